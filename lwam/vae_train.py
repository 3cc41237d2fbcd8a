"""Train a (small) Wan-architecture VAE from scratch, for presets without released weights (``tiny``).

Objective: L1 + MSE reconstruction of clips in [-1, 1], decoded from the posterior mean (or a posterior
sample with ``sample_posterior=True``: slower to converge in a short run, since the initial log-variance
around 0 drowns the small initial means in noise), plus a very small KL term (``kl_weight``, default 1e-6)
that only keeps the latent scale from drifting. AdamW with linear warm-up
and cosine decay to 10 %, gradient clipping.

Latent statistics. The diffusion model expects normalised latents z = (mu - mean) / std with roughly unit
scale per channel. The published ``Wan2.1_VAE.pth`` comes with fixed statistics (in ``VAEConfig``); a freshly
trained VAE does not, so after training :func:`train_vae` runs :func:`estimate_latent_stats` on the training
clips (per-channel mean and std of the posterior mean over batch, time and space) and stores them with
``vae.set_latent_stats(mean, std)``. That writes the VAE's (non-persistent) buffers and ``vae.cfg.latent_mean
/ latent_std`` -- so they travel with any config saved afterwards -- and the checkpoint written here keeps
them in its safetensors metadata, which ``WanVAE.load_pretrained`` / :func:`load_vae_checkpoint` apply.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lwam._atomic import atomic_path
from lwam.config import VAEConfig
from lwam.model.vae import WanVAE
from lwam.schedule import warmup_cosine

__all__ = ["train_vae", "estimate_latent_stats", "save_vae_checkpoint", "load_vae_checkpoint", "VAE_WEIGHTS_NAME"]

VAE_WEIGHTS_NAME = "vae.safetensors"


class _Clips:
    """Uniform access to clips held in a tensor [N, 3, T, H, W] or a Dataset whose items are clips
    [3, T, H, W] (or a tuple / dict holding one under ``video``)."""

    def __init__(self, frames: torch.Tensor | Dataset, vae: WanVAE) -> None:
        self.frames = frames
        if isinstance(frames, torch.Tensor):
            self.n = frames.shape[0] if frames.dim() == 5 else 0
            probe = frames[:1] if frames.dim() == 5 else frames
        elif hasattr(frames, "__getitem__") and hasattr(frames, "__len__"):
            self.n = len(frames)
            probe = self._item(0).unsqueeze(0) if self.n else None
        else:
            raise TypeError(f"frames: expected a tensor [N, 3, T, H, W] or a Dataset of clips [3, T, H, W], "
                            f"got {type(frames).__name__}")
        if self.n == 0:
            raise ValueError("frames: expected at least one clip, got none")
        vae.check_video(probe, name="frames")
        self.num_frames = probe.shape[2]

    def _item(self, i: int) -> torch.Tensor:
        item = self.frames[i]
        if isinstance(item, dict):
            item = item.get("video", item.get("frames"))
        elif isinstance(item, (tuple, list)):
            item = item[0]
        if not isinstance(item, torch.Tensor) or item.dim() != 4:
            raise TypeError(f"frames[{i}]: expected a clip tensor [3, T, H, W], got "
                            f"{type(item).__name__}{tuple(item.shape) if isinstance(item, torch.Tensor) else ''}")
        return item

    def batch(self, idx: list[int]) -> torch.Tensor:
        """[len(idx), 3, T, H, W] float32."""
        if isinstance(self.frames, torch.Tensor):
            return self.frames[torch.as_tensor(idx)].float()
        return torch.stack([self._item(i) for i in idx]).float()


def _batches(clips: _Clips, batch_size: int, limit: int | None = None):
    n = clips.n if limit is None else min(clips.n, limit)
    for start in range(0, n, batch_size):
        yield clips.batch(list(range(start, min(start + batch_size, n))))


@torch.no_grad()
def estimate_latent_stats(vae: WanVAE, frames: torch.Tensor | Dataset, batch_size: int = 8,
                          max_clips: int | None = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std [z_dim] (float32, CPU) of the VAE's raw posterior mean over the clips
    ``frames`` ([N, 3, T, H, W] or a Dataset of [3, T, H, W]), pooled over clips, latent frames and pixels.

    Use ``vae.set_latent_stats(mean, std)`` to make ``vae.encode`` return roughly unit-scale latents.
    """
    clips = _Clips(frames, vae)
    was_training = vae.training
    vae.eval()
    device = vae.conv1.weight.device
    total = torch.zeros(vae.z_dim, dtype=torch.float64)
    total_sq = torch.zeros(vae.z_dim, dtype=torch.float64)
    count = 0
    for x in _batches(clips, batch_size, max_clips):
        mu, _ = vae.encode_moments(x.to(device), chunked=False)
        mu = mu.double().transpose(0, 1).reshape(vae.z_dim, -1).cpu()
        total += mu.sum(1)
        total_sq += mu.square().sum(1)
        count += mu.shape[1]
    vae.train(was_training)
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0.0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def save_vae_checkpoint(vae: WanVAE, path: str | os.PathLike, step: int | None = None) -> Path:
    """Write ``vae``'s state dict as safetensors at ``path`` atomically (temporary file, then rename), with
    the VAE config and latent statistics in the metadata. Returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in vae.state_dict().items()}
    meta = {
        "format": "lwam-wan-vae",
        "config": json.dumps(dataclasses.asdict(vae.cfg)),
        "latent_mean": json.dumps([float(v) for v in vae.latent_mean]),
        "latent_std": json.dumps([float(v) for v in vae.latent_std]),
    }
    if step is not None:
        meta["step"] = str(step)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def load_vae_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> WanVAE:
    """Rebuild a VAE written by :func:`save_vae_checkpoint` (config and latent statistics from the
    metadata, tensors checked strictly against the layout)."""
    from lwam._safe_load import read_safetensors_metadata

    meta = read_safetensors_metadata(path, "VAE checkpoint")
    if "config" not in meta:
        raise ValueError(f"{path}: no 'config' in the safetensors metadata; load it with "
                         f"WanVAE(cfg).load_pretrained(path) instead")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(meta["config"]).items()}
    vae = WanVAE(VAEConfig(**fields)).load_pretrained(path)
    return vae.to(device).eval()


def train_vae(vae: WanVAE, frames: torch.Tensor | Dataset, steps: int = 300, lr: float = 2e-3,
              batch_size: int = 8, out_dir: str | os.PathLike | None = None, progress: bool = True,
              seed: int = 0, log: Callable[[dict[str, Any]], None] | None = None, *,
              kl_weight: float = 1e-6, weight_decay: float = 0.01, grad_clip: float = 1.0,
              warmup_steps: int | None = None, clip_frames: int | None = None, sample_posterior: bool = False,
              log_every: int = 10, eval_clips: int = 16, update_latent_stats: bool = True) -> dict[str, Any]:
    """Train ``vae`` in place on clips ``frames`` ([N, 3, T, H, W] in [-1, 1], or a Dataset of [3, T, H, W]).

    Each step draws ``batch_size`` clips (shuffled epochs, seeded by ``seed``); with ``clip_frames`` (1 + f*k)
    a random window of that many frames is cut from each batch, which is cheaper than whole clips. Loss:
    L1 + MSE between the clip and the reconstruction of a posterior sample (the mean if not
    ``sample_posterior``) + ``kl_weight`` * KL(q || N(0, 1)) (per element). ``log`` receives a metrics dict
    every ``log_every`` steps. Afterwards (if ``update_latent_stats``) the latent statistics are re-estimated
    on up to 256 training clips and set on the VAE (see the module docstring), and if ``out_dir`` is given,
    ``out_dir/vae.safetensors`` is written atomically.

    Returns the final metrics: ``loss``, ``l1``, ``mse``, ``kl`` (mean over the last ``log_every`` steps),
    ``recon_l1``, ``recon_mse``, ``psnr`` (deterministic encode + decode, clamped, on up to ``eval_clips``
    training clips; PSNR for the [-1, 1] range), ``steps``, ``seconds``, ``latent_mean``, ``latent_std``
    (lists) and ``checkpoint`` (path or None).
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps, batch_size, lr: expected positive values, got {steps}, {batch_size}, {lr}")
    clips = _Clips(frames, vae)
    f = vae.temporal_factor
    if clip_frames is not None and (clip_frames < 1 or (clip_frames - 1) % f or clip_frames > clips.num_frames):
        raise ValueError(f"clip_frames: expected 1 + {f}*k and at most T = {clips.num_frames}, got {clip_frames}")
    device = vae.conv1.weight.device
    gen = torch.Generator().manual_seed(seed)
    warmup = warmup_steps if warmup_steps is not None else min(20, max(1, steps // 10))
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.99),
                            weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, steps, floor=0.1))

    was_training = vae.training
    vae.train()
    order: list[int] = []
    window: list[tuple[float, float, float, float]] = []
    pending: list[torch.Tensor] = []  # per-step (loss, l1, mse, kl) on the device, read once per interval
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="train vae", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if len(order) < batch_size:
            order += torch.randperm(clips.n, generator=gen).tolist() * max(1, -(-batch_size // clips.n))
        idx, order = order[:batch_size], order[batch_size:]
        x = clips.batch(idx)
        if clip_frames is not None and clip_frames < x.shape[2]:
            start = int(torch.randint(0, x.shape[2] - clip_frames + 1, (1,), generator=gen))
            x = x[:, :, start:start + clip_frames]
        x = x.to(device)

        out = vae(x, sample_posterior=sample_posterior, generator=gen if device.type == "cpu" else None)
        recon = out.recon.float()
        l1 = (recon - x).abs().mean()
        mse = F.mse_loss(recon, x)
        mean, logvar = out.mean.float(), out.logvar.float().clamp(-30.0, 20.0)
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
        loss = l1 + mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), grad_clip)
        opt.step()
        sched.step()

        pending.append(torch.stack([loss.detach(), l1.detach(), mse.detach(), kl.detach()]))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            rows = torch.stack(pending).cpu().tolist()  # the one host sync of the interval
            first = step + 1 - len(rows)
            for i, row in enumerate(rows):
                if not math.isfinite(row[0]):
                    raise FloatingPointError(f"train_vae: non-finite loss at step {first + i} (l1 {row[1]}, "
                                             f"mse {row[2]}, kl {row[3]}); lower lr")
            pending.clear()
            window = (window + [tuple(r) for r in rows])[-log_every:]
            bar.set_postfix(loss=f"{window[-1][0]:.4f}", l1=f"{window[-1][1]:.4f}")
            if log is not None:
                last = window[-1]
                log({"step": step + 1, "loss": last[0], "l1": last[1], "mse": last[2], "kl": last[3],
                     "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - t0})
    bar.close()

    avg = [sum(v[i] for v in window) / len(window) for i in range(4)]
    metrics: dict[str, Any] = {"steps": steps, "loss": avg[0], "l1": avg[1], "mse": avg[2], "kl": avg[3]}
    vae.eval()
    with torch.no_grad():
        n_el, sum_abs, sum_sq = 0, 0.0, 0.0
        for x in _batches(clips, batch_size, eval_clips):
            x = x.to(device)
            mu, _ = vae.encode_moments(x, chunked=False)
            y = vae._decode_raw(mu, chunked=False).float().clamp(-1.0, 1.0)
            sum_abs += float((y - x).abs().sum())
            sum_sq += float((y - x).square().sum())
            n_el += x.numel()
    metrics["recon_l1"] = sum_abs / n_el
    metrics["recon_mse"] = sum_sq / n_el
    metrics["psnr"] = 10.0 * math.log10(4.0 / max(metrics["recon_mse"], 1e-12))
    if update_latent_stats:
        vae.set_latent_stats(*estimate_latent_stats(vae, frames, batch_size=batch_size))
    metrics["latent_mean"] = [float(v) for v in vae.latent_mean]
    metrics["latent_std"] = [float(v) for v in vae.latent_std]
    metrics["checkpoint"] = None
    if out_dir is not None:
        metrics["checkpoint"] = str(save_vae_checkpoint(vae, Path(out_dir) / VAE_WEIGHTS_NAME, step=steps))
    metrics["seconds"] = time.perf_counter() - t0
    vae.train(was_training)
    if log is not None:
        log({"step": steps, "final": True, **{k: v for k, v in metrics.items() if not isinstance(v, list)}})
    return metrics
