"""``lwam experiment``: the demo pipeline repeated over training seeds and over conditions that change one thing.

What does not change between runs is built once and shared: the scripted-expert demonstrations, the decoded
windows, the VAE trained on their frames and the latent cache. Each (condition, seed) run then trains its own
policy from its own initialisation and evaluates it closed-loop on the same unseen episode seeds, with the
blind-vision control. Runs are resumable one by one (a finished run is never repeated, an interrupted one
resumes from its last training checkpoint), and ``jobs`` runs can train side by side in worker processes.

Layout of ``out_dir``::

    shared/dataset/        LeRobot dataset of the expert demonstrations (shared/collect.json: its summary)
    shared/vae/            vae.safetensors (+ vae.json: its metrics)
    shared/latents.npy     latent cache of every window
    runs/<condition>/seed_<s>/{train/, checkpoint/, result.json}
    report.json, report.md, ablation.png, stage_times.png   (:mod:`lwam.experiment_report`)

A condition is a set of config overrides applied to the demo's training config (:data:`CONDITIONS`). Seed
``s`` of every condition starts from the same initial weights and sees the same data order, so the
conditions differ only by what the condition changes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lwam._atomic import atomic_write_json
from lwam._env import environment
from lwam._logging import logger
from lwam.demo import DemoConfig, _num_threads, demo_model_config, sim_policy

#: The ten Meta-World MT10 tasks (metaworld.MT10's training classes, v3 names).
MT10_TASKS: tuple[str, ...] = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3",
                               "drawer-close-v3", "button-press-topdown-v3", "peg-insert-side-v3",
                               "window-open-v3", "window-close-v3")


@dataclass(frozen=True)
class Condition:
    """One arm of the experiment: ``overrides(cfg)`` -> config overrides ("section.field": value)."""

    name: str
    label: str
    overrides: Callable[[Any], dict[str, Any]]


CONDITIONS: dict[str, Condition] = {c.name: c for c in (
    Condition("video", "video co-training (video loss weight 1, the paper's loss)",
              lambda cfg: {"train.video_loss_weight": 1.0}),
    Condition("no_video", "no video co-training (video loss weight 0: the video pass is skipped)",
              lambda cfg: {"train.video_loss_weight": 0.0}),
    Condition("full_res_video", "video co-training on full-resolution latents (no 2x2 downsampling)",
              lambda cfg: {"train.video_loss_weight": 1.0, "train.video_downsample": 1}),
    Condition("full_chunk_loss", "action loss on the whole chunk (not only the executed prefix)",
              lambda cfg: {"train.action_loss_steps": cfg.data.chunk_size}),
)}


@dataclass
class ExperimentConfig:
    """``demo``: the pipeline's budgets and tasks (its ``seed`` seeds the shared data and VAE);
    ``seeds``: training seeds (initial weights, data order, flow noise); ``conditions``: names in
    :data:`CONDITIONS`; ``blind_episodes``: episodes per task of the blind control (default: the
    demo's ``eval_episodes``); ``jobs``: runs trained side by side (worker processes, ``demo.threads``
    intra-op threads each)."""

    demo: DemoConfig = field(default_factory=DemoConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    conditions: tuple[str, ...] = ("video", "no_video")
    blind_episodes: int | None = None
    jobs: int = 1

    def validate(self) -> None:
        unknown = [c for c in self.conditions if c not in CONDITIONS]
        if unknown:
            raise ValueError(f"conditions: unknown {unknown}; choose from {sorted(CONDITIONS)}")
        if not self.conditions or len(set(self.conditions)) != len(self.conditions):
            raise ValueError(f"conditions: expected distinct names, got {list(self.conditions)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds: expected distinct non-negative integers, got {list(self.seeds)}")
        if self.jobs < 1:
            raise ValueError(f"jobs: expected >= 1, got {self.jobs}")
        if self.blind_episodes is not None and self.blind_episodes < 1:
            raise ValueError(f"blind_episodes: expected >= 1, got {self.blind_episodes}")
        if not self.demo.tasks:
            raise ValueError("demo.tasks: expected at least one task")

    def to_dict(self) -> dict[str, Any]:
        return {"demo": dataclasses.asdict(self.demo), "seeds": list(self.seeds),
                "conditions": list(self.conditions), "blind_episodes": self.blind_episodes, "jobs": self.jobs}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        demo = dict(d["demo"])
        demo["tasks"] = tuple(demo["tasks"])
        return cls(demo=DemoConfig(**demo), seeds=tuple(d["seeds"]), conditions=tuple(d["conditions"]),
                   blind_episodes=d.get("blind_episodes"), jobs=int(d.get("jobs", 1)))


def _same_runs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two configs (dicts) define the same shared data and the same per-run training, i.e. whether
    ``b`` may resume what ``a`` left. The seed list, the condition list and the job count may differ."""
    def key(d):
        demo = {k: v for k, v in d["demo"].items() if k not in ("threads", "conv_threads")}
        demo["tasks"] = list(demo["tasks"])
        return json.dumps({"demo": demo, "blind_episodes": d.get("blind_episodes")}, sort_keys=True, default=str)
    return key(a) == key(b)


