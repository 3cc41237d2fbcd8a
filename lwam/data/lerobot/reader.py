"""Read a LeRobot dataset (v2.1; v3.0 read-only as well): :class:`LeRobotReader`.

Named apart from LeRobot's own ``LeRobotReader`` (a differently shaped torch dataset of frames): this
class reads episodes (tables, videos, meta) for :class:`lwam.data.windows.WindowDataset`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lwam.data.lerobot.format import ACTION_KEY, DEFAULT_CHUNKS_SIZE, IMAGE_PREFIX, STATE_KEY, _read_jsonl
from lwam.data.lerobot.video import _decode_time_range, decode_video


class LeRobotReader:
    """Read a LeRobot dataset (v2.1; v3.0 read-only as well).

    Attributes:
        root, info (info.json), fps, version, features
        video_keys: e.g. ["observation.images.corner", ...]; cameras: the same without the prefix.
        tasks: list[str] indexed by task_index.
        episodes: list of episodes.jsonl rows (``episode_index``, ``tasks``, ``length``, ...).
        num_episodes, num_frames.
    """

    def __init__(self, root: str | os.PathLike, state_key: str = STATE_KEY, action_key: str = ACTION_KEY):
        self.root = Path(root)
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"not a LeRobot dataset (missing {info_path})")
        self.info: dict[str, Any] = json.loads(info_path.read_text())
        self.version = str(self.info.get("codebase_version", ""))
        if self.version not in ("v2.0", "v2.1", "v3.0"):
            raise ValueError(f"{info_path}: unsupported codebase_version {self.version!r} (v2.x or v3.0)")
        self.fps = float(self.info["fps"])
        self.features: dict[str, Any] = self.info["features"]
        self.state_key, self.action_key = state_key, action_key
        for k in (state_key, action_key):
            if k not in self.features:
                raise ValueError(f"{info_path}: feature {k!r} missing (have {sorted(self.features)})")
        self.video_keys = [k for k, v in self.features.items() if v.get("dtype") == "video"]
        self.cameras = [k[len(IMAGE_PREFIX):] if k.startswith(IMAGE_PREFIX) else k for k in self.video_keys]
        self._data_cache: dict[int, dict[str, np.ndarray]] = {}
        if self.version == "v3.0":
            self._load_meta_v3()
        else:
            meta = self.root / "meta"
            self.tasks = [r["task"] for r in sorted(_read_jsonl(meta / "tasks.jsonl"), key=lambda r: r["task_index"])]
            self.episodes = sorted(_read_jsonl(meta / "episodes.jsonl"), key=lambda r: r["episode_index"])
        self._by_index = {int(e["episode_index"]): i for i, e in enumerate(self.episodes)}

    # -- metadata -------------------------------------------------------------------------
    def _load_meta_v3(self) -> None:
        import pandas as pd

        meta = self.root / "meta"
        tasks = pd.read_parquet(meta / "tasks.parquet")
        if "task" not in tasks.columns:  # v3.0 stores the task string as the index
            tasks = tasks.reset_index().rename(columns={"index": "task", "__index_level_0__": "task"})
        self.tasks = [str(r.task) for r in tasks.sort_values("task_index").itertuples()]
        files = sorted((meta / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise FileNotFoundError(f"v3.0 episodes parquet missing under {meta / 'episodes'}")
        eps = pd.concat([pd.read_parquet(f) for f in files]).sort_values("episode_index")
        self.episodes = []
        for r in eps.to_dict("records"):
            row = {"episode_index": int(r["episode_index"]), "length": int(r["length"]),
                   "tasks": [str(t) for t in r["tasks"]],
                   "_data": (int(r["data/chunk_index"]), int(r["data/file_index"]))}
            for key in self.video_keys:
                row[f"_video:{key}"] = (int(r[f"videos/{key}/chunk_index"]), int(r[f"videos/{key}/file_index"]),
                                        float(r[f"videos/{key}/from_timestamp"]), float(r[f"videos/{key}/to_timestamp"]))
            self.episodes.append(row)

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @property
    def num_frames(self) -> int:
        return sum(int(e["length"]) for e in self.episodes)

    @property
    def episode_indices(self) -> list[int]:
        return [int(e["episode_index"]) for e in self.episodes]

    def _episode(self, ep: int) -> dict[str, Any]:
        if ep not in self._by_index:
            raise IndexError(f"episode_index {ep} not in dataset {self.root} (have {self.num_episodes})")
        return self.episodes[self._by_index[ep]]

    def episode_length(self, ep: int) -> int:
        return int(self._episode(ep)["length"])

    def image_size(self, video_key: str) -> tuple[int, int]:
        """(H, W) of a video feature."""
        shape = self.features[self._video_key(video_key)]["shape"]
        names = self.features[self._video_key(video_key)].get("names") or []
        if list(names[:1]) == ["channels"]:
            return int(shape[1]), int(shape[2])
        return int(shape[0]), int(shape[1])

    def _video_key(self, key: str) -> str:
        if key in self.video_keys:
            return key
        if IMAGE_PREFIX + key in self.video_keys:
            return IMAGE_PREFIX + key
        matches = [k for k in self.video_keys if k.split(".")[-1] == key]
        if len(matches) == 1:
            return matches[0]
        raise KeyError(f"camera {key!r} not in dataset {self.root} (video keys: {self.video_keys})")

    def resolve_camera(self, name: str) -> str:
        """Map a camera name ("corner") or a full key to the dataset's video key."""
        return self._video_key(name)

    # -- frames ---------------------------------------------------------------------------
    def _chunk(self, ep: int) -> int:
        return ep // int(self.info.get("chunks_size", DEFAULT_CHUNKS_SIZE))

    def data_path(self, ep: int) -> Path:
        if self.version == "v3.0":
            c, f = self._episode(ep)["_data"]
            return self.root / self.info["data_path"].format(chunk_index=c, file_index=f)
        return self.root / self.info["data_path"].format(episode_chunk=self._chunk(ep), episode_index=ep)

    def video_path(self, ep: int, key: str) -> Path:
        key = self._video_key(key)
        if self.version == "v3.0":
            c, f, _, _ = self._episode(ep)[f"_video:{key}"]
            return self.root / self.info["video_path"].format(video_key=key, chunk_index=c, file_index=f)
        return self.root / self.info["video_path"].format(episode_chunk=self._chunk(ep), video_key=key,
                                                           episode_index=ep)

    def episode_data(self, ep: int) -> dict[str, np.ndarray]:
        """Low-dimensional columns of one episode.

        Returns a dict with ``observation.state`` float32 [T, P], ``action`` float32 [T, A],
        ``timestamp`` float32 [T], ``frame_index``, ``index``, ``task_index`` int64 [T] (the keys use
        the dataset's state/action names).
        """
        if ep in self._data_cache:
            return self._data_cache[ep]
        import pyarrow.parquet as pq

        path = self.data_path(ep)
        if not path.is_file():
            raise FileNotFoundError(f"episode data file missing: {path}")
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"cannot read episode data file {path}: {e}") from e
        if self.version == "v3.0":
            import pyarrow.compute as pc

            table = table.filter(pc.equal(table["episode_index"], ep))
        out: dict[str, np.ndarray] = {}
        for key in (self.state_key, self.action_key):
            col = table[key].combine_chunks()
            out[key] = np.asarray(col.flatten(), dtype=np.float32).reshape(len(col), -1)
        for key, dtype in (("timestamp", np.float32), ("frame_index", np.int64), ("index", np.int64),
                           ("task_index", np.int64)):
            if key in table.column_names:
                out[key] = table[key].to_numpy().astype(dtype)
        if "task_index" not in out:
            out["task_index"] = np.full(len(out[self.state_key]), self.episode_task_index(ep), np.int64)
        order = np.argsort(out["frame_index"]) if "frame_index" in out else None
        if order is not None and not np.all(order == np.arange(len(order))):
            out = {k: v[order] for k, v in out.items()}
        if len(out[self.state_key]) != self.episode_length(ep):
            raise ValueError(f"{path}: {len(out[self.state_key])} rows, episodes meta says "
                             f"{self.episode_length(ep)}")
        self._data_cache[ep] = out
        return out

    def episode_task_index(self, ep: int) -> int:
        task = self._episode(ep)["tasks"][0]
        return self.tasks.index(task) if task in self.tasks else 0

    def instruction(self, ep: int) -> str:
        return str(self._episode(ep)["tasks"][0])

    def episode_video(self, ep: int, key: str) -> np.ndarray:
        """Decoded frames of one camera: uint8 [T, H, W, 3], T = episode length.

        Raises FileNotFoundError / :class:`VideoDecodeError` naming the file when it is missing or corrupt.
        """
        key = self._video_key(key)
        path = self.video_path(ep, key)
        n = self.episode_length(ep)
        if self.version == "v3.0":
            _, _, t0, t1 = self._episode(ep)[f"_video:{key}"]
            return _decode_time_range(path, t0, t1, self.fps, n)
        return decode_video(path, expected_frames=n)

    def episode_stats(self) -> list[dict[str, Any]]:
        """Rows of meta/episodes_stats.jsonl (v2.1), [] when absent."""
        path = self.root / "meta" / "episodes_stats.jsonl"
        return _read_jsonl(path) if path.exists() else []

    def __repr__(self) -> str:
        return (f"LeRobotReader({str(self.root)!r}, {self.version}, episodes={self.num_episodes}, "
                f"frames={self.num_frames}, cameras={self.cameras}, fps={self.fps:g})")
