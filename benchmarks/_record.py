"""JSON benchmark records under benchmarks/results/ (written only when LWAM_BENCH_RECORD=1; the directory
is ``LWAM_BENCH_RESULTS`` when set, e.g. by benchmarks/gpu_check.sh).

A record holds the environment (``lwam._env.environment``: device name, torch / triton / CUDA versions, git
commit, threads) and the suite's results (shapes, medians, peak memory, whatever the suite adds). A suite
opens one :class:`Record` per run and adds each measurement as it finishes: the file is rewritten every
time (to a temporary name, then renamed, so it is never half-written), so a run cut short by a time limit
keeps every measurement it finished.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lwam._atomic import atomic_write_json
from lwam._env import environment

__all__ = ["RESULTS_DIR", "Record", "results_dir", "recording", "environment", "write_record"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_dir() -> Path:
    return Path(os.environ["LWAM_BENCH_RESULTS"]) if os.environ.get("LWAM_BENCH_RESULTS") else RESULTS_DIR


def recording() -> bool:
    return os.environ.get("LWAM_BENCH_RECORD", "") == "1"


class Record:
    """One run's record ``<benchmark>-<device>-<date>-<time>.json``, rewritten after every :meth:`add`.

    ``extra`` fields sit beside ``results``; :meth:`update` changes them (derived numbers such as speed-ups,
    recomputed by the suite after each measurement). Nothing is written unless :func:`recording`, and
    nothing before the first result. ``complete`` is False until :meth:`finish` (a run cut short by its time
    limit leaves ``complete: false`` and the measurements it finished)."""

    def __init__(self, benchmark: str, device: str, **extra: Any):
        self.benchmark, self.device = benchmark, device
        self.extra: dict[str, Any] = dict(extra)
        self.results: list[dict] = []
        self.complete = False
        self.path = results_dir() / f"{benchmark}-{device}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"

    def add(self, row: dict, **extra: Any) -> Path | None:
        """Append one measurement (and update ``extra``), then rewrite the file."""
        self.results.append(row)
        return self.update(**extra)

    def update(self, **extra: Any) -> Path | None:
        self.extra.update(extra)
        return self.write()

    def finish(self, **extra: Any) -> Path | None:
        """The run ended normally (every selected case ran): mark the record complete."""
        self.complete = True
        return self.update(**extra)

    def write(self) -> Path | None:
        if not recording() or not self.results:
            return None
        record = {"benchmark": self.benchmark, **environment(self.device), **self.extra,
                  "complete": self.complete, "results": self.results}
        return atomic_write_json(self.path, record)  # creates the directory


def write_record(benchmark: str, device: str, results: list[dict], **extra) -> Path | None:
    """Write ``{benchmark, environment..., results, extra...}`` to :func:`results_dir` when recording, at once."""
    rec = Record(benchmark, device, **extra)
    rec.results = list(results)
    return rec.finish()
