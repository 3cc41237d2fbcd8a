"""Loading the compiled extension ``lwam._C`` once, and saying why when it cannot be used.

``status()`` returns an :class:`ExtensionStatus` (cached for the process). Before importing the binary it
reads the build record ``lwam/_C_build_info.json`` that setup.py writes beside it, and refuses a binary
built for another torch (its C++ ABI is not stable across torch versions; loading it could crash), so the
reason reads "built for torch X (CUDA a, Python p), running torch Y (CUDA b, Python q)".

Environment: ``LWAM_NO_EXTENSION=1`` skips loading (every op uses its reference).
Importing this module does not import ``lwam._C`` and never initialises CUDA.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

BUILD_INFO_NAME = "_C_build_info.json"
_REBUILD = "rebuild with `pip install --no-build-isolation -e .`"


@dataclasses.dataclass(frozen=True)
class ExtensionStatus:
    """Whether ``lwam._C`` is usable: ``available``; ``reason`` (why not, or what was loaded);
    ``with_cuda`` (the binary has CUDA kernels); ``build_info`` (the build record, {} if none);
    ``module`` (the imported ``lwam._C`` or None)."""

    available: bool
    reason: str
    with_cuda: bool = False
    build_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    module: Any = None


_STATUS: ExtensionStatus | None = None


def _package_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def read_build_info() -> dict[str, Any]:
    """The build record beside the binary, or {} when there is none (or it is unreadable)."""
    path = _package_dir() / BUILD_INFO_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _describe(torch_version: Any, cuda: Any, python: Any) -> str:
    return f"torch {torch_version} (CUDA {cuda or 'none'}, Python {python})"


def running_description() -> str:
    return _describe(torch.__version__, torch.version.cuda, platform.python_version())


def built_description(info: dict[str, Any]) -> str:
    return _describe(info.get("torch", "?"), info.get("cuda"), info.get("python", "?"))


def _load() -> ExtensionStatus:
    if os.environ.get("LWAM_NO_EXTENSION", "") == "1":
        return ExtensionStatus(False, "LWAM_NO_EXTENSION=1 is set")
    info = read_build_info()
    if info.get("kind") == "python":
        return ExtensionStatus(False, f"lwam._C was not built: the last build installed pure Python because "
                                      f"{info.get('reason', 'of an unknown reason')}", build_info=info)
    if importlib.util.find_spec("lwam._C") is None:
        return ExtensionStatus(False, f"lwam._C is not built (no compiled extension in {_package_dir()}); "
                                      f"{_REBUILD}", build_info=info)
    built_torch = info.get("torch")
    if built_torch is not None and (built_torch != torch.__version__ or info.get("cuda") != torch.version.cuda):
        return ExtensionStatus(False, f"lwam._C was built for {built_description(info)}, running "
                                      f"{running_description()}; {_REBUILD}", build_info=info)
    try:
        module = importlib.import_module("lwam._C")
    except (ImportError, OSError) as exc:
        built = built_description(info) if info else "an unknown torch (no build record)"
        return ExtensionStatus(False, f"lwam._C failed to load ({exc}); built for {built}, running "
                                      f"{running_description()}; {_REBUILD}", build_info=info)
    with_cuda = bool(getattr(module, "with_cuda", 0))
    kind = "CPU + CUDA kernels" if with_cuda else "CPU kernel only"
    return ExtensionStatus(True, f"lwam._C loaded ({kind}), built for {built_description(info)}",
                           with_cuda=with_cuda, build_info=info, module=module)


def status() -> ExtensionStatus:
    """Load ``lwam._C`` on first call (registering its ops) and report; later calls return the same."""
    global _STATUS
    if _STATUS is None:
        _STATUS = _load()
    return _STATUS
