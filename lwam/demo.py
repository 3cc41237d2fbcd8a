"""``lwam demo``: the whole loop on Meta-World, end to end, on whatever machine it runs on.

collect scripted-expert demos (LeRobot format) -> train the tiny preset's VAE on their frames -> cache
latents -> train the tiny Light-WAM -> evaluate closed-loop on unseen seeds, with two image controls (blind:
images zeroed; shuffled: another episode's images, in distribution) -> report.json + figures (loss curves,
predicted future frames next to the real ones, success per task, stage times).
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lwam._atomic import atomic_write_json
from lwam._env import environment
from lwam.config import get_preset


@dataclass
class DemoConfig:
    tasks: tuple[str, ...] = ("button-press-topdown-v3", "drawer-open-v3")
    episodes_per_task: int = 20
    window_stride: int = 2
    vae_steps: int = 300
    vae_batch_size: int = 4
    train_steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3
    eval_episodes: int = 10
    executed_steps: int = 8
    max_steps: int = 200            # per evaluation episode
    collect_max_steps: int = 200    # per expert episode
    blind_control: bool = True      # evaluate again with every image zeroed (lwam.envs.evaluate)
    shuffled_control: bool = True   # ... and with the images of another episode of the same task
    cameras: tuple[str, ...] = ("corner", "gripper")  # Meta-World cameras (lwam.envs.metaworld), side by side
    image_size: int = 64            # side of each camera's square image (pixels)
    seed: int = 0
    threads: int = 1                 # intra-op threads for the small-op stages (training, evaluation)
    conv_threads: int | None = None  # for the VAE stages, whose convolutions do scale (default: all cores)
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A minutes-long smoke variant for CI: same stages, tiny budgets (no success target)."""
        return cls(tasks=("button-press-topdown-v3",), episodes_per_task=2, window_stride=8, vae_steps=4,
                   train_steps=6, batch_size=4, eval_episodes=1, max_steps=24, collect_max_steps=150)


def controls(dcfg: DemoConfig) -> list[str]:
    """The image controls (``lwam.envs.evaluate`` ``image_control``) the config asks for, in report order."""
    return [c for c, on in (("blind", dcfg.blind_control), ("shuffled", dcfg.shuffled_control)) if on]


