"""Figures people would rather look at than read: predicted future frames next to the real ones,
closed-loop success per task, and stage timings. PNG via matplotlib (Agg)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _to_img(x: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> uint8 [H, W, 3]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def plot_future_frames(real: torch.Tensor, predicted: torch.Tensor, out: str | os.PathLike,
                       titles: list[str] | None = None) -> Path:
    """real, predicted: [N, 3, T, H, W] in [-1, 1] (same T, H, W). One row pair per sample:
    the real frames above, the decoded predictions below; column 0 is the conditioning frame."""
    plt = _plt()
    n, _, t = real.shape[:3]
    fig, axes = plt.subplots(2 * n, t, figsize=(1.6 * t * real.shape[4] / real.shape[3], 1.7 * 2 * n),
                             squeeze=False)
    for i in range(n):
        for j in range(t):
            for r, (src, name) in enumerate(((real, "real"), (predicted, "predicted"))):
                ax = axes[2 * i + r][j]
                ax.imshow(_to_img(src[i, :, j]))
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(name if titles is None else f"{titles[i]}\n{name}", fontsize=7)
                if i == 0 and r == 0:
                    ax.set_title("t=0 (given)" if j == 0 else f"t+{j}", fontsize=8)
    fig.suptitle("Future frames: real (top) vs Light-WAM video branch (bottom)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def plot_success(success: dict[str, float], blind: dict[str, float] | None, out: str | os.PathLike) -> Path:
    """Bar chart of closed-loop success per task, with the blind-vision control beside it."""
    plt = _plt()
    tasks = list(success)
    x = np.arange(len(tasks))
    w = 0.38 if blind else 0.6
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.4))
    bars = [ax.bar(x - (w / 2 if blind else 0), [100 * success[t] for t in tasks], w, label="policy")]
    if blind:
        bars.append(ax.bar(x + w / 2, [100 * blind.get(t, 0.0) for t in tasks], w,
                           label="blind control (images zeroed)"))
    for b in bars:  # values on the bars, so that a 0% bar is visible too
        ax.bar_label(b, fmt="%.0f%%", fontsize=8)
    ax.set_xticks(x, tasks, fontsize=8)
    ax.set_ylabel("success (%)")
    ax.set_ylim(0, 115)
    ax.axhline(80, color="gray", lw=0.8, ls="--")
    ax.legend(fontsize=8)
    ax.set_title("Closed-loop success on unseen seeds")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def plot_stage_times(times: dict[str, float], out: str | os.PathLike, title: str = "Wall time per stage") -> Path:
    """Horizontal bars of seconds per stage."""
    plt = _plt()
    names = list(times)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(names)))
    ax.barh(names[::-1], [times[k] for k in names[::-1]])
    for i, k in enumerate(names[::-1]):
        ax.text(times[k], i, f" {times[k]:.1f}s", va="center", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def plot_reconstructions(real: torch.Tensor, recon: torch.Tensor, out: str | os.PathLike,
                         titles: list[str] | None = None) -> Path:
    """real, recon: [N, 3, H, W] in [-1, 1]. One row per sample: the frame, then its VAE reconstruction."""
    plt = _plt()
    n = real.shape[0]
    aspect = real.shape[3] / real.shape[2]
    fig, axes = plt.subplots(n, 2, figsize=(2 * 1.7 * aspect, 1.7 * n), squeeze=False)
    for i in range(n):
        for j, (src, name) in enumerate(((real, "frame"), (recon, "VAE reconstruction"))):
            ax = axes[i][j]
            ax.imshow(_to_img(src[i]))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0 and titles is not None:
                ax.set_ylabel(titles[i], fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
