"""The devices the fuzz machine drives, each with what the model may assume about it.

A `Device` is one generation of one kind of bdev: made with `Device.make(kind, gen, seed)`,
deleted (bdev removal) with `delete()`. Its facts say what the data model may check:

- `stores_data`: reads return what was written (null: no).
- `write_zeroes_reads_zero`, `unmap_reads_zero`: what a read of the range returns afterwards,
  as each module documents it (never guessed):
  * malloc: "Write Zeroes and Unmap clear the range" (bdev/malloc.pyx);
  * aio on a regular file: Write Zeroes is fallocate(ZERO_RANGE), Unmap is
    fallocate(PUNCH_HOLE | KEEP_SIZE) (bdev/aio.pyx): a punched hole reads as zeroes;
  * NVMe on nvme.emu: Write Zeroes reads zeroes (NVM 3.3); deallocated blocks read as zeroes
    because the namespace announces DLFEAT = 001b (nvme/emu/storage.py);
  * the Python RAM disk below: both clear (it is ours);
  * null: nothing is stored.
- `needs_clock`: completions only arrive when the test's clock runs (a poller registered on the
  calling thread advances it), so a channel must not be put with I/O in flight on it (see
  machine.py).

Kinds: malloc, malloc-split (optimal I/O boundary 1, split on it: every I/O splits per block),
null, aio (a temporary file), nvme (nvme.emu controller with a small MDTS, so I/O splits, and
fault rules), py (a RAM disk in Python with a small max transfer, an I/O boundary and an alignment
that bounces), py-late (completes from a poller, in random order, and refuses with -ENOMEM now and
then), py-bad (the same, breaking the module contract now and then).
"""
import os
import random
import tempfile

import bdev
from bdev.core import PyBdev
from env.thread import current_thread

KINDS = ("malloc", "malloc-split", "null", "aio", "nvme", "py", "py-late", "py-bad")
NUM_BLOCKS = 128
BLOCK_SIZE = 512
ENOMEM = 12


