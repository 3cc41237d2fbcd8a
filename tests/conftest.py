import os
from pathlib import Path

import torch  # does not import triton

# Without a CUDA device Triton kernels can only run in its interpreter, which must be chosen before triton
# is imported anywhere. With one, the kernels must run compiled: the GPU tier tests what users run (and
# the interpreter of some Triton / numpy pairs crashes outright).
_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif os.environ.get("LWAM_ALLOW_FALLBACK", "") != "1":
    # On a CUDA machine lwam._C must be there with its CUDA kernels (tests/test_latent_downsample.py then
    # asserts the CUDA op is in use instead of passing on the reference), unless a fallback was asked for.
    os.environ.setdefault("LWAM_REQUIRE_EXTENSION", "1")

import pytest  # noqa: E402

# Small-op workloads run faster on one intra-op thread, and far faster when the cores are shared.
torch.set_num_threads(1)

DATA = Path(__file__).resolve().parent / "data"
LAYOUTS = DATA / "checkpoint_layouts"  # tensor names and shapes of the published weight files
GOLDEN = DATA / "golden"  # fixtures written by the published Light-WAM code (see its README)
# The GPU tier of these modules tests lwam._C's CUDA kernels (not the reference on CUDA tensors).
CUDA_EXTENSION_MODULES = {"test_latent_downsample.py"}


def pytest_configure(config):
    config.addinivalue_line("markers", "install_check: checks of the installed package that the GPU tier runs "
                                       "too (benchmarks/gpu_check.sh: -m 'gpu or install_check')")


def pytest_collection_modifyitems(config, items):
    if not _CUDA:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
        return
    from lwam.info import cuda_extension_verdict
    from lwam.ops import _extension

    verdict, why = cuda_extension_verdict(True, _extension.status())
    if verdict != "fallback":  # "ok" runs them; "missing" makes them fail (LWAM_REQUIRE_EXTENSION=1 above)
        return
    skip = pytest.mark.skip(reason=f"CUDA kernels of lwam._C not built: {why}")
    for item in items:
        if "gpu" in item.keywords and item.path.name in CUDA_EXTENSION_MODULES:
            item.add_marker(skip)


@pytest.fixture
def layouts() -> Path:
    return LAYOUTS