def demo_model_config(dcfg: DemoConfig, seed: int | None = None, overrides: dict[str, Any] | None = None):
    """The tiny preset with the demo's training budgets and cameras (``dcfg.cameras`` side by side, each
    ``image_size`` square: frames [3, image_size, image_size * len(cameras)]); ``seed`` (default ``dcfg.seed``)
    seeds training, ``overrides`` ("section.field": value) come last."""
    if not dcfg.cameras:
        raise ValueError("cameras: expected at least one camera name")
    cfg = get_preset("tiny").replace(**{"train.max_steps": dcfg.train_steps, "train.batch_size": dcfg.batch_size,
                                        "train.lr": dcfg.lr, "train.seed": dcfg.seed if seed is None else seed,
                                        "train.save_every": max(1, dcfg.train_steps // 3),
                                        "train.warmup_steps": min(100, max(1, dcfg.train_steps // 10)),
                                        "data.executed_steps": dcfg.executed_steps,
                                        "data.cameras": tuple(dcfg.cameras), "data.image_height": dcfg.image_size,
                                        "data.image_width": dcfg.image_size * len(dcfg.cameras),
                                        **dcfg.overrides})
    if overrides:
        cfg = cfg.replace(**overrides)
    cfg.validate()
    return cfg


def run_demo(out_dir: str | Path, dcfg: DemoConfig | None = None, progress: bool = True,
             device: str | None = None) -> dict[str, Any]:
    """Run every stage into ``out_dir``; returns the report (also written to ``out_dir/report.json``)."""
    dcfg = dcfg or DemoConfig()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Small ops: one intra-op thread is fastest on a few cores (restored afterwards).
    from lwam.pipeline import num_threads

    with num_threads(dcfg.threads if device == "cpu" else None):
        return _run_demo(Path(out_dir), dcfg, progress, device)


def _run_demo(out: Path, dcfg: DemoConfig, progress: bool, device: str) -> dict[str, Any]:
    from lwam.checkpoint import save_checkpoint
    from lwam.envs.metaworld import collect_demos
    from lwam.model.lightwam import LightWAM
    from lwam.pipeline import (StageTimer, cache_latents_stage, evaluate_stage, make_windows, num_threads,
                               sim_policy, train_stage, train_vae_stage)
    from lwam.plots import plot_stage_times, plot_success

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(dcfg.seed)
    stage = StageTimer("demo")
    t_start = time.perf_counter()

    cfg = demo_model_config(dcfg)

    with stage("collect"):
        col = collect_demos(list(dcfg.tasks), dcfg.episodes_per_task, out / "dataset", cameras=cfg.data.cameras,
                            size=cfg.data.image_height, seed=dcfg.seed, max_steps=dcfg.collect_max_steps,
                            progress=progress)
    with stage("windows"):
        windows, stats = make_windows(out / "dataset", cfg, window_stride=dcfg.window_stride, progress=progress)
    model = LightWAM(cfg).to(device)
    conv_threads = (dcfg.conv_threads or os.cpu_count()) if device == "cpu" else None
    with stage("train_vae"), num_threads(conv_threads):
        vae_metrics = train_vae_stage(model, windows, out / "vae", steps=dcfg.vae_steps,
                                      batch_size=dcfg.vae_batch_size, progress=progress, seed=dcfg.seed)
    with stage("cache_latents"), num_threads(conv_threads):
        train_set = cache_latents_stage(model, windows, out / "latents.npy", progress=progress)
    with stage("train"):
        trainer, tr = train_stage(model, train_set, out / "train", stats, dcfg.train_steps, device=device,
                                  progress=progress)
    ckpt = save_checkpoint(model, out / "checkpoint", stats=stats)

    with stage("future_frames"):
        frames_png = _future_frames_figure(model, windows, train_set, out / "future_frames.png")

    with stage("build_policy"):
        policy = sim_policy(model, stats, dcfg.tasks[0], device)
    results = evaluate_stage(policy, dcfg.tasks, dcfg.eval_episodes, stage, executed_steps=dcfg.executed_steps,
                             max_steps=dcfg.max_steps, cameras=cfg.data.cameras, size=cfg.data.image_height,
                             controls=controls(dcfg), video_dir=out / "videos", progress=progress)

    plot_success(results["policy"]["success"], results.get("blind", {}).get("success"), out / "success.png")
    wall = round(time.perf_counter() - t_start, 2)
    plot_stage_times(stage.times, out / "stage_times.png")
    report = {
        "tasks": list(dcfg.tasks),
        "success": results["policy"]["success"],
        "success_rate": results["policy"]["success_rate"],
        "blind_success": results.get("blind", {}).get("success"),
        "blind_success_rate": results.get("blind", {}).get("success_rate"),
        "shuffled_success": results.get("shuffled", {}).get("success"),
        "shuffled_success_rate": results.get("shuffled", {}).get("success_rate"),
        "cameras": list(cfg.data.cameras),
        "image_size": cfg.data.image_height,
        "eval_episodes_per_task": dcfg.eval_episodes,
        "eval_seed_start": results["policy"]["seed_start"],
        "mean_action_query_latency_ms": results["policy"]["query_latency_ms"],
        "policy_kind": f"{type(policy).__module__}.{type(policy).__name__}",
        "stage_seconds": stage.times,
        "wall_seconds": wall,
        "demos": {k: v for k, v in col.items() if k != "path"},
        "windows": len(windows),
        "vae": {k: vae_metrics.get(k) for k in ("recon_l1", "recon_mse", "psnr", "seconds")},
        "train": {"steps": tr["step"], "steps_per_s": tr["steps_per_s"], "final": tr["metrics"]},
        "trainable_parameters": sum(p.numel() for _, p in model.trainable_parameters()),
        "checkpoint": str(ckpt),
        "figures": {"loss": str(out / "train" / "loss.png"), "future_frames": str(frames_png),
                    "success": str(out / "success.png"), "stage_times": str(out / "stage_times.png")},
        "config": dataclasses.asdict(dcfg),
        **environment(device),
        "impl": trainer.impl.to_dict(),
    }
    atomic_write_json(out / "report.json", report)
    return report


@torch.no_grad()
def _future_frames_figure(model, windows, train_set, path: Path, n: int = 3) -> Path:
    """Decode the video branch's predicted future frames next to the real frames, for n windows."""
    from lwam.plots import plot_future_frames

    model.eval()
    picks = torch.linspace(0, len(train_set) - 1, n).long().tolist()
    g = torch.Generator().manual_seed(0)
    reals, preds, titles = [], [], []
    f = model.cfg.train.video_downsample
    for i in picks:
        item = train_set[i]
        lat = item["latents"][None].to(model.proprio_encoder.weight.device)
        pred = model.generate_future(lat, item["proprio"][None], instruction=item["instruction"], steps=16,
                                     generator=g)
        video = model.vae.decode(pred).float().cpu()                 # [1, 3, T, H/f, W/f]
        real = windows.get(i, video=True)["video"][None]              # [1, 3, T, H, W]
        real = torch.nn.functional.avg_pool3d(real, (1, f, f))
        reals.append(real)
        preds.append(video)
        titles.append(item["instruction"][:24])
    model.train()
    return plot_future_frames(torch.cat(reals), torch.cat(preds), path, titles)
