"""benchmarks/gpu_check.sh, the one command for a GPU machine, in its CPU mode (``--cpu``): the same stages
(build info, install check, GPU test tier, every benchmark suite, summary) at small shapes, so that the
command cannot rot between GPU windows. Takes a couple of minutes on 2 cores."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ["environment", "install", "gpu_tests", "bench_query_pool", "bench_latent_downsample", "bench_policy",
          "bench_train_step", "summary"]
BENCHMARKS = {"query_pool", "latent_downsample", "policy_latency", "train_step"}


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")
def test_gpu_check_cpu_mode(tmp_path):
    out = tmp_path / "gpu_check"
    committed = ROOT / "benchmarks" / "results"
    before = set(committed.glob("*.json")) if committed.exists() else set()
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("LWAM_BENCH_RESULTS", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu", str(out)], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=1500)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("*.log"))
                     if p.exists()) if out.exists() else ""
    assert proc.returncode == 0, f"gpu_check --cpu failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}\n{logs}"
    assert "[gpu_check]" in proc.stdout and "stage bench_policy" in proc.stdout   # progress is printed
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == STAGES[:-1]          # summary writes stages.json while it runs
    assert all(s["rc"] == 0 and s["expected_gpu_s"] > 0 for s in stages), stages
    records = [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]
    assert {r["benchmark"] for r in records} == BENCHMARKS
    assert all(r["device"] == "cpu" and r["results"] for r in records)
    pool = next(r for r in records if r["benchmark"] == "query_pool")
    fused = [row for row in pool["results"] if row["case"] == "fused"]
    assert fused and all(row["kernel_bytes"] >= row["floor_bytes"] > 0 for row in fused)
    summary = (out / "summary.md").read_text()
    assert "| bench_train_step | ok |" in summary and "### query_pool" in summary
    after = set(committed.glob("*.json")) if committed.exists() else set()
    assert after == before, f"records written outside OUTDIR: {sorted(after - before)}"
