"""`userblk blob`: a blobstore on a file or on any bdev a JSON config makes.

    userblk blob -f disk.img init --size 256M --cluster-size 1M
    userblk blob -f disk.img create --size 10M --thin --xattr name=db
    userblk blob -f disk.img ls
    userblk blob -f disk.img snapshot 1 ; userblk blob -f disk.img clone 2
    userblk blob -f disk.img export 1 out.bin ; userblk blob -f disk.img import in.bin
    userblk blob -f disk.img dump ; userblk blob -f disk.img check [--repair]
    userblk blob -c stack.json -b Nvme0n1 ls

Every command opens the target (an aio bdev on the file, or the stack of the config), does its
job and closes it again: a store is loaded (and unloaded cleanly) by the commands that need one;
`dump` and `check` read the device without loading it. Exit status 1 on an error (a corrupt store,
a missing blob...), 2 for bad usage, and `check` returns 1 when it finds problems.
"""
import argparse
import json
import os
import re
import sys

from env.errors import UserblkError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class UsageError(UserblkError):
    """A bad combination of options (exit status 2)."""


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4096, 64k, 1M, 2G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _xattr(text):
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"an xattr is NAME=VALUE, not {text!r}")
    return name, value.encode()


EPILOG = """\
actions:
  init       make a new store (--size creates or extends the file; whatever was there is lost)
  ls         the blobs: size, allocated clusters, thin/snapshot/clone relations, xattrs
  create     a new blob (--size or --clusters; --thin allocates on first write)
  rm         delete blobs (a snapshot with clones cannot be deleted)
  resize     grow or shrink a blob
  snapshot   snapshot a blob (it goes copy-on-write); prints the snapshot's id
  clone      a writable clone of a snapshot; prints its id
  inflate    give a clone all its clusters (no longer depends on a snapshot)
  decouple   copy the parent's own clusters into a clone; its parent becomes the grandparent
  dump       the decoded super block, bitmaps and metadata pages (the store is not loaded)
  check      like fsck: leaked or doubly held clusters, broken chains, bad checksums;
             reports, and repairs only with --repair
  export     a blob's contents to a file ('-': stdout)
  import     a file's contents into a new blob (or into blob --blob ID)

examples:
  userblk blob -f /var/tmp/store.img init --size 1G
  userblk blob -f /var/tmp/store.img create --size 100M --thin --xattr name=vm1
  userblk blob -c stack.json -b Malloc0 init"""


def add_arguments(p):
    t = p.add_argument_group("target (one of)")
    t.add_argument("-f", "--file", metavar="PATH", help="a file or block device (an aio bdev)")
    t.add_argument("-c", "--config", metavar="JSON", help="an SPDK-style JSON config making the "
                   "bdev stack")
    t.add_argument("-b", "--bdev", metavar="NAME", help="with --config: the bdev holding the store")
    t.add_argument("--block-size", type=parse_size, metavar="SIZE", help="with --file: the I/O "
                   "unit (default: the device's, 512 for a file)")
    t.add_argument("--json", action="store_true", help="JSON output (ls, dump, check, create...)")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    a = sub.add_parser("init", help="make a new, empty store")
    a.add_argument("--size", type=parse_size, help="with --file: create or extend it to this")
    a.add_argument("--cluster-size", type=parse_size, default=1 << 20, metavar="SIZE")
    a.add_argument("--md-pages", type=int, metavar="N", help="metadata pages (default: one per "
                   "cluster, at most one per 128 KiB)")
    a.add_argument("--clear", choices=("auto", "write_zeroes", "none"), default="auto")
    sub.add_parser("ls", help="list the blobs")
    a = sub.add_parser("create", help="a new blob")
    g = a.add_mutually_exclusive_group(required=True)
    g.add_argument("--size", type=parse_size, help="bytes (rounded up to whole clusters)")
    g.add_argument("--clusters", type=int)
    a.add_argument("--thin", action="store_true", help="allocate clusters on first write")
    a.add_argument("--xattr", type=_xattr, action="append", default=[], metavar="NAME=VALUE")
    a = sub.add_parser("rm", help="delete blobs")
    a.add_argument("ids", type=int, nargs="+", metavar="ID")
    a = sub.add_parser("resize", help="grow or shrink a blob")
    a.add_argument("id", type=int)
    a.add_argument("size", type=parse_size, help="bytes (rounded up to whole clusters)")
    for name, what in (("snapshot", "snapshot a blob"), ("clone", "clone a snapshot")):
        a = sub.add_parser(name, help=what)
        a.add_argument("id", type=int)
        a.add_argument("--xattr", type=_xattr, action="append", default=[],
                       metavar="NAME=VALUE")
    for name in ("inflate", "decouple"):
        a = sub.add_parser(name, help=f"{name} a clone")
        a.add_argument("id", type=int)
    a = sub.add_parser("dump", help="decoded super block and metadata pages")
    a.add_argument("--blob", type=int, metavar="ID", help="only this blob's pages")
    a.add_argument("--all-pages", action="store_true", help="also pages of no current chain")
    a = sub.add_parser("check", help="fsck: report, repair with --repair")
    a.add_argument("--repair", action="store_true")
    a = sub.add_parser("export", help="a blob's contents to a file")
    a.add_argument("id", type=int)
    a.add_argument("output", help="a path, or - for stdout")
    a = sub.add_parser("import", help="a file's contents into a blob")
    a.add_argument("input", help="a path, or - for stdin")
    a.add_argument("--blob", type=int, metavar="ID", help="into this blob (grown if needed) "
                   "instead of a new one")
    a.add_argument("--thin", action="store_true", help="a new thin blob: zero chunks of the file "
                   "take no clusters")
    a.add_argument("--xattr", type=_xattr, action="append", default=[], metavar="NAME=VALUE")


