"""LeRobot-format datasets: a v2.1 writer and a v2.1 / v3.0 reader.

Layout written (v2.1)::

    root/meta/info.json                 codebase_version "v2.1", fps, features, splits, path templates
    root/meta/episodes.jsonl            {"episode_index", "tasks": [str], "length", ...}
    root/meta/tasks.jsonl               {"task_index", "task"}
    root/meta/episodes_stats.jsonl      {"episode_index", "stats": {feature: {min,max,mean,std,count}}}
    root/data/chunk-000/episode_000000.parquet
        columns observation.state, action, timestamp, frame_index, episode_index, index, task_index
    root/videos/chunk-000/<video_key>/episode_000000.mp4     (yuv420p, h264 when available)

Every file is written (``lwam._atomic``) to a temporary name and renamed, and the meta files are rewritten after the
episode's data and videos are in place, so a crash never leaves a half episode that readers can see.
Videos are decoded with PyAV to uint8 ``[T, H, W, 3]``.

Modules: ``format`` (keys, path templates, meta files), ``video`` (encode / decode), ``stats``
(episodes_stats), ``writer`` (:class:`LeRobotWriter`), ``reader`` (:class:`LeRobotReader`).
"""
from __future__ import annotations

from lwam.data.lerobot.format import (ACTION_KEY, CODEBASE_VERSION, DATA_PATH, DEFAULT_CHUNKS_SIZE, IMAGE_PREFIX,
                                      STATE_KEY, VIDEO_PATH)
from lwam.data.lerobot.reader import LeRobotReader
from lwam.data.lerobot.video import VideoDecodeError, decode_video, encode_video, video_codec
from lwam.data.lerobot.writer import LeRobotWriter

__all__ = ["LeRobotReader", "LeRobotWriter", "VideoDecodeError", "encode_video", "decode_video", "video_codec",
           "STATE_KEY", "ACTION_KEY", "IMAGE_PREFIX", "CODEBASE_VERSION", "DEFAULT_CHUNKS_SIZE", "DATA_PATH",
           "VIDEO_PATH"]
