"""The summary of one ``benchmarks/gpu_check.sh`` run, and its two helpers (standard library only: it must
work when lwam or torch do not).

- ``python benchmarks/gpu_check_summary.py DIR``: reads DIR/facts.tsv (what the script found: mode, Python,
  nvcc, lwam._C mode, budget), DIR/stages.tsv (one line per stage: name, exit status, seconds, limit, share,
  status), DIR/records/*.json (the benchmark records), DIR/build_info.json (``python -m lwam.info --json``
  after the install) and DIR/gpu_tests.xml (the GPU tier's JUnit report), and writes DIR/summary.json and
  DIR/summary.md. Run after every stage, so both always describe the run so far.
- ``... --plan`` (stdin: the script's plan as tab-separated lines): the plan as JSON on stdout.
- ``... --check-install BUILD_INFO_JSON``: exit 1 with one line when the install is not usable here:
  Triton installed but ``lwam.kernels`` not importable, or lwam._C without CUDA kernels on a CUDA machine
  when no fallback was asked for (``lwam.info.cuda_extension_verdict`` "missing").

summary.json: ``mode``, ``device``, ``ok`` (every stage passed), ``complete`` (every selected stage ran
to its end), ``budget_s``, ``elapsed_s``, ``extension`` (how lwam._C was built, and whether the run was
Triton-only), ``headline`` (in this order: latent_downsample vs copy bandwidth, query_pool fused vs
reference, policy_latency Policy vs the eager reference path with peak memory, train_step fast vs
reference), ``stages``, ``gpu_tests`` (counts and failures), ``records`` (file names inside the tarball).
"""
from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STAGE_FIELDS = ("stage", "rc", "seconds", "limit_s", "share_s", "status")
HEADLINE_ORDER = ("latent_downsample", "query_pool", "policy_latency", "train_step")
TARBALL = "gpu_check.tar.gz"


# --- reading -----------------------------------------------------------------------------------------------
def _int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def read_facts(d: Path) -> dict[str, str]:
    path = d / "facts.tsv"
    if not path.exists():
        return {}
    return dict(line.split("\t", 1) for line in path.read_text().splitlines() if "\t" in line)


def read_stages(d: Path) -> list[dict[str, Any]]:
    path = d / "stages.tsv"
    rows = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        name, rc, seconds, limit, share, status = (line.split("\t") + [""] * 6)[:6]
        rc_ = _int(rc)
        rows.append({"stage": name, "rc": rc_, "seconds": _int(seconds), "limit_s": _int(limit),
                     "share_s": _int(share), "status": status,
                     "cut": rc_ in (124, 137), "ran": rc_ is not None})
    return rows


