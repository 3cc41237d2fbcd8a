"""Build script for lwam.

Packages: ``lwam`` and its subpackages, plus ``kernels/`` installed as ``lwam.kernels``.

The compiled extension ``lwam._C`` (csrc/: the latent-downsampling ops) is built as

- a CUDAExtension (CPU + CUDA kernels) when the installed torch was built with CUDA
  (``torch.version.cuda``) and nvcc is found; device code for ``TORCH_CUDA_ARCH_LIST`` when set,
  else sm_80 and sm_90 (+ PTX of compute_90 for newer GPUs);
- a CppExtension (CPU kernel only; CUDA tensors then use the reference) when torch has no CUDA, or when
  it has but no usable nvcc was found and ``LWAM_ALLOW_FALLBACK=1`` is set (without it the install stops);
- nothing (pure Python: every op falls back to its reference) when ``LWAM_NO_EXTENSION=1``, when
  torch cannot be imported at build time, when no C++ compiler is found, or when a CPU-only build fails
  (``LWAM_REQUIRE_EXTENSION=1`` turns that into an error too).

A failed CUDA build (torch has CUDA and nvcc exists) is an error: pip fails instead of installing pure
Python silently. ``LWAM_ALLOW_FALLBACK=1`` asks for the pure-Python fallback instead.
With CUDA torch, these stop the install before anything compiles, with one line ``[lwam setup] ERROR: ...``
(``LWAM_ALLOW_FALLBACK=1`` builds the CppExtension instead and records why): ``CUDA_HOME`` (or
``CUDA_PATH``) set to a directory that does not exist or holds no bin/nvcc; no nvcc at all (neither there,
nor on PATH, nor in /usr/local/cuda/bin); an nvcc with no toolkit behind it.

The CUDA root is where nvcc really lives: ``CUDA_HOME``/``CUDA_PATH`` when they hold bin/nvcc, else the
directory nvcc itself reports (``nvcc --dryrun``), so an nvcc on PATH that is a wrapper script
(``/usr/local/bin/nvcc`` running ``/usr/local/cuda-X/bin/nvcc``) does not make torch guess ``/usr/local``.
``lwam info --build`` shows what was built.

The build prints which of these it did and writes ``lwam/_C_build_info.json`` beside the binary
(build kind, reason, torch / CUDA / Python versions) so that a load failure can say
"built for X, running Y". ``MAX_JOBS`` bounds the parallel compile jobs (ninja; without ninja the
sources compile one at a time).

Developer install: ``pip install --no-build-isolation -e .`` (builds against the torch you run).
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
CPP_SOURCES = ["csrc/module.cpp", "csrc/latent_downsample.cpp"]
CUDA_SOURCES = ["csrc/latent_downsample_cuda.cu"]
BUILD_INFO = "_C_build_info.json"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"

CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-diag-suppress=3306"]


def _say(message: str) -> None:
    print(f"[lwam setup] {message}", flush=True)


def cuda_arch_flags(arch_list: str | None = None) -> list[str]:
    """``-gencode`` flags for ``arch_list`` (TORCH_CUDA_ARCH_LIST syntax: "8.0;9.0+PTX", "9.0a", spaces or
    semicolons), defaulting to the environment's TORCH_CUDA_ARCH_LIST, else sm_80 and sm_90 (+PTX)."""
    if arch_list is None:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    flags: list[str] = []
    for item in re.split(r"[;\s]+", arch_list.strip()):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        arch = item[:-4] if ptx else item
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", arch)
        if m is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot parse {item!r} (expected e.g. 8.0, 9.0a, 9.0+PTX)")
        num = m.group(1) + m.group(2) + m.group(3)
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def nvcc_compile_flags() -> list[str]:
    """nvcc flags of lwam._C beyond what torch's BuildExtension adds (tests/test_cuda_compile.py reuses them)."""
    return NVCC_FLAGS + ["-DLWAM_WITH_CUDA"] + cuda_arch_flags()


# Where nvcc is looked for after CUDA_HOME/CUDA_PATH and PATH (torch's own last guess too).
NVCC_FALLBACK_DIRS = ("/usr/local/cuda/bin",)


def _cuda_home_var(env=None) -> tuple[str, str] | None:
    """(name, value) of the CUDA root variable in effect: CUDA_HOME, else CUDA_PATH (empty means unset)."""
    env = os.environ if env is None else env
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            return var, env[var]
    return None


def cuda_home_problem(env=None) -> str | None:
    """Why the CUDA root variable in effect cannot be used (it names no directory, or one without bin/nvcc),
    or None when it is usable or unset."""
    found = _cuda_home_var(env)
    if found is None:
        return None
    var, home = found
    if not os.path.isdir(home):
        return f"{var}={home} does not exist"
    if not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return f"{var}={home} holds no bin/nvcc"
    return None


