"""`userblk blob` on a file and on a JSON-config bdev: every action, its output and exit status."""
import json
import os

import pytest

from userblk.cli import main


def run(capsys, *argv):
    rc = main(["blob", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def img(tmp_path):
    return str(tmp_path / "store.img")


def test_the_whole_cycle_on_a_file(capsys, img, tmp_path):
    f = ["-f", img]
    rc, out, _ = run(capsys, *f, "init", "--size", "32M", "--cluster-size", "64k")
    assert rc == 0 and "clusters of 64K" in out and os.path.getsize(img) == 32 << 20
    assert run(capsys, *f, "create", "--size", "200k", "--xattr", "name=db")[1].strip() == "1"
    assert run(capsys, *f, "create", "--clusters", "10", "--thin")[1].strip() == "2"
    data = os.urandom(300 * 1024 + 100)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    assert run(capsys, *f, "import", str(src), "--thin", "--xattr", "from=file")[1].strip() == "3"
    assert run(capsys, *f, "snapshot", "3")[1].strip() == "4"
    assert run(capsys, *f, "clone", "4")[1].strip() == "5"
    rc, out, _ = run(capsys, *f, "ls")
    lines = out.splitlines()
    assert rc == 0 and lines[0].split()[:3] == ["ID", "SIZE", "ALLOCATED"]
    assert "name=db" in lines[1] and "thick" in lines[1]
    assert "thin" in lines[2] and "0/10" in lines[2]
    assert "clone" in lines[3] and "from=file" in lines[3]
    assert "snapshot" in lines[4] and "3,5" in lines[4]
    rc, out, _ = run(capsys, "--json", *f, "ls")
    doc = json.loads(out)
    assert [b["id"] for b in doc["blobs"]] == [1, 2, 3, 4, 5]
    assert doc["blobs"][3]["clones"] == [3, 5] and doc["blobs"][4]["parent"] == 4
    dst = tmp_path / "out.bin"
    assert run(capsys, *f, "export", "5", str(dst))[0] == 0
    got = dst.read_bytes()
    assert got[:len(data)] == data and not any(got[len(data):])
    rc, _, err = run(capsys, *f, "rm", "4")
    assert rc == 1 and "has clones 3, 5" in err
    assert run(capsys, *f, "inflate", "3")[0] == 0
    assert run(capsys, *f, "decouple", "5")[0] == 0
    assert run(capsys, *f, "rm", "4", "2")[0] == 0
    assert run(capsys, *f, "resize", "1", "1M")[0] == 0
    rc, out, _ = run(capsys, "--json", *f, "ls")
    doc = json.loads(out)
    assert [(b["id"], b["num_clusters"]) for b in doc["blobs"]] == [(1, 16), (3, 5), (5, 5)]
    rc, out, _ = run(capsys, *f, "check")
    assert rc == 0 and out.strip().endswith("OK")


def test_dump_shows_the_super_block_and_pages(capsys, img):
    f = ["-f", img]
    run(capsys, *f, "init", "--size", "8M", "--cluster-size", "64k")
    run(capsys, *f, "create", "--clusters", "2", "--xattr", "name=vol")
    rc, out, _ = run(capsys, *f, "dump")
    assert rc == 0
    assert "super block slot 0" in out and "clean" in out
    assert "BLOB clusters 2" in out and "XATTR name = vol" in out and "EXTENTS from 0" in out
    rc, out, _ = run(capsys, "--json", *f, "dump", "--blob", "1")
    doc = json.loads(out)
    assert doc["clean"] and [p["blob_id"] for p in doc["pages"]] == [1]
    kinds = [d["kind"] for d in doc["pages"][0]["descriptors"]]
    assert kinds == ["blob", "extents", "xattr"]


def test_check_reports_and_repairs(capsys, img):
    f = ["-f", img]
    run(capsys, *f, "init", "--size", "8M", "--cluster-size", "64k")
    run(capsys, *f, "create", "--clusters", "2")
    # mark a cluster used that no blob holds (and keep the checksum right): a leak
    from env.crc32c import crc32c
    from blob.layout import PAGE, decode_super, encode_super
    with open(img, "r+b") as fh:
        raw = bytearray(fh.read(16 * PAGE))
    sb = max((decode_super(bytes(raw[i * PAGE:(i + 1) * PAGE]), i, 512, (8 << 20) // 512)
              for i in (0, 1) if raw[i * PAGE:i * PAGE + 8] == b"UBLKBLOB"),
             key=lambda s: s.super_seq)
    g = sb.geometry
    raw[g.cluster_bitmap_start * PAGE + 10] |= 0x80
    region = raw[g.cluster_bitmap_start * PAGE:(g.cluster_bitmap_start + 1) * PAGE]
    sb.cluster_bitmap_crc = crc32c(bytes(region))
    raw[sb.slot * PAGE:(sb.slot + 1) * PAGE] = encode_super(sb)
    with open(img, "r+b") as fh:
        fh.write(raw)
    rc, out, err = run(capsys, *f, "ls")
    assert rc == 1 and "used-cluster bitmap disagrees" in err
    rc, out, _ = run(capsys, *f, "check")
    assert rc == 1 and "leaked clusters: 1 cluster(s)" in out
    rc, out, _ = run(capsys, *f, "check", "--repair")
    assert rc == 0 and "repaired" in out
    assert run(capsys, *f, "check")[0] == 0
    assert run(capsys, *f, "ls")[0] == 0


def test_a_bdev_from_a_json_config(capsys, tmp_path):
    cfg = tmp_path / "stack.json"
    cfg.write_text(json.dumps({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_malloc_create",
         "params": {"name": "CliMalloc", "num_blocks": 32768, "block_size": 4096}}]}]}))
    c = ["-c", str(cfg), "-b", "CliMalloc"]
    rc, out, _ = run(capsys, *c, "init", "--cluster-size", "1M")
    assert rc == 0 and "I/O unit 4096" in out
    # (a malloc bdev lives as long as the command: the next one finds no store)
    rc, _, err = run(capsys, *c, "ls")
    assert rc == 1 and "no blobstore" in err


def test_usage_errors(capsys, img, tmp_path):
    assert run(capsys, "ls")[0] == 2
    rc, _, err = run(capsys, "-f", img, "ls")
    assert rc == 2 and "does not exist" in err
    rc, _, err = run(capsys, "-c", str(tmp_path / "x.json"), "ls")
    assert rc == 2 and "--bdev" in err
    with pytest.raises(SystemExit):
        main(["blob", "-f", img, "create", "--size", "12q"])