def read_records(d: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted((d / "records").glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("results"), list):
            rec["_file"] = path.name
            records.append(rec)
    return records


def latest(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The newest record of each benchmark (by its 'time' field, then file name)."""
    out: dict[str, dict[str, Any]] = {}
    for rec in records:
        key = rec.get("benchmark") or rec["_file"].split("-")[0]
        if key not in out or (rec.get("time", ""), rec["_file"]) > (out[key].get("time", ""), out[key]["_file"]):
            out[key] = rec
    return out


def read_junit(path: Path) -> dict[str, Any] | None:
    """Counts of a pytest JUnit report, and the failed / errored tests with the first line of their message."""
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"error": f"unreadable JUnit report: {exc}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": tag,
                               "message": msg[0][:300] if msg else ""})
    return {**counts, "failed": failed}


# --- headline numbers ------------------------------------------------------------------------------------------
def _rows(rec: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in rec.get("results", []) if isinstance(r, dict)]


def headline_latent_downsample(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (shape, dtype): lwam._C's GB/s against the device copy (CUDA) and avg_pool3d."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in _rows(rec):
        groups.setdefault((tuple(r.get("shape", [])), r.get("dtype")), {})[r.get("case")] = r
    out = []
    for (shape, dtype), cases in groups.items():
        if "lwam" not in cases:
            continue
        gbps = {c: cases[c]["GB/s"] for c in cases if "GB/s" in cases[c]}
        row: dict[str, Any] = {"shape": list(shape), "dtype": dtype, "lwam_GB/s": gbps.get("lwam"),
                               "lwam_backward_GB/s": gbps.get("lwam_backward"), "copy_GB/s": gbps.get("copy"),
                               "avg_pool3d_GB/s": gbps.get("avg_pool3d")}
        if gbps.get("copy"):
            row["fraction_of_copy_bandwidth"] = gbps["lwam"] / gbps["copy"]
            if gbps.get("lwam_backward"):
                row["backward_fraction_of_copy_bandwidth"] = gbps["lwam_backward"] / gbps["copy"]
        if gbps.get("avg_pool3d"):
            row["speedup_vs_avg_pool3d"] = gbps["lwam"] / gbps["avg_pool3d"]
        out.append(row)
    return out


def headline_query_pool(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (shape, dtype, mode), fwd+bwd first: fused vs reference (and its compile, where measured)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in _rows(rec):
        groups.setdefault((r.get("shape_name"), r.get("dtype"), r.get("mode")), {})[r.get("case")] = r
    out = []
    for (shape_name, dtype, mode), cases in sorted(groups.items(), key=lambda kv: kv[0][2] != "fwd_bwd"):
        if "fused" not in cases:
            continue
        f = cases["fused"]
        row: dict[str, Any] = {"shape_name": shape_name, "shape": f.get("shape"), "dtype": dtype, "mode": mode,
                               "fused_ms": f["median_s"] * 1e3}
        for other in ("reference", "reference_compiled"):
            if other in cases:
                row[f"{other}_ms"] = cases[other]["median_s"] * 1e3
                row[f"speedup_vs_{other}"] = cases[other]["median_s"] / f["median_s"]
        for k in ("GB/s", "fraction_of_floor", "kernel_bytes_vs_floor", "peak_memory_bytes"):
            if f.get(k) is not None:
                row[f"fused_{k}"] = f[k]
        if "reference" in cases and cases["reference"].get("peak_memory_bytes") is not None:
            row["reference_peak_memory_bytes"] = cases["reference"]["peak_memory_bytes"]
        out.append(row)
    return out


def headline_policy(rec: dict[str, Any]) -> dict[str, Any]:
    """Policy vs the eager reference path: median latency and peak memory of each, the speed-up."""
    sides = {r.get("side"): r for r in _rows(rec)}
    out: dict[str, Any] = {"preset": rec.get("preset"), "dtype": rec.get("dtype")}
    for side, r in sides.items():
        out[f"{side}_ms"] = r.get("median_ms")
        out[f"{side}_peak_bytes"] = r.get("peak_bytes")
    if "reference" in sides and "policy" in sides:
        out["speedup_vs_reference"] = sides["reference"]["median_ms"] / sides["policy"]["median_ms"]
        out["matches_reference"] = sides["policy"].get("matches_reference")
    return out


def headline_train_step(rec: dict[str, Any]) -> dict[str, Any]:
    """Per case samples/s and peak memory (each trainer alone), and each one's ratios to the reference."""
    out: dict[str, Any] = {"preset": rec.get("preset"), "dtype": rec.get("dtype"),
                           "batch": (rec.get("shapes") or {}).get("batch"), "cases": {}}
    for r in _rows(rec):
        out["cases"][r.get("case")] = {k: r.get(k) for k in ("samples_per_s", "median_s", "peak_memory_bytes",
                                                              "speedup_vs_reference", "memory_vs_reference",
                                                              "matches_reference_loss") if k in r}
    return out


HEADLINES = {"latent_downsample": headline_latent_downsample, "query_pool": headline_query_pool,
             "policy_latency": headline_policy, "train_step": headline_train_step}


def headline(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in HEADLINE_ORDER:
        rec = records.get(name)
        if rec is None:
            out[name] = None  # not measured (stage cut, failed or not selected)
            continue
        out[name] = {"record": f"gpu_check/records/{rec['_file']}", "device": rec.get("device"),
                     "device_name": rec.get("device_name"), "complete": rec.get("complete"),
                     "numbers": HEADLINES[name](rec)}
    return out


# --- the summary -----------------------------------------------------------------------------------------------
def build_summary(d: Path) -> dict[str, Any]:
    facts = read_facts(d)
    stages = read_stages(d)
    records = latest(read_records(d))
    try:
        build = json.loads((d / "build_info.json").read_text())
    except (OSError, ValueError):
        build = {}
    device = facts.get("gpu") or next((r.get("device_name") for r in records.values() if r.get("device_name")), None)
    ran = [s for s in stages if s["ran"]]
    env = next(iter(records.values()), {})
    return {
        "mode": facts.get("mode"),
        "device": device,
        "ok": bool(stages) and all(s["rc"] == 0 for s in stages if s["status"] != "not selected"),
        "complete": bool(stages) and all(s["ran"] and not s["cut"] for s in stages if s["status"] != "not selected"),
        "budget_s": _int(facts.get("budget_s", "")),
        "elapsed_s": sum(s["seconds"] or 0 for s in stages),
        "started": facts.get("started"),
        "python": facts.get("python"), "python_version": facts.get("python_version"),
        "torch": facts.get("torch") or (build.get("running") or {}).get("torch") or env.get("torch"),
        "cuda": facts.get("torch_cuda") or (build.get("running") or {}).get("cuda") or env.get("cuda"),
        "triton": facts.get("triton") or (build.get("triton") or {}).get("version") or env.get("triton"),
        "commit": env.get("commit"),
        "extension": {
            "mode": facts.get("extension_mode"),  # cuda | triton-only | cpu
            "triton_only": facts.get("extension_mode") == "triton-only",
            "reason": facts.get("extension_reason"), "nvcc": facts.get("nvcc") or None,
            "torch_cuda_arch_list": facts.get("torch_cuda_arch_list") or None,
            "build": {k: (build.get("build_record") or {}).get(k) for k in ("kind", "reason")} if build else None,
            "loaded": (build.get("extension") or {}).get("reason"),
            "cuda_kernels": build.get("cuda_extension"),
            "lwam_kernels": build.get("kernels"),
        },
        "headline": headline(records),
        "stages": [{k: s[k] for k in STAGE_FIELDS} for s in stages],
        "gpu_tests": read_junit(d / "gpu_tests.xml"),
        "records": sorted(f"gpu_check/records/{r['_file']}" for r in records.values()),
        "files": f"{TARBALL} holds gpu_check/: logs/<stage>.log, records/*.json, stages.tsv, facts.tsv, "
                 f"build_info.json, gpu_tests.xml, summary.md, summary.json",
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def render_markdown(summary: dict[str, Any], records: dict[str, dict[str, Any]]) -> str:
    ext = summary["extension"]
    lines = [f"# gpu_check summary ({summary['mode']}, {summary['device'] or 'no GPU'})", "",
             f"Python {summary['python_version']} ({summary['python']}), torch {summary['torch']}, "
             f"Triton {summary['triton']}; lwam._C: {ext['mode']} ({ext['reason']})", "",
             "| stage | status | seconds | limit | share |", "|---|---|---|---|---|"]
    for s in summary["stages"]:
        lines.append(f"| {s['stage']} | {s['status']} | {_fmt(s['seconds'])} | {_fmt(s['limit_s'])} | "
                     f"{_fmt(s['share_s'])} |")
    lines += ["", "## Headline", "", "```json", json.dumps(summary["headline"], indent=1, default=str), "```", ""]
    t = summary["gpu_tests"]
    if t:
        lines.append(f"GPU tests: {t.get('passed')} passed, {t.get('failures')} failed, {t.get('errors')} errors, "
                     f"{t.get('skipped')} skipped")
        lines += [f"- {f['kind']}: {f['test']}: {f['message']}" for f in t.get("failed", [])]
        lines.append("")
    try:  # the suites' tables, when lwam (make_table) imports
        sys.path.insert(0, str(HERE))
        from make_table import render_record
    except Exception:  # noqa: BLE001  (the JSON above is the summary; tables are extra)
        render_record = None
    for name in HEADLINE_ORDER:
        if render_record is not None and name in records:
            lines += [render_record(records[name]).replace("(`results/", "(`records/"), ""]
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_summary(d: Path) -> dict[str, Any]:
    summary = build_summary(d)
    _write(d / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    _write(d / "summary.md", render_markdown(summary, latest(read_records(d))) + "\n")
    return summary


# --- helpers of the script -------------------------------------------------------------------------------------
def plan_from_tsv(text: str) -> dict[str, Any]:
    plan: dict[str, Any] = {"stages": []}
    for line in text.splitlines():
        parts = line.split("\t")
        if parts[0] == "stage":
            name, share, command = parts[1], parts[2], "\t".join(parts[3:])
            plan["stages"].append({"stage": name, "share_s": _int(share) if share != "rest" else "rest",
                                   "command": command})
        elif len(parts) == 2:
            plan[parts[0]] = _int(parts[1]) if parts[0] == "budget_s" else parts[1]
    return plan


def check_install(build: dict[str, Any]) -> str | None:
    """Why this install cannot give the run it should, or None."""
    kernels = build.get("kernels") or {}
    if (build.get("triton") or {}).get("installed") and not kernels.get("importable"):
        return f"triton is installed but lwam.kernels does not import: {kernels.get('error')}"
    verdict = build.get("cuda_extension") or {}
    if verdict.get("verdict") == "missing":
        return f"lwam._C has no CUDA kernels on this CUDA machine: {verdict.get('reason')}"
    return None


def main(argv: list[str]) -> int:
    if argv[:1] == ["--plan"]:
        print(json.dumps(plan_from_tsv(sys.stdin.read()), indent=2))
        return 0
    if len(argv) == 2 and argv[0] == "--check-install":
        problem = check_install(json.loads(Path(argv[1]).read_text()))
        print(f"install check: {problem or 'ok'}")
        return 1 if problem else 0
    if len(argv) != 1:
        print("usage: python benchmarks/gpu_check_summary.py DIR | --plan | --check-install BUILD_INFO_JSON",
              file=sys.stderr)
        return 2
    summary = write_summary(Path(argv[0]))
    print(json.dumps({k: summary[k] for k in ("mode", "device", "ok", "complete", "elapsed_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
