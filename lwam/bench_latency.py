"""``lwam bench latency``: action-query latency of the eager LightWAM vs the optimised Policy, in one run.

Measures, for batch ``B`` at the preset's image size:

* the whole query (CPU observation in -> CPU actions out, transfers included) of the eager model
  (``LightWAM.predict_actions``) and of :class:`lwam.policy.compiled.Policy` (``predict_batch``);
* each stage -- VAE encode, context (text lookup + proprio token + embedding), backbone (up to the last
  tapped layer), expert (pooling + head) -- for both. The Policy's stages are its transformed modules,
  each compiled on its own when the policy compiles on CUDA, else run eagerly (stated in the output);
* median, p10 and p90 in milliseconds over ``iters`` timed calls after ``warmup`` calls, eager and policy
  calls alternating (a shared machine's load then hits both alike). CUDA timings use events around each
  call and synchronise; CPU timings use ``time.perf_counter``;
* peak memory on CUDA: ``torch.cuda.max_memory_allocated`` of each side measured alone (the policy is
  built and timed before the eager model is moved to the GPU; the eager number excludes the resident
  policy), and the device's used memory from NVML (nvidia-ml-py) when available;
* the environment: device name, torch / triton / CUDA versions, git commit, threads, and whether the
  weights are random (no checkpoint given) -- random weights time the same as trained ones.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import numpy as np
import torch

from lwam._atomic import atomic_write_text
from lwam._env import environment

INSTRUCTION = "put the bowl on the plate"


def _nvml_used(device: torch.device) -> int | None:
    """Device memory in use (all processes, CUDA context and allocator caches included), from NVML."""
    if device.type != "cuda":
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(idx)).used)
    except Exception:  # NVML missing or restricted: not fatal for a timing run
        return None


def time_fn(fn: Callable[[], Any], device: torch.device, iters: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median / p10 / p90 / mean milliseconds of ``fn()`` over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    a = np.asarray(times)
    return {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
            "p90_ms": float(np.percentile(a, 90)), "mean_ms": float(a.mean()), "iters": len(times)}


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, iters: int = 20,
                     warmup: int = 3) -> dict[str, dict[str, float]]:
    """Like :func:`time_fn` for several functions whose calls alternate (a, b, a, b, ...), so that a
    shared machine's load drifts affect every side alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    for _ in range(iters):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        a = np.asarray(ts)
        out[name] = {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
                     "p90_ms": float(np.percentile(a, 90)), "mean_ms": float(a.mean()), "iters": len(ts)}
    return out


def _eager_stages(model, images: torch.Tensor, proprio: torch.Tensor, dev: torch.device) -> dict[str, Callable]:
    """Closures for each stage of the eager model; inputs of later stages come from a first pass."""
    cfg = model.cfg
    taps = cfg.tap_layers
    img, prop = images.to(dev), proprio.to(dev)
    b = img.shape[0]
    with torch.no_grad():
        z = model.encode_video(img[:, :, None])
        ctx = model.context(model.text_context({"instruction": [INSTRUCTION] * b}, dev), prop)
        t0 = torch.zeros(b, 1, device=dev)
        states = model.dit(z, t0, ctx, taps=taps, stop_after=max(taps), return_video=False,
                           context_embedded=True).taps

    def nograd(f):
        def g():
            with torch.no_grad():
                return f()
        return g

    return {
        "vae_encode": nograd(lambda: model.encode_video(img[:, :, None])),
        "context": nograd(lambda: model.context(model.text_context({"instruction": [INSTRUCTION] * b}, dev), prop)),
        "backbone": nograd(lambda: model.dit(z, t0, ctx, taps=taps, stop_after=max(taps), return_video=False,
                                             context_embedded=True)),
        "expert": nograd(lambda: model.expert(states)),
    }


