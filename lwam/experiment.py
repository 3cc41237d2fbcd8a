"""``lwam experiment``: the demo pipeline repeated over training seeds and over conditions that change one thing.

What does not change between runs is built once and shared: the scripted-expert demonstrations, the decoded
windows, the VAE trained on their frames and the latent cache. Each (condition, seed) run then trains its own
policy from its own initialisation and evaluates it closed-loop on the same unseen episode seeds, with the
image controls (blind: images zeroed; shuffled: another episode's images). Runs are resumable one by one (a
finished run is never repeated, an interrupted one resumes from its last training checkpoint), and ``jobs``
runs can train side by side in worker processes.

Layout of ``out_dir``::

    shared/dataset/        LeRobot dataset of the expert demonstrations (shared/collect.json: its summary)
    shared/vae/            vae.safetensors (+ vae.json: its metrics)
    shared/latents.npy     latent cache of every window
    runs/<condition>/seed_<s>/{train/, checkpoint/, result.json}
    sessions.json          each call's real wall time (start to end)
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lwam._atomic import atomic_write_json
from lwam._env import environment
from lwam._logging import logger
from lwam.demo import DemoConfig, controls, demo_model_config
from lwam.pipeline import StageTimer, num_threads
from lwam.experiment_conditions import CONDITIONS, CONTROLS, DECISIVE_TASKS, MT10_TASKS, Condition

__all__ = ["CONDITIONS", "CONTROLS", "DECISIVE_TASKS", "MT10_TASKS", "Condition", "ExperimentConfig",
           "prepare_shared", "run_config", "run_experiment", "run_one"]


#: Creating ``out_dir/STOP`` while an experiment runs lets the running runs finish and starts no other
#: (removed at the start of the next call).
STOP_FILE = "STOP"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ExperimentConfig:
    """``demo``: the pipeline's budgets and tasks (its ``seed`` seeds the shared data and VAE);
    ``seeds``: training seeds (initial weights, data order, flow noise); ``conditions``: names in
    :data:`CONDITIONS`; ``blind_episodes``: episodes per task of each image control, blind and shuffled
    (default: the demo's ``eval_episodes``); ``jobs``: runs trained side by side (worker processes, ``demo.threads``
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
        demo = _demo_fields(d["demo"])
        return cls(demo=DemoConfig(**demo), seeds=tuple(d["seeds"]), conditions=tuple(d["conditions"]),
                   blind_episodes=d.get("blind_episodes"), jobs=int(d.get("jobs", 1)))


def _demo_fields(d: dict[str, Any]) -> dict[str, Any]:
    """A DemoConfig's dict (as experiment.json keeps it) -> DemoConfig keyword arguments; fields an older
    experiment.json lacks take their defaults (those of the code that wrote it: corner + gripper at 64 px)."""
    demo = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(DemoConfig)}
    demo.update({k: v for k, v in d.items() if k in demo})
    demo["tasks"], demo["cameras"] = tuple(demo["tasks"]), tuple(demo["cameras"])
    return demo


