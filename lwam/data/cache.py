"""Offline caches: VAE latents of every window, and text contexts of every instruction.

Latent cache (``build_latent_cache``): one ``.npy`` array [N, C, T', h, w] (N windows) memory-mapped
while training. It is built under ``<path>.partial`` with a progress record ``<path>.progress.json``
(windows done, shape, dtype, a fingerprint); the record is rewritten atomically after every batch has
been flushed, so an interrupted build resumes at the first unfinished batch and produces the same file
as an uninterrupted one. The finished array is renamed to ``path``.

The fingerprint covers everything the latents depend on, recorded per component: the windows
(dataset path, episodes and lengths, cameras, image size, frame stride, window stride), the dataset's
content (its metadata and parquet files), the storage dtype, and whatever the caller passes as
``depends_on`` (``lwam`` passes a digest of the VAE weights and latent statistics). A cache or partial
build made from other inputs is never reused silently: :class:`~lwam.errors.StaleStateError` names the
components that changed and how to start fresh.

Text contexts have one cache class and file format: :class:`lwam.model.text.TextContextCache`
(``build_text_cache`` there).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from lwam._atomic import atomic_write_json
from lwam.data.windows import WindowDataset, collate_windows
from lwam.errors import StaleStateError


def _fingerprint(windows: WindowDataset) -> str:
    cfg = windows.cfg
    parts = [str(windows.dataset.root.resolve()), ",".join(map(str, windows.episodes)),
             ",".join(map(str, windows.lengths.tolist())), ",".join(windows.video_keys), cfg.camera_layout,
             str(cfg.image_height), str(cfg.image_width), str(cfg.num_frames), str(cfg.frame_stride),
             str(cfg.rotate_180), str(windows.window_stride)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def dataset_digest(root: str | os.PathLike) -> str:
    """sha256 (16 hex) of a LeRobot dataset's metadata and parquet files (names, sizes, bytes). Videos are
    left out (large; the frame cache tracks them by modification time)."""
    root = Path(root)
    h = hashlib.sha256()
    files = sorted([*root.glob("meta/*.json"), *root.glob("meta/*.jsonl"), *root.glob("data/**/*.parquet")])
    for p in files:
        if p.name == "lwam_stats.json":  # derived from the data, written by lwam itself
            continue
        h.update(f"{p.relative_to(root)}:{p.stat().st_size}:".encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def state_digest(module: torch.nn.Module) -> str:
    """sha256 (16 hex) of a module's state dict (names, dtypes, shapes, values) and, for a VAE, its
    latent statistics: two VAEs give the same latents only if their digests agree."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for name in ("latent_mean", "latent_std"):
        if hasattr(module, name):
            h.update(name.encode() + torch.as_tensor(getattr(module, name)).double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_components(windows: WindowDataset, dtype: str, depends_on: Mapping[str, str] | None = None
                     ) -> dict[str, str]:
    """The inputs a latent cache depends on, by name -> digest."""
    comps = {"windows": _fingerprint(windows), "dataset": dataset_digest(windows.dataset.root), "dtype": dtype}
    for k, v in (depends_on or {}).items():
        comps[str(k)] = str(v)
    return comps


def _combined(components: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(sorted(components.items()))).encode()).hexdigest()[:16]


def _stale(path: Path, recorded: Mapping[str, Any], now: Mapping[str, str], what: str) -> StaleStateError:
    old = recorded.get("components")
    if isinstance(old, dict):
        changed = [f"{k}: {old.get(k, '(absent)')} -> {now.get(k, '(absent)')}"
                   for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]
    else:
        changed = ["recorded by an older lwam without per-component fingerprints"]
    files = ", ".join(str(p) for p in (path, *_paths(path)) if p.exists())
    return StaleStateError(f"{what} {path} was built from other inputs ({'; '.join(changed)}); it is not reused. "
                           f"To start fresh delete {files} (lwam train: --overwrite), or choose another path")


def _read_record(p: Path) -> dict[str, Any]:
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}  # cut short: treated as an unknown record
    return rec if isinstance(rec, dict) else {}


def _paths(path: Path) -> tuple[Path, Path, Path]:
    return path.with_name(path.name + ".partial"), path.with_name(path.name + ".progress.json"), \
        path.with_name(path.name + ".json")