class FuzzRamDisk(PyBdev):
    """A RAM disk written in Python (bdev.core.PyBdev). `late`: most I/Os are completed from a
    poller of the creating thread 1..4 polls later, in random order. `nomem`: the probability of
    refusing a submission with -ENOMEM (the layer queues it and retries). Every choice comes from
    `seed`, so an example replays."""

    def __init__(self, name, num_blocks, block_size, *, seed, late=False, nomem=0.0,
                 misbehave=0.0, **kw):
        super().__init__(name, block_size=block_size, num_blocks=num_blocks, module="fuzzram",
                         io_types=("read", "write", "write_zeroes", "unmap", "flush", "reset",
                                   "compare"), **kw)
        self.data = bytearray(num_blocks * block_size)
        self.rnd = random.Random(seed)
        self.late = late
        self.nomem = nomem
        self.misbehave = misbehave      # probability of breaking the module contract
        self.kept_views = []
        self.pending = []               # [io, polls left]
        self.destructed = 0
        self.submitted_after_destruct = 0
        self.contract_errors = []
        self.at_destruct = None
        self.poller = None
        if late or misbehave:
            self.poller = current_thread().register_poller(self._poll, 0,
                                                           name=f"fuzzram:{name}")

    def submit(self, io):
        if self.destructed:
            self.submitted_after_destruct += 1
        if self.nomem and self.rnd.random() < self.nomem:
            return -ENOMEM
        if self.misbehave and self.rnd.random() < self.misbehave:
            return self._misbehave(io)
        if io.type == "reset" and self.pending:
            # a reset completes after everything accepted before it
            self.pending.append([io, max(p[1] for p in self.pending) + 1])
            return 0
        if self.late and self.rnd.random() < 0.8:
            self.pending.append([io, self.rnd.randint(1, 4)])
            return 0
        self._execute(io)
        return 0

    def _misbehave(self, io):
        """Break the module contract in one of the ways a Python module can; the layer must
        still complete the I/O exactly once (issue 18, item 5)."""
        from tests.fuzz.known_bugs import present
        ways = ["raise", "eio", "complete_then_eio", "complete_twice", "none"]
        if not present("pybdev_submit_garbage"):
            ways.append("garbage")
        if not present("pybdev_views_outlive_io"):
            ways.append("keep_views")
        way = self.rnd.choice(ways)
        if way == "raise":
            raise RuntimeError("a module bug")
        if way == "eio":
            return -5
        if way == "garbage":
            return "not an errno"
        if way == "none":
            self._execute(io)
            return None
        if way == "keep_views":
            views = io.buffers() if io.type in ("read", "write", "compare") else []
            self._execute(io)
            self.kept_views.extend(views)      # written after completion by _poll_views
            return 0
        self._execute(io)
        if way == "complete_then_eio":
            return -5
        try:                                   # complete_twice: the second one must refuse
            io.complete("success")
        except Exception as e:
            from env.errors import UserblkError
            if not isinstance(e, UserblkError):
                self.contract_errors.append(f"a second complete() raised {e!r}")
        else:
            self.contract_errors.append("a second complete() of one I/O was accepted")
        return 0

    def _poll_views(self):
        views, self.kept_views = self.kept_views, []
        for mv in views:
            try:
                mv[:1] = b"\xee"
            except Exception:
                continue                       # refused: what should happen
            self.contract_errors.append("a view from PyIo.buffers() still wrote after its I/O "
                                        "completed")

    def _poll(self):
        if self.kept_views:
            self._poll_views()
        if not self.pending:
            return 0
        due = []
        for p in self.pending:
            p[1] -= 1
            if p[1] <= 0:
                due.append(p)
        if not due:
            return 0
        self.pending = [p for p in self.pending if p[1] > 0]
        self.rnd.shuffle(due)
        for io, _ in due:
            self._execute(io)
        return len(due)

    def _execute(self, io):
        bs = self.block_size
        pos = io.offset_blocks * bs
        status = "success"
        if io.type in ("read", "write", "compare"):
            for mv in io.buffers():
                n = mv.nbytes
                if io.type == "read":
                    mv[:] = self.data[pos:pos + n]
                elif io.type == "write":
                    self.data[pos:pos + n] = mv
                elif bytes(mv) != bytes(self.data[pos:pos + n]):
                    status = "miscompare"
                pos += n
        elif io.type in ("write_zeroes", "unmap"):
            n = io.num_blocks * bs
            self.data[pos:pos + n] = bytes(n)
        io.complete(status)

    def destruct(self):
        self.destructed += 1
        # the rule of issue 18: destruct only after every channel is put and every I/O done
        self.at_destruct = (self.channel_count, len(self.pending))
        if self.poller is not None and self.poller.is_registered:
            self.poller.unregister()


class Device:
    """One bdev under test (one generation of one kind)."""

    stores_data = True
    write_zeroes_reads_zero = True
    unmap_reads_zero = True
    needs_clock = False
    can_fail = False                   # I/O may fail without any fault injected by the machine
    kind = None

    def __init__(self, name):
        self.name = name
        self.bdev = bdev.get_bdev(name)
        self.block_size = self.bdev.block_size
        self.num_blocks = self.bdev.num_blocks

    made = 0

    @staticmethod
    def make(kind, gen, seed):
        maker = {"malloc": MallocDevice, "malloc-split": MallocSplitDevice, "null": NullDevice,
                 "aio": AioDevice, "nvme": NvmeDevice, "py": PyDevice,
                 "py-late": PyLateDevice, "py-bad": PyBadDevice}[kind]
        Device.made += 1          # names stay unique even when an example leaves one behind
        return maker(f"Fz{kind.replace('-', '')}{Device.made}g{gen}", seed)

    def supports(self, io_type):
        """What the bdev advertises (write_zeroes is emulated wherever write is)."""
        if io_type == "write_zeroes":
            return self.bdev.io_type_supported("write") or self.bdev.io_type_supported(io_type)
        return self.bdev.io_type_supported(io_type)

    def delete(self):
        raise NotImplementedError

    def cleanup(self):
        """After the machine: resources the bdev does not own (files, emulators)."""


class MallocDevice(Device):
    kind = "malloc"
    split = False

    def __init__(self, name, seed):
        from bdev import malloc
        malloc.create(name, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                      optimal_io_boundary=1 if self.split else 0,
                      split_on_optimal_io_boundary=self.split)
        super().__init__(name)

    def delete(self):
        from bdev import malloc
        malloc.delete(self.name)


