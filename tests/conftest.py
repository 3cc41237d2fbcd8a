import importlib.util
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
    config.addinivalue_line("markers", "lwam_kernels_missing(error): set by conftest on kernel tests that "
                                       "would skip although Triton is installed; they fail instead")


def _kernels_import_error() -> str | None:
    """Why ``lwam.kernels`` does not import although Triton is installed (an install that dropped it, or a
    Triton the kernels do not support), else None."""
    if importlib.util.find_spec("triton") is None:
        return None
    from lwam.info import kernels_status

    status = kernels_status(True)
    return None if status["importable"] else status["error"]


def _fail_hidden_kernel_skips(items) -> None:
    """A kernel test that would skip because "triton is not installed" while Triton is installed hides a
    broken install: it fails instead (in setup, with the import error)."""
    error = _kernels_import_error()
    if error is None:
        return
    for item in items:
        hidden = [m for m in item.own_markers if m.name in ("skip", "skipif")
                  and "triton is not installed" in str(m.kwargs.get("reason", ""))]
        if hidden:
            item.own_markers[:] = [m for m in item.own_markers if m not in hidden]
            item.add_marker(pytest.mark.lwam_kernels_missing(error))


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("lwam_kernels_missing")
    if marker is not None:
        pytest.fail(f"triton is installed but lwam.kernels does not import ({marker.args[0]}): the install "
                    f"dropped the Triton kernels; reinstall with `pip install --no-build-isolation -e .`",
                    pytrace=False)


def pytest_collection_modifyitems(config, items):
    _fail_hidden_kernel_skips(items)
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
