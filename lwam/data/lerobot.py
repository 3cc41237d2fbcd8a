"""LeRobot-format datasets: a v2.1 writer and a v2.1 / v3.0 reader.

Layout written (v2.1)::

    root/meta/info.json                 codebase_version "v2.1", fps, features, splits, path templates
    root/meta/episodes.jsonl            {"episode_index", "tasks": [str], "length", ...}
    root/meta/tasks.jsonl               {"task_index", "task"}
    root/meta/episodes_stats.jsonl      {"episode_index", "stats": {feature: {min,max,mean,std,count}}}
    root/data/chunk-000/episode_000000.parquet
        columns observation.state, action, timestamp, frame_index, episode_index, index, task_index
    root/videos/chunk-000/<video_key>/episode_000000.mp4     (yuv420p, h264 when available)

Every file is written to a temporary name and renamed, and the meta files are rewritten after the
episode's data and videos are in place, so a crash never leaves a half episode that readers can see.
Videos are decoded with PyAV to uint8 ``[T, H, W, 3]``.
"""
from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lwam._atomic import atomic_path
from lwam._logging import log_once

CODEBASE_VERSION = "v2.1"
DEFAULT_CHUNKS_SIZE = 1000
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
STATE_KEY = "observation.state"
ACTION_KEY = "action"
IMAGE_PREFIX = "observation.images."


class VideoDecodeError(RuntimeError):
    """A video file exists but cannot be decoded (truncated, garbage, wrong frame count)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        super().__init__(f"cannot decode video file {self.path}: {reason}")


# --------------------------------------------------------------------------------------------
# atomic file helpers
# --------------------------------------------------------------------------------------------
def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and rename it."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"LeRobot meta file missing: {path}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------
# video
# --------------------------------------------------------------------------------------------
_CODEC: str | None = None


def video_codec() -> str:
    """The best available PyAV encoder: libx264 (h264), else mpeg4."""
    global _CODEC
    if _CODEC is None:
        import av

        for name in ("libx264", "h264", "mpeg4"):
            try:
                av.codec.Codec(name, "w")
            except Exception:  # noqa: BLE001 - PyAV raises different types per version
                continue
            _CODEC = name
            break
        else:
            raise RuntimeError("PyAV has neither an h264 nor an mpeg4 encoder")
        if _CODEC == "mpeg4":
            log_once("lerobot.codec", "no h264 encoder in PyAV; writing mpeg4 videos")
    return _CODEC


def encode_video(frames: np.ndarray, path: str | os.PathLike, fps: float, crf: int = 18) -> None:
    """Encode ``frames`` uint8 [T, H, W, 3] (RGB) to an mp4 at ``path`` (yuv420p), atomically.

    H and W must be even (yuv420p subsamples chroma 2x2).
    """
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected uint8 [T,H,W,3], got {frames.dtype} {tuple(frames.shape)}")
    t, h, w, _ = frames.shape
    if t == 0:
        raise ValueError("frames: expected at least one frame, got T=0")
    if h % 2 or w % 2:
        raise ValueError(f"frames: H and W must be even for yuv420p, got H={h} W={w}")
    codec = video_codec()
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency"}
            else:
                stream.bit_rate = max(200_000, 40 * h * w)
                stream.options = {"qscale": "2"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def decode_video(path: str | os.PathLike, expected_frames: int | None = None,
                 start: int = 0, stop: int | None = None) -> np.ndarray:
    """Decode an mp4 to uint8 [T, H, W, 3] RGB (frames ``start:stop`` of the file).

    Raises FileNotFoundError for a missing file and :class:`VideoDecodeError` (naming the file) for a
    corrupt one or one whose frame count differs from ``expected_frames``.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file missing: {path}")
    out: list[np.ndarray] = []
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i < start:
                    continue
                if stop is not None and i >= stop:
                    break
                out.append(frame.to_ndarray(format="rgb24"))
    except VideoDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - av.error.* and OSError subclasses vary by version
        raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e
    if not out:
        raise VideoDecodeError(path, "no frames decoded")
    frames = np.stack(out)
    want = expected_frames
    if want is not None and frames.shape[0] != want:
        raise VideoDecodeError(path, f"expected {want} frames, decoded {frames.shape[0]}")
    return frames


def _decode_time_range(path: Path, t0: float, t1: float, fps: float, expected: int) -> np.ndarray:
    """Frames whose timestamps lie in [t0, t1) of a concatenated (v3.0) video file."""
    import av

    if not path.is_file():
        raise FileNotFoundError(f"video file missing: {path}")
    out: list[np.ndarray] = []
    half = 0.5 / fps
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            container.seek(max(0, int((t0 - 1.0) / stream.time_base)), stream=stream, backward=True)
            for frame in container.decode(stream):
                ts = float(frame.pts * stream.time_base) if frame.pts is not None else frame.time
                if ts < t0 - half:
                    continue
                if ts >= t1 - half or len(out) == expected:
                    break
                out.append(frame.to_ndarray(format="rgb24"))
    except Exception as e:  # noqa: BLE001
        raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e
    if len(out) != expected:
        raise VideoDecodeError(path, f"expected {expected} frames in [{t0:.3f}s, {t1:.3f}s), got {len(out)}")
    return np.stack(out)


# --------------------------------------------------------------------------------------------
# statistics (LeRobot episodes_stats.jsonl)
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------------
class LeRobotDataset:
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
        return (f"LeRobotDataset({str(self.root)!r}, {self.version}, episodes={self.num_episodes}, "
                f"frames={self.num_frames}, cameras={self.cameras}, fps={self.fps:g})")
