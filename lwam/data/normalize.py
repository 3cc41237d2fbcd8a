"""Normalisation statistics and the :class:`Normalizer`.

Stats are computed once over a dataset's low-dimensional features and stored as JSON next to it
(``meta/lwam_stats.json``); checkpoints store the same dict (``Normalizer.to_dict()``), so a policy
de-normalises with exactly the numbers it was trained with.

Modes (docs/model.md, "Data conventions"):
- ``"minmax"``: y = 2 (x - min) / (max - min) - 1, so the data range maps to [-1, 1];
- ``"zscore"``: y = (x - mean) / std;
- ``"identity"``: y = x.
Outputs are clamped to [-clip, clip]; ``invert`` is exact wherever the forward map did not clamp.
Dimensions with (near-)zero range or std are mapped to 0 and invert to min / mean.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import numpy as np
import torch

from lwam._atomic import atomic_write_json
from lwam.data.lerobot import ACTION_KEY, STATE_KEY, LeRobotReader

STATS_FILE = "meta/lwam_stats.json"
MODES = ("minmax", "zscore", "identity")
_EPS = 1e-8

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def compute_stats(values: np.ndarray | Iterable[np.ndarray]) -> dict[str, list[float] | int]:
    """Stats of one feature. values: [N, D] or an iterable of [N_i, D] chunks.

    Returns {"min", "max", "mean", "std": [D] lists, "count": N}. Mean/std are accumulated in float64
    (Chan's parallel update), so chunked and whole-array results agree.
    """
    chunks = [values] if isinstance(values, np.ndarray) else values
    n, mean, m2, lo, hi = 0, None, None, None, None
    for x in chunks:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise ValueError(f"values: expected [N, D], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            continue
        k, mu = x.shape[0], x.mean(0)
        var_sum = ((x - mu) ** 2).sum(0)
        if mean is None:
            n, mean, m2, lo, hi = k, mu, var_sum, x.min(0), x.max(0)
            continue
        delta = mu - mean
        tot = n + k
        mean = mean + delta * k / tot
        m2 = m2 + var_sum + delta ** 2 * n * k / tot
        n = tot
        lo, hi = np.minimum(lo, x.min(0)), np.maximum(hi, x.max(0))
    if mean is None:
        raise ValueError("values: no rows to compute statistics from")
    return {"min": lo.tolist(), "max": hi.tolist(), "mean": mean.tolist(),
            "std": np.sqrt(m2 / n).tolist(), "count": int(n)}


def compute_dataset_stats(dataset: LeRobotReader, keys: Sequence[str] | None = None,
                          episodes: Sequence[int] | None = None) -> dict[str, dict[str, Any]]:
    """Stats of ``keys`` (default: the dataset's state and action features) over ``episodes`` (all)."""
    keys = list(keys) if keys is not None else [dataset.state_key, dataset.action_key]
    eps = list(episodes) if episodes is not None else dataset.episode_indices
    from lwam.validate import check_finite_rows

    def rows(k: str):
        for e in eps:
            v = dataset.episode_data(e)[k]
            check_finite_rows(v, f"{dataset.root}: episode {e} {k!r}")
            yield v

    return {k: compute_stats(rows(k)) for k in keys}


def save_stats(stats: Mapping[str, Any], path: str | os.PathLike) -> None:
    atomic_write_json(path, {"version": 1, "features": dict(stats)})


def load_stats(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    data = json.loads(Path(path).read_text())
    return dict(data["features"]) if "features" in data else dict(data)


def dataset_stats(dataset: LeRobotReader, recompute: bool = False) -> dict[str, dict[str, Any]]:
    """The dataset's stats over all its episodes: read from ``meta/lwam_stats.json``, computed and
    stored there (atomically) the first time or when ``recompute`` is set or the file is stale."""
    path = dataset.root / STATS_FILE
    if path.exists() and not recompute:
        stats = load_stats(path)
        keys = (dataset.state_key, dataset.action_key)
        if all(k in stats for k in keys) and stats[dataset.action_key]["count"] == dataset.num_frames:
            return stats
    stats = compute_dataset_stats(dataset)
    save_stats(stats, path)
    return stats


class Normalizer:
    """Feature-wise normalisation with clamping.

    Args:
        stats: feature name -> {"min","max","mean","std": [D] ...} (e.g. from :func:`dataset_stats`).
        modes: feature name -> "minmax" | "zscore" | "identity".
        clip: outputs are clamped to [-clip, clip].

    ``apply(key, x)`` / ``invert(key, y)`` accept numpy arrays or torch tensors of shape [..., D] and
    return the same type, dtype and device.
    """

    def __init__(self, stats: Mapping[str, Mapping[str, Any]], modes: Mapping[str, str], clip: float = 5.0):
        self.clip = float(clip)
        self.modes = dict(modes)
        self.stats = {k: {s: (list(v) if isinstance(v, (list, tuple, np.ndarray)) else v)
                          for s, v in stats[k].items()} for k in self.modes}
        self._scale: dict[str, np.ndarray] = {}
        self._offset: dict[str, np.ndarray] = {}
        for key, mode in self.modes.items():
            if mode not in MODES:
                raise ValueError(f"modes[{key!r}]: expected one of {MODES}, got {mode!r}")
            if key not in stats:
                raise ValueError(f"stats: feature {key!r} missing (have {sorted(stats)})")
            st = stats[key]
            # Every mode is y = (x - offset) * scale; scale 0 marks a constant dimension.
            if mode == "minmax":
                lo, hi = np.asarray(st["min"], np.float64), np.asarray(st["max"], np.float64)
                rng = hi - lo
                const = rng < _EPS
                self._offset[key] = np.where(const, lo, (lo + hi) / 2)
                self._scale[key] = np.where(const, 0.0, 2.0 / np.where(const, 1.0, rng))
            elif mode == "zscore":
                mean, std = np.asarray(st["mean"], np.float64), np.asarray(st["std"], np.float64)
                const = std < _EPS
                self._offset[key] = mean
                self._scale[key] = np.where(const, 0.0, 1.0 / np.where(const, 1.0, std))
            else:
                d = len(st["min"]) if "min" in st else len(st["mean"])
                self._offset[key] = np.zeros(d)
                self._scale[key] = np.ones(d)
        self._torch_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, stats: Mapping[str, Mapping[str, Any]], data_cfg: Any,
                    state_key: str = STATE_KEY, action_key: str = ACTION_KEY) -> "Normalizer":
        """Modes and clip from a :class:`lwam.config.DataConfig` (action_norm, proprio_norm, norm_clip)."""
        return cls(stats, {action_key: data_cfg.action_norm, state_key: data_cfg.proprio_norm},
                   clip=data_cfg.norm_clip)

    def dim(self, key: str) -> int:
        return int(self._scale[key].shape[0])

    def _params(self, key: str, x: ArrayT) -> tuple[Any, Any]:
        if key not in self.modes:
            raise KeyError(f"feature {key!r} has no normalisation (have {sorted(self.modes)})")
        if x.shape[-1] != self.dim(key):
            raise ValueError(f"{key}: expected last dim {self.dim(key)}, got shape {tuple(x.shape)}")
        if isinstance(x, torch.Tensor):
            ck = (key, x.device, x.dtype)
            if ck not in self._torch_cache:
                dt = x.dtype if x.dtype.is_floating_point else torch.float32
                self._torch_cache[ck] = (torch.as_tensor(self._offset[key], dtype=dt, device=x.device),
                                         torch.as_tensor(self._scale[key], dtype=dt, device=x.device))
            return self._torch_cache[ck]
        return self._offset[key], self._scale[key]

    def apply(self, key: str, x: ArrayT) -> ArrayT:
        """Normalise x [..., D] of feature ``key``; clamped to [-clip, clip]."""
        offset, scale = self._params(key, x)
        if isinstance(x, torch.Tensor):
            y = (x.to(offset.dtype) - offset) * scale
            return y.clamp(-self.clip, self.clip)
        y = (np.asarray(x, dtype=np.float64) - offset) * scale
        dtype = x.dtype if np.issubdtype(np.asarray(x).dtype, np.floating) else np.float32
        return np.clip(y, -self.clip, self.clip).astype(dtype)

    def invert(self, key: str, y: ArrayT) -> ArrayT:
        """Map normalised y [..., D] back to the feature's units."""
        offset, scale = self._params(key, y)
        if isinstance(y, torch.Tensor):
            safe = torch.where(scale == 0, torch.ones_like(scale), scale)
            return torch.where(scale == 0, offset.expand_as(y), y.to(offset.dtype) / safe + offset)
        safe = np.where(self._scale[key] == 0, 1.0, scale)
        x = np.where(scale == 0, offset, np.asarray(y, np.float64) / safe + offset)
        dtype = y.dtype if np.issubdtype(np.asarray(y).dtype, np.floating) else np.float32
        return x.astype(dtype)

    # -- serialisation (checkpoints) ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"clip": self.clip, "modes": dict(self.modes), "stats": {k: dict(v) for k, v in self.stats.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Normalizer":
        return cls(d["stats"], d["modes"], clip=d.get("clip", 5.0))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Normalizer":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        return f"Normalizer(modes={self.modes}, clip={self.clip})"
