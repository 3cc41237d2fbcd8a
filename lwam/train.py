"""Trainer: the implementation config it computes with (:class:`~lwam.config.ImplConfig`: ``lwam train``
runs the fast one, ``--impl reference`` the published arithmetic), AdamW + warm-up/cosine schedule, grad clipping, accumulation, bf16 autocast on CUDA,
atomic checkpoints with full resume, JSON-lines metrics, a loss plot, and data parallelism through
torch.distributed (DDP, or FSDP2 with ``fsdp=True``) when launched by torchrun.

Divergence: a non-finite loss (or any loss term) or gradient norm stops the run with a
:class:`~lwam.errors.NonFiniteError` naming the step and the first non-finite metric, before the optimiser
applies that step, so no non-finite weights are ever written (``max_nonfinite_skips`` > 0 skips up to that
many such steps instead, each with a warning). Resume takes the newest intact checkpoint, warning about any
newer one it cannot read. Rank 0 holds the output directory's lock (:mod:`lwam._lock`) for the Trainer's
lifetime, so a second process training into the same directory is refused.

Determinism: the batch of global step k is a fixed function of (seed, k) (a per-epoch permutation), and
the video branch's noise of sample i in step k is drawn from a generator seeded by (seed, k). So a resumed
run, or the same global batch split over several ranks, sees exactly the same data and noise.

Host syncs: a step leaves its metrics on the device (0-dim tensors); :meth:`Trainer.train` reads their
values once per ``log_every`` steps, so logging never drains the GPU queue. The divergence check above
costs one sync of a single bool per step (every metric finite?), before the optimiser step.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from lwam import _lock
from lwam._atomic import atomic_path, atomic_write_bytes
from lwam._logging import logger
from lwam.checkpoint import load_trainer_state, save_checkpoint
from lwam.config import ImplConfig, TrainConfig, _validate_train
from lwam.data.windows import collate_windows
from lwam.errors import NonFiniteError, WeightFileError
from lwam.schedule import warmup_cosine

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine down to ``min_lr_ratio`` at ``max_steps`` (:func:`warmup_cosine`)."""
    return warmup_cosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)


