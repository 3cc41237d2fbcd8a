"""Lazy package faces: a package lists ``name -> module`` and its names import on first use (PEP 562), so
``import lwam`` stays light and never initialises CUDA."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(modules: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """{module: (names, ...)} -> {name: module}."""
    return {name: module for module, names in modules.items() for name in names}


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` that imports ``names[name]`` and returns its ``name``."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
