"""The environment record: where a benchmark, a demo or a training run ran (device name, torch / triton /
CUDA / Python versions, git commit, threads). One function, used by every record lwam writes."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """HEAD of the checkout that holds ``cwd`` (default: this package's source), or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30,
                             cwd=str(cwd or Path(__file__).resolve().parent))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def environment(device: str | torch.device) -> dict[str, Any]:
    """{device, device_name, torch, triton, cuda, python, commit, threads, triton_interpret, time}."""
    return {
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "triton": package_version("triton"), "cuda": torch.version.cuda, "python": platform.python_version(),
        "commit": git_commit(), "threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
