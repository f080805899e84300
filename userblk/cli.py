"""The `userblk` command: one entry point, a subcommand per job.

    userblk env                 what this machine offers (hugepages, IOMMU, vfio/uio, NVMe devices)
    userblk identify [TRID]     Identify Controller/Namespace of an NVMe controller, like
                                `nvme id-ctrl` + `nvme id-ns` (needs root; `emu` for the emulator)
    userblk perf [OPTIONS]      a bdevperf-like workload generator (no options: 3 s of 4 KiB
                                randread at QD 32 on a 64 MiB malloc bdev; see userblk/perf.py)
"""
import argparse
import json
import logging
import sys

from userblk import __version__


def cmd_env(args):
    from env import sysinfo
    info = sysinfo.gather()
    print(json.dumps(info, indent=2) if args.json else sysinfo.format_text(info))
    return 0


def _open_controller(trid):
    """An attached controller for `trid` ("emu": the in-process emulated controller; None: the
    first NVMe PCI function of this machine)."""
    import nvme
    from nvme.controller import Controller
    if trid == "emu":
        from nvme.emu import EmulatedController
        return Controller(EmulatedController().transport, name="emu").init()
    if trid is None:
        devices = nvme.probe()
        if not devices:
            from env.errors import PciError
            raise PciError("no NVMe PCI function on this machine (see `userblk env`)")
        trid = str(devices[0].address)
    return nvme.attach(trid)


def cmd_identify(args):
    ctrlr = _open_controller(args.trid)
    try:
        nsids = [args.nsid] if args.nsid else sorted(ctrlr.namespaces)
        if args.json:
            out = {"controller": ctrlr.data.to_dict(),
                   "namespaces": {str(n): ctrlr.namespace(n).data.to_dict() for n in nsids}}
            print(json.dumps(out, indent=2, default=str))
            return 0
        print(f"NVME Identify Controller ({ctrlr.name}):")
        print(ctrlr.data.format_text())
        for n in nsids:
            print(f"NVME Identify Namespace {n}:")
            print(ctrlr.namespace(n).data.format_text())
    finally:
        ctrlr.detach(restore_driver=not args.keep)
    return 0


def cmd_perf(args):
    from userblk import perf
    try:
        return perf.main(args)
    except perf.UsageError as e:
        print(f"userblk perf: error: {e}", file=sys.stderr)
        return 2


PERF_EPILOG = """\
examples:
  userblk perf                                   3 s randread, QD 32, 4 KiB, 64 MiB malloc bdev
  userblk perf -w randrw -M 70 -q 64 -o 16k -t 10 -j 2
  userblk perf --config stack.json -b Nvme0n1 -w randwrite -t 30 --results out.json
  userblk perf -w verify -t 5                    write, read back, compare

Each job is one (thread, bdev) pair with its own channel; its I/O loop runs in C without the GIL.
Ctrl-C stops the run and prints the figures so far (exit status 130). Exit status 1 when I/Os
failed or verify found miscompares, 2 for bad options."""


def build_parser():
    p = argparse.ArgumentParser(prog="userblk", description="user-space, polled-mode block "
                                "devices for Python")
    p.add_argument("--version", action="version", version=f"userblk {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    e = sub.add_parser("env", help="show what this machine offers (hugepages, IOMMU, vfio, NVMe)")
    e.add_argument("--json", action="store_true", help="print JSON instead of text")
    e.set_defaults(func=cmd_env)

    i = sub.add_parser("identify", help="Identify Controller and Namespace data of an NVMe "
                       "controller (takes it from the kernel driver for the time of the command)")
    i.add_argument("trid", nargs="?", help="PCI address (0000:00:04.0), SPDK transport id "
                   "('trtype:PCIe traddr:0000:00:04.0') or 'emu' (in-process emulated "
                   "controller); default: the first NVMe function")
    i.add_argument("-n", "--nsid", type=int, help="only this namespace")
    i.add_argument("--json", action="store_true", help="nvme-cli JSON key names")
    i.add_argument("--keep", action="store_true", help="leave the device on vfio-pci/uio "
                   "afterwards instead of giving it back to the kernel driver")
    i.set_defaults(func=cmd_identify)

    from userblk import perf
    pf = sub.add_parser("perf", help="bdevperf-like workload generator (IOPS, MiB/s, latency "
                        "percentiles) on a bdev stack; no options: 3 s randread on 64 MiB malloc",
                        description="Measure a bdev stack like SPDK's bdevperf: queue depth, I/O "
                        "size, workload, time, threads; a table of IOPS, MiB/s and latency "
                        "percentiles per job and in total.", epilog=PERF_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    perf.add_arguments(pf)
    pf.set_defaults(func=cmd_perf)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:         # `userblk ... | head`
        sys.stderr.close()
        return 0
    except Exception as e:          # a clear one-line error for the user; -v for the traceback
        from env.errors import UserblkError
        if args.verbose or not isinstance(e, UserblkError):
            raise
        print(f"userblk {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
