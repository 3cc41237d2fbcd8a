"""Benchmark: fused multi-layer learned-query pooling vs the reference poolers, eager and torch.compile'd.

Cases, measured side by side in one run at each shape:
  fused               MultiLayerQueryPooler (one lwam::query_pool launch set for all L layers)
  reference           the plain ReferenceQueryPooler forward per layer (fused=False)
  reference_compiled  torch.compile of the same reference
  folded_inference    fold_for_inference(...) (forward only: the frozen-policy path)
Modes: "fwd" (under no_grad) and "fwd_bwd" (forward + backward to the layer inputs and every parameter).

Shapes: on CUDA the paper's training shape (L=3, B=16, S=392, D=1536, H=8, Q=16) and inference (B=1), in
bf16 and fp32; on CPU tiny shapes in fp32 (the fused path runs in the Triton interpreter there, which
measures the interpreter, not the kernel). Every case is checked against the reference first, warmed up,
and timed with a device synchronize before the clock is read. Launches are counted (Triton launches through
the launcher's counter; on CUDA also every device kernel through torch.profiler); peak memory on CUDA.
Beside the time, the fused case reports the bytes its kernels move (``kq.modelled_bytes``: every tile each
program loads, no L2 reuse), the floor (``kq.floor_bytes``: X, A, y once forward; again with gy, gX, gA
backward), achieved GB/s, and on CUDA the fraction of the floor (floor bytes at measured copy bandwidth /
measured time).
Run: ``python -m pytest benchmarks/test_bench_query_pool.py --benchmark-only``; with LWAM_BENCH_RECORD=1 a
JSON record goes to benchmarks/results/, rewritten after every case (a cut run keeps what it measured).
The fused cases fail, not skip, where the kernel should run and cannot (on CUDA; or Triton installed and
``lwam.kernels`` not importable, see benchmarks/conftest.py).
"""
from __future__ import annotations

import os

import pytest
import torch

from _record import Record
from lwam.modules.query_pool import MultiLayerQueryPooler, fold_for_inference, pool_layers
from lwam.ops.query_pool import query_pool_kernel_available
from lwam.testing import assert_close

try:
    import lwam.kernels.query_pool as kq
except ImportError:
    kq = None

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":
    SHAPES = {"train": (3, 16, 392, 1536, 8, 16), "infer": (3, 1, 392, 1536, 8, 16)}
    DTYPES = [torch.bfloat16, torch.float32]
else:
    SHAPES = {"train": (3, 4, 24, 64, 8, 16), "infer": (3, 1, 24, 64, 8, 16)}
    DTYPES = [torch.float32]
# Headline first (a run cut by its time limit keeps what it finished): fwd+bwd before fwd, and the
# torch.compile of the reference, whose compile dominates the suite's time, last at each shape.
CASES = ["fused", "reference", "folded_inference", "reference_compiled"]
MODES = ["fwd_bwd", "fwd"]
_COMPILED: dict = {}


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _setup(shape, dtype):
    L, B, S, D, H, Q = shape
    torch.manual_seed(0)
    mod = MultiLayerQueryPooler(L, D, num_queries=Q, num_heads=H)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn_like(p) * (0.5 if p.dim() == 1 else 0.02))
    mod = mod.to(DEVICE, dtype)
    xs = [(torch.randn(B, S, D, device=DEVICE) * 1.5 + 0.2).to(dtype) for _ in range(L)]
    return mod, xs


def _forward_fn(case, mod, shape, dtype, mode):
    poolers = list(mod.poolers)
    if case == "fused":
        return lambda xs: pool_layers(poolers, xs, fused=True)
    if case == "reference":
        return lambda xs: pool_layers(poolers, xs, fused=False)
    if case == "reference_compiled":
        key = (shape, dtype, mode)
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(lambda xs: pool_layers(poolers, xs, fused=False), fullgraph=True)
        return _COMPILED[key]
    folded = fold_for_inference(poolers)
    return lambda xs: folded(xs)


