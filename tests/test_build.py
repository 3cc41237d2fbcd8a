"""setup.py's decisions, with its probes monkeypatched (no GPU, no CUDA torch, no real nvcc needed):
a failed CUDA build with CUDA torch + nvcc present is a failure unless a fallback is asked for; the CUDA
root is found behind an nvcc wrapper script; ``lwam info --build`` shows what was built."""
from __future__ import annotations

import importlib.util
import json
import os
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
    # no toolkit behind nvcc at all: an error outcome, not a CppExtension
    monkeypatch.setattr(setup_py, "cuda_root", lambda nvcc: None)
    kind, reason, exts, _base, _info = setup_py._plan()
    assert kind == "error" and "CUDA_HOME" in reason and not exts


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
