import os
from pathlib import Path

# The Triton interpreter must be chosen before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Small-op workloads run faster on one intra-op thread, and far faster when the cores are shared.
torch.set_num_threads(1)

DATA = Path(__file__).resolve().parent / "data"
LAYOUTS = DATA / "checkpoint_layouts"  # tensor names and shapes of the published weight files
GOLDEN = DATA / "golden"  # fixtures written by the published Light-WAM code (see its README)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def layouts() -> Path:
    return LAYOUTS