def _find_nvcc() -> str | None:
    found = _cuda_home_var()
    if found and os.path.exists(os.path.join(found[1], "bin", "nvcc")):
        return os.path.join(found[1], "bin", "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    for d in NVCC_FALLBACK_DIRS:
        if os.access(os.path.join(d, "nvcc"), os.X_OK):
            return os.path.join(d, "nvcc")
    return None


def _run_nvcc(nvcc: str, args: list[str]) -> str:
    try:
        proc = subprocess.run([nvcc, *args], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout + proc.stderr


def cuda_root(nvcc: str, run=_run_nvcc) -> str | None:
    """The CUDA toolkit root of ``nvcc``: CUDA_HOME/CUDA_PATH when they hold bin/nvcc; else the directory
    nvcc reports as its own (``_HERE_`` of ``nvcc --dryrun``, which sees through wrapper scripts and
    symlinks), checked to hold include/cuda_runtime.h; else the parent of nvcc's resolved bin/."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.abspath(home)
    m = re.search(r"^#\$ _HERE_=(.+)$", run(nvcc, ["--dryrun", "-E", "-x", "cu", os.devnull]), re.MULTILINE)
    candidates = [os.path.dirname(m.group(1).strip())] if m else []
    candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def _nvcc_version(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _have_cxx() -> bool:
    cxx = os.environ.get("CXX", "c++").split()[0]
    return shutil.which(cxx) is not None or shutil.which("g++") is not None or shutil.which("clang++") is not None


def _plan():
    """Decide what to build: (kind, reason, ext_modules, cmdclass extras, info)."""
    if os.environ.get("LWAM_NO_EXTENSION", "") == "1":
        return "python", "LWAM_NO_EXTENSION=1 is set", [], None, {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001  (any import failure means: no torch to build against)
        return "python", (f"torch is not importable at build time ({type(exc).__name__}: {exc}); under pip's "
                          f"build isolation use `pip install --no-build-isolation .` to build lwam._C"), [], None, {}
    info = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if not _have_cxx():
        return "python", "no C++ compiler found (set CXX or install g++)", [], None, info
    cpu_ext = cpp_extension.CppExtension(
        name="lwam._C",
        sources=CPP_SOURCES,
        include_dirs=[CSRC],
        extra_compile_args={"cxx": CXX_FLAGS},
    )
    if torch.version.cuda is not None:
        # Kind "error": the install stops (see _resolve_plan) unless LWAM_ALLOW_FALLBACK=1 takes cpu_ext.
        problem = cuda_home_problem()
        if problem is not None:
            return "error", (f"torch {torch.__version__} has CUDA {torch.version.cuda} but {problem}: point it "
                             f"at the CUDA toolkit or unset it"), [cpu_ext], cpp_extension.BuildExtension, info
        nvcc = _find_nvcc()
        if nvcc is None:
            return "error", (f"torch {torch.__version__} has CUDA {torch.version.cuda} but no nvcc was found "
                             f"(CUDA_HOME, PATH, {', '.join(NVCC_FALLBACK_DIRS)}): install the CUDA toolkit or set "
                             f"CUDA_HOME"), [cpu_ext], cpp_extension.BuildExtension, info
        root = cuda_root(nvcc)
        if root is None:
            return "error", (f"torch has CUDA {torch.version.cuda} and nvcc is at {nvcc}, but no CUDA toolkit "
                             f"root with include/cuda_runtime.h was found behind it: set CUDA_HOME"),\
                [cpu_ext], cpp_extension.BuildExtension, info
        # torch.utils.cpp_extension guessed its CUDA_HOME at import (from nvcc's location on PATH, which for
        # a wrapper script is the wrong tree): use the real root for this build.
        os.environ["CUDA_HOME"] = root
        cpp_extension.CUDA_HOME = root
        info["cuda_home"] = root
        info["nvcc"] = _nvcc_version(os.path.join(root, "bin", "nvcc"))
        info["cuda_arch_flags"] = cuda_arch_flags()
        ext = cpp_extension.CUDAExtension(
            name="lwam._C",
            sources=CPP_SOURCES + CUDA_SOURCES,
            include_dirs=[CSRC],
            define_macros=[("LWAM_WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc_compile_flags()},
        )
        reason = f"torch {torch.__version__} has CUDA {torch.version.cuda} and nvcc {info['nvcc']} is at {nvcc}"
        return "cuda", reason, [ext], cpp_extension.BuildExtension, info
    why = f"torch {torch.__version__} was built without CUDA"
    return "cpu", why + ": CPU kernel only", [cpu_ext], cpp_extension.BuildExtension, info


def _resolve_plan(plan, env=None):
    """A plan of kind "error" becomes the CppExtension build when ``LWAM_ALLOW_FALLBACK=1`` (the reason says
    so); otherwise it stays "error" and ``setup.py`` stops with one line before building anything."""
    env = os.environ if env is None else env
    kind, reason, exts, base, info = plan
    if kind == "error" and env.get("LWAM_ALLOW_FALLBACK", "") == "1":
        kind = "cpu" if exts else "python"
        reason = f"{reason}; LWAM_ALLOW_FALLBACK=1: " + ("CPU kernel only" if exts else "installed pure Python")
    return kind, reason, exts, base, info


def _write_build_info(dirs: list[str], info: dict) -> None:
    record = dict(info)
    record.update({
        "python": platform.python_version(),
        "python_tag": sys.implementation.cache_tag,
        "platform": platform.platform(),
    })
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, BUILD_INFO + ".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, os.path.join(d, BUILD_INFO))


def _target_dirs(cmd) -> list[str]:
    """Where lwam/ lands for this command: build_lib (wheel content) and, for in-place / editable
    builds, the source package too."""
    dirs = [os.path.join(cmd.build_lib, "lwam")]
    if getattr(cmd, "inplace", False) or getattr(cmd, "editable_mode", False):
        dirs.append(os.path.join(HERE, "lwam"))
    return dirs


class BuildFailed(RuntimeError):
    """A build of lwam._C that must not degrade to pure Python failed."""


def failed_build_outcome(kind: str, why: str, env=None) -> dict:
    """What a failed compile of lwam._C means. Raises :class:`BuildFailed` for a CUDA build (torch has CUDA
    and nvcc exists: a user with a GPU toolchain expects the CUDA kernels) unless ``LWAM_ALLOW_FALLBACK=1``,
    and for any build with ``LWAM_REQUIRE_EXTENSION=1``; otherwise returns the pure-Python build record."""
    env = os.environ if env is None else env
    allow = env.get("LWAM_ALLOW_FALLBACK", "") == "1"
    if env.get("LWAM_REQUIRE_EXTENSION", "") == "1" or (kind in ("cuda", "error") and not allow):
        raise BuildFailed(f"{why}. torch has CUDA and nvcc is present, so lwam will not install without its "
                          f"CUDA kernels; fix the toolchain (CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS) or set "
                          f"LWAM_ALLOW_FALLBACK=1 to install pure Python with the reference fallbacks")
    return {"kind": "python", "reason": why + ("; LWAM_ALLOW_FALLBACK=1: installed pure Python" if allow else "")}


KIND, REASON, EXT_MODULES, BUILD_EXT_BASE, INFO = _resolve_plan(_plan())
INFO.update({"kind": KIND, "reason": REASON})


class build_py(_build_py):
    """Writes the build record when no extension is built (build_ext does it otherwise)."""

    def run(self):
        super().run()
        if not self.distribution.ext_modules:
            _say(f"building pure Python (reference fallbacks only): {REASON}")
            _write_build_info(_target_dirs(self), INFO)


cmdclass = {"build_py": build_py}

if BUILD_EXT_BASE is not None:
    class build_ext(BUILD_EXT_BASE):
        """torch's BuildExtension that reports what it builds and records it; a failed build is an error
        or a pure-Python fallback as :func:`failed_build_outcome` decides."""

        def build_extensions(self):
            jobs = os.environ.get("MAX_JOBS")
            _say(f"building lwam._C as a {'CUDAExtension' if KIND == 'cuda' else 'CppExtension'}: {REASON}"
                 + (f"; {' '.join(INFO['cuda_arch_flags'])}" if KIND == "cuda" else "")
                 + (f"; MAX_JOBS={jobs}" if jobs else ""))
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001  (compiler, linker, nvcc: all mean "no binary")
                why = f"compiling lwam._C as a {KIND} extension failed ({type(exc).__name__}: {exc})"
                try:
                    outcome = failed_build_outcome(KIND, why)
                except BuildFailed as failed:
                    _say(f"ERROR: {failed}")
                    raise
                _say(f"{outcome['reason']}; installing pure Python (reference fallbacks only)")
                self.extensions = []  # nothing to copy in place or to list as output
                _write_build_info(_target_dirs(self), dict(INFO, **outcome))
                return
            _write_build_info(_target_dirs(self), INFO)
            _say(f"built lwam._C ({KIND}); build record in lwam/{BUILD_INFO}")

    cmdclass["build_ext"] = build_ext


packages = find_packages(include=["lwam", "lwam.*"]) + ["lwam.kernels"]

if __name__ == "__main__":
    if KIND == "error":  # CUDA torch without a usable toolkit: one line, no traceback, nothing built
        raise SystemExit(f"[lwam setup] ERROR: {REASON} (or set LWAM_ALLOW_FALLBACK=1 to install without the CUDA "
                         f"kernels)")
    setup(
        packages=packages,
        package_dir={"lwam.kernels": "kernels"},
        ext_modules=EXT_MODULES,
        cmdclass=cmdclass,
    )
