"""Benchmark-suite setup. Without a CUDA device, Triton kernels can only run in its interpreter, which
must be chosen before triton is imported anywhere; with one they run compiled.

A suite that measures fused paths must not measure their fallback instead: when Triton is installed but
``lwam.kernels`` does not import (an install that dropped it, or a Triton the kernels do not support),
every suite but the latent-downsampling one (lwam._C, no Triton) fails with the import error."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `benchmarks/` is not a package: make its helpers (``_record``) importable from the suites.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lwam.info import kernels_status  # noqa: E402  (after TRITON_INTERPRET: it imports the kernels)

_TRITON = importlib.util.find_spec("triton") is not None
KERNELS = kernels_status(_TRITON)
NO_TRITON_MODULES = {"test_bench_latent_downsample"}


@pytest.fixture(autouse=True)
def _triton_kernels_installed(request):
    if _TRITON and not KERNELS["importable"] and request.module.__name__ not in NO_TRITON_MODULES:
        pytest.fail(f"triton is installed but lwam.kernels does not import ({KERNELS['error']}): the fused "
                    f"paths would silently measure their reference fallback; reinstall with "
                    f"`pip install --no-build-isolation --no-deps -e .`")
