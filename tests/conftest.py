import os
from pathlib import Path

# The Triton interpreter must be chosen before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Small-op workloads run faster on one intra-op thread, and far faster when the cores are shared.
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"
LAYOUTS = SHARED / "checkpoint_layouts"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def layouts() -> Path:
    if not LAYOUTS.is_dir():
        pytest.skip(f"checkpoint layouts not found at {LAYOUTS}")
    return LAYOUTS
