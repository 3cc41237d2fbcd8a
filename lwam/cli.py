"""The ``lwam`` command.

Arguments are checked before any work starts (positive and finite numbers, existing paths, choices).
Anticipated failures -- bad arguments or files, a diverging run, a busy or stale output directory --
print one line ``lwam <command>: error: ...`` naming the file or argument and exit with status 2;
``--debug`` (or ``LWAM_DEBUG=1``) shows the traceback instead. Commands that write an output directory
lock it (a second process is refused, naming the holder); ``lwam train`` resumes a run found there and
refuses arguments that conflict with it; ``--overwrite`` discards what is there.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from lwam import __version__
from lwam._argtypes import checkpoint_dir, dataset_dir, existing_file, nonneg_int, positive_float, positive_int

EXIT_ERROR = 2
DEFAULT_TASKS = ["button-press-topdown-v3", "drawer-open-v3"]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to every option that has a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if "%(default)" in h or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return h
        return f"{h} (default: %(default)s)" if h else "(default: %(default)s)"


# --- helpers ---------------------------------------------------------------------------------------------
def _clear_dir(d: Path) -> None:
    """Delete everything in ``d`` but its lock file (``--overwrite``)."""
    from lwam._lock import LOCK_NAME

    for p in d.iterdir():
        if p.name == LOCK_NAME:
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _has_content(d: Path) -> bool:
    from lwam._lock import LOCK_NAME

    return d.is_dir() and any(p.name != LOCK_NAME for p in d.iterdir())


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# --- commands --------------------------------------------------------------------------------------------
def _cmd_info(args: argparse.Namespace) -> int:
    if args.build:
        from lwam.info import build_info, format_build_info

        record = build_info()
        print(json.dumps(record, indent=2) if args.json else format_build_info(record))
        return 0
    from lwam.config import get_preset
    from lwam.info import format_info, model_info

    info = model_info(get_preset(args.preset))
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_collect(args: argparse.Namespace) -> int:
    from lwam import _lock
    from lwam.envs.metaworld import collect_demos
    from lwam.errors import NothingWrittenError

    out = Path(args.out)
    if (out / "meta" / "info.json").exists() and not args.overwrite:
        raise FileExistsError(f"--out {out}: already holds a dataset; pass --overwrite to replace it, or choose "
                              f"another directory")
    with _lock.locked(out, "lwam collect"):
        if args.overwrite and out.exists():
            _clear_dir(out)
        res = collect_demos(args.tasks, args.episodes, out, cameras=tuple(args.cameras), size=args.size,
                            seed=args.seed, max_steps=args.max_steps, progress=not args.no_progress)
        if not res.get("frames"):
            _clear_dir(out)
            raise NothingWrittenError(
                f"--out {out}: nothing written, the scripted expert succeeded in none of "
                f"{sum(res['attempts'].values())} attempts (tasks {', '.join(args.tasks)}); raise --max-steps")
    print(json.dumps(res, indent=2, default=str))
    return 0


_TRAIN_DEFAULTS = {"preset": "tiny", "window_stride": 1, "seed": 0, "skip_nonfinite": 0, "impl": "fast"}


def _cmd_train(args: argparse.Namespace) -> int:
    from lwam import _lock, _run_record as rr
    from lwam.checkpoint import save_checkpoint
    from lwam.config import get_preset

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a directory")
    if _rank() != 0:  # under torchrun: rank 0 owns the directory (lock, record) and writes final/
        _train(args, out, None)
        return 0
    with _lock.locked(out, "lwam train"):
        if args.overwrite and out.exists():
            _clear_dir(out)
        record = rr.read_record(out)
        if record is None and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
            raise FileExistsError(f"--out {out}: holds checkpoints but no run record ({rr.RUN_FILE}); "
                                  f"{rr.FRESH_HINT}")
        given = {k: getattr(args, k) for k in ("preset", "dataset", "vae", "dit", "text_cache", "steps",
                                               "batch_size", "lr", "window_stride", "seed", "skip_nonfinite",
                                               "impl")}
        s = rr.merge_settings(out, record, given, _TRAIN_DEFAULTS)
        for key, check in (("dataset", dataset_dir), ("vae", existing_file), ("dit", existing_file),
                           ("text_cache", existing_file)):
            if s.get(key) is not None:
                try:
                    check(s[key])
                except argparse.ArgumentTypeError as e:
                    raise FileNotFoundError(f"--{key.replace('_', '-')}: {e}"
                                            f"{' (recorded in ' + str(out / rr.RUN_FILE) + ')' if given[key] is None else ''}"
                                            ) from None
        if s.get("dataset") is None:
            raise ValueError("--dataset: required (a LeRobot dataset directory)")
        cfg = get_preset(s["preset"])
        if s.get("vae") is None:
            raise ValueError("--vae: required; the tiny preset has no released VAE, run `lwam train vae` first"
                             if cfg.name == "tiny" else "--vae: required (Wan2.1_VAE.pth, or a VAE trained by "
                             "`lwam train vae`)")
        from lwam.data.cache import dataset_digest
        digests = {"dataset": dataset_digest(s["dataset"]),
                   **{k: rr.file_digest(s[k]) for k in ("vae", "dit", "text_cache") if s.get(k) is not None}}
        rr.check_digests(out, record, digests)
        if record is None:
            rr.write_record(out, s, digests)
        res, model, stats = _train(args, out, s)
        path = save_checkpoint(model, out / "final", stats=stats)
    print(json.dumps({"checkpoint": str(path), "impl": model.impl.to_dict(), **res}, indent=2, default=str))
    return 0


def _train(args: argparse.Namespace, out: Path, s: dict | None):
    import torch

    from lwam.config import ImplConfig, get_preset
    from lwam.model.lightwam import LightWAM
    from lwam.pipeline import cache_latents_stage, make_windows, train_stage
    from lwam.vae_train import load_vae_checkpoint

    if s is None:  # a non-zero rank: the record rank 0 wrote
        from lwam._run_record import merge_settings, read_record
        s = merge_settings(out, read_record(out), {}, _TRAIN_DEFAULTS)
    cfg = get_preset(s["preset"])
    over = {k: v for k, v in (("train.max_steps", s.get("steps")), ("train.batch_size", s.get("batch_size")),
                              ("train.lr", s.get("lr")), ("train.seed", s.get("seed"))) if v is not None}
    if s.get("text_cache"):  # the run's text contexts come from this file, not from an encoder
        over["text.encoder"] = "cache"
    cfg = cfg.replace(**over)
    cfg.validate()
    windows, stats = make_windows(s["dataset"], cfg, window_stride=s["window_stride"], progress=not args.no_progress)
    vae = None
    if str(s["vae"]).endswith(".safetensors"):
        vae = load_vae_checkpoint(s["vae"])
        cfg.vae = vae.cfg
    # Seeded initial weights: the same command gives the same run.
    torch.manual_seed(cfg.train.seed)
    model = LightWAM(cfg)
    if vae is not None:
        model.vae.load_state_dict(vae.state_dict())
        model.vae.set_latent_stats(vae.latent_mean, vae.latent_std)
    else:
        model.vae.load_pretrained(s["vae"])
    if s.get("dit"):
        from lwam.model.weights import load_wan_dit
        load_wan_dit(model.dit, s["dit"])
    instructions = list(windows.dataset.tasks)
    if s.get("text_cache"):
        from lwam.model.text import TextContextCache

        cache = TextContextCache.load(s["text_cache"], cfg.text)
        missing = [t for t in instructions if t not in cache]
        if missing:
            raise ValueError(f"--text-cache {s['text_cache']}: no context for the dataset's instructions "
                             f"{missing[:3]} ({len(missing)} of {len(instructions)} missing)")
        model.text.update(cache.subset(instructions))
    else:
        model.text.get(instructions)  # encode once, so that the checkpoints carry every training instruction
    train_set = cache_latents_stage(model, windows, out / "latents.npy", progress=not args.no_progress)
    _, res = train_stage(model, train_set, out, stats, impl=ImplConfig.named(s["impl"]),
                         progress=not args.no_progress, max_nonfinite_skips=s["skip_nonfinite"])
    return res, model, stats


def _cmd_train_vae(args: argparse.Namespace) -> int:
    from lwam import _lock
    from lwam.config import get_preset
    from lwam.model.vae import WanVAE
    from lwam.pipeline import VideoClips, make_windows
    from lwam.vae_train import VAE_WEIGHTS_NAME, train_vae

    out = Path(args.out)
    if (out / VAE_WEIGHTS_NAME).exists() and not args.overwrite:
        raise FileExistsError(f"--out {out}: already holds {VAE_WEIGHTS_NAME}; pass --overwrite to retrain it, or "
                              f"choose another directory")
    with _lock.locked(out, "lwam train vae"):
        import torch

        cfg = get_preset(args.preset)
        windows, _ = make_windows(args.dataset, cfg, window_stride=args.window_stride,
                                  progress=not args.no_progress)
        torch.manual_seed(args.seed)
        vae = WanVAE(cfg.vae)
        res = train_vae(vae, VideoClips(windows, max_clips=args.max_clips, seed=args.seed), steps=args.steps,
                        batch_size=args.batch_size, out_dir=out, progress=not args.no_progress, clip_frames=5,
                        seed=args.seed)
    print(json.dumps(res, indent=2, default=str))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from lwam.envs.evaluate import evaluate

    if bool(args.checkpoint) == bool(args.server):
        raise ValueError("lwam eval needs exactly one of --checkpoint DIR and --server ws://HOST:PORT")
    if args.server:
        from lwam.policy.remote import RemotePolicy

        policy = RemotePolicy(args.server, api_key=args.api_key or os.environ.get("LWAM_API_KEY"))
        spec = policy.metadata["observation_spec"]
        cameras = policy.cameras
        size = int(spec[f"observation.images.{cameras[0]}"]["shape"][0])
        executed, chunk = policy.executed_steps, int(policy.metadata["chunk_size"])
    else:
        from lwam.checkpoint import load_checkpoint
        from lwam.policy.loading import load_policy

        model, stats = load_checkpoint(args.checkpoint)
        if stats is None:
            raise ValueError(f"--checkpoint {args.checkpoint}: no stats.json (normalisation statistics); cannot "
                             f"de-normalise actions")
        policy = load_policy(model, stats, device="cpu", eager=args.eager)
        cameras, size, executed = model.cfg.data.cameras, model.cfg.data.image_height, model.cfg.data.executed_steps
        chunk = model.cfg.chunk_size
    executed = args.executed_steps or executed
    if executed > chunk:
        raise ValueError(f"--executed-steps: expected at most the chunk size {chunk}, got {executed}")
    out = {}
    for blind in ([False, True] if args.blind else [False]):
        out["blind" if blind else "policy"] = evaluate(
            policy, args.tasks, args.episodes, executed_steps=executed,
            max_steps=args.max_steps, blind=blind, video_dir=None if blind else args.videos,
            progress=not args.no_progress, cameras=cameras, size=size, latency_steps=args.latency_steps,
            asynchronous=args.asynchronous, lead_steps=args.lead_steps, blend=args.blend)
    print(json.dumps(out, indent=2, default=str))
    return 0


def _demo_config(args: argparse.Namespace):
    """The DemoConfig of `lwam demo` / `lwam experiment`: --quick budgets or the defaults, then the options."""
    from lwam.demo import DemoConfig
    from lwam.experiment_conditions import MT10_TASKS

    dcfg = DemoConfig.quick() if args.quick else DemoConfig()
    for name in ("episodes_per_task", "train_steps", "vae_steps", "eval_episodes", "image_size"):
        v = getattr(args, name)
        if v is not None:
            setattr(dcfg, name, v)
    if args.tasks:
        dcfg.tasks = MT10_TASKS if args.tasks == ["mt10"] else tuple(args.tasks)
    if args.cameras:
        dcfg.cameras = tuple(args.cameras)
    if args.controls is not None:
        dcfg.blind_control, dcfg.shuffled_control = "blind" in args.controls, "shuffled" in args.controls
    return dcfg


def _add_demo_data_args(p: argparse.ArgumentParser) -> None:
    """The camera, image and control options `lwam demo` and `lwam experiment` share."""
    p.add_argument("--cameras", nargs="+", metavar="CAM",
                   help="Meta-World cameras, side by side (default: corner gripper; e.g. corner4 gripper)")
    p.add_argument("--image-size", type=positive_int, help="side of each camera's square image in pixels, a "
                                                           "multiple of 32: 64, 96, 128 (default: 64)")
    p.add_argument("--controls", nargs="*", choices=["blind", "shuffled"], metavar="CONTROL",
                   help="image controls evaluated after the policy: blind (images zeroed), shuffled (another "
                        "episode's images); none given: no control (default: both)")


def _cmd_demo(args: argparse.Namespace) -> int:
    from lwam.demo import run_demo

    out = Path(args.out)
    if _has_content(out):
        if not args.overwrite:
            raise FileExistsError(f"--out {out}: exists and is not empty; pass --overwrite to replace it, or "
                                  f"choose another directory")
        _clear_dir(out)
    dcfg = _demo_config(args)
    if args.seed is not None:
        dcfg.seed = args.seed
    report = run_demo(out, dcfg, progress=not args.no_progress)
    keys = ("success", "blind_success", "mean_action_query_latency_ms", "stage_seconds", "wall_seconds")
    print(json.dumps({k: report[k] for k in keys}, indent=2))
    print(f"report: {out}/report.json")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from lwam.experiment import ExperimentConfig, run_experiment
    from lwam.experiment_report import markdown_table, write_report

    out = Path(args.out)
    if args.report_only:
        report = write_report(out)
        print(markdown_table(report))
        print(f"report: {out}/report.md")
        return 0
    if args.overwrite and _has_content(out):
        _clear_dir(out)
    dcfg = _demo_config(args)
    ecfg = ExperimentConfig(demo=dcfg, seeds=tuple(args.seeds), conditions=tuple(args.conditions),
                            blind_episodes=args.blind_episodes, jobs=args.jobs)
    report = run_experiment(out, ecfg, progress=not args.no_progress)
    print(markdown_table(report))
    print(f"report: {out}/report.md (+ report.json, ablation.png)")
    return 0


# --- parser ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from lwam.config import PRESETS

    presets = sorted(PRESETS)
    fmt = {"formatter_class": _HelpFormatter}
    p = argparse.ArgumentParser(prog="lwam", description="Light-WAM: train, evaluate and deploy a World Action Model",
                                epilog="Errors print one line and exit with status 2; --debug or LWAM_DEBUG=1 "
                                       "shows the traceback.", **fmt)
    p.add_argument("--version", action="version", version=f"lwam {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also: LWAM_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="parameter and token counts of a preset (no weights allocated)", **fmt)
    info.add_argument("--preset", default="paper", choices=presets, help="model preset")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--build", action="store_true",
                      help="what was built and what runs: lwam._C, Triton kernels, the GPU's launch config")
    info.set_defaults(func=_cmd_info)

    col = sub.add_parser("collect", help="collect scripted-expert demos into a LeRobot dataset", **fmt)
    col_sub = col.add_subparsers(dest="sim", required=True, metavar="SIMULATOR")
    mw = col_sub.add_parser("metaworld", help="Meta-World scripted experts", **fmt)
    mw.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, metavar="TASK", help="Meta-World v3 task names")
    mw.add_argument("--episodes", type=positive_int, default=20, help="successful episodes per task")
    mw.add_argument("--cameras", nargs="+", default=["corner", "gripper"], metavar="CAMERA", help="cameras to record")
    mw.add_argument("--size", type=positive_int, default=64, help="square camera image size (pixels)")
    mw.add_argument("--max-steps", type=positive_int, default=200, help="step limit per episode")
    mw.add_argument("--seed", type=nonneg_int, default=0, help="first environment seed")
    mw.add_argument("--out", required=True, help="dataset directory to write")
    mw.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    mw.add_argument("--no-progress", action="store_true", help="no progress bars")
    mw.set_defaults(func=_cmd_collect)

    tr = sub.add_parser("train", help="train Light-WAM on a LeRobot dataset (or `train vae`)", **fmt,
                        description="Train Light-WAM. Re-running into the same --out resumes the run (arguments "
                                    "left out are taken from its run.json; conflicting ones are refused).")
    tr_sub = tr.add_subparsers(dest="what", metavar="{vae}")
    tv = tr_sub.add_parser("vae", help="train the preset's Wan-VAE on the dataset's frames", **fmt)
    tv.add_argument("--preset", default="tiny", choices=presets, help="model preset whose VAE is trained")
    tv.add_argument("--dataset", required=True, type=dataset_dir, help="LeRobot dataset directory")
    tv.add_argument("--out", required=True, help="directory for vae.safetensors")
    tv.add_argument("--steps", type=positive_int, default=400, help="optimiser steps")
    tv.add_argument("--batch-size", type=positive_int, default=8, help="clips per step")
    tv.add_argument("--max-clips", type=positive_int, default=512, help="clips drawn from the dataset")
    tv.add_argument("--window-stride", type=positive_int, default=2, help="a window every N frames")
    tv.add_argument("--seed", type=nonneg_int, default=0, help="seed of the initial weights and the clip order")
    tv.add_argument("--overwrite", action="store_true", help="replace a vae.safetensors already at --out")
    tv.add_argument("--no-progress", action="store_true", help="no progress bars")
    tv.set_defaults(func=_cmd_train_vae)
    tr.add_argument("--preset", choices=presets, help="model preset (default: tiny)")
    tr.add_argument("--dataset", type=dataset_dir, help="LeRobot dataset directory (required for a new run)")
    tr.add_argument("--out", help="run directory: checkpoints, metrics.jsonl, loss.png, final/")
    tr.add_argument("--vae", type=existing_file,
                    help="VAE weights: vae.safetensors from `lwam train vae`, or Wan2.1_VAE.pth (required for a new run)")
    tr.add_argument("--dit", type=existing_file, help="Wan2.1 DiT diffusion_pytorch_model.safetensors (paper preset)")
    tr.add_argument("--text-cache", type=existing_file,
                    help="text contexts of the dataset's instructions (a TextContextCache file, "
                         "lwam.model.text.build_text_cache); every checkpoint carries them; presets with a "
                         "built-in encoder need none")
    tr.add_argument("--impl", choices=["fast", "reference"],
                    help="how the training step computes (lwam.config.ImplConfig): the fast implementation "
                         "(default) or the published arithmetic; recorded in every checkpoint (impl.json)")
    tr.add_argument("--steps", type=positive_int, help="optimiser steps (default: the preset's)")
    tr.add_argument("--batch-size", type=positive_int, help="global batch size (default: the preset's)")
    tr.add_argument("--lr", type=positive_float, help="peak learning rate (default: the preset's)")
    tr.add_argument("--window-stride", type=positive_int, help="a window every N frames (default: 1)")
    tr.add_argument("--seed", type=nonneg_int, help="seed of the initial weights, batch order and noise (default: 0)")
    tr.add_argument("--skip-nonfinite", type=nonneg_int,
                    help="skip up to N steps whose loss or gradient is not finite instead of stopping (default: 0)")
    tr.add_argument("--overwrite", action="store_true", help="discard the run already in --out and start fresh")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="closed-loop evaluation on Meta-World, in-process or through `lwam serve`", **fmt)
    ev.add_argument("--checkpoint", type=checkpoint_dir, help="our checkpoint directory (evaluate in-process)")
    ev.add_argument("--server", help="ws://HOST:PORT of `lwam serve` (evaluate through the server)")
    ev.add_argument("--api-key", help="API key for --server (default: $LWAM_API_KEY)")
    ev.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, metavar="TASK", help="Meta-World v3 task names")
    ev.add_argument("--episodes", type=positive_int, default=10, help="episodes per task (unseen seeds)")
    ev.add_argument("--executed-steps", type=positive_int,
                    help="actions executed per query (default: the checkpoint's data.executed_steps)")
    ev.add_argument("--max-steps", type=positive_int, default=200, help="step limit per episode")
    ev.add_argument("--blind", action="store_true", help="also run the blind-vision control")
    ev.add_argument("--latency-steps", type=nonneg_int, default=0,
                    help="simulated inference latency in control steps (the robot holds still while it has no action)")
    ev.add_argument("--async", dest="asynchronous", action="store_true",
                    help="asynchronous chunk execution: request the next chunk --lead-steps before the horizon "
                         "ends, drop the stale prefix of a late chunk")
    ev.add_argument("--lead-steps", type=nonneg_int, help="with --async (default: --latency-steps)")
    ev.add_argument("--blend", choices=["none", "linear"], default="none", help="with --async: mix the overlap")
    ev.add_argument("--videos", help="directory for rollout videos")
    ev.add_argument("--eager", action="store_true",
                    help="use lwam.policy.eager.EagerPolicy (the plain model) instead of the compiled Policy")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(func=_cmd_eval)

    dm = sub.add_parser("demo", help="collect, train VAE + policy, evaluate closed-loop, report (Meta-World)", **fmt)
    dm.add_argument("--out", default="runs/demo", help="output directory")
    dm.add_argument("--overwrite", action="store_true", help="replace what an earlier demo left in --out")
    dm.add_argument("--quick", action="store_true", help="minutes-long smoke variant (CI)")
    dm.add_argument("--tasks", nargs="+", metavar="TASK", help="Meta-World v3 tasks, or 'mt10' (default: the demo's two)")
    dm.add_argument("--episodes-per-task", type=positive_int, help="demos per task (default: the demo's)")
    dm.add_argument("--train-steps", type=positive_int, help="policy training steps (default: the demo's)")
    dm.add_argument("--vae-steps", type=positive_int, help="VAE training steps (default: the demo's)")
    dm.add_argument("--eval-episodes", type=positive_int, help="evaluation episodes per task (default: the demo's)")
    dm.add_argument("--seed", type=nonneg_int, help="seed of the demos, the VAE and the policy (default: 0)")
    _add_demo_data_args(dm)
    dm.add_argument("--no-progress", action="store_true", help="no progress bars")
    dm.set_defaults(func=_cmd_demo)

    from lwam.experiment_conditions import CONDITIONS
    ex = sub.add_parser("experiment", help="the demo over seeds x conditions (video co-training ablation, MT10), "
                                           "resumable, with a report", **fmt)
    ex.add_argument("--out", default="runs/experiment",
                    help="output directory; running again into it resumes (finished runs are kept)")
    ex.add_argument("--overwrite", action="store_true", help="delete what --out holds and start over")
    ex.add_argument("--seeds", nargs="+", type=nonneg_int, default=[0, 1, 2], metavar="S", help="training seeds")
    ex.add_argument("--conditions", nargs="+", default=["video", "no_video"], choices=sorted(CONDITIONS),
                    metavar="C", help=f"conditions, the first is the reference of the paired effects "
                                      f"({', '.join(sorted(CONDITIONS))})")
    ex.add_argument("--tasks", nargs="+", metavar="TASK", help="Meta-World v3 tasks, or 'mt10' (default: the demo's)")
    ex.add_argument("--episodes-per-task", type=positive_int, help="demos per task (default: the demo's)")
    ex.add_argument("--train-steps", type=positive_int, help="policy training steps per run (default: the demo's)")
    ex.add_argument("--vae-steps", type=positive_int, help="VAE training steps (default: the demo's)")
    ex.add_argument("--eval-episodes", type=positive_int, help="evaluation episodes per task (default: the demo's)")
    ex.add_argument("--blind-episodes", type=positive_int,
                    help="episodes per task of each image control, blind and shuffled (default: as eval)")
    _add_demo_data_args(ex)
    ex.add_argument("--jobs", type=positive_int, default=1,
                    help="runs trained side by side (one process and one thread each; at most the core count)")
    ex.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test)")
    ex.add_argument("--report-only", action="store_true", help="rebuild the report from the finished runs")
    ex.add_argument("--no-progress", action="store_true", help="no progress bars")
    ex.set_defaults(func=_cmd_experiment)

    from lwam.bench_latency import add_bench_parser
    add_bench_parser(sub)
    from lwam.serving.server import add_serve_parser
    add_serve_parser(sub, **fmt)
    from lwam.export import add_export_parser
    add_export_parser(sub, **fmt)
    return p


def _anticipated() -> tuple[type[BaseException], ...]:
    """Exception classes that mean bad input or a state the user can fix, not a bug in lwam."""
    from lwam.errors import LwamError

    kinds: list[type[BaseException]] = [LwamError, ValueError, TypeError, OSError, KeyError, FloatingPointError]
    try:
        from lwam.data.lerobot import VideoDecodeError
        kinds.append(VideoDecodeError)
    except ImportError:
        pass
    try:
        from safetensors import SafetensorError
        kinds.append(SafetensorError)
    except ImportError:
        pass
    return tuple(kinds)


def _message(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(str(msg).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    return msg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LWAM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.parse_args([args.command, "--help"])
    if args.command == "train" and args.what is None and not args.out:
        print("lwam train: error: argument --out: required", file=sys.stderr)
        return EXIT_ERROR
    if debug:
        return int(args.func(args) or 0)
    cmd = " ".join(x for x in (args.command, getattr(args, "what", None) or getattr(args, "sim", None)) if x)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"lwam {cmd}: interrupted", file=sys.stderr)
        return 130
    except _anticipated() as e:
        print(f"lwam {cmd}: error: {_message(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug: still one line, and how to see more
        print(f"lwam {cmd}: internal error: {type(e).__name__}: {_message(e)} (rerun with --debug for the traceback, "
              f"and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
