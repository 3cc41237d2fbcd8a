"""Write a LeRobot v2.1 dataset episode by episode (every file atomically, meta files last)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lwam._atomic import atomic_path, atomic_write_json
from lwam.data.lerobot.format import (ACTION_KEY, CODEBASE_VERSION, DATA_PATH, DEFAULT_CHUNKS_SIZE, IMAGE_PREFIX,
                                      STATE_KEY, VIDEO_PATH, _json_number, _read_jsonl, _write_jsonl)
from lwam.data.lerobot.stats import _array_stats, _image_stats
from lwam.data.lerobot.video import encode_video, video_codec


class LeRobotWriter:
    """Write a LeRobot v2.1 dataset episode by episode.

    Args:
        root: dataset directory (created). If it already holds a v2.1 dataset written with the same
            features, new episodes are appended after the existing ones (resume after a crash).
        fps: frames per second (timestamps are ``frame_index / fps``).
        state_dim, action_dim: widths of ``observation.state`` and ``action``.
        video_keys: camera names; each becomes the feature ``observation.images.<name>``.
        image_size: (H, W) of every camera's frames (even numbers).
        robot_type: free text stored in info.json.
        state_names, action_names: optional per-dimension names.
    """

    def __init__(self, root: str | os.PathLike, fps: float, state_dim: int, action_dim: int,
                 video_keys: Sequence[str], image_size: tuple[int, int], robot_type: str = "unknown",
                 state_names: Sequence[str] | None = None, action_names: Sequence[str] | None = None):
        self.root = Path(root)
        self.fps = float(fps)
        self.state_dim, self.action_dim = int(state_dim), int(action_dim)
        self.cameras = [str(k) for k in video_keys]
        self.video_keys = [IMAGE_PREFIX + k for k in self.cameras]
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.robot_type = robot_type
        self.features = self._features(state_names, action_names)
        self.episodes: list[dict[str, Any]] = []
        self.episode_stats: list[dict[str, Any]] = []
        self.tasks: list[str] = []
        self.total_frames = 0
        info_path = self.root / "meta" / "info.json"
        if info_path.exists():
            self._resume(info_path)

    def _features(self, state_names, action_names) -> dict[str, Any]:
        h, w = self.image_size
        feats: dict[str, Any] = {
            STATE_KEY: {"dtype": "float32", "shape": [self.state_dim],
                        "names": list(state_names) if state_names else [f"s{i}" for i in range(self.state_dim)]},
            ACTION_KEY: {"dtype": "float32", "shape": [self.action_dim],
                         "names": list(action_names) if action_names else [f"a{i}" for i in range(self.action_dim)]},
        }
        for key in self.video_keys:
            feats[key] = {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
                          "info": {"video.fps": _json_number(self.fps), "video.height": h, "video.width": w,
                                   "video.channels": 3, "video.codec": "h264" if video_codec() != "mpeg4" else "mpeg4",
                                   "video.pix_fmt": "yuv420p", "video.is_depth_map": False,
                                   "has_audio": False}}
        for key in ("timestamp",):
            feats[key] = {"dtype": "float32", "shape": [1], "names": None}
        for key in ("frame_index", "episode_index", "index", "task_index"):
            feats[key] = {"dtype": "int64", "shape": [1], "names": None}
        return feats

    def _resume(self, info_path: Path) -> None:
        info = json.loads(info_path.read_text())
        if info.get("codebase_version") != CODEBASE_VERSION:
            raise ValueError(f"{info_path}: cannot append to a {info.get('codebase_version')} dataset")
        old = {k: v.get("shape") for k, v in info["features"].items()}
        new = {k: v.get("shape") for k, v in self.features.items()}
        if old != new:
            raise ValueError(f"{info_path}: existing features {old} differ from the writer's {new}")
        meta = self.root / "meta"
        self.episodes = _read_jsonl(meta / "episodes.jsonl")
        self.episode_stats = _read_jsonl(meta / "episodes_stats.jsonl")
        self.tasks = [r["task"] for r in sorted(_read_jsonl(meta / "tasks.jsonl"), key=lambda r: r["task_index"])]
        self.total_frames = sum(int(e["length"]) for e in self.episodes)

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            self.tasks.append(task)
        return self.tasks.index(task)

    def add_episode(self, states: np.ndarray, actions: np.ndarray, images: Mapping[str, np.ndarray],
                    task: str, extra: Mapping[str, Any] | None = None) -> int:
        """Append one episode and commit it.

        Args:
            states: float [T, state_dim].
            actions: float [T, action_dim] (action t is taken after observing frame t).
            images: camera name -> uint8 [T, H, W, 3].
            task: the instruction sentence.
            extra: JSON-able fields stored in the episode's episodes.jsonl row (e.g. the env seed).
        Returns:
            the new episode's index.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        states = np.asarray(states, dtype=np.float32)
        actions = np.asarray(actions, dtype=np.float32)
        t = states.shape[0] if states.ndim == 2 else -1
        if states.ndim != 2 or states.shape[1] != self.state_dim or t < 1:
            raise ValueError(f"states: expected [T>=1, {self.state_dim}], got {tuple(states.shape)}")
        if actions.shape != (t, self.action_dim):
            raise ValueError(f"actions: expected [{t}, {self.action_dim}], got {tuple(actions.shape)}")
        if set(images) != set(self.cameras):
            raise ValueError(f"images: expected cameras {self.cameras}, got {sorted(images)}")
        for cam, frames in images.items():
            if np.asarray(frames).shape != (t, *self.image_size, 3) or np.asarray(frames).dtype != np.uint8:
                raise ValueError(f"images[{cam!r}]: expected uint8 [{t}, {self.image_size[0]}, "
                                 f"{self.image_size[1]}, 3], got {np.asarray(frames).dtype} "
                                 f"{tuple(np.asarray(frames).shape)}")

        ep = len(self.episodes)
        chunk = ep // DEFAULT_CHUNKS_SIZE
        task_idx = self.task_index(task)
        for cam, key in zip(self.cameras, self.video_keys):
            encode_video(np.asarray(images[cam]), self.root / VIDEO_PATH.format(
                episode_chunk=chunk, video_key=key, episode_index=ep), self.fps)
        frame_index = np.arange(t, dtype=np.int64)
        table = pa.table({
            STATE_KEY: pa.array(list(states), type=pa.list_(pa.float32(), self.state_dim)),
            ACTION_KEY: pa.array(list(actions), type=pa.list_(pa.float32(), self.action_dim)),
            "timestamp": pa.array((frame_index / self.fps).astype(np.float32)),
            "frame_index": pa.array(frame_index),
            "episode_index": pa.array(np.full(t, ep, dtype=np.int64)),
            "index": pa.array(self.total_frames + frame_index),
            "task_index": pa.array(np.full(t, task_idx, dtype=np.int64)),
        })
        data_path = self.root / DATA_PATH.format(episode_chunk=chunk, episode_index=ep)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(data_path) as tmp:
            pq.write_table(table, tmp)

        stats = {STATE_KEY: _array_stats(states), ACTION_KEY: _array_stats(actions),
                 "timestamp": _array_stats((frame_index / self.fps)[:, None]),
                 "frame_index": _array_stats(frame_index[:, None]),
                 "episode_index": _array_stats(np.full((t, 1), ep)),
                 "index": _array_stats((self.total_frames + frame_index)[:, None]),
                 "task_index": _array_stats(np.full((t, 1), task_idx))}
        for cam, key in zip(self.cameras, self.video_keys):
            stats[key] = _image_stats(np.asarray(images[cam]))
        row = {"episode_index": ep, "tasks": [task], "length": t}
        if extra:
            row.update(dict(extra))
        self.episodes.append(row)
        self.episode_stats.append({"episode_index": ep, "stats": stats})
        self.total_frames += t
        self._write_meta()
        return ep

    def _write_meta(self) -> None:
        meta = self.root / "meta"
        n = len(self.episodes)
        # Videos and parquet of every listed episode exist before the meta files name them.
        _write_jsonl(meta / "tasks.jsonl", ({"task_index": i, "task": s} for i, s in enumerate(self.tasks)))
        _write_jsonl(meta / "episodes.jsonl", self.episodes)
        _write_jsonl(meta / "episodes_stats.jsonl", self.episode_stats)
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": n,
            "total_frames": self.total_frames,
            "total_tasks": len(self.tasks),
            "total_videos": n * len(self.video_keys),
            "total_chunks": (n + DEFAULT_CHUNKS_SIZE - 1) // DEFAULT_CHUNKS_SIZE,
            "chunks_size": DEFAULT_CHUNKS_SIZE,
            "fps": _json_number(self.fps),
            "splits": {"train": f"0:{n}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH,
            "features": self.features,
        }
        atomic_write_json(meta / "info.json", info)