def global_batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Indices of the global batch of ``step``: consecutive slices of per-epoch permutations."""
    out: list[int] = []
    start = step * batch
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm[offset: offset + batch - len(out)].tolist())
    return out


def first_nonfinite(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """(name, value) of the first non-finite metric in ``metrics`` (floats or 0-dim tensors, insertion
    order), or None. Reading a tensor syncs the host: call it only once something is known to be wrong."""
    for k, v in metrics.items():
        x = float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v
        if isinstance(x, float) and not math.isfinite(x):
            return k, x
    return None


def all_finite(metrics: dict[str, Any]) -> bool:
    """Whether every tensor metric is finite: ONE host sync for all of them (a single bool crosses)."""
    ts = [v.detach().float().reshape(()) for v in metrics.values() if isinstance(v, torch.Tensor)]
    return True if not ts else bool(torch.isfinite(torch.stack(ts)).all())


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Trains a :class:`~lwam.model.lightwam.LightWAM` on a map-style dataset of window dicts.

    ``dataset[i]`` -> {'latents' or 'video', 'instruction' or 'text_context', 'proprio', 'actions',
    'actions_is_pad'}. ``out_dir`` receives checkpoints/step_NNNNNNN/, metrics.jsonl and loss.png.

    ``impl``: how the model computes (``ImplConfig.fast()``, ``ImplConfig.reference()``, their names, or
    None to keep the model's current one); applied with ``model.set_impl`` and written into every
    checkpoint (``impl.json``). ``on_step(step, metrics)`` gets the step's metrics as device tensors
    (reading one syncs the host).
    """

    def __init__(self, model, dataset: Dataset, out_dir: str | os.PathLike, cfg: TrainConfig | None = None, *,
                 impl: ImplConfig | str | None = None, stats: dict | None = None,
                 device: str | torch.device | None = None, resume: bool = True, progress: bool = True,
                 fsdp: bool = False, on_step: Callable[[int, dict[str, Any]], None] | None = None,
                 max_nonfinite_skips: int = 0):
        self.cfg = cfg or model.cfg.train
        _validate_train(self.cfg)
        if max_nonfinite_skips < 0:
            raise ValueError(f"max_nonfinite_skips: expected >= 0, got {max_nonfinite_skips}")
        self.max_nonfinite_skips = int(max_nonfinite_skips)
        self.nonfinite_skipped = 0
        self.rank, self.world = _dist_info()
        if self.cfg.batch_size % (self.world * self.cfg.grad_accum):
            raise ValueError(f"train.batch_size={self.cfg.batch_size} must be divisible by world size {self.world} "
                             f"x grad_accum {self.cfg.grad_accum}")
        if len(dataset) == 0:
            raise ValueError("dataset is empty")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(impl, str):
            impl = ImplConfig.named(impl)
        if impl is not None:
            model.set_impl(impl)
        self.impl: ImplConfig = model.impl
        self.model = model.to(self.device)
        self.dataset = dataset
        self.out_dir = Path(out_dir)
        self.stats = stats
        self.progress = progress and self.rank == 0
        self.on_step = on_step
        self.step = 0
        params = [p for _, p in model.trainable_parameters()]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, betas=tuple(self.cfg.betas),
                                           weight_decay=self.cfg.weight_decay, foreach=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.cfg))
        self.autocast = self.device.type == "cuda" and self.cfg.mixed_precision == "bf16"
        self.wrapped = self._wrap(fsdp)
        if self.rank == 0:
            # Before touching any file: a second trainer on this directory would delete the first one's
            # partial checkpoints and interleave its metrics.
            _lock.acquire(self.out_dir, command="lwam Trainer")
            weakref.finalize(self, _lock.release, self.out_dir)
            self._clean_partial_checkpoints()
        if self.world > 1:
            dist.barrier()  # no rank lists checkpoints while rank 0 is still tidying them
        if resume:
            self.resume()

    # --- distribution -------------------------------------------------------------------------
    def _wrap(self, fsdp: bool):
        if self.world == 1:
            return self.model
        if fsdp:
            from torch.distributed.fsdp import fully_shard
            for block in self.model.dit.blocks:
                fully_shard(block)
            fully_shard(self.model)
            return self.model
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   # without video co-training the video head takes no part in the loss
                   find_unused_parameters=self.model.cfg.train.video_loss_weight == 0)

    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        # Through the (possibly DDP-wrapped) module's forward, so that gradient hooks fire.
        return self.wrapped(batch)

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint_dirs(self) -> list[Path]:
        d = self.out_dir / CHECKPOINT_DIR
        return sorted(p for p in d.glob("step_*") if p.is_dir()) if d.is_dir() else []

    def _clean_partial_checkpoints(self) -> None:
        """Tidy what a run killed inside :func:`~lwam.checkpoint.atomic_write_dir` left behind: a
        half-written ``.step_N.tmp-*`` is deleted; a complete ``.step_N.old-*`` (killed between its two
        renames) is put back as ``step_N`` if that is missing, else deleted."""
        d = self.out_dir / CHECKPOINT_DIR
        if not d.is_dir():
            return
        for p in sorted(d.glob(".step_*.tmp-*")):
            shutil.rmtree(p, ignore_errors=True)
        for p in sorted(d.glob(".step_*.old-*")):
            final = d / p.name[1:].split(".old-")[0]
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, final)

    def save(self) -> Path | None:
        if self.rank != 0:
            return None
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "nonfinite_skipped": self.nonfinite_skipped,
        }
        path = save_checkpoint(self.model, self.out_dir / CHECKPOINT_DIR / f"step_{self.step:07d}",
                               stats=self.stats, trainer_state=state)
        atomic_write_bytes(self.out_dir / "latest", path.name.encode())
        return path

    def resume(self) -> bool:
        """Load the newest intact checkpoint (weights, optimiser, scheduler, RNG, step). A newer one that
        cannot be read (truncated by a crash of the disk or the machine) is skipped with a warning."""
        ckpts = self.checkpoint_dirs()
        if not ckpts:
            return False
        from lwam._safe_load import read_safetensors
        from lwam.model.weights import CheckpointMismatchError, load_into

        failures: list[str] = []
        for path in reversed(ckpts):
            try:
                weights = read_safetensors(path / "model.safetensors", "checkpoint weights")
                state = load_trainer_state(path)
                if state is None:
                    raise FileNotFoundError(f"{path}: no trainer.pt, cannot resume optimiser state")
                load_into(self.model, weights, f"checkpoint {path}")
            except CheckpointMismatchError:
                raise  # another model: every checkpoint of this run would fail alike
            except (WeightFileError, FileNotFoundError, OSError) as e:
                failures.append(f"{path.name}: {e}")
                logger.warning(f"cannot resume from {path} ({e}); trying the previous checkpoint")
                continue
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng_cpu"])
            if state.get("rng_cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng_cuda"])
            self.step = int(state["step"])
            self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
            logger.info(f"resumed from {path} at step {self.step}")
            return True
        raise WeightFileError(f"{self.out_dir / CHECKPOINT_DIR}: no intact checkpoint to resume from ("
                              + "; ".join(failures) + "); move the directory away to start fresh")

    # --- one step -----------------------------------------------------------------------------
    def _micro_batches(self, step: int) -> list[dict[str, Any]]:
        cfg = self.cfg
        idx = global_batch_indices(len(self.dataset), cfg.batch_size, step, cfg.seed)
        per_rank = cfg.batch_size // self.world
        mine = idx[self.rank * per_rank:(self.rank + 1) * per_rank]
        batch = collate_windows([self.dataset[i] for i in mine])
        self._attach_noise(batch, step, self.rank * per_rank)
        mb = per_rank // cfg.grad_accum
        return [{k: v[j * mb:(j + 1) * mb] for k, v in batch.items()} for j in range(cfg.grad_accum)]

    def _attach_noise(self, batch: dict[str, Any], step: int, offset: int) -> None:
        """Per-sample flow noise from a generator of (seed, step), sliced for this rank."""
        mcfg = self.model.cfg
        f = mcfg.train.video_downsample
        if "latents" in batch:
            b, c, t, h, w = batch["latents"].shape
        elif "video" in batch and batch["video"].dim() == 5:
            # Raw frames: the noise takes the shape of the latents the VAE will give.
            vae = mcfg.vae
            b, _, frames, hh, ww = batch["video"].shape
            c, t = vae.z_dim, 1 + (frames - 1) // vae.temporal_factor
            h, w = hh // vae.spatial_factor, ww // vae.spatial_factor
        else:
            return
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + step)
        gb = self.cfg.batch_size
        u = torch.rand(gb, generator=g)
        eps = torch.randn(gb, c, t, h // f, w // f, generator=g)
        batch["flow_u"] = u[offset:offset + b]
        batch["flow_eps"] = eps[offset:offset + b]

    def train_step(self) -> dict[str, Any]:
        """One optimiser step (all micro-batches). Returns its metrics: 0-dim tensors on the device
        (``loss``, ``video_loss``, ``action_loss``, ``video_mse``, ``t_mean``, ``grad_norm``; micro-batch
        means), ``lr`` (float) and ``skipped_nonfinite`` (1.0, only on a skipped step). The gradients stay
        in ``.grad`` until the next step. A non-finite metric stops the run (:class:`NonFiniteError`)
        before the update, or skips the update within ``max_nonfinite_skips``."""
        self.wrapped.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, Any] = {}
        mbs = self._micro_batches(self.step)
        for batch in mbs:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                loss, metrics = self._loss(batch)
            (loss / len(mbs)).backward()
            for k, v in metrics.items():
                totals[k] = totals[k] + v / len(mbs) if k in totals else v / len(mbs)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip).detach()
        totals["lr"] = self.scheduler.get_last_lr()[0]
        # The step's one host sync: a single bool, so that a diverged step is never applied. The metric
        # values themselves stay on the device (read once per logging interval).
        bad = None if all_finite(totals) else first_nonfinite(totals)
        if bad is not None:
            self._nonfinite_step(*bad)
            totals["skipped_nonfinite"] = 1.0
            with warnings.catch_warnings():  # the schedule moves on with the step count, update or not
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
                self.scheduler.step()
        else:
            self.optimizer.step()
            self.scheduler.step()
        self.step += 1
        return totals

    @staticmethod
    def read_metrics(steps: list[tuple[int, dict[str, Any]]]) -> list[dict[str, float]]:
        """(step, device metrics) pairs -> rows of floats, with ONE device-to-host transfer for all."""
        if not steps:
            return []
        keys = [k for k, v in steps[0][1].items() if isinstance(v, torch.Tensor)]
        values = torch.stack([torch.stack([m[k].float() for k in keys]) for _, m in steps]).cpu().tolist()
        rows = []
        for (step, m), vals in zip(steps, values):
            row: dict[str, float] = {"step": step, **dict(zip(keys, vals))}
            row.update({k: float(v) for k, v in m.items() if not isinstance(v, torch.Tensor)})
            rows.append(row)
        return rows

    def _nonfinite_step(self, metric: str, value: float) -> None:
        """Step ``self.step + 1`` (numbered as in metrics.jsonl) produced a non-finite ``metric``: raise,
        or skip its update while the skip budget lasts."""
        step = self.step + 1
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_skipped += 1
        if self.nonfinite_skipped > self.max_nonfinite_skips:
            allowed = (f"after skipping {self.max_nonfinite_skips} such step(s) " if self.max_nonfinite_skips else "")
            raise NonFiniteError(
                f"training diverged {allowed}at step {step}: {metric} = {value} (the update was not applied and "
                f"nothing non-finite was saved); lower the learning rate, check the data for non-finite "
                f"values, or allow skipping such steps (max_nonfinite_skips / --skip-nonfinite)",
                step=step, metric=metric)
        logger.warning(f"step {step}: {metric} = {value}; update skipped ({self.nonfinite_skipped} of at most "
                       f"{self.max_nonfinite_skips})")

    # --- loop ---------------------------------------------------------------------------------
    def train(self, max_steps: int | None = None) -> dict[str, Any]:
        """Run until ``max_steps`` (default cfg.max_steps); returns the last metrics and timing."""
        total = self.cfg.max_steps if max_steps is None else max_steps
        if not isinstance(total, int) or total < 1:
            raise ValueError(f"max_steps: expected an int >= 1, got {total!r}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out_dir / METRICS_FILE
        if self.rank == 0 and metrics_path.exists():
            self._truncate_metrics(metrics_path, self.step)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        t0 = time.perf_counter()
        start = self.step
        last: dict[str, float] = {}
        while self.step < total:
            metrics = self.train_step()
            if self.step % self.cfg.log_every == 0 or self.step == total:
                row = self.read_metrics([(self.step, metrics)])[0]  # the interval's one host sync
                last = {k: v for k, v in row.items() if k != "step"}
                if self.rank == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if bar is not None:
                        bar.set_postfix(loss=f"{last['loss']:.4f}", act=f"{last['action_loss']:.4f}")
            if bar is not None:
                bar.update(1)
            if self.step % self.cfg.save_every == 0 or self.step == total:
                self.save()
            if self.on_step is not None:
                self.on_step(self.step, metrics)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        if self.rank == 0 and metrics_path.exists():
            plot_losses(metrics_path, self.out_dir / "loss.png")
        return {"step": self.step, "metrics": last, "seconds": elapsed,
                "steps_per_s": (self.step - start) / elapsed if elapsed > 0 else float("nan")}

    @staticmethod
    def _truncate_metrics(path: Path, step: int) -> None:
        """Drop metric lines past the resumed step (written after the last checkpoint of a killed run)."""
        keep = []
        for ln in path.read_text().splitlines():
            try:
                row = json.loads(ln)
            except json.JSONDecodeError:  # blank, or cut short by a kill in the middle of a write
                continue
            if isinstance(row, dict) and row.get("step", math.inf) <= step:
                keep.append(ln)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in keep))


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_losses(metrics_path: str | os.PathLike, out: str | os.PathLike) -> Path | None:
    """Loss curves (total, video, action) against step, log scale; PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for key, label in (("loss", "total"), ("video_loss", "video (flow, weighted)"), ("action_loss", "action (MSE)")):
        if key in rows[0]:
            ax.plot(steps, [r[key] for r in rows], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Light-WAM training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