def _policy_stages(policy, images: torch.Tensor, proprio: torch.Tensor, compiled: bool) -> dict[str, Callable]:
    fast = policy.fast
    b, _, h, w = images.shape
    policy.predict_batch(images, [INSTRUCTION] * b, proprio)  # fills the runner's buffers
    r = policy._runners[(b, h, w)]
    wrap = (lambda f: torch.compile(f, dynamic=False, backend=policy.options.compile_backend)) if compiled else (lambda f: f)
    enc, ctxf, bb, ex = wrap(fast.encode), wrap(fast.context), wrap(fast.backbone), wrap(fast.expert_head)
    with torch.no_grad():
        z = fast.encode(r.images)
        ctx = fast.context(r.text, r.proprio)
        states = fast.backbone(z, ctx, r.cos, r.sin)

    def nograd(f):
        def g():
            with torch.no_grad():
                return f()
        return g

    def context():  # per-query work: cached text embedding lookup + the proprio token
        policy.text_embedding(INSTRUCTION)
        return ctxf(r.text, r.proprio)

    return {"vae_encode": nograd(lambda: enc(r.images)), "context": nograd(context),
            "backbone": nograd(lambda: bb(z, ctx, r.cos, r.sin)), "expert": nograd(lambda: ex(states))}


def run_latency(preset: str | None = None, checkpoint: str | None = None, device: str | None = None,
                iters: int = 20, warmup: int = 3, batch_size: int = 1, compile: bool = True,
                stages: bool = True, seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    """Run the side-by-side latency benchmark and return a JSON-able record (see the module docstring)."""
    if threads:
        torch.set_num_threads(threads)
    from lwam.config import get_preset
    from lwam.policy.compiled import Policy
    from lwam.model.lightwam import LightWAM

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    stats = None
    if checkpoint:
        from lwam.checkpoint import load_checkpoint
        model, stats = load_checkpoint(checkpoint)
        preset = model.cfg.name
    else:
        preset = preset or ("paper" if dev.type == "cuda" else "tiny")
        model = LightWAM(get_preset(preset))
    model.eval().requires_grad_(False)
    cfg = model.cfg
    if INSTRUCTION not in model.text and model.text.encoder is None:  # random umT5-like context
        model.text.add(INSTRUCTION, torch.randn(cfg.text.max_tokens, cfg.text.dim) * 0.1)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    b, h, w = batch_size, cfg.data.image_height, cfg.data.image_width
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    proprio = torch.randn(b, cfg.proprio_dim, generator=g)
    # Raw proprio in, raw actions out for the policy; the eager model gets the same normalised proprio.
    record: dict[str, Any] = {
        "benchmark": "policy_latency", **environment(dev), "preset": preset, "batch_size": b,
        "image_hw": [h, w], "tokens": cfg.action_tokens(), "context_tokens": cfg.context_tokens(),
        "chunk_size": cfg.chunk_size, "dtype": str(dtype).replace("torch.", ""),
        "weights": f"checkpoint {checkpoint}" if checkpoint else "random weights (timing only)",
        "iters": iters, "warmup": warmup, "eager_impl": model.impl.to_dict(),
    }

    # --- Policy first, alone on the device ---------------------------------------------------------
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        mem0 = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    policy = Policy.from_model(model, stats=stats, device=dev, dtype=dtype, compile=compile)
    record["policy_options"] = {k: getattr(policy.options, k) for k in policy.options.__dataclass_fields__}
    policy.predict_batch(images, [INSTRUCTION] * b, proprio)
    record["policy_build_and_warmup_s"] = time.perf_counter() - t0
    query = lambda: policy.predict_batch(images, [INSTRUCTION] * b, proprio)  # noqa: E731
    if dev.type == "cuda":
        query()
        torch.cuda.synchronize(dev)
        record["policy_peak_bytes"] = torch.cuda.max_memory_allocated(dev) - mem0
        record["policy_nvml_used_bytes"] = _nvml_used(dev)

    # --- eager model (the policy stays resident; its bytes are subtracted) -------------------------
    norm_prop = proprio
    if policy.normalizer is not None:
        from lwam.data.lerobot import STATE_KEY
        norm_prop = policy.normalizer.apply(STATE_KEY, proprio).float()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        resident = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    model.to(device=dev, dtype=dtype)

    def eager_query():
        with torch.no_grad():
            return model.predict_actions(images.to(dev), norm_prop.to(dev), instruction=[INSTRUCTION] * b).float().cpu()

    if dev.type == "cuda":
        eager_query()
        torch.cuda.synchronize(dev)
        record["eager_peak_bytes"] = torch.cuda.max_memory_allocated(dev) - resident
        record["eager_nvml_used_bytes"] = _nvml_used(dev)

    # --- timings, eager and policy calls alternating -----------------------------------------------
    res: dict[str, dict[str, Any]] = {"eager": {}, "policy": {}}
    t = time_interleaved({"eager": eager_query, "policy": query}, dev, iters, warmup)
    res["eager"]["query"], res["policy"]["query"] = t["eager"], t["policy"]
    if stages:
        compiled_stages = compile and dev.type == "cuda"
        record["policy_stages_compiled"] = compiled_stages
        pst = _policy_stages(policy, images, proprio, compiled_stages)
        est = _eager_stages(model, images, norm_prop, dev)
        for name in est:
            t = time_interleaved({"eager": est[name], "policy": pst[name]}, dev, iters, warmup)
            res["eager"][name], res["policy"][name] = t["eager"], t["policy"]
    record["results"] = res
    record["speedup_median"] = res["eager"]["query"]["median_ms"] / res["policy"]["query"]["median_ms"]
    return record


def format_record(rec: dict[str, Any]) -> str:
    lines = [f"lwam bench latency: preset {rec['preset']}, batch {rec['batch_size']}, image {rec['image_hw']}, "
             f"{rec['tokens']} tokens, {rec['context_tokens']} context tokens, chunk {rec['chunk_size']}, "
             f"{rec['dtype']}",
             f"device {rec['device']} ({rec['device_name']}), torch {rec['torch']}, triton {rec['triton']}, "
             f"CUDA {rec['cuda']}, commit {(rec['commit'] or 'unknown')[:12]}, threads {rec['threads']}",
             f"weights: {rec['weights']}"]
    if "policy_stages_compiled" in rec:
        lines.append(f"policy stages: {'compiled separately' if rec['policy_stages_compiled'] else 'transformed modules, eager'}")
    lines.append(f"{'stage':<12} {'eager median [p10, p90] ms':>32} {'policy median [p10, p90] ms':>32}")
    res = rec["results"]
    for stage in ("query", "vae_encode", "context", "backbone", "expert"):
        if stage not in res["eager"]:
            continue
        cells = []
        for side in ("eager", "policy"):
            r = res[side][stage]
            cells.append(f"{r['median_ms']:9.3f} [{r['p10_ms']:.3f}, {r['p90_ms']:.3f}]")
        lines.append(f"{stage:<12} {cells[0]:>32} {cells[1]:>32}")
    lines.append(f"speed-up (query median): {rec['speedup_median']:.2f}x")
    for side in ("eager", "policy"):
        if f"{side}_peak_bytes" in rec:
            nv = rec.get(f"{side}_nvml_used_bytes")
            lines.append(f"peak memory {side}: {rec[f'{side}_peak_bytes'] / 2**30:.3f} GiB (max_memory_allocated)"
                         + (f", NVML used {nv / 2**30:.3f} GiB" if nv else ""))
    return "\n".join(lines)


def _cmd_bench_latency(args: argparse.Namespace) -> int:
    rec = run_latency(preset=args.preset, checkpoint=args.checkpoint, device=args.device, iters=args.iters,
                      warmup=args.warmup, batch_size=args.batch_size, compile=not args.no_compile,
                      stages=not args.no_stages, threads=args.threads)
    text = json.dumps(rec, indent=2, default=str)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text if args.json else format_record(rec))
    return 0


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench latency`` on the ``lwam`` command's subparsers; returns the ``bench`` parser."""
    bench = subparsers.add_parser("bench", help="benchmarks")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    lat = sub.add_parser("latency", help="action-query latency: eager model vs Policy, per stage, peak memory")
    lat.add_argument("--preset", choices=("paper", "tiny", "robotwin"), default=None,
                     help="default: paper on CUDA, tiny on CPU (ignored with --checkpoint)")
    lat.add_argument("--checkpoint", default=None, help="our checkpoint directory (default: random weights)")
    lat.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    lat.add_argument("--iters", type=int, default=20)
    lat.add_argument("--warmup", type=int, default=3)
    lat.add_argument("--batch-size", type=int, default=1)
    lat.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    lat.add_argument("--no-compile", action="store_true", help="Policy without torch.compile / CUDA graphs")
    lat.add_argument("--no-stages", action="store_true", help="time only the whole query")
    lat.add_argument("--json", action="store_true", help="print the JSON record instead of the table")
    lat.add_argument("--out", default=None, help="also write the JSON record to this file")
    lat.set_defaults(func=_cmd_bench_latency)
    return bench


if __name__ == "__main__":  # python -m lwam.bench_latency ...
    p = argparse.ArgumentParser(prog="lwam")
    add_bench_parser(p.add_subparsers(dest="command", required=True))
    a = p.parse_args()
    raise SystemExit(a.func(a))
