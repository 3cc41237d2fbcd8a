"""setup.py's decisions, with its probes monkeypatched (no GPU, no CUDA torch, no real nvcc needed):
a failed CUDA build with CUDA torch + nvcc present is a failure unless a fallback is asked for; with CUDA
torch a nonexistent CUDA_HOME or no nvcc at all stops the install with one line unless
LWAM_ALLOW_FALLBACK=1; the CUDA root is found behind an nvcc wrapper script; ``lwam info --build`` shows
what was built. The install checks (marked ``install_check``; benchmarks/gpu_check.sh runs them in the GPU
tier too): the Triton kernels were installed as ``lwam.kernels``, and on a CUDA machine lwam._C has its
CUDA kernels unless a fallback was asked for."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def setup_py():
    spec = importlib.util.spec_from_file_location("lwam_setup_py_build", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only under __main__
    return module


def _fake_toolkit(tmp_path: Path) -> tuple[Path, Path]:
    """A CUDA tree whose nvcc answers --dryrun like the real one, and a wrapper script elsewhere on PATH."""
    root = tmp_path / "cuda-99.1"
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "lib64").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ _HERE_={root / 'bin'}' >&2\necho 'Cuda compilation tools, release 99.1'\n")
    nvcc.chmod(0o755)
    wrapper_dir = tmp_path / "usr-local-bin"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    wrapper.chmod(0o755)
    return root, wrapper


def test_cuda_root_behind_a_wrapper_script(setup_py, tmp_path, monkeypatch):
    root, wrapper = _fake_toolkit(tmp_path)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    # The wrapper's own parent (what torch guesses from PATH) is not a toolkit; nvcc's report is.
    assert setup_py.cuda_root(str(wrapper)) == str(root)
    monkeypatch.setenv("CUDA_HOME", str(root))
    assert setup_py.cuda_root("/nonexistent/nvcc") == str(root)
    monkeypatch.delenv("CUDA_HOME")
    assert setup_py.cuda_root(str(wrapper), run=lambda *a: "") is None  # nothing behind it: no guess


def test_plan_uses_the_real_root_with_cuda_torch(setup_py, tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    root, wrapper = _fake_toolkit(tmp_path)
    for var in ("CUDA_HOME", "CUDA_PATH", "LWAM_NO_EXTENSION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.version, "cuda", "99.1")
    monkeypatch.setattr(setup_py, "_find_nvcc", lambda: str(wrapper))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local")  # torch's wrong guess
    monkeypatch.setenv("CUDA_HOME", "")                              # restored by monkeypatch afterwards
    kind, reason, exts, _base, info = setup_py._plan()
    assert kind == "cuda", reason
    assert info["cuda_home"] == str(root) and cpp_extension.CUDA_HOME == str(root)
    assert info["nvcc"] == "99.1" and exts and exts[0].name == "lwam._C"
    # no toolkit behind nvcc at all: an error outcome (the CppExtension only as the asked-for fallback)
    monkeypatch.setattr(setup_py, "cuda_root", lambda nvcc: None)
    plan = setup_py._plan()
    assert plan[0] == "error" and "CUDA_HOME" in plan[1]
    assert setup_py._resolve_plan(plan, env={})[0] == "error"
    kind, reason, exts, _base, _info = setup_py._resolve_plan(plan, env={"LWAM_ALLOW_FALLBACK": "1"})
    assert kind == "cpu" and "LWAM_ALLOW_FALLBACK=1" in reason and exts[0].name == "lwam._C"


def test_cuda_torch_with_a_nonexistent_cuda_home_or_no_nvcc_is_an_error(setup_py, tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    root, wrapper = _fake_toolkit(tmp_path)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)  # _plan sets it: restore it after
    cxx = shutil.which(os.environ.get("CXX", "c++").split()[0]) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler: setup.py plans pure Python before looking at CUDA")
    monkeypatch.setenv("CXX", cxx)  # found by its absolute path when PATH is narrowed below
    for var in ("CUDA_HOME", "CUDA_PATH", "LWAM_NO_EXTENSION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.version, "cuda", "99.1")
    monkeypatch.setenv("PATH", str(wrapper.parent))  # an nvcc on PATH does not excuse a wrong CUDA_HOME
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-such-cuda"))
    kind, reason, *_ = setup_py._plan()
    assert kind == "error" and f"CUDA_HOME={tmp_path / 'no-such-cuda'} does not exist" in reason
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # exists, holds no bin/nvcc
    kind, reason, *_ = setup_py._plan()
    assert kind == "error" and "holds no bin/nvcc" in reason
    monkeypatch.setenv("CUDA_HOME", str(root))
    assert setup_py._plan()[0] == "cuda"
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "no-such-cuda"))
    assert "CUDA_PATH=" in setup_py._plan()[1]
    monkeypatch.delenv("CUDA_PATH")
    # no nvcc anywhere: not on PATH, not in the fallback directories
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(setup_py, "NVCC_FALLBACK_DIRS", (str(tmp_path / "nothing"),))
    plan = setup_py._plan()
    assert plan[0] == "error" and "no nvcc was found" in plan[1]
    kind, reason, exts, *_ = setup_py._resolve_plan(plan, env={"LWAM_ALLOW_FALLBACK": "1"})
    assert kind == "cpu" and "CPU kernel only" in reason and exts
    # ... but one in a fallback directory (e.g. /usr/local/cuda/bin, off PATH) is found
    monkeypatch.setattr(setup_py, "NVCC_FALLBACK_DIRS", (str(root / "bin"),))
    assert setup_py._plan()[0] == "cuda"
    monkeypatch.setattr(torch.version, "cuda", None)  # CPU torch: CUDA_HOME is irrelevant
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-such-cuda"))
    assert setup_py._plan()[0] == "cpu"


_CUDA_TORCH_SETUP = ("import runpy, sys, torch; torch.version.cuda = '99.1'; sys.argv = ['setup.py', '--name']; "
                     "runpy.run_path('setup.py', run_name='__main__')")


def test_setup_py_stops_with_one_line_on_a_nonexistent_cuda_home(tmp_path):
    """setup.py run as pip runs it (CUDA torch simulated): one error line, no traceback, nothing built;
    with LWAM_ALLOW_FALLBACK=1 it goes on."""
    env = {k: v for k, v in os.environ.items() if k not in ("LWAM_ALLOW_FALLBACK", "LWAM_NO_EXTENSION", "CUDA_PATH")}
    env["CUDA_HOME"] = str(tmp_path / "no-such-cuda")
    proc = subprocess.run([sys.executable, "-c", _CUDA_TORCH_SETUP], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[lwam setup] ERROR: ") and "Traceback" not in proc.stderr
    assert f"CUDA_HOME={tmp_path / 'no-such-cuda'} does not exist" in lines[0] and "LWAM_ALLOW_FALLBACK=1" in lines[0]
    proc = subprocess.run([sys.executable, "-c", _CUDA_TORCH_SETUP], cwd=str(ROOT),
                          env=dict(env, LWAM_ALLOW_FALLBACK="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "lwam", proc.stderr


def _build_ext_cmd(setup_py, tmp_path):
    from setuptools import Distribution

    dist = Distribution({"name": "lwam", "ext_modules": list(setup_py.EXT_MODULES)})
    cmd = setup_py.build_ext(dist)
    cmd.build_lib = str(tmp_path / "build_lib")
    cmd.inplace = False
    return cmd


def test_failed_cuda_build_with_cuda_torch_and_nvcc_is_a_failure(setup_py, tmp_path, monkeypatch):
    if setup_py.BUILD_EXT_BASE is None:
        pytest.skip("no C++ compiler or torch at build time: setup.py defines no build_ext")
    monkeypatch.delenv("LWAM_ALLOW_FALLBACK", raising=False)
    monkeypatch.delenv("LWAM_REQUIRE_EXTENSION", raising=False)
    monkeypatch.setattr(setup_py, "KIND", "cuda")
    monkeypatch.setattr(setup_py, "INFO", dict(setup_py.INFO, kind="cuda", cuda_arch_flags=["-gencode=x"]))

    def nvcc_fails(self):
        raise subprocess.CalledProcessError(1, ["nvcc", "-c", "latent_downsample_cuda.cu"])

    monkeypatch.setattr(setup_py.BUILD_EXT_BASE, "build_extensions", nvcc_fails)
    cmd = _build_ext_cmd(setup_py, tmp_path)
    with pytest.raises(setup_py.BuildFailed, match="LWAM_ALLOW_FALLBACK=1"):
        cmd.build_extensions()
    assert not (tmp_path / "build_lib" / "lwam" / setup_py.BUILD_INFO).exists()  # nothing says "built"

    monkeypatch.setenv("LWAM_ALLOW_FALLBACK", "1")   # asked for: pure Python, recorded as such
    cmd = _build_ext_cmd(setup_py, tmp_path)
    cmd.build_extensions()
    record = json.loads((tmp_path / "build_lib" / "lwam" / setup_py.BUILD_INFO).read_text())
    assert record["kind"] == "python" and "failed" in record["reason"] and "LWAM_ALLOW_FALLBACK" in record["reason"]
    assert cmd.extensions == []


def test_failed_cpu_build_falls_back_unless_required(setup_py):
    assert setup_py.failed_build_outcome("cpu", "g++ failed", env={})["kind"] == "python"
    with pytest.raises(setup_py.BuildFailed):
        setup_py.failed_build_outcome("cpu", "g++ failed", env={"LWAM_REQUIRE_EXTENSION": "1"})
    with pytest.raises(setup_py.BuildFailed):
        setup_py.failed_build_outcome("cuda", "nvcc failed", env={})
    assert setup_py.failed_build_outcome("cuda", "nvcc failed", env={"LWAM_ALLOW_FALLBACK": "1"})["kind"] == "python"


def test_lwam_info_build_shows_what_was_built():
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "lwam.cli", "info", "--build"], capture_output=True, text=True,
                         env=env, cwd=str(ROOT), timeout=300)
    assert out.returncode == 0, out.stderr
    from lwam.ops import _extension

    info = _extension.read_build_info()
    text = out.stdout
    assert f"build: {info.get('kind', 'none')}" in text
    assert "lwam._C:" in text and "triton:" in text and f"torch {torch.__version__}" in text
    out = subprocess.run([sys.executable, "-m", "lwam.cli", "info", "--build", "--json"], capture_output=True,
                         text=True, env=env, cwd=str(ROOT), timeout=300)
    record = json.loads(out.stdout)
    assert record["build_record"] == info and isinstance(record["extension"]["available"], bool)


class _Status:
    def __init__(self, available=True, with_cuda=False, reason="lwam._C loaded (CPU kernel only)", build_info=None):
        self.available, self.with_cuda, self.reason = available, with_cuda, reason
        self.build_info = build_info if build_info is not None else {"kind": "cpu", "reason": "no nvcc"}


def test_cuda_extension_verdict():
    from lwam.info import cuda_extension_verdict

    assert cuda_extension_verdict(False, _Status(), env={})[0] == "not-applicable"
    assert cuda_extension_verdict(True, _Status(with_cuda=True), env={})[0] == "ok"
    verdict, why = cuda_extension_verdict(True, _Status(), env={})  # a CPU-only build on a CUDA machine
    assert verdict == "missing" and "no CUDA kernels" in why and "LWAM_ALLOW_FALLBACK=1" in why
    assert cuda_extension_verdict(True, _Status(available=False, reason="not built"), env={})[0] == "missing"
    assert cuda_extension_verdict(True, _Status(), env={"LWAM_ALLOW_FALLBACK": "1"})[0] == "fallback"
    recorded = _Status(build_info={"kind": "cpu", "reason": "no nvcc; LWAM_ALLOW_FALLBACK=1: CPU kernel only"})
    assert cuda_extension_verdict(True, recorded, env={})[0] == "fallback"  # asked for at install time


@pytest.mark.install_check
def test_triton_kernels_are_installed_as_lwam_kernels():
    """With Triton installed, ``lwam.kernels`` must import: an install that dropped it would turn every
    fused path into its reference fallback, and the kernel tests into skips."""
    import importlib.util

    from lwam.info import kernels_status

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    status = kernels_status(True)
    assert status["importable"], f"lwam.kernels does not import: {status.get('error')}"


@pytest.mark.gpu
@pytest.mark.install_check
def test_cuda_machine_runs_the_cuda_extension():
    """On a CUDA machine lwam._C must carry its CUDA kernels (a CPU-only build fails here instead of the
    CUDA tests passing on the reference), unless LWAM_ALLOW_FALLBACK=1 asked for that."""
    from lwam.info import cuda_extension_verdict
    from lwam.ops import _extension

    verdict, why = cuda_extension_verdict(torch.cuda.is_available(), _extension.status())
    if verdict == "fallback":
        pytest.skip(why)
    assert verdict == "ok", why
    assert _extension.read_build_info().get("kind") == "cuda"


DROP_KERNELS_PLUGIN = '''
import sys

class _NoKernels:
    """An install that dropped kernels/: lwam.kernels cannot be found."""
    def find_spec(self, name, path=None, target=None):
        if name == "lwam.kernels" or name.startswith("lwam.kernels."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoKernels())
'''


def test_kernel_tests_fail_not_skip_when_an_install_dropped_lwam_kernels(tmp_path):
    """Triton installed, lwam.kernels missing: tests/test_query_pool.py's kernel tests (which skip as
    "triton is not installed" when the import fails) fail with the import error instead; the others run."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    (tmp_path / "drop_lwam_kernels.py").write_text(DROP_KERNELS_PLUGIN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "drop_lwam_kernels",
                           "tests/test_query_pool.py", "-rA", "-k",
                           "test_fused_noncontiguous_shared_strides or test_unfused_is_exactly_the_reference"],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    summary = out.strip().splitlines()[-1]
    assert "1 passed" in summary and "1 error" in summary and "skipped" not in summary, out[-3000:]
    assert "ERROR tests/test_query_pool.py::test_fused_noncontiguous_shared_strides" in out
    assert "lwam.kernels does not import" in out