def build_latent_cache(windows: WindowDataset,
                       encode: Callable[[torch.Tensor], torch.Tensor],
                       path: str | os.PathLike, batch_size: int = 8, progress: bool = True,
                       dtype: str = "float16", depends_on: Mapping[str, str] | None = None) -> Path:
    """Encode the video of every window and store the latents.

    Args:
        windows: the windows to encode (index i of the cache = window i).
        encode: video [B, 3, F, H, W] float in [-1, 1] -> latents [B, C, T', h, w] (called under no_grad).
        path: the .npy file to produce.
        batch_size: windows per ``encode`` call.
        dtype: "float16" or "float32" storage.
        depends_on: further inputs the latents depend on, name -> digest (e.g. ``{"vae": state_digest(vae)}``).
    Returns:
        ``path``. Returns at once if a complete cache with the same fingerprint is already there.
    Raises:
        StaleStateError: a cache or partial build at ``path`` has another fingerprint (names what changed).
    """
    from tqdm.auto import tqdm

    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype: expected 'float16' or 'float32', got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    path = Path(path)
    partial, progress_file, meta_file = _paths(path)
    comps = cache_components(windows, dtype, depends_on)
    fp = _combined(comps)
    n = len(windows)
    if path.exists():
        meta = _read_record(meta_file) if meta_file.exists() else {}
        if meta.get("fingerprint") == fp and meta.get("num_windows") == n:
            return path
        raise _stale(path, meta, comps, "latent cache")
    path.parent.mkdir(parents=True, exist_ok=True)

    done, arr = 0, None
    if partial.exists() and progress_file.exists():
        rec = _read_record(progress_file)
        if rec.get("fingerprint") != fp or rec.get("num_windows") != n:
            raise _stale(path, rec, comps, "partial latent cache for")
        done = int(rec["done"])
        arr = np.lib.format.open_memmap(partial, mode="r+")
        if tuple(arr.shape) != tuple(rec["shape"]):
            arr, done = None, 0
    bar = tqdm(total=n, initial=done, desc="cache latents", unit="win", disable=not progress)
    try:
        with torch.no_grad():
            while done < n:
                idx = range(done, min(done + batch_size, n))
                video = collate_windows([windows.get(i, video=True) for i in idx])["video"]
                lat = encode(video)
                if not isinstance(lat, torch.Tensor) or lat.dim() != 5 or lat.shape[0] != len(idx):
                    raise ValueError(f"encode: expected a tensor [B={len(idx)}, C, T', h, w], got "
                                     f"{tuple(lat.shape) if isinstance(lat, torch.Tensor) else type(lat)}")
                lat_np = lat.detach().to("cpu", torch.float32).numpy()
                if arr is None:
                    arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np.dtype(dtype),
                                                    shape=(n, *lat_np.shape[1:]))
                elif tuple(arr.shape[1:]) != tuple(lat_np.shape[1:]):
                    raise ValueError(f"encode: latent shape changed from {tuple(arr.shape[1:])} to "
                                     f"{tuple(lat_np.shape[1:])}")
                arr[idx.start:idx.stop] = lat_np
                arr.flush()
                done = idx.stop
                atomic_write_json(progress_file, {"done": done, "num_windows": n, "fingerprint": fp,
                                                  "components": comps, "dtype": dtype, "shape": list(arr.shape)})
                bar.update(len(idx))
    finally:
        bar.close()
    shape = list(arr.shape)
    del arr
    # The record first: a kill between the two leaves the finished partial and its progress record,
    # which the next call completes; never a cache without its fingerprint.
    atomic_write_json(meta_file, {"fingerprint": fp, "components": comps, "num_windows": n, "dtype": dtype,
                                  "shape": shape, "episodes": windows.episodes})
    os.replace(partial, path)
    progress_file.unlink(missing_ok=True)
    return path


class CachedWindowDataset(Dataset):
    """The windows of ``windows`` with precomputed latents instead of video.

    Item: the WindowDataset dict without ``video``, plus ``latents`` float32 [C, T', h, w]. The action
    branch's current frame is ``latents[:, 0]`` (full latent resolution), so no video is decoded.
    """

    def __init__(self, windows: WindowDataset, path: str | os.PathLike,
                 depends_on: Mapping[str, str] | None = None):
        self.windows = windows
        self.path = Path(path)
        _, _, meta_file = _paths(self.path)
        if not self.path.exists():
            raise FileNotFoundError(f"latent cache missing: {self.path} (build it with build_latent_cache)")
        if meta_file.exists():
            meta = _read_record(meta_file)
            comps = cache_components(windows, str(meta.get("dtype", "")), depends_on)
            old = meta.get("components")
            if not isinstance(old, dict):  # written before per-component fingerprints: windows only
                if meta.get("fingerprint") != _fingerprint(windows):
                    raise _stale(self.path, meta, comps, "latent cache")
            elif any(old.get(k) != v for k, v in comps.items()):
                raise _stale(self.path, meta, comps, "latent cache")
        try:
            self.latents = np.load(self.path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            from lwam.errors import WeightFileError
            raise WeightFileError(f"latent cache {self.path}: not a readable .npy array ({e}); delete it to "
                                  f"rebuild") from None
        if self.latents.shape[0] != len(windows):
            raise ValueError(f"latent cache {self.path} holds {self.latents.shape[0]} windows, "
                             f"expected {len(windows)}")

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, T', h, w)."""
        return tuple(self.latents.shape[1:])

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        out = self.windows.get(index, video=False)
        out["latents"] = torch.from_numpy(np.array(self.latents[index], dtype=np.float32))  # a copy: the memmap is read-only
        return out
