"""`userblk perf`: a bdevperf-like workload generator on bdev stacks.

    userblk perf                                  # 3 s of 4 KiB randread, QD 32, 64 MiB malloc
    userblk perf -q 128 -o 4k -w randrw -M 70 -t 10 --config stack.json -b Nvme0n1 -j 2
    userblk perf -w verify -t 5 --results out.json --plot latency.png

Options are spelled as bdevperf spells them (-q, -o, -w, -t, -M, -m, --json). Each job is one
(thread, bdev) pair: an OS thread with its own env Thread, its own descriptor channel and its own
`env.workload.Workload` (bdev.perf adapter), whose I/O loop runs in C without the GIL. The Python
side only sets up, samples progress (the Workloads' `completed` counters, read lock-free from the
main thread once a second) and the process's RSS, and prints. A Workload's run() occupies its OS
thread, so every job has an OS thread of its own: `-j 2 -b A,B` runs four (with `-m`, the jobs of
one core are pinned to that core and share it).

`verify` (bdevperf's verify) writes a pattern (per block: its number, a generation, the job; the
rest a fill byte) and reads it back into a cleared buffer, comparing; miscompares are counted and
the first ones described. It runs in the same C loop as the other workloads. Jobs of one bdev
verify disjoint parts of it.

Ctrl-C (or SIGTERM) stops the jobs; the figures of the time run so far are printed and saved, and
the exit status is 130.
"""
import argparse
import datetime
import json
import os
import platform
import re
import resource
import signal
import socket
import sys
import threading
import time

from env.errors import InvalidArgument, UserblkError

WORKLOADS = ("read", "write", "randread", "randwrite", "rw", "randrw", "verify")
MIXED = ("rw", "randrw")
READ_ONLY = ("read", "randread")
DEFAULT_SECONDS = 3.0
DEFAULT_QUEUE_DEPTH = 32
DEFAULT_IO_SIZE = 4096
DEFAULT_SIZE = 64 << 20
DEFAULT_BLOCK_SIZE = 512
DEFAULT_NAMES = {"malloc": "Malloc0", "null": "Null0"}
PERCENTILES = ("p50", "p90", "p99", "p99.9")
RESULTS_SCHEMA = "userblk-perf/1"


class PerfError(UserblkError):
    """A perf run could not be done."""


class UsageError(PerfError, InvalidArgument):
    """A bad option or a combination that cannot work (exit status 2)."""