class _Target:
    """The bdev the command works on, and how to let go of it."""

    def __init__(self, o, create_size=None):
        if bool(o.file) == bool(o.config):
            raise UsageError("give --file PATH or --config JSON --bdev NAME")
        self.created = []
        if o.file:
            if o.bdev:
                raise UsageError("--bdev goes with --config")
            from bdev import aio
            kw = {}
            if create_size is not None:
                kw["create_size"] = create_size
            elif not os.path.exists(o.file):
                raise UsageError(f"{o.file} does not exist (init --size SIZE creates it)")
            self.bdev = aio.create("BlobFile0", o.file, o.block_size, **kw)
            self.created = [self.bdev]
        else:
            if not o.bdev:
                raise UsageError("--config needs --bdev NAME: the bdev holding the store")
            if create_size is not None:
                raise UsageError("init --size applies to --file")
            from bdev import config, get_bdev
            self.created = config.load_config(o.config)
            self.bdev = get_bdev(o.bdev)
        self.name = self.bdev.name

    def close(self):
        from bdev import config
        config.teardown(self.created)


def main(o, out=None):
    out = out or sys.stdout
    try:
        target = _Target(o, create_size=o.size if o.action == "init" else None)
    except UsageError as e:
        print(f"userblk blob: error: {e}", file=sys.stderr)
        return 2
    try:
        return ACTIONS[o.action](o, target, out)
    finally:
        target.close()


def _emit(o, out, data, text):
    if o.json:
        json.dump(data, out, indent=2, default=_json_default)
        out.write("\n")
    else:
        out.write(text + ("\n" if text and not text.endswith("\n") else ""))


def _json_default(v):
    if isinstance(v, (bytes, bytearray)):
        return _show_bytes(v)
    return str(v)


def _show_bytes(v):
    try:
        s = bytes(v).decode()
        if s.isprintable():
            return s
    except UnicodeDecodeError:
        pass
    return "0x" + bytes(v).hex()


def _store(target):
    from blob import Blobstore
    return Blobstore.load(target.name)