class MallocSplitDevice(MallocDevice):
    kind = "malloc-split"
    split = True


class NullDevice(Device):
    kind = "null"
    stores_data = False

    def __init__(self, name, seed):
        from bdev import null
        null.create(name, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
        super().__init__(name)

    def delete(self):
        from bdev import null
        null.delete(self.name)


class AioDevice(Device):
    """A temporary file on the disk (O_DIRECT where the file system takes it)."""
    kind = "aio"

    def __init__(self, name, seed):
        from bdev import aio
        self.dir = tempfile.mkdtemp(prefix="userblk-fuzz-", dir="/var/tmp")
        self.path = os.path.join(self.dir, "disk.img")
        aio.create(name, self.path, BLOCK_SIZE, create_size=NUM_BLOCKS * BLOCK_SIZE,
                   queue_depth=16)
        super().__init__(name)

    def delete(self):
        from bdev import aio
        aio.delete(self.name)

    def cleanup(self):
        try:
            os.unlink(self.path)
            os.rmdir(self.dir)
        except OSError:
            pass


class NvmeDevice(Device):
    """One namespace of an nvme.emu controller attached through bdev.nvme. MDTS 1 (8 KiB per
    command: I/Os above 16 blocks split) and 32-entry queues (splits run out of queue entries and
    the layer retries). `emu` takes fault rules; `clock` (a poller on this thread) advances its
    time one tick per poll, so delayed commands complete, and releases held ones after a while."""
    kind = "nvme"
    needs_clock = True
    RELEASE_HELD_AFTER = 16            # polls

    def __init__(self, name, seed):
        from bdev import nvme as bdev_nvme
        from nvme.emu import EmulatedController, EmuNamespace
        self.ctrlr_name = name + "c"
        self.emu = EmulatedController([EmuNamespace(NUM_BLOCKS, BLOCK_SIZE)], mdts=1, mqes=31,
                                      name=f"emu-{name}")
        bdev_nvme.attach_emulated(self.ctrlr_name, self.emu)
        self.polls = 0
        self.clock = current_thread().register_poller(self._tick, 0, name=f"emu-clock:{name}")
        super().__init__(self.ctrlr_name + "n1")

    def _tick(self):
        self.polls += 1
        n = self.emu.tick()
        if self.emu.held and self.polls % self.RELEASE_HELD_AFTER == 0:
            n += self.emu.release()
        return n

    def delete(self):
        from bdev import nvme as bdev_nvme
        bdev_nvme.detach_controller(self.ctrlr_name)

    def controller_gone(self):
        from bdev import nvme as bdev_nvme
        return not any(c.name == self.ctrlr_name for c in bdev_nvme.controllers())

    def cleanup(self):
        if self.clock.is_registered:
            self.clock.unregister()


class PyDevice(Device):
    """The Python RAM disk completing inside its submission, behind the layer's machinery: a
    maximum transfer of 5 blocks, an optimal boundary of 8 (split on it), a required alignment
    of 64 bytes (misaligned buffers bounce)."""
    kind = "py"
    late = False
    nomem = 0.0
    misbehave = 0.0

    def __init__(self, name, seed):
        self.module = FuzzRamDisk(name, NUM_BLOCKS, BLOCK_SIZE, seed=seed, late=self.late,
                                  nomem=self.nomem, misbehave=self.misbehave,
                                  max_transfer_blocks=5, optimal_io_boundary=8,
                                  split_on_optimal_io_boundary=True,
                                  required_alignment=64).register()
        self.needs_clock = self.late
        super().__init__(name)

    def delete(self):
        self.module.unregister()

    def cleanup(self):
        if self.module.poller is not None and self.module.poller.is_registered:
            self.module.poller.unregister()


class PyLateDevice(PyDevice):
    kind = "py-late"
    late = True
    nomem = 0.15


class PyBadDevice(PyDevice):
    """The Python RAM disk breaking its contract now and then: submit raises, returns an errno
    without completing, completes and returns an errno, completes twice, returns None (and,
    once their fixes are in, returns garbage, keeps PyIo.buffers() views after completion)."""
    kind = "py-bad"
    late = True
    misbehave = 0.2
    can_fail = True
