"""The `userblk` command: one entry point, a subcommand per job.

    userblk env                 what this machine offers (hugepages, IOMMU, vfio/uio, NVMe devices)
    userblk identify [TRID]     Identify Controller/Namespace of an NVMe controller, like
                                `nvme id-ctrl` + `nvme id-ns` (needs root; `emu` for the emulator;
                                an NVMe/TCP transport ID reaches a controller over the network)
    userblk discover TRID       the discovery log page of an NVMe/TCP discovery controller, like
                                `nvme discover`
    userblk perf [OPTIONS]      a bdevperf-like workload generator (no options: 3 s of 4 KiB
                                randread at QD 32 on a 64 MiB malloc bdev; see userblk/perf.py)
    userblk setup [reset|status] like SPDK's scripts/setup.sh: hugepages, hugetlbfs, NVMe devices
                                to vfio-pci/uio_pci_generic and back (see env/setup.py)
    userblk blob ACTION         a blobstore on a file or a bdev: init, ls, create, rm, snapshot,
                                clone, dump, check, export, import (see userblk/blob_cli.py)
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
    if nvme.is_tcp(trid):
        return nvme.connect(trid)
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


def cmd_discover(args):
    from nvme.discovery import discover
    from nvme.fabrics import FabricsOptions, TransportId
    if args.trid and (args.traddr or args.trsvcid or args.adrfam):
        print("userblk discover: error: give a transport ID or -a/-s/-f, not both",
              file=sys.stderr)
        return 2
    if args.trid:
        tid = TransportId.parse(args.trid)
    elif args.traddr:
        tid = TransportId.from_fields(traddr=args.traddr, trsvcid=args.trsvcid,
                                      adrfam=args.adrfam)
    else:
        print("userblk discover: error: which target? give a transport ID ('trtype:TCP "
              "adrfam:IPv4 traddr:10.0.0.2 trsvcid:4420') or -a ADDRESS", file=sys.stderr)
        return 2
    opts = FabricsOptions(hostnqn=args.hostnqn) if args.hostnqn else None
    log = discover(tid, opts)
    print(json.dumps(log.to_dict(), indent=2) if args.json else log.format_text())
    return 0


def cmd_perf(args):
    from userblk import perf
    try:
        return perf.main(args)
    except perf.UsageError as e:
        print(f"userblk perf: error: {e}", file=sys.stderr)
        return 2


def cmd_blob(args):
    from userblk import blob_cli
    return blob_cli.main(args)


def cmd_setup(args):
    from env import setup
    action = args.action
    given = {name for name in ("hugemem", "hugepages", "node", "driver")
             if getattr(args, name) is not None}
    given |= {name for name in ("allow", "block", "dry_run") if getattr(args, name)}
    allowed = {"config": {"hugemem", "hugepages", "node", "driver", "allow", "block", "dry_run"},
               "reset": {"hugemem", "hugepages", "allow", "block", "dry_run"},
               "status": set()}[action]
    extra = sorted(given - allowed)
    if extra:
        flags = ", ".join("--" + name.replace("_", "-") for name in extra)
        verb = "does" if len(extra) == 1 else "do"
        print(f"userblk setup {action}: error: {flags} {verb} not apply to {action}",
              file=sys.stderr)
        return 2
    if action == "status":
        info = setup.status()
        print(json.dumps(info, indent=2) if args.json else setup.format_status(info))
        return 0
    if action == "reset":
        report = setup.reset(hugepages=args.hugepages, hugemem_mib=args.hugemem, allow=args.allow,
                             block=args.block, dry_run=args.dry_run)
    else:
        report = setup.configure(hugepages=args.hugepages, hugemem_mib=args.hugemem,
                                 node=args.node, driver=args.driver or "auto", allow=args.allow,
                                 block=args.block, dry_run=args.dry_run)
    print(json.dumps(report, indent=2) if args.json else setup.format_report(report))
    return 0 if report["ok"] else 1


SETUP_EPILOG = """\
actions:
  config (default)  reserve 2 MiB hugepages (at least --hugemem, never fewer than now), mount
                    hugetlbfs at /dev/hugepages if no 2 MiB hugetlbfs is mounted, load the driver
                    and bind every NVMe function to it; skipped, with the reason: functions whose
                    namespaces are mounted, swapped on or held (LVM, md), --block'ed or not
                    --allow'ed ones, and those already on a user-space driver
  reset             give every NVMe function on vfio-pci/uio_pci_generic back to its kernel
                    driver (nvme), except one a process still holds; --hugemem/--hugepages set
                    the pool to exactly that (0 frees it); the hugetlbfs mount stays
  status            hugepages per size and NUMA node; per NVMe function: BDF, vendor:device,
                    NUMA node, driver, block devices

