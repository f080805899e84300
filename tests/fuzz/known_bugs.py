"""Defects of today's code that the fuzz machine found or that issue 18 lists, one switch each.

While a defect is `present`, the machine steps around it (or accepts its wrong symptom) so that
the suite passes, and its minimal reproducer in test_known_bugs.py is an
`xfail(strict=True)`. When a fix is merged, that reproducer passes, strict xfail turns it into a
failure, and whoever merged the fix sets `present=False` here: the reproducer then runs as a
plain regression test and the machine covers the case again.

To try the machine as if some were fixed, without editing this file:
    USERBLK_FUZZ_ASSUME_FIXED=negative_int_overflow,put_channel_message   (or =all)
"""
import os


class Bug:
    def __init__(self, name, summary, present=True):
        self.name = name
        self.summary = summary
        self._present = present

    @property
    def present(self):
        fixed = {s.strip() for s in os.environ.get("USERBLK_FUZZ_ASSUME_FIXED", "").split(",")}
        if "all" in fixed or self.name in fixed:
            return False
        return self._present

    def __repr__(self):
        return f"<Bug {self.name} {'present' if self.present else 'fixed'}>"


BUGS = {b.name: b for b in [
    Bug("nvme_unmap_stale_context",
        "the NVMe bdev's unmap starts from where the last unmap of a reused I/O object ended "
        "(driver_ctx never cleared): it deallocates blocks nobody asked for, or sends a range "
        "list of garbage and fails with Data Transfer Error (issue 18, item 1)", present=False),
    Bug("negative_int_overflow",
        "a negative or >= 2**64 offset, length or size raises a bare OverflowError "
        "(issue 18, 'Unclear or wrong errors')", present=False),
    Bug("wrong_type_typeerror",
        "an argument of the wrong type (a float or str offset, a str buffer, a list as I/O "
        "type...) raises a bare TypeError instead of a userblk InvalidArgument"),
    Bug("float_truncated",
        "a float offset or length is truncated silently: d.read_blocks(ch, buf, 1.5, 1) reads "
        "block 1, d.read(ch, buf, 1024.9) reads at 1024", present=False),
    Bug("vector_iterator_refs",
        "readv/writev given an iterator of buffers (a generator) keep no reference to them: "
        "the references are built by a second pass over the exhausted iterator, so DmaBuffers "
        "are not pinned (free() succeeds under the I/O) and other buffers may be freed in flight"),
    Bug("put_channel_message",
        "I/O on a channel that was put() fails with ResourceExhausted 'no free I/O object' "
        "instead of saying the channel was released (issue 18)", present=False),
    Bug("flush_range_unchecked",
        "FLUSH beyond the end of the bdev, or of zero bytes, is accepted (issue 18)", present=False),
    Bug("destruct_before_io_done",
        "a bdev's destruct runs when its last descriptor closes, while channels are still held "
        "and I/O is in flight: a split malloc I/O then writes freed memory and the process "
        "segfaults (issue 18, item 2)", present=False),
    Bug("pybdev_submit_garbage",
        "a PyBdev.submit that returns something other than an int (or None) loses the I/O: it "
        "never completes and `outstanding` stays 1 (issue 18, item 5)", present=False),
    Bug("pybdev_views_outlive_io",
        "memoryviews from PyIo.buffers() still work after the I/O completed: a module that "
        "keeps one writes into memory the I/O no longer owns (issue 18, item 3)", present=False),
    Bug("nvme_options_unvalidated",
        "ControllerOptions(io_timeout_s=-1 | nan | '5', io_queue_requests=0) are accepted at "
        "attach and fail later, at get_io_channel (issue 18)", present=False),
    Bug("config_raw_errors",
        "load_config lets raw exceptions out: a file that is not UTF-8 (UnicodeDecodeError), "
        "JSON nested 100,000 deep (RecursionError), \"method\": [\"a\"] (TypeError: "
        "unhashable) (issue 18)"),
    Bug("malloc_create_bad_args",
        "malloc.create(size='64M') raises TypeError, block_size=0 ZeroDivisionError (issue 18)", present=False),
]}


def present(name):
    return BUGS[name].present
