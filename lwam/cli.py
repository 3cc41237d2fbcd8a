"""The ``lwam`` command."""
from __future__ import annotations

import argparse
import json
import sys


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
    from lwam.envs.metaworld import collect_demos

    res = collect_demos(args.tasks, args.episodes, args.out, cameras=tuple(args.cameras), size=args.size,
                        seed=args.seed, max_steps=args.max_steps, progress=not args.no_progress)
    print(json.dumps(res, indent=2, default=str))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lwam.checkpoint import save_checkpoint
    from lwam.config import ImplConfig, get_preset
    from lwam.model.lightwam import LightWAM
    from lwam.pipeline import cache_latents_stage, make_windows
    from lwam.train import Trainer
    from lwam.vae_train import load_vae_checkpoint

    if not args.dataset or not args.out:
        raise ValueError("lwam train needs --dataset and --out")
    cfg = get_preset(args.preset)
    over = {"train.max_steps": args.steps} if args.steps else {}
    if args.batch_size:
        over["train.batch_size"] = args.batch_size
    if args.lr:
        over["train.lr"] = args.lr
    if args.text_cache:  # the run's text contexts come from this file, not from an encoder
        over["text.encoder"] = "cache"
    cfg = cfg.replace(**over)
    impl = ImplConfig.named(args.impl)
    out = Path(args.out)
    windows, stats = make_windows(args.dataset, cfg, window_stride=args.window_stride, progress=not args.no_progress)
    if args.vae:
        if str(args.vae).endswith(".safetensors"):
            vae = load_vae_checkpoint(args.vae)
            cfg.vae = vae.cfg
        else:
            vae = None
    elif cfg.name == "tiny":
        raise ValueError("the tiny preset has no released VAE: run `lwam train vae` first and pass --vae")
    else:
        raise ValueError("pass --vae (Wan2.1_VAE.pth, or a VAE trained by `lwam train vae`)")
    model = LightWAM(cfg)
    if vae is not None:
        model.vae.load_state_dict(vae.state_dict())
        model.vae.set_latent_stats(vae.latent_mean, vae.latent_std)
    else:
        model.vae.load_pretrained(args.vae)
    if args.dit:
        from lwam.model.weights import load_wan_dit
        load_wan_dit(model.dit, args.dit)
    instructions = list(windows.dataset.tasks)
    if args.text_cache:
        from lwam.model.text import TextContextCache

        cache = TextContextCache.load(args.text_cache, cfg.text)
        missing = [s for s in instructions if s not in cache]
        if missing:
            raise ValueError(f"--text-cache {args.text_cache}: no context for the dataset's instructions "
                             f"{missing[:3]} ({len(missing)} of {len(instructions)} missing)")
        model.text.update(cache.subset(instructions))
    else:
        model.text.get(instructions)  # encode once, so that the checkpoints carry every training instruction
    train_set = cache_latents_stage(model, windows, out / "latents.npy", progress=not args.no_progress)
    trainer = Trainer(model, train_set, out, impl=impl, stats=stats, progress=not args.no_progress)
    res = trainer.train()
    path = save_checkpoint(model, out / "final", stats=stats)
    print(json.dumps({"checkpoint": str(path), "impl": impl.to_dict(), **res}, indent=2, default=str))
    return 0


