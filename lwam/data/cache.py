"""Offline caches: VAE latents of every window, and text contexts of every instruction.

Latent cache (``build_latent_cache``): one ``.npy`` array [N, C, T', h, w] (N windows) memory-mapped
while training. It is built under ``<path>.partial`` with a progress record ``<path>.progress.json``
(windows done, shape, dtype, a fingerprint of the windows); the record is rewritten atomically after
every batch has been flushed, so an interrupted build resumes at the first unfinished batch and
produces the same file as an uninterrupted one. The finished array is renamed to ``path``.

Text contexts have one cache class and file format: :class:`lwam.model.text.TextContextCache`
(``build_text_cache`` there).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from lwam._atomic import atomic_write_json
from lwam.data.windows import WindowDataset, collate_windows


def _fingerprint(windows: WindowDataset) -> str:
    cfg = windows.cfg
    parts = [str(windows.dataset.root.resolve()), ",".join(map(str, windows.episodes)),
             ",".join(map(str, windows.lengths.tolist())), ",".join(windows.video_keys), cfg.camera_layout,
             str(cfg.image_height), str(cfg.image_width), str(cfg.num_frames), str(cfg.frame_stride),
             str(cfg.rotate_180), str(windows.window_stride)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _paths(path: Path) -> tuple[Path, Path, Path]:
    return path.with_name(path.name + ".partial"), path.with_name(path.name + ".progress.json"), \
        path.with_name(path.name + ".json")


def build_latent_cache(windows: WindowDataset,
                       encode: Callable[[torch.Tensor], torch.Tensor],
                       path: str | os.PathLike, batch_size: int = 8, progress: bool = True,
                       dtype: str = "float16") -> Path:
    """Encode the video of every window and store the latents.

    Args:
        windows: the windows to encode (index i of the cache = window i).
        encode: video [B, 3, F, H, W] float in [-1, 1] -> latents [B, C, T', h, w] (called under no_grad).
        path: the .npy file to produce.
        batch_size: windows per ``encode`` call.
        dtype: "float16" or "float32" storage.
    Returns:
        ``path``. Returns at once if a complete cache for the same windows is already there.
    """
    from tqdm.auto import tqdm

    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype: expected 'float16' or 'float32', got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    path = Path(path)
    partial, progress_file, meta_file = _paths(path)
    fp = _fingerprint(windows)
    n = len(windows)
    if path.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("fingerprint") == fp and meta.get("num_windows") == n:
            return path
    path.parent.mkdir(parents=True, exist_ok=True)

    done, arr = 0, None
    if partial.exists() and progress_file.exists():
        rec = json.loads(progress_file.read_text())
        if rec.get("fingerprint") == fp and rec.get("num_windows") == n and rec.get("dtype") == dtype:
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
                                                  "dtype": dtype, "shape": list(arr.shape)})
                bar.update(len(idx))
    finally:
        bar.close()
    shape = list(arr.shape)
    del arr
    os.replace(partial, path)
    atomic_write_json(meta_file, {"fingerprint": fp, "num_windows": n, "dtype": dtype, "shape": shape,
                                  "episodes": windows.episodes})
    progress_file.unlink(missing_ok=True)
    return path


class CachedWindowDataset(Dataset):
    """The windows of ``windows`` with precomputed latents instead of video.

    Item: the WindowDataset dict without ``video``, plus ``latents`` float32 [C, T', h, w]. The action
    branch's current frame is ``latents[:, 0]`` (full latent resolution), so no video is decoded.
    """

    def __init__(self, windows: WindowDataset, path: str | os.PathLike):
        self.windows = windows
        self.path = Path(path)
        _, _, meta_file = _paths(self.path)
        if not self.path.exists():
            raise FileNotFoundError(f"latent cache missing: {self.path} (build it with build_latent_cache)")
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
            if meta.get("fingerprint") != _fingerprint(windows):
                raise ValueError(f"latent cache {self.path} was built for other windows "
                                 f"(episodes {meta.get('episodes')}); rebuild it")
        self.latents = np.load(self.path, mmap_mode="r")
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
