"""JSON benchmark records under benchmarks/results/ (written only when LWAM_BENCH_RECORD=1; the directory
is ``LWAM_BENCH_RESULTS`` when set, e.g. by benchmarks/gpu_check.sh).

A record holds the environment (device name, torch / triton / CUDA versions, git commit, threads) and the
suite's results (shapes, medians, peak memory, whatever the suite adds). Files are written to a temporary
name and renamed, so a record is never half-written.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_dir() -> Path:
    return Path(os.environ["LWAM_BENCH_RESULTS"]) if os.environ.get("LWAM_BENCH_RESULTS") else RESULTS_DIR


def recording() -> bool:
    return os.environ.get("LWAM_BENCH_RECORD", "") == "1"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=30)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict[str, Any]:
    """Where a benchmark ran. ``device``: "cuda" or "cpu"."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
    return {
        "device": device, "device_name": name, "torch": torch.__version__, "triton": _version("triton"),
        "cuda": torch.version.cuda, "python": platform.python_version(), "commit": git_commit(),
        "threads": torch.get_num_threads(), "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_record(benchmark: str, device: str, results: list[dict], **extra: Any) -> Path | None:
    """Write ``{benchmark, environment..., results, extra...}`` to benchmarks/results/ when recording."""
    if not recording() or not results:
        return None
    record = {"benchmark": benchmark, **environment(device), **extra, "results": results}
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{benchmark}-{device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path
