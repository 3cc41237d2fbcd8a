"""Per-episode feature statistics as LeRobot's ``episodes_stats.jsonl`` holds them."""
from __future__ import annotations

from typing import Any

import numpy as np


def _array_stats(x: np.ndarray) -> dict[str, Any]:
    """x [N, D] -> {min, max, mean, std: [D], count: [1]}."""
    x = np.asarray(x, dtype=np.float64)
    return {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(),
            "std": x.std(0).tolist(), "count": [int(x.shape[0])]}


def _image_stats(frames: np.ndarray) -> dict[str, Any]:
    """frames uint8 [T, H, W, 3] -> per-channel stats in [0, 1], shaped [3, 1, 1] like LeRobot."""
    sub = frames[:: max(1, frames.shape[0] // 16)].reshape(-1, 3).astype(np.float64) / 255.0
    s = _array_stats(sub)
    return {k: ([[[v]] for v in s[k]] if k != "count" else [int(frames.shape[0])]) for k in s}