def _step(fwd, mod, xs, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                out = fwd(xs)
            _sync()
            return out
        return run
    leaves = [x.detach().requires_grad_(True) for x in xs]
    params = list(mod.parameters())

    def run():
        out = fwd(leaves)
        grads = torch.autograd.grad(out.float().square().mean(), [*leaves, *params])
        _sync()
        return grads
    return run


def _count_launches(run) -> dict:
    counts = {}
    if kq is not None:
        kq.reset_launch_count()
        run()
        counts["triton_launches"] = kq.launch_count()
    if DEVICE == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
        counts["cuda_kernels"] = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return counts


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_bench_query_pool(benchmark, record, shape_name, dtype, mode, case):
    shape = SHAPES[shape_name]
    if case == "folded_inference" and mode != "fwd":
        pytest.skip("the folded inference module is frozen (forward only)")
    mod, xs = _setup(shape, dtype)
    if case in ("fused", "folded_inference") and not query_pool_kernel_available(xs[0]):
        if DEVICE == "cuda" or kq is None:  # the kernel should run here: measuring the fallback is wrong
            pytest.fail(f"{case}: the Triton kernel cannot run on {DEVICE} {dtype}")
        pytest.skip("no Triton kernel here (needs CUDA, or TRITON_INTERPRET=1 on CPU)")
    fwd = _forward_fn(case, mod, shape, dtype, mode)

    with torch.no_grad():  # correctness first: against the fp32 reference
        ref32 = pool_layers([p.float() for p in _setup(shape, torch.float32)[0].to(DEVICE).poolers],
                            [x.float() for x in xs], fused=False)
        assert_close(fwd(xs), ref32, dtype, name=case)

    run = _step(fwd, mod, xs, mode)
    for _ in range(2):  # warm-up (and torch.compile's first calls)
        run()
    launches = _count_launches(run)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    slow_cpu = DEVICE == "cpu" and case in ("fused", "folded_inference")
    rounds = 30 if DEVICE == "cuda" else (3 if slow_cpu else 10)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    peak = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None
    traffic = _traffic(shape, dtype, mode, median) if case == "fused" else {}
    benchmark.extra_info.update({"device": DEVICE, "shape": dict(zip("LBSDHQ", shape)), **launches,
                                 "peak_memory_bytes": peak, **traffic})
    record.results.append({"case": case, "mode": mode, "shape_name": shape_name,
                           "shape": dict(zip("LBSDHQ", shape)), "dtype": str(dtype).replace("torch.", ""),
                           "median_s": median, "peak_memory_bytes": peak, **launches, **traffic})
    record.update(speedup_vs_reference=_speedups(record.results))
    if traffic:
        print(f"\nquery_pool fused {shape_name} {dtype} {mode}: {median * 1e3:.3f} ms, modelled kernel traffic "
              f"{traffic['kernel_bytes'] / 1e6:.1f} MB ({traffic['kernel_bytes_vs_floor']:.2f}x the floor of "
              f"{traffic['floor_bytes'] / 1e6:.1f} MB), {traffic['GB/s']:.1f} GB/s"
              + (f", {traffic['fraction_of_floor']:.3f} of the floor time at copy bandwidth "
                 f"{traffic['copy_GB/s']:.0f} GB/s" if "fraction_of_floor" in traffic else ""))


_COPY_BW: dict = {}


def _copy_bandwidth() -> float:
    """Device copy bandwidth (bytes/s, read + write) of a 256 MiB clone: the yardstick of the floor."""
    if "bw" not in _COPY_BW:
        src = torch.empty(128 * 2 ** 20, dtype=torch.float16, device=DEVICE)
        for _ in range(3):
            src.clone()
        _sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            src.clone()
        end.record()
        _sync()
        _COPY_BW["bw"] = 2 * src.numel() * src.element_size() * 10 / (start.elapsed_time(end) / 1e3)
    return _COPY_BW["bw"]


def _traffic(shape, dtype, mode, median) -> dict:
    """Bytes the fused kernels move (kq.modelled_bytes with the launch config used here), the floor
    (kq.floor_bytes), achieved GB/s of the modelled bytes, and on CUDA the fraction of the floor: the time
    the floor bytes take at copy bandwidth over the measured time (the module's small dense ops included)."""
    if kq is None:
        return {}
    L, B, S, D, H, Q = shape
    backward = mode == "fwd_bwd"
    dev = torch.device(DEVICE)
    cfg = kq.default_config(dev, S, D, H, Q)
    per_kernel = kq.modelled_bytes(L, B, S, D, H, Q, dtype, cfg, backward)
    total = sum(per_kernel.values())
    floor = kq.floor_bytes(L, B, S, D, H, Q, dtype, backward)
    out = {"kernel_bytes": total, "floor_bytes": floor, "kernel_bytes_vs_floor": total / floor,
           "GB/s": total / median / 1e9, "kernel_bytes_by_kernel": per_kernel}
    if DEVICE == "cuda":
        bw = _copy_bandwidth()
        out.update({"copy_GB/s": bw / 1e9, "fraction_of_floor": (floor / bw) / median})
    return out


def _speedups(results: list[dict]) -> dict[str, float]:
    """``"<shape>/<dtype>/<mode>/<case>" -> reference median / case median`` where both were measured."""
    speedups = {}
    by_key = {(r["shape_name"], r["dtype"], r["mode"], r["case"]): r["median_s"] for r in results}
    for (shape_name, dt, mode, case), t in by_key.items():
        ref = by_key.get((shape_name, dt, mode, "reference"))
        if ref and case != "reference":
            speedups[f"{shape_name}/{dt}/{mode}/{case}"] = ref / t
    return speedups


@pytest.fixture(scope="module")
def record():
    """This run's record, rewritten after every case; marked complete when the module ends."""
    rec = Record("query_pool", DEVICE,
                 note=("CPU: the fused path runs in the Triton interpreter; its times measure the interpreter"
                       if DEVICE == "cpu" else "CUDA kernels, synchronised timing"))
    yield rec
    rec.finish()
