"""Summary of one ``benchmarks/gpu_check.sh`` run: OUTDIR/stages.json and OUTDIR/summary.md.

Usage: ``python benchmarks/gpu_check_summary.py OUTDIR``. Reads OUTDIR/stages.tsv (name, exit status,
seconds, limit, expected GPU seconds per stage, written by gpu_check.sh) and OUTDIR/records/*.json (the
benchmark records), and writes the stage table followed by one table per benchmark record (the newest of
each benchmark; CPU records too, marked as such, since a CPU-mode run has no other).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lwam._atomic import atomic_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_table import load_records, render_record  # noqa: E402


def _stages(out: Path) -> list[dict]:
    rows = []
    for line in (out / "stages.tsv").read_text().splitlines():
        name, rc, seconds, limit, expected = line.split("\t")
        rows.append({"stage": name, "rc": int(rc), "seconds": int(seconds), "limit_s": int(limit),
                     "expected_gpu_s": int(expected), "timed_out": int(rc) in (124, 137)})
    return rows


def _latest(records: list[dict]) -> list[dict]:
    latest: dict[str, dict] = {}
    for rec in records:
        key = rec.get("benchmark") or rec["_file"].split("-")[0]
        if key not in latest or (rec.get("time", ""), rec["_file"]) > (latest[key].get("time", ""),
                                                                        latest[key]["_file"]):
            latest[key] = rec
    return [latest[k] for k in sorted(latest)]


def write_summary(out: Path) -> str:
    stages = _stages(out)
    records = _latest(load_records(out / "records"))
    lines = ["# gpu_check summary", "",
             "| stage | status | seconds | limit | expected on H100/H200 |", "|---|---|---|---|---|"]
    for s in stages:
        status = "ok" if s["rc"] == 0 else ("timed out" if s["timed_out"] else f"failed (rc {s['rc']})")
        lines.append(f"| {s['stage']} | {status} | {s['seconds']} | {s['limit_s']} | {s['expected_gpu_s']} |")
    lines.append(f"| total | | {sum(s['seconds'] for s in stages)} | | {sum(s['expected_gpu_s'] for s in stages)} |")
    lines.append("")
    if not records:
        lines.append("No benchmark records were written.")
    for rec in records:
        if rec.get("device") != "cuda":
            lines.append(f"(CPU record: {rec.get('note', 'small shapes')})")
            lines.append("")
        lines.append(render_record(rec).replace("(`results/", "(`records/"))
        lines.append("")
    text = "\n".join(lines)
    for name, payload in (("stages.json", json.dumps({"stages": stages, "records": [r["_file"] for r in records]},
                                                    indent=2)), ("summary.md", text)):
        with atomic_path(out / name) as tmp:
            tmp.write_text(payload + "\n")
    return text


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/gpu_check_summary.py OUTDIR")
    print(write_summary(Path(sys.argv[1])))
