"""JSON benchmark records under benchmarks/results/ (written only when LWAM_BENCH_RECORD=1; the directory
is ``LWAM_BENCH_RESULTS`` when set, e.g. by benchmarks/gpu_check.sh).

A record holds the environment (``lwam._env.environment``: device name, torch / triton / CUDA versions, git
commit, threads) and the suite's results (shapes, medians, peak memory, whatever the suite adds). Files are written to a temporary
name and renamed, so a record is never half-written.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from lwam._atomic import atomic_write_json
from lwam._env import environment

__all__ = ["RESULTS_DIR", "results_dir", "recording", "environment", "write_record"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_dir() -> Path:
    return Path(os.environ["LWAM_BENCH_RESULTS"]) if os.environ.get("LWAM_BENCH_RESULTS") else RESULTS_DIR


def recording() -> bool:
    return os.environ.get("LWAM_BENCH_RECORD", "") == "1"


def write_record(benchmark: str, device: str, results: list[dict], **extra) -> Path | None:
    """Write ``{benchmark, environment..., results, extra...}`` to :func:`results_dir` when recording."""
    if not recording() or not results:
        return None
    record = {"benchmark": benchmark, **environment(device), **extra, "results": results}
    path = results_dir() / f"{benchmark}-{device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    return atomic_write_json(path, record)  # creates the directory
