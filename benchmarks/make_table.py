"""Render the latest GPU benchmark records (benchmarks/results/*.json, device "cuda") as markdown tables
into benchmarks/README.md, between the ``<!-- gpu-results:begin -->`` and ``<!-- gpu-results:end -->``
markers. With no GPU record it writes a line that says so. CPU records are never shown in the table.

Usage: ``python benchmarks/make_table.py [--results DIR] [--readme PATH] [--check]``
(``--check``: exit 1 if the README's table is not what the records give, writing nothing).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lwam._atomic import atomic_write_text

HERE = Path(__file__).resolve().parent
BEGIN = "<!-- gpu-results:begin -->"
END = "<!-- gpu-results:end -->"

# Columns shown first, in this order, when a record's rows have them; other scalar keys follow.
_FIRST = ("case", "side", "mode", "shape_name", "shape", "dtype", "factor", "median_s", "median_ms",
          "samples_per_s", "GB/s", "speedup_vs_reference", "fraction_of_copy_bandwidth",
          "peak_memory_bytes", "peak_bytes", "memory_vs_reference")
_SKIP = {"flags", "impl", "loss_check", "peak_memory_kind", "bytes", "min_ms", "max_ms", "rounds", "weights"}


def load_records(results: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(results.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"skipping {path.name}: {err}", file=sys.stderr)
            continue
        if isinstance(rec, dict) and isinstance(rec.get("results"), list):
            rec["_file"] = path.name
            records.append(rec)
    return records


def latest_gpu_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest CUDA record of each benchmark (by its 'time' field, then file name)."""
    latest: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec.get("device") != "cuda":
            continue
        key = rec.get("benchmark") or rec["_file"].split("-")[0]
        if key not in latest or (rec.get("time", ""), rec["_file"]) > (latest[key].get("time", ""),
                                                                        latest[key]["_file"]):
            latest[key] = rec
    return [latest[k] for k in sorted(latest)]


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("bytes") and isinstance(value, (int, float)):
        return f"{value / 2 ** 30:.2f} GiB"
    if key == "median_s" and isinstance(value, (int, float)):
        return f"{value * 1e3:.3f} ms"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    return str(value).replace("|", "/")


def _header(key: str) -> str:
    return {"median_s": "median", "peak_memory_bytes": "peak memory", "peak_bytes": "peak memory",
            "samples_per_s": "samples/s", "speedup_vs_reference": "speed-up vs reference",
            "memory_vs_reference": "memory vs reference"}.get(key, key)


def render_record(rec: dict[str, Any]) -> str:
    rows = rec["results"]
    keys: list[str] = [k for k in _FIRST if any(k in r for r in rows)]
    for r in rows:
        for k, v in r.items():
            if k not in keys and k not in _SKIP and not isinstance(v, dict):
                keys.append(k)
    env = ", ".join([str(rec.get("device_name", "?"))]
                    + [f"{k} {rec[k]}" for k in ("torch", "triton", "cuda") if rec.get(k)])
    commit = (rec.get("commit") or "?")[:10]
    extra = ", ".join(f"{k} {_fmt(k, rec[k])}" for k in ("preset", "dtype", "shapes") if k in rec)
    out = [f"### {rec.get('benchmark', rec['_file'])}", "",
           f"{env}; commit {commit}; {rec.get('time', '?')}" + (f"; {extra}" if extra else "")
           + f" (`results/{rec['_file']}`)", "",
           "| " + " | ".join(_header(k) for k in keys) + " |",
           "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(k, r.get(k)) for k in keys) + " |")
    return "\n".join(out)


def render(records: list[dict[str, Any]]) -> str:
    gpu = latest_gpu_records(records)
    if not gpu:
        n_cpu = sum(1 for r in records if r.get("device") != "cuda")
        return ("No GPU records yet: no benchmark run on a CUDA device has been recorded in `results/`"
                + (f" ({n_cpu} CPU record(s) there are not shown)." if n_cpu else "."))
    return "\n\n".join(render_record(r) for r in gpu)


def update_readme(readme: Path, table: str) -> str:
    text = readme.read_text()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{readme}: markers {BEGIN} ... {END} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--readme", type=Path, default=HERE / "README.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    args = ap.parse_args(argv)
    new = update_readme(args.readme, render(load_records(args.results)))
    if args.check:
        if new != args.readme.read_text():
            print(f"{args.readme} is out of date: run python benchmarks/make_table.py", file=sys.stderr)
            return 1
        return 0
    atomic_write_text(args.readme, new)
    print(f"wrote {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