def _clusters_for(bs, size):
    return -(-size // bs.cluster_size)


# ---- actions ----------------------------------------------------------------------------------
def do_init(o, target, out):
    from blob import Blobstore
    bs = Blobstore.init(target.name, o.cluster_size, md_pages=o.md_pages, clear=o.clear)
    facts = {"uuid": str(bs.uuid), "bdev": target.name, "cluster_size": bs.cluster_size,
             "io_unit_size": bs.io_unit_size, "data_clusters": bs.total_data_clusters,
             "md_pages": bs.geometry.md_pages}
    bs.unload()
    _emit(o, out, facts, f"blobstore {facts['uuid']} on {target.name}: "
          f"{facts['data_clusters']} clusters of {_human(facts['cluster_size'])}, "
          f"I/O unit {facts['io_unit_size']} bytes, {facts['md_pages']} metadata pages")
    return 0


def do_ls(o, target, out):
    bs = _store(target)
    try:
        rows = [bs.info(bid) for bid in bs]
        head = {"uuid": str(bs.uuid), "cluster_size": bs.cluster_size,
                "free_clusters": bs.free_clusters, "data_clusters": bs.total_data_clusters}
    finally:
        bs.unload()
    lines = [f"{'ID':>5} {'SIZE':>10} {'ALLOCATED':>11}  {'KIND':<9} {'PARENT':>6}  "
             f"{'CLONES':<12} XATTRS"]
    for r in rows:
        kind = "snapshot" if r["snapshot"] else "clone" if r["parent"] else \
            "thin" if r["thin"] else "thick"
        xa = " ".join(f"{k}={_show_bytes(v)}" for k, v in sorted(r["xattrs"].items()))
        lines.append(f"{r['id']:>5} {_human(r['size']):>10} "
                     f"{r['allocated_clusters']:>5}/{r['num_clusters']:<5}  {kind:<9} "
                     f"{r['parent'] if r['parent'] else '-':>6}  "
                     f"{','.join(map(str, r['clones'])) or '-':<12} {xa}")
    lines.append(f"{len(rows)} blob(s); {head['free_clusters']} of {head['data_clusters']} "
                 f"clusters of {_human(head['cluster_size'])} free")
    _emit(o, out, {**head, "blobs": rows}, "\n".join(lines))
    return 0


def _xattrs(pairs):
    return {k: v for k, v in pairs}


def do_create(o, target, out):
    bs = _store(target)
    try:
        n = o.clusters if o.clusters is not None else _clusters_for(bs, o.size)
        bid = bs.create(n, thin=o.thin, xattrs=_xattrs(o.xattr))
    finally:
        bs.unload()
    _emit(o, out, {"id": bid, "num_clusters": n}, str(bid))
    return 0


def do_rm(o, target, out):
    bs = _store(target)
    try:
        for bid in o.ids:
            bs.delete(bid)
    finally:
        bs.unload()
    return 0


def do_resize(o, target, out):
    bs = _store(target)
    try:
        h = bs.open(o.id)
        h.resize(_clusters_for(bs, o.size))
        h.close()
    finally:
        bs.unload()
    return 0


def _one(fn_name):
    def action(o, target, out):
        bs = _store(target)
        try:
            fn = getattr(bs, fn_name)
            kw = {"xattrs": _xattrs(o.xattr)} if fn_name in ("snapshot", "clone") else {}
            result = fn(o.id, **kw)
        finally:
            bs.unload()
        if result is not None:
            _emit(o, out, {"id": result}, str(result))
        return 0
    return action


def do_export(o, target, out):
    bs = _store(target)
    f = None
    try:
        h = bs.open(o.id)
        ch = bs.get_io_channel()
        try:
            f = sys.stdout.buffer if o.output == "-" else open(o.output, "wb")
            unit = bs.io_unit_size
            chunk = max(unit, 1 << 20) // unit
            buf = bytearray(chunk * unit)
            pos = 0
            while pos < h.num_units:
                n = min(chunk, h.num_units - pos)
                view = memoryview(buf)[:n * unit]
                h.read(ch, view, pos, n)
                f.write(view)
                pos += n
        finally:
            ch.put()
            h.close()
            if f is not None and f is not sys.stdout.buffer:
                f.close()
    finally:
        bs.unload()
    return 0


def do_import(o, target, out):
    src = sys.stdin.buffer.read() if o.input == "-" else None
    size = len(src) if src is not None else os.path.getsize(o.input)
    bs = _store(target)
    try:
        n = _clusters_for(bs, size)
        if o.blob is None:
            bid = bs.create(n, thin=o.thin, xattrs=_xattrs(o.xattr))
        else:
            bid = o.blob
        h = bs.open(bid)
        ch = bs.get_io_channel()
        try:
            if h.num_clusters < n:
                h.resize(n)
            for k, v in _xattrs(o.xattr).items():
                if o.blob is not None:
                    h.set_xattr(k, v)
            unit = bs.io_unit_size
            chunk = max(unit, 1 << 20)
            f = open(o.input, "rb") if src is None else None
            try:
                pos = 0
                while pos < size:
                    data = src[pos:pos + chunk] if f is None else f.read(chunk)
                    if not data:
                        break
                    if len(data) % unit:
                        data += bytes(unit - len(data) % unit)
                    if not (o.thin and o.blob is None and not any(data)):
                        h.write(ch, data, pos // unit)
                    pos += len(data)
            finally:
                if f is not None:
                    f.close()
            h.sync_md()
        finally:
            ch.put()
            h.close()
    finally:
        bs.unload()
    _emit(o, out, {"id": bid, "bytes": size}, str(bid))
    return 0


def do_check(o, target, out):
    from blob.check import check
    report = check(target.name, repair=o.repair)
    data = {"ok": report.ok, "clean": report.clean, "blobs": sorted(report.blobs),
            "problems": [{"kind": k, "message": m} for k, m in report.problems],
            "notes": report.notes, "repaired": report.repaired, "dropped": report.dropped}
    _emit(o, out, data, report.text())
    return 0 if report.ok or report.repaired else 1


def do_dump(o, target, out):
    from blob.dump import dump
    data = dump(target.name, blob=o.blob, all_pages=o.all_pages)
    from blob.dump import format_text
    _emit(o, out, data, format_text(data))
    return 0


def _human(n):
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % (size // 1024 or 1) == 0:
            v = n / size
            return f"{v:g}{unit}" if v == int(v) or v >= 10 else f"{v:.1f}{unit}"
    return f"{n}B"


ACTIONS = {"init": do_init, "ls": do_ls, "create": do_create, "rm": do_rm, "resize": do_resize,
           "snapshot": _one("snapshot"), "clone": _one("clone"), "inflate": _one("inflate"),
           "decouple": _one("decouple_parent"), "dump": do_dump, "check": do_check,
           "export": do_export, "import": do_import}