def run_config(dcfg: DemoConfig, condition: str, seed: int):
    """The training config of run (condition, seed)."""
    base = demo_model_config(dcfg, seed)
    return demo_model_config(dcfg, seed, CONDITIONS[condition].overrides(base))


# --- shared stage ------------------------------------------------------------------------------------------
def prepare_shared(out: Path, ecfg: ExperimentConfig, progress: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Demonstrations, windows, VAE and latent cache, each built once (a finished piece is reused).
    Returns the shared summary (also ``shared/shared.json``)."""
    from lwam.envs.metaworld import collect_demos
    from lwam.model.lightwam import LightWAM
    from lwam.pipeline import cache_latents_stage, make_windows, train_vae_stage
    from lwam.vae_train import VAE_WEIGHTS_NAME

    dcfg = ecfg.demo
    shared = out / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    summary_path = shared / "shared.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.exists() else {"stage_seconds": {}}
    times = summary["stage_seconds"]
    cfg = demo_model_config(dcfg, dcfg.seed)
    conv_threads = (dcfg.conv_threads or os.cpu_count()) if device == "cpu" else None

    collect_json = shared / "collect.json"
    if not collect_json.exists():
        if (shared / "dataset").exists():  # interrupted: episodes of an unfinished collection are not trusted
            logger.info("experiment: removing an unfinished demonstration dataset")
            shutil.rmtree(shared / "dataset")
        t0 = time.perf_counter()
        col = collect_demos(list(dcfg.tasks), dcfg.episodes_per_task, shared / "dataset", cameras=cfg.data.cameras,
                            size=cfg.data.image_height, seed=dcfg.seed, max_steps=dcfg.collect_max_steps,
                            progress=progress)
        times["collect"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(collect_json, {k: v for k, v in col.items() if k != "path"})
    summary["demos"] = json.loads(collect_json.read_text())

    t0 = time.perf_counter()
    windows, stats = make_windows(shared / "dataset", cfg, window_stride=dcfg.window_stride, progress=progress)
    times.setdefault("windows", round(time.perf_counter() - t0, 2))
    atomic_write_json(shared / "stats.json", stats)
    summary["windows"] = len(windows)

    vae_dir = shared / "vae"
    if not (vae_dir / "vae.json").exists():
        torch.manual_seed(dcfg.seed)
        model = LightWAM(cfg).to(device)
        t0 = time.perf_counter()
        with _num_threads(conv_threads):
            metrics = train_vae_stage(model, windows, vae_dir, steps=dcfg.vae_steps, batch_size=dcfg.vae_batch_size,
                                      progress=progress, seed=dcfg.seed)
        times["train_vae"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(vae_dir / "vae.json", {k: metrics.get(k) for k in ("recon_l1", "recon_mse", "psnr",
                                                                              "steps", "seconds")})
    summary["vae"] = json.loads((vae_dir / "vae.json").read_text())

    model = _model_with_shared_vae(shared, cfg, device, seed=dcfg.seed)
    if not (vae_dir / "reconstructions.png").exists():
        summary["vae_psnr_per_task"] = vae_reconstructions(model.vae, windows, vae_dir / "reconstructions.png")
    t0 = time.perf_counter()
    with _num_threads(conv_threads):
        cache_latents_stage(model, windows, shared / "latents.npy", progress=progress)
    times.setdefault("cache_latents", round(time.perf_counter() - t0, 2))
    summary["vae_weights"] = str(vae_dir / VAE_WEIGHTS_NAME)
    atomic_write_json(summary_path, summary)
    return summary


@torch.no_grad()
def vae_reconstructions(vae, windows, path: Path, per_task: int = 4) -> dict[str, float]:
    """PSNR (dB, [-1, 1] range) of the VAE's reconstruction of the first frames of ``per_task`` windows of every
    task (spread over the episodes), and a figure of one frame per task next to its reconstruction: what the
    policy can know about the scene is what survives this round trip."""
    from lwam.plots import plot_reconstructions

    device = next(vae.parameters()).device
    by_task: dict[str, list[int]] = {}
    for i in range(len(windows)):
        ep, t = windows.locate(i)
        if t == 0:  # one window per episode: its start
            by_task.setdefault(windows.dataset.instruction(ep), []).append(i)
    frames = 1 + vae.cfg.temporal_factor
    psnr, reals, recons, titles = {}, [], [], []
    for task, idx in by_task.items():
        picks = [idx[k] for k in np.linspace(0, len(idx) - 1, min(per_task, len(idx))).round().astype(int)]
        x = torch.stack([windows.get(i, video=True)["video"][:, :frames] for i in picks]).to(device)
        r = vae.decode(vae.encode(x)).clamp(-1, 1).float()
        mse = (r - x.float()).pow(2).mean().item()
        psnr[task] = round(10 * float(np.log10(4.0 / max(mse, 1e-12))), 2)
        reals.append(x[0, :, 0].cpu())
        recons.append(r[0, :, 0].cpu())
        titles.append(f"{task[:28]}\n{psnr[task]:.1f} dB")
    plot_reconstructions(torch.stack(reals), torch.stack(recons), path, titles)
    return psnr


def _model_with_shared_vae(shared: Path, cfg, device: str, seed: int):
    """A freshly initialised LightWAM (seeded) whose VAE is the shared trained one (weights and statistics)."""
    from lwam.model.lightwam import LightWAM
    from lwam.vae_train import VAE_WEIGHTS_NAME, load_vae_checkpoint

    vae = load_vae_checkpoint(shared / "vae" / VAE_WEIGHTS_NAME)
    cfg = cfg.replace(vae=vae.cfg)
    torch.manual_seed(seed)
    model = LightWAM(cfg)
    model.vae.load_state_dict(vae.state_dict())
    model.vae.requires_grad_(cfg.train_vae)
    model.vae.eval()
    return model.to(device)


# --- one run -----------------------------------------------------------------------------------------------
def run_dir(out: Path, condition: str, seed: int) -> Path:
    return out / "runs" / condition / f"seed_{seed}"


def run_one(out: str | os.PathLike, ecfg_dict: dict[str, Any], condition: str, seed: int, device: str = "cpu",
            progress: bool = False) -> dict[str, Any]:
    """Train and evaluate run (condition, seed) (``result.json`` in its directory; an existing one is
    returned as it is). Takes the config as a dict so that it can run in a worker process."""
    out = Path(out)
    ecfg = ExperimentConfig.from_dict(ecfg_dict)
    d = run_dir(out, condition, seed)
    if (d / "result.json").exists():
        return json.loads((d / "result.json").read_text())
    with _num_threads(ecfg.demo.threads if device == "cpu" else None):
        return _run_one(out, d, ecfg, condition, seed, device, progress)


def _run_one(out: Path, d: Path, ecfg: ExperimentConfig, condition: str, seed: int, device: str,
             progress: bool) -> dict[str, Any]:
    from lwam.checkpoint import save_checkpoint
    from lwam.envs.evaluate import evaluate
    from lwam.pipeline import cache_latents_stage, make_windows
    from lwam.train import Trainer

    dcfg = ecfg.demo
    shared = out / "shared"
    d.mkdir(parents=True, exist_ok=True)
    started = environment(device)  # at the start: the commit whose code this run imported
    times: dict[str, float] = {}
    cfg = run_config(dcfg, condition, seed)
    windows, stats = make_windows(shared / "dataset", cfg, window_stride=dcfg.window_stride, progress=False)
    model = _model_with_shared_vae(shared, cfg, device, seed=seed)
    train_set = cache_latents_stage(model, windows, shared / "latents.npy", progress=False)  # complete: reused

    t0 = time.perf_counter()
    trainer = Trainer(model, train_set, d / "train", stats=stats, device=device, progress=progress)
    tr = trainer.train(dcfg.train_steps)
    times["train"] = round(time.perf_counter() - t0, 2)
    save_checkpoint(model, d / "checkpoint", stats=stats)

    t0 = time.perf_counter()
    policy = sim_policy(model, stats, dcfg.tasks[0], device)
    times["build_policy"] = round(time.perf_counter() - t0, 2)
    common = dict(executed_steps=dcfg.executed_steps, max_steps=dcfg.max_steps, progress=progress,
                  cameras=cfg.data.cameras, size=cfg.data.image_height)
    t0 = time.perf_counter()
    ev = evaluate(policy, list(dcfg.tasks), dcfg.eval_episodes, **common)
    times["eval"] = round(time.perf_counter() - t0, 2)
    blind = None
    if dcfg.blind_control:
        t0 = time.perf_counter()
        blind = evaluate(policy, list(dcfg.tasks), ecfg.blind_episodes or dcfg.eval_episodes, blind=True, **common)
        times["eval_blind"] = round(time.perf_counter() - t0, 2)

    def episodes(r):
        return {t: [int(e["success"]) for e in eps] for t, eps in r["episodes"].items()}

    result = {
        "condition": condition, "seed": seed,
        "success": ev["success"], "success_rate": ev["success_rate"], "episodes": episodes(ev),
        "blind_success": None if blind is None else blind["success"],
        "blind_success_rate": None if blind is None else blind["success_rate"],
        "blind_episodes": None if blind is None else episodes(blind),
        "eval_seed_start": ev["seed_start"],
        "mean_steps_per_task": ev["mean_steps_per_task"],
        "query_latency_ms": ev["query_latency_ms"],
        "train": {"steps": tr["step"], "steps_per_s": tr["steps_per_s"], "final": tr["metrics"]},
        "stage_seconds": times,
        "overrides": CONDITIONS[condition].overrides(demo_model_config(dcfg, seed)),
        "impl": trainer.impl.to_dict(),
        **started,
    }
    # The step checkpoints served only to resume this run; the final checkpoint stays.
    shutil.rmtree(d / "train" / "checkpoints", ignore_errors=True)
    atomic_write_json(d / "result.json", result)
    return result


# --- the grid ----------------------------------------------------------------------------------------------
def run_experiment(out_dir: str | os.PathLike, ecfg: ExperimentConfig | None = None, progress: bool = True,
                   device: str | None = None) -> dict[str, Any]:
    """Shared stage, then every run of ``ecfg.seeds`` x ``ecfg.conditions`` not yet finished, then the report
    of every finished run in ``out_dir`` (also ``out_dir/report.json``). Another call into the same
    ``out_dir`` must keep the tasks and budgets; it may ask for other seeds and conditions."""
    from tqdm.auto import tqdm

    from lwam.experiment_report import write_report

    ecfg = ecfg or ExperimentConfig()
    ecfg.validate()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "experiment.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if not _same_runs(old, ecfg.to_dict()):
            raise ValueError(f"{out}: holds an experiment with other settings ({cfg_path}); resume it with the same "
                             f"tasks and budgets, or choose another --out (--overwrite replaces it)")
        # This call runs its own grid; experiment.json keeps every seed and condition run so far (the report
        # covers every finished run, conditions in the order they were first asked for).
        union = dataclasses.replace(ecfg, seeds=tuple(dict.fromkeys([*old["seeds"], *ecfg.seeds])),
                                    conditions=tuple(dict.fromkeys([*old["conditions"], *ecfg.conditions])))
        atomic_write_json(cfg_path, union.to_dict())
    else:
        atomic_write_json(cfg_path, ecfg.to_dict())
    t_start = time.perf_counter()
    with _num_threads(ecfg.demo.threads if device == "cpu" else None):
        prepare_shared(out, ecfg, progress=progress, device=device)

    grid = [(c, s) for s in ecfg.seeds for c in ecfg.conditions]
    todo = [(c, s) for c, s in grid if not (run_dir(out, c, s) / "result.json").exists()]
    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="experiment runs", unit="run",
               disable=not progress, dynamic_ncols=True, position=0)
    cfg_dict = ecfg.to_dict()
    try:
        if ecfg.jobs == 1 or len(todo) <= 1:
            for c, s in todo:
                bar.set_postfix(condition=c, seed=s)
                r = run_one(out, cfg_dict, c, s, device, progress)
                bar.update(1)
                bar.write(f"  {c} seed {s}: success {_pct(r['success'])}  blind {_pct(r['blind_success'])}")
        else:
            import multiprocessing as mp
            with ProcessPoolExecutor(max_workers=ecfg.jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(run_one, str(out), cfg_dict, c, s, device, False): (c, s) for c, s in todo}
                for fut in as_completed(futures):
                    c, s = futures[fut]
                    r = fut.result()
                    bar.update(1)
                    bar.write(f"  {c} seed {s}: success {_pct(r['success'])}  blind {_pct(r['blind_success'])}")
    finally:
        bar.close()
    logger.info(f"experiment: {len(todo)} run(s) in {time.perf_counter() - t_start:.0f}s")
    return write_report(out)


def _pct(d: dict[str, float] | None) -> str:
    return "-" if d is None else " ".join(f"{k.removesuffix('-v3')}={100 * v:.0f}%" for k, v in d.items())