examples:
  sudo userblk setup                           2 GiB of hugepages, every idle NVMe to vfio-pci
  sudo userblk setup --hugemem 512 --allow 0000:00:10.0
  userblk setup --dry-run                      what it would do (no root needed)
  sudo userblk setup reset --hugemem 0         everything back to the kernel, hugepages freed
  userblk setup status

What each device was taken from is kept in /run/userblk/setup.json for reset. Exit status 1
when not root (without --dry-run) or when a device could not be moved, 2 for bad options."""


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
                   "('trtype:PCIe traddr:0000:00:04.0', or 'trtype:TCP adrfam:IPv4 traddr:... "
                   "trsvcid:4420 subnqn:...' for NVMe/TCP) or 'emu' (in-process emulated "
                   "controller); default: the first NVMe function")
    i.add_argument("-n", "--nsid", type=int, help="only this namespace")
    i.add_argument("--json", action="store_true", help="nvme-cli JSON key names")
    i.add_argument("--keep", action="store_true", help="leave the device on vfio-pci/uio "
                   "afterwards instead of giving it back to the kernel driver")
    i.set_defaults(func=cmd_identify)

    d = sub.add_parser("discover", help="the discovery log page of an NVMe/TCP discovery "
                       "controller (like nvme discover)",
                       description="Connect to an NVMe/TCP discovery controller, print its "
                       "discovery log page (the subsystems and ports it knows), disconnect.")
    d.add_argument("trid", nargs="?", help="'trtype:TCP adrfam:IPv4 traddr:10.0.0.2 "
                   "trsvcid:4420' (subnqn: the discovery NQN)")
    d.add_argument("-a", "--traddr", help="the target's address (instead of a transport ID)")
    d.add_argument("-s", "--trsvcid", help="its port (default 4420)")
    d.add_argument("-f", "--adrfam", help="IPv4 (default) or IPv6")
    d.add_argument("-q", "--hostnqn", help="host NQN (default: one made for this process)")
    d.add_argument("--json", action="store_true", help="nvme-cli's JSON (-o json)")
    d.set_defaults(func=cmd_discover)

    s = sub.add_parser("setup", help="like SPDK's setup.sh: reserve hugepages and bind NVMe "
                       "devices to vfio-pci/uio_pci_generic; `setup reset` gives them back, "
                       "`setup status` shows them",
                       description="Prepare this machine for user-space NVMe (SPDK's "
                       "scripts/setup.sh), give the devices back, or show where they are.",
                       epilog=SETUP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("action", nargs="?", choices=("config", "reset", "status"), default="config",
                   help="config (default), reset or status; put it before --allow/--block")
    size = s.add_mutually_exclusive_group()
    size.add_argument("--hugemem", type=int, metavar="MIB", help="MiB of 2 MiB hugepages (config: "
                      "at least this much, default 2048; reset: exactly this much, 0 frees them)")
    size.add_argument("--hugepages", type=int, metavar="N", help="the same as a count of 2 MiB "
                      "pages")
    s.add_argument("--node", type=int, metavar="NODE", help="reserve the hugepages on this NUMA "
                   "node (default: the kernel spreads them)")
    s.add_argument("--driver", choices=("auto", "vfio-pci", "uio_pci_generic"), help="auto "
                   "(default): vfio-pci with an IOMMU or vfio no-IOMMU mode, else uio_pci_generic")
    s.add_argument("--allow", nargs="+", action="extend", default=[], metavar="BDF",
                   help="only these PCI functions (e.g. 0000:00:10.0; commas work too)")
    s.add_argument("--block", nargs="+", action="extend", default=[], metavar="BDF",
                   help="never these PCI functions")
    s.add_argument("--dry-run", action="store_true", help="print what would be done, change "
                   "nothing (no root needed)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=cmd_setup)

    from userblk import perf
    pf = sub.add_parser("perf", help="bdevperf-like workload generator (IOPS, MiB/s, latency "
                        "percentiles) on a bdev stack; no options: 3 s randread on 64 MiB malloc",
                        description="Measure a bdev stack like SPDK's bdevperf: queue depth, I/O "
                        "size, workload, time, threads; a table of IOPS, MiB/s and latency "
                        "percentiles per job and in total.", epilog=PERF_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    perf.add_arguments(pf)
    pf.set_defaults(func=cmd_perf)

    from userblk import blob_cli
    bl = sub.add_parser("blob", help="a blobstore on a file or a bdev: init, ls, create, rm, "
                        "snapshot, clone, dump, check, export, import",
                        description="Blobstore administration on a file (an aio bdev) or on a "
                        "bdev a JSON config makes.", epilog=blob_cli.EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    blob_cli.add_arguments(bl)
    bl.set_defaults(func=cmd_blob)
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
