"""Reading weight files without executing code, with errors that name the file.

safetensors files are read with ``safetensors``; ``.pt`` / ``.pth`` files with
``torch.load(weights_only=True)`` (tensors and plain containers only). Any format error -- a truncated
or empty file, a file of another format, a pickle that would run code -- becomes a
:class:`~lwam.errors.WeightFileError` whose message names the file and what was wrong. The advice torch
attaches to a refused pickle (to retry with ``weights_only=False``, i.e. to run code from the file) is
never passed on.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from lwam.errors import WeightFileError


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise WeightFileError(f"{what} {path}: is a directory, expected a file")


def _safetensors_error(path: Path, what: str, e: BaseException) -> WeightFileError:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return WeightFileError(f"{what} {path}: not a readable safetensors file ({reason}); it may be truncated or "
                           f"of another format")


def read_safetensors(path: str | os.PathLike, what: str = "weight file") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (CPU)."""
    return read_safetensors_with_metadata(path, what)[0]


def read_safetensors_with_metadata(path: str | os.PathLike, what: str = "weight file"
                                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file (CPU)."""
    from safetensors import safe_open

    path = Path(path)
    _require_file(path, what)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            return {k: fh.get_tensor(k) for k in fh.keys()}, meta
    except Exception as e:  # SafetensorError derives from Exception only
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise _safetensors_error(path, what, e) from None


def read_safetensors_metadata(path: str | os.PathLike, what: str = "weight file") -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    _require_file(path, what)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return dict(fh.metadata() or {})
    except Exception as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise _safetensors_error(path, what, e) from None


def torch_load_plain(path: str | os.PathLike, what: str = "weight file") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with format errors as WeightFileError."""
    path = Path(path)
    _require_file(path, what)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        if "Weights only load failed" in msg:
            detail = f" (it references {found.group(1)})" if found else ""
            raise WeightFileError(f"{what} {path}: holds Python objects other than tensors and plain "
                                  f"containers{detail}; refused, since loading it could run code from the file. "
                                  f"Re-export it as a plain state dict or safetensors") from None
        raise WeightFileError(f"{what} {path}: not a PyTorch file ({msg.splitlines()[0] if msg else 'unpickling failed'})"
                              ) from None
    except EOFError:
        raise WeightFileError(f"{what} {path}: empty or truncated file") from None
    except (RuntimeError, KeyError, ValueError, IndexError, AttributeError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "central directory" in reason or "zip archive" in reason:
            reason = "truncated or corrupt zip archive"
        raise WeightFileError(f"{what} {path}: not a readable PyTorch file ({reason})") from None