def _same_runs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two configs (dicts) define the same shared data and the same per-run training, i.e. whether
    ``b`` may resume what ``a`` left. The seed list, the condition list and the job count may differ."""
    def key(d):
        demo = {k: v for k, v in _demo_fields(d["demo"]).items() if k not in ("threads", "conv_threads")}
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
    stage = StageTimer("experiment", summary["stage_seconds"])
    cfg = demo_model_config(dcfg, dcfg.seed)
    conv_threads = (dcfg.conv_threads or os.cpu_count()) if device == "cpu" else None

    collect_json = shared / "collect.json"
    if not collect_json.exists():
        if (shared / "dataset").exists():  # interrupted: episodes of an unfinished collection are not trusted
            logger.info("experiment: removing an unfinished demonstration dataset")
            shutil.rmtree(shared / "dataset")
        with stage("collect"):
            col = collect_demos(list(dcfg.tasks), dcfg.episodes_per_task, shared / "dataset",
                                cameras=cfg.data.cameras, size=cfg.data.image_height, seed=dcfg.seed,
                                max_steps=dcfg.collect_max_steps, progress=progress)
        atomic_write_json(collect_json, {k: v for k, v in col.items() if k != "path"})
    summary["demos"] = json.loads(collect_json.read_text())

    with stage("windows", keep_first=True):
        windows, stats = make_windows(shared / "dataset", cfg, window_stride=dcfg.window_stride, progress=progress)
    atomic_write_json(shared / "stats.json", stats)
    summary["windows"] = len(windows)

    vae_dir = shared / "vae"
    if not (vae_dir / "vae.json").exists():
        torch.manual_seed(dcfg.seed)
        model = LightWAM(cfg).to(device)
        with stage("train_vae"), num_threads(conv_threads):
            metrics = train_vae_stage(model, windows, vae_dir, steps=dcfg.vae_steps, batch_size=dcfg.vae_batch_size,
                                      progress=progress, seed=dcfg.seed)
        atomic_write_json(vae_dir / "vae.json", {k: metrics.get(k) for k in ("recon_l1", "recon_mse", "psnr",
                                                                              "steps", "seconds")})
    summary["vae"] = json.loads((vae_dir / "vae.json").read_text())

    model = _model_with_shared_vae(shared, cfg, device, seed=dcfg.seed)
    if not (vae_dir / "reconstructions.png").exists():
        summary["vae_psnr_per_task"] = vae_reconstructions(model.vae, windows, vae_dir / "reconstructions.png")
    with stage("cache_latents", keep_first=True), num_threads(conv_threads):
        cache_latents_stage(model, windows, shared / "latents.npy", progress=progress)
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
    with num_threads(ecfg.demo.threads if device == "cpu" else None):
        return _run_one(out, d, ecfg, condition, seed, device, progress)


def _run_one(out: Path, d: Path, ecfg: ExperimentConfig, condition: str, seed: int, device: str,
             progress: bool) -> dict[str, Any]:
    from lwam.checkpoint import save_checkpoint
    from lwam.pipeline import cache_latents_stage, evaluate_stage, make_windows, sim_policy, train_stage

    dcfg = ecfg.demo
    shared = out / "shared"
    d.mkdir(parents=True, exist_ok=True)
    started = environment(device)  # at the start: the commit whose code this run imported
    started_utc, t_run = _utc_now(), time.perf_counter()
    stage = StageTimer(f"experiment {condition} seed {seed}", log=False)
    times = stage.times
    cfg = run_config(dcfg, condition, seed)
    windows, stats = make_windows(shared / "dataset", cfg, window_stride=dcfg.window_stride, progress=False)
    model = _model_with_shared_vae(shared, cfg, device, seed=seed)
    train_set = cache_latents_stage(model, windows, shared / "latents.npy", progress=False)  # complete: reused

    with stage("train"):
        trainer, tr = train_stage(model, train_set, d / "train", stats, dcfg.train_steps, device=device,
                                  progress=progress)
    save_checkpoint(model, d / "checkpoint", stats=stats)

    with stage("build_policy"):
        policy = sim_policy(model, stats, dcfg.tasks[0], device)
    evals = evaluate_stage(policy, dcfg.tasks, dcfg.eval_episodes, stage, executed_steps=dcfg.executed_steps,
                           max_steps=dcfg.max_steps, cameras=cfg.data.cameras, size=cfg.data.image_height,
                           controls=controls(dcfg), control_episodes=ecfg.blind_episodes, progress=progress)
    ev = evals.pop("policy")
    ctrl: dict[str, dict[str, Any]] = evals

    def episodes(r):
        return {t: [int(e["success"]) for e in eps] for t, eps in r["episodes"].items()}

    def steps(r):
        return {t: [int(e["steps"]) for e in eps] for t, eps in r["episodes"].items()}

    blind = ctrl.get("blind")
    result = {
        "condition": condition, "seed": seed,
        "success": ev["success"], "success_rate": ev["success_rate"], "episodes": episodes(ev),
        "episode_steps": steps(ev),
        "blind_success": None if blind is None else blind["success"],
        "blind_success_rate": None if blind is None else blind["success_rate"],
        "blind_episodes": None if blind is None else episodes(blind),
        "controls": {c: {"success": r["success"], "success_rate": r["success_rate"], "episodes": episodes(r),
                         "episode_steps": steps(r),
                         "image_seeds": {t: [e.get("image_seed") for e in eps] for t, eps in r["episodes"].items()}}
                     for c, r in ctrl.items()},
        "eval_seed_start": ev["seed_start"],
        "cameras": list(cfg.data.cameras), "image_size": cfg.data.image_height,
        "mean_steps_per_task": ev["mean_steps_per_task"],
        "query_latency_ms": ev["query_latency_ms"], "num_queries": ev["num_queries"],
        "train": {"steps": tr["step"], "steps_per_s": tr["steps_per_s"], "final": tr["metrics"]},
        "stage_seconds": times,
        "overrides": CONDITIONS[condition].overrides(demo_model_config(dcfg, seed)),
        "impl": trainer.impl.to_dict(),
        **started,
    }
    # Wall time of this call (an interrupted run's earlier attempts are not in it; the train figure then
    # covers only the resumed steps).
    result.update(started_utc=started_utc, ended_utc=_utc_now(), wall_seconds=round(time.perf_counter() - t_run, 2))
    # The step checkpoints served only to resume this run; the final checkpoint stays.
    shutil.rmtree(d / "train" / "checkpoints", ignore_errors=True)
    atomic_write_json(d / "result.json", result)
    return result


# --- the grid ----------------------------------------------------------------------------------------------
def run_experiment(out_dir: str | os.PathLike, ecfg: ExperimentConfig | None = None, progress: bool = True,
                   device: str | None = None) -> dict[str, Any]:
    """Shared stage, then every run of ``ecfg.seeds`` x ``ecfg.conditions`` not yet finished, then the report
    of every finished run in ``out_dir`` (also ``out_dir/report.json``). Another call into the same
    ``out_dir`` must keep the tasks and budgets; it may ask for other seeds and conditions. Creating
    ``out_dir/STOP`` stops the grid after the runs in progress (:data:`STOP_FILE`)."""
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
    if (out / STOP_FILE).exists():
        (out / STOP_FILE).unlink()  # a stop request of an earlier call
    t_start, started_utc = time.perf_counter(), _utc_now()
    with num_threads(ecfg.demo.threads if device == "cpu" else None):
        prepare_shared(out, ecfg, progress=progress, device=device)

    grid = [(c, s) for s in ecfg.seeds for c in ecfg.conditions]
    todo = [(c, s) for c, s in grid if not (run_dir(out, c, s) / "result.json").exists()]
    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="experiment runs", unit="run",
               disable=not progress, dynamic_ncols=True, position=0)
    cfg_dict = ecfg.to_dict()
    stop = out / STOP_FILE
    try:
        if ecfg.jobs == 1 or len(todo) <= 1:
            for c, s in todo:
                if stop.exists():
                    logger.info(f"experiment: {stop} exists: no further run starts")
                    break
                bar.set_postfix(condition=c, seed=s)
                r = run_one(out, cfg_dict, c, s, device, progress)
                bar.update(1)
                bar.write(f"  {c} seed {s}: {_line(r)}")
        else:
            import multiprocessing as mp
            with ProcessPoolExecutor(max_workers=ecfg.jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(run_one, str(out), cfg_dict, c, s, device, False): (c, s) for c, s in todo}
                for fut in as_completed(futures):
                    if fut.cancelled():
                        continue
                    c, s = futures[fut]
                    r = fut.result()
                    bar.update(1)
                    bar.write(f"  {c} seed {s}: {_line(r)}")
                    if stop.exists() and any(f.cancel() for f in futures):
                        logger.info(f"experiment: {stop} exists: the runs not yet started are cancelled "
                                    f"(a run already handed to a worker still finishes)")
    finally:
        bar.close()
        _record_session(out, started_utc, time.perf_counter() - t_start, ecfg.jobs,
                        sum((run_dir(out, c, s) / "result.json").exists() for c, s in todo))
    logger.info(f"experiment: {len(todo)} run(s) in {time.perf_counter() - t_start:.0f}s")
    return write_report(out)


def _record_session(out: Path, started_utc: str, seconds: float, jobs: int, runs: int) -> None:
    """Append this call's real wall time (start to end, shared stage included) to ``sessions.json``: the
    report's wall time is the sum over the calls that built the experiment."""
    path = out / "sessions.json"
    sessions = json.loads(path.read_text()) if path.exists() else []
    sessions.append({"started_utc": started_utc, "ended_utc": _utc_now(), "wall_seconds": round(seconds, 2),
                     "jobs": jobs, "runs_finished": int(runs), "cpu_count": os.cpu_count()})
    atomic_write_json(path, sessions)


def _line(r: dict[str, Any]) -> str:
    ctrl = "  ".join(f"{k} {_pct(v.get('success'))}" for k, v in (r.get("controls") or {}).items())
    return f"success {_pct(r['success'])}  {ctrl}".rstrip()


def _pct(d: dict[str, float] | None) -> str:
    return "-" if d is None else " ".join(f"{k.removesuffix('-v3')}={100 * v:.0f}%" for k, v in d.items())
