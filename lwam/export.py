"""``lwam export``: a checkpoint -> one ``.pt2`` file that runs the policy without the Python training stack
(lwam.policy.exported), and the drift check that guards it.

:func:`export_policy` builds the compiled policy's transformed action path (fp32, CPU, compile off: the
same exact transformations as ``lwam.Policy``), exports it with ``torch.export`` at batch 1 and compiles it
ahead of time with AOTInductor; the custom op ``lwam::query_pool`` is registered with a fake (meta)
implementation, so the export traces through it and the package calls it. The file is written atomically.

:func:`check_drift` compares the exported policy with the eager model (lwam.policy.eager, the reference
every transformation is checked against) on observations: recorded ones from a LeRobot dataset
(:func:`recorded_observations`), or any list. Drift of one observation is ``max |a_exported - a_eager| /
max |a_eager|`` over its chunk; the check fails when the largest drift exceeds the tolerance
(default 1e-5, fp32).
"""
from __future__ import annotations

import json
import os
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lwam.errors import DriftError

__all__ = ["export_policy", "check_drift", "recorded_observations", "DEFAULT_TOLERANCE"]

DEFAULT_TOLERANCE = 1e-5


def export_policy(checkpoint: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Export ``checkpoint`` (an lwam checkpoint directory) to ``out`` (.pt2). Returns what was written:
    path, instructions, seconds for export and for the AOT compilation, file size."""
    from safetensors.torch import save as save_safetensors

    import lwam
    from lwam._atomic import atomic_path
    from lwam.policy.compiled import Policy
    from lwam.policy.exported import FORMAT_VERSION, META_NAME, TENSORS_NAME, archive_prefix

    out = Path(out)
    if out.suffix != ".pt2":
        raise ValueError(f"--out {out}: expected a file name ending in .pt2")
    policy = Policy.from_checkpoint(checkpoint, device="cpu", dtype=torch.float32, compile=False,
                                    cuda_graphs=False)
    cfg = policy.cfg
    instructions = policy.instructions
    if not instructions:
        raise ValueError(f"--checkpoint {checkpoint}: no instruction has a cached text context; an exported "
                         f"policy answers only the instructions embedded at export")
    h, w = cfg.data.image_height, cfg.data.image_width
    runner = policy._runner(1, h, w)
    runner.text[0].copy_(policy.text_embedding(instructions[0]))
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(policy.fast, runner.args(), strict=False)
    t_export = time.perf_counter() - t0
    tensors = {f"text.{i}": policy.text_embedding(s).detach().float().cpu().contiguous()
               for i, s in enumerate(instructions)}
    tensors["rope_cos"] = runner.cos.detach().cpu().contiguous()
    tensors["rope_sin"] = runner.sin.detach().cpu().contiguous()
    meta = {
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "stats": policy.normalizer.to_dict() if policy.normalizer is not None else None,
        "instructions": instructions,
        "executed_steps": int(cfg.data.executed_steps),
        "image_hw": [h, w],
        "batch_size": 1,
        "dtype": "float32",
        "inference_options": asdict(policy.options),
        "source_checkpoint": str(checkpoint),
        "lwam_version": lwam.__version__,
        "torch_version": torch.__version__,
    }
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
        prefix = archive_prefix(tmp)
        with zipfile.ZipFile(tmp, "a") as z:
            z.writestr(f"{prefix}/{META_NAME}", json.dumps(meta, indent=2))
            z.writestr(f"{prefix}/{TENSORS_NAME}", save_safetensors(tensors))
    t_compile = time.perf_counter() - t0
    return {"path": str(out), "instructions": instructions, "export_s": round(t_export, 2),
            "aot_compile_s": round(t_compile, 2), "bytes": out.stat().st_size}


def recorded_observations(dataset: str | os.PathLike, n: int, cfg: Any, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` observations recorded in a LeRobot dataset (frames spread over its episodes, drawn with
    ``seed``), as the robot-facing dicts of lwam.policy.observation: every camera of ``cfg.data``, the
    state, the episode's instruction."""
    from lwam.data.lerobot import LeRobotReader
    from lwam.policy.observation import IMAGE_PREFIX, STATE_KEY

    reader = LeRobotReader(dataset)
    rng = np.random.default_rng(seed)
    episodes = reader.episode_indices
    picks = sorted((int(e), int(rng.integers(reader.episode_length(e))))
                   for e in rng.choice(episodes, size=n, replace=True))
    out, videos = [], {}
    for ep, t in picks:
        if ep not in videos:
            videos.clear()  # one episode's videos decoded at a time
            videos[ep] = {c: reader.episode_video(ep, c) for c in cfg.data.cameras}
        obs = {f"{IMAGE_PREFIX}{c}": videos[ep][c][t] for c in cfg.data.cameras}
        obs[STATE_KEY] = reader.episode_data(ep)[reader.state_key][t]
        obs["task"] = reader.instruction(ep)
        out.append(obs)
    return out


def check_drift(exported: Any, reference: Any, observations: Sequence[dict[str, Any]],
                tolerance: float = DEFAULT_TOLERANCE, raise_on_drift: bool = True) -> dict[str, Any]:
    """Actions of ``exported`` (an ExportedPolicy) vs ``reference`` (the eager policy of the same weights)
    on ``observations``. Returns {"observations", "max_relative_drift", "mean_relative_drift",
    "max_abs_diff", "tolerance", "passed"}; raises :class:`DriftError` when it fails (``raise_on_drift``)."""
    if not observations:
        raise ValueError("observations: expected at least one")
    drifts, diffs = [], []
    for obs in observations:
        a = np.asarray(exported.predict_action_chunk(obs), dtype=np.float64)
        b = np.asarray(reference.predict_action_chunk(obs), dtype=np.float64)
        diff = float(np.abs(a - b).max())
        diffs.append(diff)
        drifts.append(diff / max(float(np.abs(b).max()), 1e-12))
    res = {"observations": len(observations), "max_relative_drift": max(drifts),
           "mean_relative_drift": float(np.mean(drifts)), "max_abs_diff": max(diffs),
           "tolerance": float(tolerance), "passed": max(drifts) <= tolerance}
    if raise_on_drift and not res["passed"]:
        raise DriftError(f"exported policy drifts from the eager model: max relative drift "
                         f"{res['max_relative_drift']:.3g} over {len(observations)} observations exceeds the "
                         f"tolerance {tolerance:g}")
    return res


def export_main(args) -> int:
    """``lwam export`` (argparse namespace of lwam.cli): export unless --out already holds an export (then
    only check it; --overwrite exports again), then the drift check when --check DATASET is given."""
    from lwam.checkpoint import load_checkpoint
    from lwam.policy.eager import EagerPolicy
    from lwam.policy.exported import load_exported

    out = Path(args.out)
    report: dict[str, Any] = {}
    if out.exists() and not args.overwrite and not args.check:
        raise FileExistsError(f"--out {out}: exists; pass --overwrite to export again, or --check DATASET to "
                              f"check it")
    if not out.exists() or args.overwrite:
        report["export"] = export_policy(args.checkpoint, out)
    if args.check:
        t0 = time.perf_counter()
        exported = load_exported(out)
        report["load_s"] = round(time.perf_counter() - t0, 3)
        model, stats = load_checkpoint(args.checkpoint)
        reference = EagerPolicy(model, stats, "cpu")
        observations = recorded_observations(args.check, args.observations, model.cfg, seed=args.seed)
        res = check_drift(exported, reference, observations, tolerance=args.tolerance, raise_on_drift=False)
        report["check"] = {"dataset": str(args.check), **res}
        print(json.dumps(report, indent=2))
        if not res["passed"]:
            raise DriftError(f"--check {args.check}: max relative drift {res['max_relative_drift']:.3g} over "
                             f"{res['observations']} recorded observations exceeds --tolerance {args.tolerance:g}")
        return 0
    print(json.dumps(report, indent=2))
    return 0


def add_export_parser(sub, **parser_kwargs) -> None:
    from lwam._argtypes import checkpoint_dir, dataset_dir, nonneg_int, positive_float, positive_int

    ep = sub.add_parser("export", help="export a checkpoint to one .pt2 file (torch.export + AOTInductor) and "
                                       "check its drift against the eager model", **parser_kwargs)
    ep.add_argument("--checkpoint", required=True, type=checkpoint_dir, help="lwam checkpoint directory")
    ep.add_argument("--out", required=True, help="the .pt2 file to write (an existing one is only checked)")
    ep.add_argument("--overwrite", action="store_true", help="export again over an existing --out")
    ep.add_argument("--check", type=dataset_dir, metavar="DATASET",
                    help="compare exported vs eager actions on observations recorded in this LeRobot dataset; "
                         "exit 2 over --tolerance")
    ep.add_argument("--observations", type=positive_int, default=50, help="recorded observations to compare")
    ep.add_argument("--tolerance", type=positive_float, default=DEFAULT_TOLERANCE,
                    help="largest max |a - a_eager| / max |a_eager| accepted")
    ep.add_argument("--seed", type=nonneg_int, default=0, help="which recorded frames are drawn")
    ep.set_defaults(func=export_main)
