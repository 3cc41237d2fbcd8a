"""Training windows (docs/model.md, "Training objective").

A window starts at every frame t of every episode and spans 33 steps: the actions t .. t+H-1
(H = ``chunk_size`` = 32), the proprio state at t, and ``num_frames`` = 9 video frames at
t, t+4, ..., t+32. Indices past the episode's last frame are clamped to it and flagged in
``actions_is_pad`` / ``frames_is_pad``.

Each episode's videos are decoded once and composed (camera layout, rotation, resize) into uint8
frames [T, H, W, 3]. With ``frame_cache="disk"`` (default) those frames are stored as one ``.npy`` per
episode under the dataset directory (``<root>/cache/frames_<layout>_<H>x<W>...``), written atomically
and memory-mapped afterwards, so decoding happens once per dataset, not once per run, and an
interrupted preparation resumes where it stopped; ``"memory"`` keeps decoded episodes in an LRU dict.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lwam._atomic import atomic_path
import torch
from torch.utils.data import Dataset

from lwam.data.cameras import compose_uint8, layout_slots
from lwam.data.lerobot import LeRobotReader
from lwam.data.normalize import Normalizer, dataset_stats
from lwam.validate import check_finite_rows


class WindowDataset(Dataset):
    """Windows of a LeRobot dataset, one per frame.

    Args:
        dataset: a :class:`LeRobotReader` or its directory.
        cfg: :class:`lwam.config.DataConfig` (image size, chunk, frames, stride, cameras, layout, norms).
        normalizer: maps ``action`` / ``observation.state``; None builds one from the dataset's stored
            stats and ``cfg``.
        episodes: episode indices to use (default all).
        frame_cache: "disk" (memory-mapped .npy per episode) or "memory" (LRU of decoded episodes).
        cache_dir: where the disk frame cache lives (default under the dataset root).
        max_cached_episodes: LRU bound on episodes held in memory (or open memmaps).
        window_stride: windows start every ``window_stride`` frames of an episode (1: every frame).

    Item (dict):
        video          float32 [3, F, H, W] in [-1, 1]   (F = num_frames; frames t, t+s, ..., clamped)
        actions        float32 [Hc, A] normalised        (Hc = chunk_size; actions t .. t+Hc-1, clamped)
        actions_is_pad bool [Hc]
        proprio        float32 [P] normalised            (state at t)
        frames_is_pad  bool [F]
        task_index     int;  instruction str;  episode_index int;  frame_index int (= t)
    """

    def __init__(self, dataset: LeRobotReader | str | os.PathLike, cfg: Any,
                 normalizer: Normalizer | None = None, episodes: Sequence[int] | None = None,
                 frame_cache: str = "disk", cache_dir: str | os.PathLike | None = None,
                 max_cached_episodes: int = 64, window_stride: int = 1):
        self.dataset = dataset if isinstance(dataset, LeRobotReader) else LeRobotReader(dataset)
        self.cfg = cfg
        ds = self.dataset
        if frame_cache not in ("disk", "memory"):
            raise ValueError(f"frame_cache: expected 'disk' or 'memory', got {frame_cache!r}")
        self.frame_cache = frame_cache
        self.normalizer = normalizer if normalizer is not None else Normalizer.from_config(
            dataset_stats(ds), cfg, state_key=ds.state_key, action_key=ds.action_key)
        self.episodes = [int(e) for e in (episodes if episodes is not None else ds.episode_indices)]
        if not self.episodes:
            raise ValueError("episodes: expected at least one episode")
        self.video_keys = [ds.resolve_camera(c) for c in cfg.cameras]
        layout_slots(cfg.camera_layout, len(self.video_keys), cfg.image_height, cfg.image_width)
        a_dim = ds.features[ds.action_key]["shape"][0]
        p_dim = ds.features[ds.state_key]["shape"][0]
        if a_dim != cfg.action_dim:
            raise ValueError(f"cfg.action_dim={cfg.action_dim} but dataset {ds.root} has action dim {a_dim}")
        if p_dim != cfg.proprio_dim:
            raise ValueError(f"cfg.proprio_dim={cfg.proprio_dim} but dataset {ds.root} has state dim {p_dim}")
        if window_stride < 1:
            raise ValueError(f"window_stride: expected >= 1, got {window_stride}")
        self.window_stride = int(window_stride)
        self.lengths = np.array([ds.episode_length(e) for e in self.episodes], dtype=np.int64)
        self.num_windows = -(-self.lengths // self.window_stride)  # windows per episode
        self.starts = np.concatenate([[0], np.cumsum(self.num_windows)])
        self.action_offsets = np.arange(cfg.chunk_size)
        self.frame_offsets = np.arange(cfg.num_frames) * cfg.frame_stride
        tag = "_".join([cfg.camera_layout, f"{cfg.image_height}x{cfg.image_width}",
                        "rot" if cfg.rotate_180 else "norot",
                        hashlib.sha1("|".join(self.video_keys).encode()).hexdigest()[:8]])
        self.cache_dir = Path(cache_dir) if cache_dir is not None else ds.root / "cache" / f"frames_{tag}"
        self.max_cached_episodes = int(max_cached_episodes)
        self._frames: OrderedDict[int, np.ndarray] = OrderedDict()
        self._low: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Window index -> (episode_index, frame t)."""
        if not 0 <= index < len(self):
            raise IndexError(f"window index {index} out of range [0, {len(self)})")
        pos = int(np.searchsorted(self.starts, index, side="right") - 1)
        return self.episodes[pos], int(index - self.starts[pos]) * self.window_stride

    # -- per-episode data -----------------------------------------------------------------
    def _episode_low(self, ep: int) -> dict[str, torch.Tensor]:
        """Normalised actions [T, A] and proprio [T, P] of an episode, computed once."""
        if ep not in self._low:
            d = self.dataset.episode_data(ep)
            ds = self.dataset
            for key in (ds.action_key, ds.state_key):
                check_finite_rows(d[key], f"{ds.root}: episode {ep} {key!r}")
            self._low[ep] = {
                "actions": torch.from_numpy(self.normalizer.apply(ds.action_key, d[ds.action_key])).float(),
                "proprio": torch.from_numpy(self.normalizer.apply(ds.state_key, d[ds.state_key])).float(),
            }
        return self._low[ep]

    def _cache_file(self, ep: int) -> Path:
        return self.cache_dir / f"episode_{ep:06d}.npy"

    def _decode_composed(self, ep: int) -> np.ndarray:
        cfg = self.cfg
        frames = [self.dataset.episode_video(ep, k) for k in self.video_keys]
        return compose_uint8(frames, cfg.camera_layout, cfg.image_height, cfg.image_width, cfg.rotate_180)

    def _cache_is_fresh(self, ep: int, path: Path) -> bool:
        if not path.exists():
            return False
        mtime = path.stat().st_mtime
        for k in self.video_keys:
            vp = self.dataset.video_path(ep, k)
            if vp.exists() and vp.stat().st_mtime > mtime:
                return False
        return True

    def episode_frames(self, ep: int) -> np.ndarray:
        """Composed frames of episode ``ep``: uint8 [T, H, W, 3] (memory-mapped with the disk cache)."""
        if ep in self._frames:
            self._frames.move_to_end(ep)
            return self._frames[ep]
        n = self.dataset.episode_length(ep)
        arr: np.ndarray | None = None
        if self.frame_cache == "disk":
            path = self._cache_file(ep)
            if self._cache_is_fresh(ep, path):
                try:
                    arr = np.load(path, mmap_mode="r")
                    if arr.shape != (n, self.cfg.image_height, self.cfg.image_width, 3):
                        arr = None
                except (ValueError, OSError):
                    arr = None
            if arr is None:
                frames = self._decode_composed(ep)
                with atomic_path(path) as tmp:
                    np.save(tmp, frames)
                arr = np.load(path, mmap_mode="r")
        else:
            arr = self._decode_composed(ep)
        self._frames[ep] = arr
        while len(self._frames) > self.max_cached_episodes:
            self._frames.popitem(last=False)
        return arr

    def prepare(self, progress: bool = True) -> "WindowDataset":
        """Decode every episode's videos into the frame cache now (with a progress bar)."""
        from tqdm.auto import tqdm

        for ep in tqdm(self.episodes, desc="decode videos", unit="ep", disable=not progress):
            if self.frame_cache == "disk" and self._cache_is_fresh(ep, self._cache_file(ep)):
                continue
            self.episode_frames(ep)
        return self

    # -- windows --------------------------------------------------------------------------
    def get(self, index: int, video: bool = True) -> dict[str, Any]:
        """The window ``index``; ``video=False`` leaves out the frames (cached-latent training)."""
        ep, t = self.locate(int(index))
        n = self.dataset.episode_length(ep)
        low = self._episode_low(ep)
        a_idx = t + self.action_offsets
        f_idx = t + self.frame_offsets
        out: dict[str, Any] = {
            "actions": low["actions"][np.minimum(a_idx, n - 1)],
            "actions_is_pad": torch.from_numpy(a_idx > n - 1),
            "proprio": low["proprio"][t],
            "frames_is_pad": torch.from_numpy(f_idx > n - 1),
            "task_index": self.dataset.episode_task_index(ep),
            "instruction": self.dataset.instruction(ep),
            "episode_index": ep,
            "frame_index": t,
        }
        if video:
            frames = self.episode_frames(ep)[np.minimum(f_idx, n - 1)]  # uint8 [F, H, W, 3]
            # numpy, not torch: small elementwise torch ops contend for threads with the training step.
            v = np.ascontiguousarray(frames.transpose(3, 0, 1, 2), dtype=np.float32)
            v *= 1.0 / 127.5
            v -= 1.0
            out["video"] = torch.from_numpy(v)
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index, video=True)

    def __repr__(self) -> str:
        return (f"WindowDataset({len(self)} windows, {len(self.episodes)} episodes, "
                f"cameras={list(self.cfg.cameras)}, layout={self.cfg.camera_layout!r}, "
                f"{self.cfg.image_height}x{self.cfg.image_width})")


def collate_windows(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of sample dicts (the one collate of lwam: windows, cached windows, trainer batches):
    tensors gain a leading batch dim, ints become int64 [B], floats float32 [B], bools bool [B], strings
    list[str], anything else a list."""
    if not batch:
        raise ValueError("batch: expected at least one sample")
    out: dict[str, Any] = {}
    for key, value in batch[0].items():
        items = [b[key] for b in batch]
        if isinstance(value, torch.Tensor):
            out[key] = torch.stack(items)
        elif isinstance(value, (bool, np.bool_)):
            out[key] = torch.tensor(items, dtype=torch.bool)
        elif isinstance(value, (int, np.integer)):
            out[key] = torch.tensor(items, dtype=torch.int64)
        elif isinstance(value, (float, np.floating)):
            out[key] = torch.tensor(items, dtype=torch.float32)
        elif isinstance(value, str):
            out[key] = list(items)
        else:
            out[key] = items
    return out