def _cmd_train_vae(args: argparse.Namespace) -> int:
    from lwam.config import get_preset
    from lwam.model.vae import WanVAE
    from lwam.pipeline import VideoClips, make_windows
    from lwam.vae_train import train_vae

    cfg = get_preset(args.preset)
    windows, _ = make_windows(args.dataset, cfg, window_stride=args.window_stride, progress=not args.no_progress)
    vae = WanVAE(cfg.vae)
    res = train_vae(vae, VideoClips(windows, max_clips=args.max_clips), steps=args.steps, batch_size=args.batch_size,
                    out_dir=args.out, progress=not args.no_progress, clip_frames=5)
    print(json.dumps(res, indent=2, default=str))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from lwam.checkpoint import load_checkpoint
    from lwam.envs.evaluate import evaluate
    from lwam.pipeline import make_policy

    model, stats = load_checkpoint(args.checkpoint)
    if stats is None:
        raise ValueError(f"{args.checkpoint}: no stats.json (normalisation statistics); cannot de-normalise actions")
    policy = make_policy(model, stats, compiled=not args.eager)
    out = {}
    for blind in ([False, True] if args.blind else [False]):
        out["blind" if blind else "policy"] = evaluate(
            policy, args.tasks, args.episodes, executed_steps=args.executed_steps or model.cfg.data.executed_steps,
            max_steps=args.max_steps, blind=blind, video_dir=None if blind else args.videos,
            progress=not args.no_progress, cameras=model.cfg.data.cameras, size=model.cfg.data.image_height)
    print(json.dumps(out, indent=2, default=str))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lwam.demo import DemoConfig, run_demo

    dcfg = DemoConfig.quick() if args.quick else DemoConfig()
    for name in ("episodes_per_task", "train_steps", "vae_steps", "eval_episodes"):
        v = getattr(args, name)
        if v is not None:
            setattr(dcfg, name, v)
    if args.tasks:
        dcfg.tasks = tuple(args.tasks)
    report = run_demo(args.out, dcfg, progress=not args.no_progress)
    keys = ("success", "blind_success", "mean_action_query_latency_ms", "stage_seconds", "wall_seconds")
    print(json.dumps({k: report[k] for k in keys}, indent=2))
    print(f"report: {args.out}/report.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lwam", description="Light-WAM: train, evaluate and deploy a World Action Model")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter and token counts of a preset (no weights allocated)")
    info.add_argument("--preset", default="paper")
    info.add_argument("--json", action="store_true")
    info.add_argument("--build", action="store_true",
                      help="what was built and what runs: lwam._C, Triton kernels, the GPU's launch config")
    info.set_defaults(func=_cmd_info)

    col = sub.add_parser("collect", help="collect scripted-expert demos into a LeRobot dataset")
    col_sub = col.add_subparsers(dest="sim", required=True)
    mw = col_sub.add_parser("metaworld", help="Meta-World scripted experts")
    mw.add_argument("--tasks", nargs="+", default=["button-press-topdown-v3", "drawer-open-v3"])
    mw.add_argument("--episodes", type=int, default=20, help="successful episodes per task")
    mw.add_argument("--cameras", nargs="+", default=["corner", "gripper"])
    mw.add_argument("--size", type=int, default=64, help="square camera image size")
    mw.add_argument("--max-steps", type=int, default=200)
    mw.add_argument("--seed", type=int, default=0)
    mw.add_argument("--out", required=True)
    mw.add_argument("--no-progress", action="store_true")
    mw.set_defaults(func=_cmd_collect)

    tr = sub.add_parser("train", help="train Light-WAM on a LeRobot dataset (or `train vae`)")
    tr_sub = tr.add_subparsers(dest="what")
    tv = tr_sub.add_parser("vae", help="train the preset's Wan-VAE on the dataset's frames")
    tv.add_argument("--preset", default="tiny")
    tv.add_argument("--dataset", required=True)
    tv.add_argument("--out", required=True)
    tv.add_argument("--steps", type=int, default=400)
    tv.add_argument("--batch-size", type=int, default=8)
    tv.add_argument("--max-clips", type=int, default=512)
    tv.add_argument("--window-stride", type=int, default=2)
    tv.add_argument("--no-progress", action="store_true")
    tv.set_defaults(func=_cmd_train_vae)
    tr.add_argument("--preset", default="tiny")
    tr.add_argument("--dataset")
    tr.add_argument("--out")
    tr.add_argument("--vae", help="VAE weights: vae.safetensors from `lwam train vae`, or Wan2.1_VAE.pth")
    tr.add_argument("--dit", help="Wan2.1 DiT diffusion_pytorch_model.safetensors (paper preset)")
    tr.add_argument("--text-cache", help="text contexts of the dataset's instructions (a TextContextCache file, "
                                         "lwam.model.text.build_text_cache); presets with a built-in encoder need none")
    tr.add_argument("--impl", choices=["fast", "reference"], default="fast",
                    help="how the training step computes (lwam.config.ImplConfig): the fast implementation "
                         "(default) or the published arithmetic; recorded in every checkpoint (impl.json)")
    tr.add_argument("--steps", type=int)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--window-stride", type=int, default=1)
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="closed-loop evaluation of a checkpoint on Meta-World")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--tasks", nargs="+", default=["button-press-topdown-v3", "drawer-open-v3"])
    ev.add_argument("--episodes", type=int, default=10)
    ev.add_argument("--executed-steps", type=int)
    ev.add_argument("--max-steps", type=int, default=200)
    ev.add_argument("--blind", action="store_true", help="also run the blind-vision control")
    ev.add_argument("--videos", help="directory for rollout videos")
    ev.add_argument("--eager", action="store_true", help="use the eager model instead of the compiled Policy")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_cmd_eval)

    dm = sub.add_parser("demo", help="collect, train VAE + policy, evaluate closed-loop, report (Meta-World)")
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--quick", action="store_true", help="minutes-long smoke variant (CI)")
    dm.add_argument("--tasks", nargs="+")
    dm.add_argument("--episodes-per-task", type=int)
    dm.add_argument("--train-steps", type=int)
    dm.add_argument("--vae-steps", type=int)
    dm.add_argument("--eval-episodes", type=int)
    dm.add_argument("--no-progress", action="store_true")
    dm.set_defaults(func=_cmd_demo)

    from lwam.bench_latency import add_bench_parser
    add_bench_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.parse_args([args.command, "--help"])
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"lwam {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
