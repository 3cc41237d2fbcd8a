"""Input checks shared by the data readers, the model and the Policy: the same conventions the training
data had (image size, dtype, value range), finite numbers, and an available device.

Every check raises before any work starts, with a ValueError / TypeError that names the argument, what
was expected and what was received; non-finite data raises :class:`~lwam.errors.NonFiniteError` (a
FloatingPointError) naming the episode and frame.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Pixels enter the VAE in [-1, 1]; a little slack for rounding in the caller's own conversion.
RANGE_SLACK = 1e-3


def check_finite_rows(values: Any, where: str) -> None:
    """``values`` [T, D] (numpy or torch): raise NonFiniteError naming the first frame (row) and
    component that is not finite. ``where`` names the source, e.g. "<dataset>: episode 3 'action'"."""
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if arr.dtype.kind != "f":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        from lwam.errors import NonFiniteError

        first = np.argwhere(bad)[0].tolist()
        frame, comp = first[0], first[1:]
        rows = int(bad.reshape(len(arr), -1).any(1).sum())
        raise NonFiniteError(f"{where}: frame {frame}{f' component {comp[0]}' if comp else ''} is "
                             f"{arr[tuple(first)]} ({rows} frame(s) with non-finite values); fix or drop that "
                             f"episode")


def check_finite(x: torch.Tensor, name: str) -> None:
    """ValueError if the float tensor ``x`` holds NaN or infinity."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, got {n} NaN/inf of {x.numel()} (shape {tuple(x.shape)})")


def check_unit_range(x: torch.Tensor, name: str) -> None:
    """``x`` float images must lie in [-1, 1]; values beyond (e.g. 0..255) are an error that says how
    to convert. Also rejects NaN/inf."""
    check_finite(x, name)
    if x.numel() == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
        hint = (" (looks like 0..255 pixels: pass uint8 [.., H, W, 3], or x / 127.5 - 1)" if hi > 2 else
                " (0..1 images: use 2 * x - 1)" if lo >= 0 and hi <= 1 + RANGE_SLACK else "")
        raise ValueError(f"{name}: expected float values in [-1, 1], got range [{lo:.4g}, {hi:.4g}]{hint}")


def check_image_size(h: int, w: int, cfg: Any, name: str = "images") -> None:
    """The composed image must have the size the model was trained on (``cfg.data``)."""
    eh, ew = cfg.data.image_height, cfg.data.image_width
    if (h, w) != (eh, ew):
        raise ValueError(f"{name}: expected H x W = {eh} x {ew} (the size this model was trained on, "
                         f"cfg.data.image_height/width), got {h} x {w}; compose and resize the cameras with "
                         f"lwam.data.cameras.compose_observation")


def check_device(device: str | torch.device, name: str = "device") -> torch.device:
    """-> torch.device; a CUDA device without CUDA (or with too few GPUs) is a ValueError saying why."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name}: not a device: {device!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA" if torch.version.cuda is None else
                   f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
            raise ValueError(f"{name}: {str(device)!r} requested but CUDA is not available ({why}); use "
                             f"device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {str(device)!r} requested but only {torch.cuda.device_count()} GPU(s) "
                             f"are visible")
    return dev
