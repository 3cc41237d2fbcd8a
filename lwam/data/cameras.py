"""Camera layouts: how several camera images become the one frame the VAE sees.

- ``"libero"``: two cameras (agentview, wrist), each resized to H x W/2 (square for 224x448), side by
  side -> [3, H, W].
- ``"robotwin"``: head camera on top (H - H/3 rows, full width), the two wrist cameras below at
  H/3 x W/2 each, side by side (384x320: head 256x320, wrists 128x160).
- ``"row"``: N cameras side by side, each resized to H x W/N.

``rotate_180`` turns every camera image by 180 degrees before placement (LIBERO's images are upside down).
Resizing is bilinear with antialiasing and only happens when sizes differ, so a layout of images that
already have the target size is exact.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

LAYOUTS = ("libero", "robotwin", "row")


def layout_slots(layout: str, num_cameras: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """Placement of each camera as (top, left, h, w) in the composed [H, W] frame."""
    if layout == "libero":
        if num_cameras != 2:
            raise ValueError(f"camera layout 'libero' needs 2 cameras, got {num_cameras}")
        if width % 2:
            raise ValueError(f"camera layout 'libero': width must be even, got {width}")
        w = width // 2
        return [(0, 0, height, w), (0, w, height, w)]
    if layout == "robotwin":
        if num_cameras != 3:
            raise ValueError(f"camera layout 'robotwin' needs 3 cameras (head, left, right), got {num_cameras}")
        if height % 3 or width % 2:
            raise ValueError(f"camera layout 'robotwin': height must be divisible by 3 and width even, "
                             f"got {height}x{width}")
        hw = height // 3
        hh = height - hw
        return [(0, 0, hh, width), (hh, 0, hw, width // 2), (hh, width // 2, hw, width // 2)]
    if layout == "row":
        if num_cameras < 1 or width % num_cameras:
            raise ValueError(f"camera layout 'row': width {width} must be divisible by the number of "
                             f"cameras {num_cameras}")
        w = width // num_cameras
        return [(0, i * w, height, w) for i in range(num_cameras)]
    raise ValueError(f"camera_layout: expected one of {LAYOUTS}, got {layout!r}")


def compose_cameras(images: Sequence[torch.Tensor], layout: str, height: int, width: int,
                    rotate_180: bool = False) -> torch.Tensor:
    """Compose camera images into one frame per time step.

    Args:
        images: one tensor per camera, each [T, 3, h_i, w_i] (or [3, h_i, w_i]); uint8 in [0, 255] or
            float (any range; the output keeps the input's scale, uint8 input gives float in [0, 255]).
        layout: "libero" | "robotwin" | "row".
        height, width: size of the composed frame.
        rotate_180: rotate every camera image by 180 degrees first.
    Returns:
        float32 [T, 3, height, width] (or [3, height, width] for unbatched input).
    """
    if not images:
        raise ValueError("images: expected at least one camera")
    unbatched = images[0].dim() == 3
    ims = [im.unsqueeze(0) if unbatched else im for im in images]
    t = ims[0].shape[0]
    for i, im in enumerate(ims):
        if im.dim() != 4 or im.shape[1] != 3 or im.shape[0] != t:
            raise ValueError(f"images[{i}]: expected [T={t}, 3, h, w], got {tuple(im.shape)}")
    slots = layout_slots(layout, len(ims), height, width)
    out = torch.zeros(t, 3, height, width, dtype=torch.float32, device=ims[0].device)
    for im, (top, left, h, w) in zip(ims, slots):
        im = im.float()
        if rotate_180:
            im = im.flip(-2, -1)
        if tuple(im.shape[-2:]) != (h, w):
            im = F.interpolate(im, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        out[:, :, top:top + h, left:left + w] = im
    return out[0] if unbatched else out


def compose_uint8(frames: Sequence[np.ndarray], layout: str, height: int, width: int,
                  rotate_180: bool = False) -> np.ndarray:
    """Like :func:`compose_cameras` for decoded videos: each camera uint8 [T, h, w, 3] -> uint8 [T, H, W, 3]."""
    ims = [torch.from_numpy(np.ascontiguousarray(f)).permute(0, 3, 1, 2) for f in frames]
    out = compose_cameras(ims, layout, height, width, rotate_180)
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def to_model_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 255] float) -> float32 in [-1, 1]."""
    return frames.float().div_(127.5).sub_(1.0)


def compose_observation(images: Mapping[str, np.ndarray], data_cfg) -> torch.Tensor:
    """One live observation (camera name -> uint8 [h, w, 3]) composed as in training.

    Cameras are taken in ``data_cfg.cameras`` order. Returns float32 [3, H, W] in [-1, 1].
    """
    missing = [c for c in data_cfg.cameras if c not in images]
    if missing:
        raise KeyError(f"images: cameras {missing} missing (have {sorted(images)})")
    frames = [np.asarray(images[c])[None] for c in data_cfg.cameras]
    out = compose_uint8(frames, data_cfg.camera_layout, data_cfg.image_height, data_cfg.image_width,
                        data_cfg.rotate_180)
    return to_model_range(torch.from_numpy(out[0]).permute(2, 0, 1))
