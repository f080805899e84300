"""The `userblk` command: one entry point, a subcommand per job.

    userblk env                 what this machine offers (hugepages, IOMMU, vfio/uio, NVMe devices)
    userblk identify TRID       Identify Controller/Namespace of an NVMe controller (needs root)
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


def build_parser():
    p = argparse.ArgumentParser(prog="userblk", description="user-space, polled-mode block "
                                "devices for Python")
    p.add_argument("--version", action="version", version=f"userblk {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    e = sub.add_parser("env", help="show what this machine offers (hugepages, IOMMU, vfio, NVMe)")
    e.add_argument("--json", action="store_true", help="print JSON instead of text")
    e.set_defaults(func=cmd_env)
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
