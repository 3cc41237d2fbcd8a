"""Video files of a LeRobot dataset: encoding (PyAV, h264 when available, else mpeg4) and decoding to
uint8 ``[T, H, W, 3]``, whole files or time ranges."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from lwam._atomic import atomic_path
from lwam._logging import log_once
from lwam.errors import VideoDecodeError




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
