"""`userblk perf`: the command line, each workload on malloc and null, threads, configs, the
results JSON, verify, bad options and Ctrl-C. Runs are short (a fraction of a second)."""
import json
import os
import signal
import subprocess
import sys

import pytest

import bdev
from userblk import cli, perf

SHORT = "0.3"


def run_cli(argv, capsys):
    """userblk <argv> in this process: (exit status, stdout, stderr)."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:               # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(argv, capsys, tmp_path, expect_rc=0):
    path = tmp_path / "results.json"
    rc, out, err = run_cli(["perf", "-t", SHORT, "--results", str(path)] + argv, capsys)
    assert rc == expect_rc, f"exit status {rc}\n{out}\n{err}"
    return json.loads(path.read_text()), out, err


@pytest.fixture(autouse=True)
def no_bdev_left():
    before = {b.name for b in bdev.bdevs()}
    yield
    left = [b for b in bdev.bdevs() if b.name not in before]
    for b in left:
        b.unregister()
    assert not left, f"userblk perf left {left} registered"


def write_config(tmp_path, *entries, name="stack.json"):
    p = tmp_path / name
    p.write_text(json.dumps({"subsystems": [{"subsystem": "bdev", "config": list(entries)}]}))
    return str(p)


MALLOC = {"method": "bdev_malloc_create",
          "params": {"name": "CfgMalloc", "num_blocks": 16384, "block_size": 512}}
NULL = {"method": "bdev_null_create",
        "params": {"name": "CfgNull", "num_blocks": 16384, "block_size": 4096}}


# ---- the default run -------------------------------------------------------------------------
def test_no_arguments_runs_randread_on_a_64_mib_malloc_bdev(capsys, tmp_path):
    res, out, err = run_json([], capsys, tmp_path)
    p = res["parameters"]
    assert (p["workload"], p["queue_depth"], p["io_size"], p["bdevs"]) == (
        "randread", 32, 4096, ["Malloc0"])
    assert p["default_bdev"] == {"type": "malloc", "size": 64 << 20, "block_size": 512}
    assert res["bdevs"][0]["size_bytes"] == 64 << 20 and res["bdevs"][0]["module"] == "malloc"
    (job,) = res["jobs"]
    assert job["iops"] > 0 and job["writes"] == 0 and job["errors"] == 0
    assert "Running randread" in out and "Malloc0 (thread 0)" in out and "Total" in out
    assert "IOPS" in err                   # the progress line (not a terminal: a line)


def test_the_command_without_arguments_as_a_user_runs_it():
    """`userblk perf` itself (the console script's module), with only a short -t."""
    r = subprocess.run([sys.executable, "-m", "userblk", "perf", "-t", "0.5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("Running randread for 0.5 s: queue depth 32, 4096-byte I/O, "
                               "1 job (Malloc0: 64 MiB malloc")
    header = next(line for line in lines if line.startswith("Job"))
    for col in ("Runtime(s)", "IOPS", "MiB/s", "Fail/s", "Average", "min", "max", "p50", "p90",
                "p99", "p99.9"):
        assert col in header.split()
    total = next(line for line in lines if line.startswith("Total")).split()
    assert float(total[2]) > 0             # IOPS
    assert any(line.startswith("Peak RSS:") for line in lines)
    assert "done (average)" in r.stderr


# ---- workloads on malloc and null -------------------------------------------------------------
@pytest.mark.parametrize("bdev_type", ["malloc", "null"])
@pytest.mark.parametrize("workload", ["read", "write", "randread", "randwrite", "rw", "randrw"])
def test_each_workload(workload, bdev_type, capsys, tmp_path):
    extra = ["-M", "70"] if workload in ("rw", "randrw") else []
    res, out, err = run_json(["-w", workload, "--bdev-type", bdev_type, "-q", "8"] + extra,
                             capsys, tmp_path)
    (job,) = res["jobs"]
    assert job["bdev"] == perf.DEFAULT_NAMES[bdev_type]
    assert job["ios"] > 0 and job["errors"] == 0 and job["submit_errors"] == 0
    assert job["ios"] == job["reads"] + job["writes"]
    if workload in ("read", "randread"):
        assert job["writes"] == 0
    elif workload in ("write", "randwrite"):
        assert job["reads"] == 0
    else:
        assert job["reads"] > 0 and job["writes"] > 0
        assert res["parameters"]["read_pct"] == 70
    lat = job["latency_us"]
    assert lat["count"] == job["ios"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]


def test_verify_on_malloc_finds_no_miscompare(capsys, tmp_path):
    res, out, err = run_json(["-w", "verify", "-q", "16"], capsys, tmp_path)
    (job,) = res["jobs"]
    assert job["miscompares"] == 0 and res["total"]["miscompares"] == 0
    assert job["writes"] > 0 and job["reads"] > 0 and job["errors"] == 0
    assert "Miscomp" in out


def test_verify_on_null_reports_miscompares(capsys, tmp_path):
    """A null bdev discards writes: verify must notice (and exit with status 1)."""
    res, out, err = run_json(["-w", "verify", "--bdev-type", "null", "-q", "4"], capsys,
                             tmp_path, expect_rc=1)
    assert res["total"]["miscompares"] > 0
    ex = res["jobs"][0]["miscompare_examples"][0]
    assert set(ex) == {"offset", "byte", "expected", "read"}
    assert "miscompare" in err


def test_verify_jobs_of_one_bdev_use_disjoint_parts(capsys, tmp_path):
    res, out, err = run_json(["-w", "verify", "-j", "2", "-q", "8"], capsys, tmp_path)
    a, b = res["jobs"]
    assert a["offset_bytes"] + a["range_bytes"] <= b["offset_bytes"]
    assert res["total"]["miscompares"] == 0


def test_verify_refuses_a_part_smaller_than_the_queue_depth(capsys):
    rc, out, err = run_cli(["perf", "-t", SHORT, "-w", "verify", "--size", "64k", "-q", "32"],
                           capsys)
    assert rc == 2 and "fewer than the queue depth" in err


# ---- threads, configs, several bdevs ----------------------------------------------------------
def test_threads_each_run_a_job(capsys, tmp_path):
    res, out, err = run_json(["-j", "2", "-w", "randrw"], capsys, tmp_path)
    assert [(j["thread"], j["bdev"]) for j in res["jobs"]] == [(0, "Malloc0"), (1, "Malloc0")]
    assert all(j["ios"] > 0 for j in res["jobs"])
    assert res["total"]["ios"] == sum(j["ios"] for j in res["jobs"])
    assert res["total"]["iops"] == pytest.approx(sum(j["iops"] for j in res["jobs"]))
    assert res["parameters"]["threads"] == 2
    assert "Malloc0 (thread 1)" in out


def test_core_mask_pins_a_thread_per_core(capsys, tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    mask = "[" + ",".join(map(str, cores[:2])) + "]"
    res, out, err = run_json(["-m", mask], capsys, tmp_path)
    assert [j["core"] for j in res["jobs"]] == cores[:2]
    assert res["parameters"]["cores"] == cores[:2]
    assert f"Malloc0 (core {cores[0]})" in out


def test_config_builds_the_stack_and_every_created_bdev_runs(capsys, tmp_path):
    cfg = write_config(tmp_path, MALLOC, NULL)
    res, out, err = run_json(["--config", cfg, "-w", "randwrite"], capsys, tmp_path)
    assert [j["bdev"] for j in res["jobs"]] == ["CfgMalloc", "CfgNull"]
    assert res["parameters"]["config"] == os.path.abspath(cfg)
    assert res["parameters"]["default_bdev"] is None
    assert {b["name"]: b["block_size"] for b in res["bdevs"]} == {"CfgMalloc": 512,
                                                                   "CfgNull": 4096}


def test_json_spelling_and_chosen_bdevs_times_threads(capsys, tmp_path):
    cfg = write_config(tmp_path, MALLOC, NULL)
    res, out, err = run_json(["--json", cfg, "-b", "CfgNull", "-b", "CfgMalloc", "-j", "2"],
                             capsys, tmp_path)
    assert sorted((j["thread"], j["bdev"]) for j in res["jobs"]) == [
        (0, "CfgMalloc"), (0, "CfgNull"), (1, "CfgMalloc"), (1, "CfgNull")]
    res, out, err = run_json(["-c", cfg, "-b", "CfgNull,CfgMalloc"], capsys, tmp_path)
    assert res["parameters"]["bdevs"] == ["CfgNull", "CfgMalloc"]


def test_a_config_that_fails_names_its_entry(capsys, tmp_path):
    cfg = write_config(tmp_path, MALLOC, {"method": "bdev_malloc_create",
                                          "params": {"name": "X", "num_blocks": 8,
                                                     "block_size": 512, "md_size": 16}})
    rc, out, err = run_cli(["perf", "-t", SHORT, "--config", cfg], capsys)
    assert rc == 1
    assert "userblk perf:" in err and "entry 1 (bdev_malloc_create 'X')" in err
    assert "md_size=16" in err


# ---- results JSON ----------------------------------------------------------------------------
def test_results_json_contents(capsys, tmp_path):
    res, out, err = run_json(["-j", "2", "-w", "randrw", "-M", "30", "-q", "4", "-o", "8k"],
                             capsys, tmp_path)
    assert res["schema"] == perf.RESULTS_SCHEMA and res["interrupted"] is False
    assert res["started_at"] and res["userblk_version"]
    p = res["parameters"]
    assert (p["workload"], p["read_pct"], p["queue_depth"], p["io_size"], p["threads"],
            p["seconds"]) == ("randrw", 30, 4, 8192, 2, float(SHORT))
    for key in ("hostname", "platform", "python", "cpu_count", "cpu_model", "memory_bytes"):
        assert key in res["machine"]
    for j in res["jobs"]:
        assert j["iops"] > 0
        assert j["iops"] == pytest.approx(j["ios"] / j["seconds"])
        assert j["mib_per_s"] == pytest.approx(j["iops"] * 8192 / (1 << 20))
        assert j["queue_depth"] == 4 and j["io_size"] == 8192
        assert set(perf.PERCENTILES) | {"mean", "min", "max", "count"} <= set(j["latency_us"])
    t = res["total"]
    assert t["iops"] == pytest.approx(sum(j["iops"] for j in res["jobs"]))
    assert t["latency_us"]["count"] == t["ios"]
    assert sum(c for lo, hi, c in res["latency_histogram_ns"]) == t["ios"]
    assert all(lo <= hi for lo, hi, c in res["latency_histogram_ns"])
    rss = res["rss"]
    assert rss["peak_bytes"] > 0
    assert len(rss["samples"]) >= 2 and all(s["rss_bytes"] > 0 for s in rss["samples"])
    assert "Results: " in out


def test_results_and_table_agree(capsys, tmp_path):
    res, out, err = run_json([], capsys, tmp_path)
    total_line = next(line for line in out.splitlines() if line.startswith("Total")).split()
    assert float(total_line[2]) == pytest.approx(res["total"]["iops"], rel=1e-3)
    assert perf.format_table(res) in out


# ---- plots -----------------------------------------------------------------------------------
def test_plot_draws_a_png(capsys, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    png = tmp_path / "lat.png"
    rc, out, err = run_cli(["perf", "-t", SHORT, "--plot", str(png)], capsys)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Latency plot: {png}" in out


def test_plot_without_matplotlib_is_a_clear_error_before_running(capsys, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib fails
    rc, out, err = run_cli(["perf", "-t", "30", "--plot", str(tmp_path / "x.png")], capsys)
    assert rc == 1
    assert "--plot needs matplotlib" in err and "userblk[plot]" in err
    assert "Running" not in out


# ---- bad options -----------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["-q", "0"], "must be at least 1"),
    (["-q", "many"], "is not an integer"),
    (["-o", "4x"], "is not a size"),
    (["-o", "0"], "must be positive"),
    (["-w", "trim"], "invalid choice: 'trim'"),
    (["-t", "0"], "seconds must be positive"),
    (["-t", "soon"], "not a number of seconds"),
    (["-M", "101"], "within 0..100"),
    (["-M", "50", "-w", "randread"], "-M (read percentage) applies to rw and randrw"),
    (["-b", "Nope"], "no bdev named Nope"),
    (["-b", "Malloc0,,X"], "empty bdev name"),
    (["-o", "1000"], "not a multiple of the block size 512 of Malloc0"),
    (["-o", "128M"], "larger than Malloc0"),
    (["-q", "5000"], "more than a channel of Malloc0 holds"),
    (["-j", "2", "-m", "0x1"], "not both"),
    (["-m", "0x0"], "selects no core"),
    (["-m", "zz"], "neither a hex core mask"),
    (["-m", "[4096]"], "not available"),
    (["--size", "1000"], "not a multiple of the block size"),
    (["--block-size", "1000", "--size", "1000000"], "cannot make the malloc bdev"),
    (["--config", "x.json", "--size", "1M"], "do not go with --config"),
    (["--results", "/nonexistent-dir/r.json"], "does not exist"),
])
def test_bad_options_exit_2_with_a_message(argv, words, capsys):
    rc, out, err = run_cli(["perf", "-t", SHORT] + argv, capsys)
    assert rc == 2
    assert words in err
    assert "Running" not in out


def test_a_bdev_missing_from_the_config_lists_what_exists(capsys, tmp_path):
    cfg = write_config(tmp_path, MALLOC)
    rc, out, err = run_cli(["perf", "-t", SHORT, "--config", cfg, "-b", "Ghost"], capsys)
    assert rc == 2 and "no bdev named 'Ghost'" in err and "CfgMalloc" in err


def test_option_parsers():
    assert [perf.parse_size(s) for s in ("4096", "4k", "4K", "128K", "1M", "4KiB", "2g")] == [
        4096, 4096, 4096, 128 << 10, 1 << 20, 4096, 2 << 30]
    assert perf.parse_core_mask("0x5") == [0, 2]
    assert perf.parse_core_mask("F") == [0, 1, 2, 3]
    assert perf.parse_core_mask("[0,2-4, 7]") == [0, 2, 3, 4, 7]


# ---- Ctrl-C ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_stops_cleanly_with_partial_results(sig, tmp_path):
    path = tmp_path / "partial.json"
    p = subprocess.Popen([sys.executable, "-m", "userblk", "perf", "-t", "60", "-j", "2",
                          "--results", str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the first progress line says the jobs are running
        for line in p.stderr:
            if "IOPS" in line:
                break
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "Interrupted" in out and "Total" in out
    res = json.loads(path.read_text())
    assert res["interrupted"] is True
    assert len(res["jobs"]) == 2 and all(j["ios"] > 0 for j in res["jobs"])
    assert all(j["seconds"] < 60 for j in res["jobs"])