# ---- option parsing ---------------------------------------------------------------------------
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text):
    """Bytes of "4096", "4k", "128K", "1M", "4KiB", "64MB" (binary units, as SPDK's
    spdk_parse_capacity)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4096, 4k, 128K, 1M)")
    value = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, not {text!r}")
    return value


def parse_core_mask(text):
    """Cores of an SPDK core mask: hex ("0x3", "F") or a list ("[0,1,4-6]")."""
    t = str(text).strip()
    cores = set()
    if t.startswith("["):
        if not t.endswith("]"):
            raise argparse.ArgumentTypeError(f"core list {text!r} lacks its closing ]")
        for part in filter(None, (p.strip() for p in t[1:-1].split(","))):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise argparse.ArgumentTypeError(f"{part!r} in {text!r} is not a core or range")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise argparse.ArgumentTypeError(f"range {part!r} in {text!r} is reversed")
            cores.update(range(lo, hi + 1))
    else:
        try:
            mask = int(t, 16)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither a hex core mask (0x3) nor a "
                                             "core list ([0,1])") from None
        cores = {i for i in range(mask.bit_length()) if mask >> i & 1}
    if not cores:
        raise argparse.ArgumentTypeError(f"core mask {text!r} selects no core")
    return sorted(cores)


def _positive_int(text):
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {v}")
    return v


def _seconds(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0 or v > 1e7:
        raise argparse.ArgumentTypeError(f"seconds must be positive, not {text!r}")
    return v


def _percent(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage") from None
    if not 0 <= v <= 100:
        raise argparse.ArgumentTypeError(f"a read percentage is within 0..100, not {v}")
    return v


class _BdevList(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        names = list(getattr(namespace, self.dest, None) or [])
        for n in str(values).split(","):
            n = n.strip()
            if not n:
                raise argparse.ArgumentError(self, f"empty bdev name in {values!r}")
            if n not in names:
                names.append(n)
        setattr(namespace, self.dest, names)


def add_arguments(p):
    """The options of `userblk perf` (bdevperf's spelling where bdevperf has the option)."""
    w = p.add_argument_group("workload")
    w.add_argument("-q", "--queue-depth", type=_positive_int, default=DEFAULT_QUEUE_DEPTH,
                   metavar="N", help=f"I/Os in flight per job (default {DEFAULT_QUEUE_DEPTH})")
    w.add_argument("-o", "--io-size", type=parse_size, default=DEFAULT_IO_SIZE, metavar="SIZE",
                   help="bytes per I/O: 4096, 4k, 128K, 1M (default 4096)")
    w.add_argument("-w", "--workload", choices=WORKLOADS, default="randread", metavar="TYPE",
                   help=f"{', '.join(WORKLOADS)} (default randread)")
    w.add_argument("-t", "--time", type=_seconds, default=DEFAULT_SECONDS, metavar="SECONDS",
                   dest="seconds", help=f"run time (default {DEFAULT_SECONDS:g})")
    w.add_argument("-M", "--rwmixread", type=_percent, default=None, metavar="PCT",
                   help="read percentage of rw and randrw (default 50)")
    w.add_argument("--seed", type=int, default=1, help="random offset seed (jobs derive theirs)")
    s = p.add_argument_group("devices")
    s.add_argument("-b", "--bdev", action=_BdevList, default=None, metavar="NAME[,NAME]",
                   help="bdev(s) to run on; repeatable or a comma list (default: every bdev "
                   "the config creates, or the in-memory default bdev)")
    s.add_argument("-c", "--config", "--json", dest="config", metavar="FILE",
                   help="SPDK JSON config that builds the bdev stack (bdev subsystem)")
    s.add_argument("--bdev-type", choices=tuple(DEFAULT_NAMES), default="malloc",
                   help="without --config: the in-memory bdev to make (default malloc: "
                   "Malloc0; null: Null0)")
    s.add_argument("--size", type=parse_size, default=None, metavar="SIZE",
                   help="without --config: size of that bdev (default 64M)")
    s.add_argument("--block-size", type=parse_size, default=None, metavar="SIZE",
                   help=f"without --config: its block size (default {DEFAULT_BLOCK_SIZE})")
    t = p.add_argument_group("threads")
    t.add_argument("-j", "--threads", type=_positive_int, default=None, metavar="N",
                   help="OS threads, each with its own channel and a job on every bdev "
                   "(default 1)")
    t.add_argument("-m", "--cpumask", type=parse_core_mask, default=None, metavar="MASK",
                   help="core mask (0x3) or list ([0,2]): a thread per core, pinned to it")
    o = p.add_argument_group("output")
    o.add_argument("--results", metavar="FILE", help="write the figures as JSON to FILE")
    o.add_argument("--plot", metavar="FILE.png", help="draw the merged latency histogram "
                   "(needs matplotlib: pip install 'userblk[plot]')")
    o.add_argument("--no-progress", action="store_true",
                   help="no progress line on stderr (default: a line about once a second)")
    return p


# ---- machine facts ----------------------------------------------------------------------------
def rss_bytes():
    """The process's resident set size now (bytes), from /proc/self/statm."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes():
    """The process's peak resident set size so far (VmHWM; getrusage as the fallback)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine_info():
    info = {"hostname": socket.gethostname(), "platform": platform.platform(),
            "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "cpus_allowed": len(os.sched_getaffinity(0)),
            "cpu_model": None, "memory_bytes": None}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["memory_bytes"] = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    try:
        from env import sysinfo
        facts = sysinfo.gather()
        for key in ("kernel", "hugepages", "iommu", "dma_backend"):
            info[key] = facts.get(key)
    except Exception as e:                     # facts are a bonus, never a failure
        info["sysinfo_error"] = str(e)
    return info


# ---- jobs -------------------------------------------------------------------------------------
class Job:
    """One (thread, bdev) pair: set up on its own OS thread, then run when told to."""

    def __init__(self, index, thread_index, bdev, core, opts, offset_bytes, range_bytes):
        self.index = index
        self.thread_index = thread_index
        self.bdev = bdev
        self.core = core
        self.opts = opts
        self.offset_bytes = offset_bytes
        self.range_bytes = range_bytes
        where = f"core {core}" if core is not None else f"thread {thread_index}"
        self.name = f"{bdev.name} ({where})"
        self.engine = None
        self.result = None
        self.error = None
        self.ready = threading.Event()
        self.done = threading.Event()
        self.os_thread = None

    def start(self, go, abort):
        self.os_thread = threading.Thread(target=self._main, args=(go, abort),
                                          name=f"perf-{self.index}", daemon=True)
        self.os_thread.start()

    def _main(self, go, abort):
        import bdev
        from bdev import perf
        from env.thread import Thread
        th = desc = ch = None
        o = self.opts
        try:
            try:
                if self.core is not None:
                    os.sched_setaffinity(0, {self.core})     # this OS thread only
                th = Thread(f"perf-{self.index}")
                th.bind()
                desc = bdev.open_bdev(self.bdev.name, write=o.workload not in READ_ONLY)
                ch = desc.get_io_channel()
                seed = (o.seed * 0x9E3779B97F4A7C15 + self.index * 0xBF58476D1CE4E5B9) \
                    & 0xFFFFFFFFFFFFFFFF or 1
                self.engine = perf.make_workload(
                    desc, ch, queue_depth=o.queue_depth, io_size=o.io_size,
                    workload=o.workload, seconds=o.seconds, read_pct=o.read_pct,
                    range_bytes=self.range_bytes, offset_bytes=self.offset_bytes, seed=seed,
                    job=self.index)
            except BaseException as e:
                self.error = e
                return
            finally:
                self.ready.set()
            go.wait()
            if abort.is_set():
                return
            try:
                self.result = self.engine.run()
            except BaseException as e:
                self.error = e
        finally:
            try:
                if ch is not None:
                    ch.put()
                if desc is not None:
                    desc.close()
                if th is not None:
                    th.exit()
                    th.destroy()
            except BaseException as e:
                if self.error is None:
                    self.error = e
            self.done.set()

    @property
    def completed(self):
        e = self.engine
        return e.completed if e is not None else 0

    def stop(self):
        if self.engine is not None:
            self.engine.stop()


def _latency(hist):
    s = hist.summary()
    return {k: (v / 1000.0 if k != "count" else v) for k, v in s.items()}


# ---- the run ----------------------------------------------------------------------------------
class Progress:
    """The live line on stderr: rewritten in place on a terminal, a line per tick otherwise."""

    def __init__(self, stream, enabled, total_seconds, io_size):
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.total = total_seconds
        self.io_size = io_size
        self.last_len = 0

    def show(self, elapsed, iops, jobs, note=""):
        if not self.enabled:
            return
        mibs = iops * self.io_size / (1 << 20)
        line = (f"[{elapsed:6.1f}/{self.total:g} s] {iops:14,.0f} IOPS {mibs:11,.2f} MiB/s  "
                f"({jobs} job{'s' if jobs != 1 else ''}){note}")
        if self.tty:
            pad = max(0, self.last_len - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.last_len = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text):
        if self.tty and self.last_len:
            self.stream.write("\n")
            self.last_len = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def end(self):
        if self.tty and self.last_len:
            self.stream.write("\n")
            self.stream.flush()
            self.last_len = 0


class PerfRun:
    """A perf run from parsed options: build the stack, run the jobs, gather the figures."""

    def __init__(self, opts, out=None, err=None):
        self.opts = opts
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.created = []
        self.bdevs = []
        self.jobs = []
        self.rss_samples = []
        self.interrupted = False
        self.started_at = None
        self.progress = Progress(self.err, not opts.no_progress, opts.seconds, opts.io_size)

    # -- set-up --
    def build_stack(self):
        import bdev
        from bdev import config
        o = self.opts
        if o.config:
            self.created = config.load_config(o.config)
            if not self.created and not o.bdev:
                raise UsageError(f"{o.config} creates no bdev (and no -b names one)")
        else:
            size = o.size or DEFAULT_SIZE
            bs = o.block_size or DEFAULT_BLOCK_SIZE
            name = DEFAULT_NAMES[o.bdev_type]
            if o.bdev and o.bdev != [name]:
                raise UsageError(f"no bdev named {', '.join(n for n in o.bdev if n != name)}: "
                                 f"without --config, userblk perf makes one {o.bdev_type} bdev, "
                                 f"{name} (give --config FILE to build a stack)")
            if size % bs:
                raise UsageError(f"--size {size} is not a multiple of the block size {bs}")
            mod = __import__(f"bdev.{o.bdev_type}", fromlist=["create"])
            try:
                self.created = [mod.create(name, size=size, block_size=bs)]
            except InvalidArgument as e:
                raise UsageError(f"cannot make the {o.bdev_type} bdev: {e}") from e
        names = o.bdev or [b.name for b in self.created]
        out = []
        for n in names:
            try:
                out.append(bdev.get_bdev(n))
            except bdev.BdevNotFound as e:
                raise UsageError(str(e)) from None
        self.bdevs = out

    def _check(self):
        o = self.opts
        for b in self.bdevs:
            if o.io_size % b.block_size:
                raise UsageError(f"-o {o.io_size} is not a multiple of the block size "
                                 f"{b.block_size} of {b.name}")
            if o.io_size > b.size:
                raise UsageError(f"-o {o.io_size} is larger than {b.name} ({b.size} bytes)")
            limit = getattr(b, "channel_ios", None)
            if limit and o.queue_depth > limit:
                raise UsageError(f"-q {o.queue_depth} is more than a channel of {b.name} holds "
                                 f"({limit} I/Os)")
            if o.workload not in READ_ONLY and not b.io_type_supported("write"):
                raise UsageError(f"{b.name} does not support writes ({o.workload} writes)")

    def make_jobs(self):
        o = self.opts
        cores = o.cpumask
        nthreads = len(cores) if cores else (o.threads or 1)
        jobs = []
        for b in self.bdevs:
            share = nthreads if o.workload == "verify" else 1
            part = (b.size // share) // o.io_size * o.io_size
            if o.workload == "verify" and part // o.io_size < o.queue_depth:
                raise UsageError(f"verify on {b.name}: a job's part of the bdev holds "
                                 f"{part // o.io_size} I/Os of {o.io_size} bytes, fewer than the "
                                 f"queue depth {o.queue_depth} (use a smaller -q or -o, fewer "
                                 "threads, or a larger bdev)")
            for t in range(nthreads):
                if o.workload == "verify":
                    off, rng = t * part, part
                else:
                    off, rng = 0, b.size // o.io_size * o.io_size
                jobs.append((t, b, cores[t] if cores else None, off, rng))
        jobs.sort(key=lambda j: (j[0], j[1].name))
        self.jobs = [Job(i, t, b, c, o, off, rng) for i, (t, b, c, off, rng) in enumerate(jobs)]

    # -- running --
    def _sample_rss(self, t0):
        v = rss_bytes()
        if v is not None:
            self.rss_samples.append({"t": round(time.monotonic() - t0, 3), "rss_bytes": v})

    def run_jobs(self):
        go, abort = threading.Event(), threading.Event()
        jobs = self.jobs
        try:
            for j in jobs:
                j.start(go, abort)
            for j in jobs:
                j.ready.wait()
        except BaseException:
            abort.set()
            go.set()
            for j in jobs:
                if j.os_thread is not None:
                    j.os_thread.join()
            raise
        failed = [j for j in jobs if j.error is not None]
        if failed:
            abort.set()
            go.set()
            for j in jobs:
                j.os_thread.join()
            e = failed[0].error
            if isinstance(e, UsageError):
                raise e
            raise PerfError(f"setting up job {failed[0].name} failed: {type(e).__name__}: "
                            f"{e}") from e
        # this thread's env Thread runs what the stack set up here (e.g. an NVMe controller's
        # admin poller): keep polling it while the jobs run
        from env.thread import current_thread
        home = current_thread()
        self.started_at = datetime.datetime.now(datetime.timezone.utc)
        t0 = time.monotonic()
        self._sample_rss(t0)
        go.set()
        last_t, last_n = t0, 0
        next_tick = t0 + 1.0
        while True:
            try:
                alive = [j for j in jobs if not j.done.is_set()]
                if not alive:
                    break
                if self.interrupted:           # a job that had not yet started its run
                    for j in alive:
                        j.stop()
                alive[0].done.wait(max(0.0, min(next_tick - time.monotonic(), 0.01)))
                home.poll()
                now = time.monotonic()
                if now >= next_tick:
                    n = sum(j.completed for j in jobs)
                    self.progress.show(now - t0, (n - last_n) / max(now - last_t, 1e-9),
                                       len(jobs), "  stopping" if self.interrupted else "")
                    last_t, last_n = now, n
                    self._sample_rss(t0)
                    next_tick += 1.0
                    if next_tick < now:
                        next_tick = now + 1.0
            except KeyboardInterrupt:
                if self.interrupted:
                    raise                      # a second Ctrl-C: give up waiting
                self.interrupted = True
                for j in jobs:
                    j.stop()
                self.progress.message("userblk perf: interrupted: stopping the jobs (partial "
                                      "results follow; Ctrl-C again to abandon them)")
        self._sample_rss(t0)
        elapsed = time.monotonic() - t0
        self.progress.show(elapsed, sum(j.completed for j in jobs) / max(elapsed, 1e-9),
                           len(jobs), "  done (average)")
        self.progress.end()
        errs = [j for j in jobs if j.error is not None]
        if errs:
            e = errs[0].error
            raise PerfError(f"job {errs[0].name} failed: {type(e).__name__}: {e}") from e

    def run(self):
        """Everything but the output; returns the results dict."""
        self.build_stack()
        self._check()
        self.make_jobs()
        self.print_header()
        old = None
        if threading.current_thread() is threading.main_thread():
            def on_term(signum, frame):
                raise KeyboardInterrupt
            old = signal.signal(signal.SIGTERM, on_term)
        try:
            self.run_jobs()
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
        return self.results()

    def teardown(self):
        from bdev import config
        created, self.created = self.created, []
        config.teardown(created)

    # -- figures --
    def results(self):
        from env.histogram import Histogram
        o = self.opts
        merged = Histogram()
        jobs = []
        for j in self.jobs:
            r = dict(j.result or {})
            if not r:
                continue
            merged.merge(j.engine.histogram)
            r = {"name": j.name, "bdev": j.bdev.name, "thread": j.thread_index, "core": j.core,
                 "offset_bytes": j.offset_bytes, "range_bytes": j.range_bytes, **r}
            r["fail_per_s"] = r["errors"] / r["seconds"]
            jobs.append(r)
        total = {"seconds": max((r["seconds"] for r in jobs), default=0.0)}
        for k in ("ios", "reads", "writes", "errors", "submit_errors"):
            total[k] = sum(r[k] for r in jobs)
        for k in ("iops", "mib_per_s", "fail_per_s"):
            total[k] = sum(r[k] for r in jobs)
        total["latency_us"] = _latency(merged)
        if o.workload == "verify":
            total["miscompares"] = sum(r.get("miscompares", 0) for r in jobs)
        samples = self.rss_samples
        after = [s["rss_bytes"] for s in samples if s["t"] >= 1.0]
        base = after[0] if after else None
        return {
            "schema": RESULTS_SCHEMA,
            "userblk_version": _version(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "interrupted": self.interrupted,
            "parameters": {
                "workload": o.workload, "queue_depth": o.queue_depth, "io_size": o.io_size,
                "seconds": o.seconds,
                "read_pct": o.read_pct if o.workload in MIXED else None,
                "threads": len(o.cpumask) if o.cpumask else (o.threads or 1),
                "cores": o.cpumask, "bdevs": [b.name for b in self.bdevs],
                "config": os.path.abspath(o.config) if o.config else None,
                "default_bdev": None if o.config else {
                    "type": o.bdev_type, "size": o.size or DEFAULT_SIZE,
                    "block_size": o.block_size or DEFAULT_BLOCK_SIZE},
                "seed": o.seed,
            },
            "machine": machine_info(),
            "bdevs": [{"name": b.name, "module": b.module, "product_name": b.product_name,
                       "block_size": b.block_size, "num_blocks": b.num_blocks,
                       "size_bytes": b.size} for b in self.bdevs],
            "jobs": jobs,
            "total": total,
            "latency_histogram_ns": [list(t) for t in merged.buckets_nonzero()],
            # VmHWM lags the per-thread RSS counters a little: never below a sample
            "rss": {"peak_bytes": max([peak_rss_bytes()] + [s["rss_bytes"] for s in samples]),
                    "samples": samples,
                    "growth_after_first_second_bytes":
                        (max(after) - base) if base is not None else None},
        }

    # -- output --
    def print_header(self):
        o = self.opts
        devs = ", ".join(f"{b.name}: {_human(b.size)} {b.module}, {b.block_size}-byte blocks"
                         for b in self.bdevs)
        mix = f" ({o.read_pct}% reads)" if o.workload in MIXED else ""
        n = len(self.jobs)
        print(f"Running {o.workload}{mix} for {o.seconds:g} s: queue depth {o.queue_depth}, "
              f"{o.io_size}-byte I/O, {n} job{'s' if n != 1 else ''} ({devs})", file=self.out)
        self.out.flush()

    def print_table(self, res):
        print(format_table(res), file=self.out)
        self.out.flush()


def _version():
    try:
        from userblk import __version__
        return __version__
    except ImportError:
        return None


def _human(n):
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} B"


def format_table(res):
    """bdevperf's table: a row per job, a Total row; latencies in microseconds."""
    verify = res["parameters"]["workload"] == "verify"
    cols = [("Runtime(s)", "seconds", "{:.2f}"), ("IOPS", "iops", "{:.2f}"),
            ("MiB/s", "mib_per_s", "{:.2f}"), ("Fail/s", "fail_per_s", "{:.2f}")]
    if verify:
        cols.append(("Miscomp", "miscompares", "{:d}"))
    lat = [("Average", "mean"), ("min", "min"), ("max", "max")] + [(p, p) for p in PERCENTILES]
    rows = [(j["name"], j) for j in res["jobs"]] + [("Total", res["total"])]
    cells = []
    for name, r in rows:
        c = [name] + [f.format(r.get(k, 0)) for _, k, f in cols]
        c += [f"{r['latency_us'][k]:.2f}" for _, k in lat]
        cells.append(c)
    heads = ["Job"] + [h for h, _, _ in cols] + [h for h, _ in lat]
    widths = [max(len(heads[i]), *(len(c[i]) for c in cells)) for i in range(len(heads))]
    def line(c):
        return "  ".join([c[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(c[1:],
                                                                            widths[1:])])
    nlat = len(lat)
    lat_width = sum(widths[-nlat:]) + 2 * (nlat - 1)
    head1 = " " * (len(line(heads)) - lat_width) + "Latency (us)".center(lat_width).rstrip()
    out = [head1, line(heads)]
    out += [line(c) for c in cells[:-1]]
    out.append("=" * len(line(heads)))
    out.append(line(cells[-1]))
    return "\n".join(out)


def plot_available():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_histogram(res, hist_buckets, path):
    """Draw the merged latency histogram (and its CDF) to `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    p = res["parameters"]
    fig, ax = plt.subplots(figsize=(9, 5))
    total = sum(c for _, _, c in hist_buckets) or 1
    if hist_buckets:
        lefts = [lo / 1000.0 for lo, _, _ in hist_buckets]
        widths = [max((hi + 1 - lo) / 1000.0, 1e-3) for lo, hi, _ in hist_buckets]
        ax.bar(lefts, [100.0 * c / total for _, _, c in hist_buckets], width=widths,
               align="edge", color="#4878a8", edgecolor="#4878a8", label="I/Os (%)")
        ax.set_xscale("log")
        cdf, acc = [], 0
        for _, _, c in hist_buckets:
            acc += c
            cdf.append(100.0 * acc / total)
        ax2 = ax.twinx()
        ax2.step([(hi + 1) / 1000.0 for _, hi, _ in hist_buckets], cdf, where="post",
                 color="#c0504d", label="cumulative (%)")
        ax2.set_ylim(0, 100.5)
        ax2.set_ylabel("cumulative %")
        lat = res["total"]["latency_us"]
        for key, style in (("p50", ":"), ("p99", "--"), ("p99.9", "-.")):
            ax.axvline(lat[key], color="gray", linestyle=style, linewidth=1)
            ax.annotate(f"{key} {lat[key]:.1f}", (lat[key], 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", fontsize=8, color="gray")
    ax.set_xlabel("latency (µs)")
    ax.set_ylabel("% of I/Os")
    t = res["total"]
    ax.set_title(f"userblk perf {p['workload']} QD {p['queue_depth']} {p['io_size']} B on "
                 f"{', '.join(p['bdevs'])}: {t['iops']:,.0f} IOPS, mean "
                 f"{t['latency_us']['mean']:.1f} µs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- entry point ------------------------------------------------------------------------------
def validate(opts):
    """Check option combinations (argparse checked each option); fills `opts.read_pct`."""
    if opts.rwmixread is not None and opts.workload not in MIXED:
        raise UsageError(f"-M (read percentage) applies to rw and randrw, not {opts.workload}")
    opts.read_pct = opts.rwmixread if opts.rwmixread is not None else 50
    if opts.threads is not None and opts.cpumask is not None:
        raise UsageError("give -j (threads) or -m (core mask), not both")
    if opts.cpumask:
        allowed = os.sched_getaffinity(0)
        bad = [c for c in opts.cpumask if c not in allowed]
        if bad:
            raise UsageError(f"core{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of "
                             f"-m {'is' if len(bad) == 1 else 'are'} not available (this process "
                             f"may use {', '.join(map(str, sorted(allowed)))})")
    if opts.config and (opts.size or opts.block_size or opts.bdev_type != "malloc"):
        raise UsageError("--bdev-type, --size and --block-size make the default bdev; they do "
                         "not go with --config")
    if opts.plot and not plot_available():
        raise PerfError("--plot needs matplotlib, which is not installed: "
                        "pip install 'userblk[plot]' (or pip install matplotlib)")
    for path, what in ((opts.results, "--results"), (opts.plot, "--plot")):
        if path:
            d = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(d):
                raise UsageError(f"{what} {path}: directory {d} does not exist")
    return opts


def main(opts, out=None, err=None):
    """Run `userblk perf` with parsed options; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    validate(opts)
    run = PerfRun(opts, out, err)
    try:
        res = run.run()
    finally:
        run.teardown()
    run.print_table(res)
    peak = res["rss"]["peak_bytes"]
    if peak:
        print(f"Peak RSS: {peak / (1 << 20):.1f} MiB", file=out)
    status = 0
    if res["interrupted"]:
        print("Interrupted: the figures cover the time run so far.", file=out)
        status = 130
    if res["total"].get("miscompares"):
        ex = [e for j in res["jobs"] for e in j.get("miscompare_examples", [])][:3]
        print(f"verify: {res['total']['miscompares']} miscompare(s); first: "
              + "; ".join(f"offset {e['offset']} byte {e['byte']}: expected {e['expected']} "
                          f"read {e['read']}" for e in ex), file=err)
        status = status or 1
    if res["total"]["errors"] or res["total"]["submit_errors"]:
        print(f"userblk perf: {res['total']['errors']} I/O error(s), "
              f"{res['total']['submit_errors']} submission error(s)", file=err)
        status = status or 1
    if opts.results:
        with open(opts.results, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
        print(f"Results: {opts.results}", file=out)
    if opts.plot:
        plot_histogram(res, res["latency_histogram_ns"], opts.plot)
        print(f"Latency plot: {opts.plot}", file=out)
    out.flush()
    return status
