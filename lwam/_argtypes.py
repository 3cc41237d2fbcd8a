"""Argument types of the ``lwam`` command line (every subcommand's parser uses them): argparse turns their
ArgumentTypeError into "argument --x: ...", exit 2, before any work starts. A leaf module: it imports nothing
from lwam, so any parser (lwam.cli, lwam.serving.server, lwam.bench_latency) may use it."""
from __future__ import annotations

import argparse
import math
from pathlib import Path


def _int_at_least(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v
    parse.__name__ = f"int>={lo}"
    return parse


positive_int = _int_at_least(1)
nonneg_int = _int_at_least(0)


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {s}")
    return v


def existing_file(s: str) -> str:
    p = Path(s)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"no such file: {s}")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"not a file: {s}")
    return s


def existing_dir(s: str) -> str:
    p = Path(s)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"no such directory: {s}")
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"not a directory: {s}")
    return s


def dataset_dir(s: str) -> str:
    existing_dir(s)
    if not (Path(s) / "meta" / "info.json").is_file():
        raise argparse.ArgumentTypeError(f"not a LeRobot dataset (no meta/info.json): {s}")
    return s


def checkpoint_dir(s: str) -> str:
    existing_dir(s)
    if not (Path(s) / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"not an lwam checkpoint directory (no config.json): {s}")
    return s
