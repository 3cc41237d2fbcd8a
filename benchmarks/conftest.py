"""Benchmark-suite setup. Without a CUDA device, Triton kernels can only run in its interpreter, which
must be chosen before triton is imported anywhere."""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `benchmarks/` is not a package: make its helpers (``_record``) importable from the suites.
sys.path.insert(0, str(Path(__file__).resolve().parent))
