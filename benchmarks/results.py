"""Where benchmark figures go besides pytest-benchmark's own table: `results/<name>.json` in the
checkout (shared with the QEMU guest, so figures measured inside it reach the host), and a text
table printed to stdout."""
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "results"


def seconds(default=5.0):
    """How long each timed run lasts: USERBLK_BENCH_SECONDS, shorter for smoke runs."""
    return float(os.environ.get("USERBLK_BENCH_SECONDS", default))


def save(name, data):
    ROOT.mkdir(exist_ok=True)
    path = ROOT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return path


def table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format)."""
    widths = [max(len(h), *(len(f.format(r[k])) for r in rows)) for k, h, f in columns]
    lines = ["  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths))]
    for r in rows:
        lines.append("  ".join(f.format(r[k]).rjust(w) for (k, _, f), w in zip(columns, widths)))
    return "\n".join(lines)


def per_op_ns(benchmark, n, stat="mean"):
    """Nanoseconds per operation of a benchmark whose one call ran `n` operations; None when
    the benchmark only ran once as a smoke test (--benchmark-disable keeps no statistics)."""
    if benchmark.stats is None:
        return None
    return getattr(benchmark.stats.stats, stat) / n * 1e9
