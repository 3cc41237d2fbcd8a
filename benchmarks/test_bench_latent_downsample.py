"""Benchmark: lwam::latent_downsample against F.avg_pool3d (eager and torch.compile'd reference) and,
on CUDA, against the device copy bandwidth (Tensor.copy_ of the input's bytes).

Shapes: the paper's training latents [B=16, C=16, T=3, H=28, W=56] at factor 2, and a large shape
(where the CUDA target is >= 85% of copy bandwidth). Every case checks correctness first, warms up,
synchronises before reading the clock, and reports achieved GB/s = (bytes read + bytes written) / median
in ``extra_info``. On CUDA the copy comes first at each shape and dtype, so that every later case has its
yardstick (``fraction_of_copy_bandwidth``). Run:
``python -m pytest benchmarks/test_bench_latent_downsample.py --benchmark-only``. With LWAM_BENCH_RECORD=1 a
JSON record is written to benchmarks/results/, rewritten after every case (a cut run keeps what it measured).
"""
from __future__ import annotations

import statistics

import _record as _rec
import pytest
import torch
import torch.nn.functional as F

from lwam.info import cuda_extension_verdict
from lwam.ops import _extension
from lwam.ops.latent_downsample import implementation, latent_downsample
from lwam.reference.latent_downsample import latent_downsample as reference
from lwam.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FACTOR = 2
PAPER = (16, 16, 3, 28, 56)
LARGE = (32, 16, 16, 128, 128) if DEVICE == "cuda" else (8, 16, 8, 64, 128)
DTYPES = [torch.bfloat16, torch.float32] if DEVICE == "cuda" else [torch.float32, torch.bfloat16]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _timed(fn):
    def run():
        out = fn()
        _sync()
        return out
    return run


def _compiled_reference():
    return torch.compile(lambda t: F.avg_pool3d(t.float(), (1, FACTOR, FACTOR)).to(t.dtype), fullgraph=True)


def _cases(x, grad):
    """name -> (callable, bytes moved)"""
    n_in = x.numel() * x.element_size()
    n_out = n_in // (FACTOR * FACTOR)
    cases = {
        "lwam": (lambda: latent_downsample(x, FACTOR), n_in + n_out),
        "avg_pool3d": (lambda: reference(x, FACTOR), n_in + n_out),
        "avg_pool3d_compiled": (lambda c=_compiled_reference(): c(x), n_in + n_out),
        "lwam_backward": (lambda: torch.ops.lwam.latent_downsample_backward(grad, FACTOR), n_in + n_out),
        "avg_pool3d_backward": (
            lambda: torch.ops.aten.avg_pool3d_backward(grad.float(), x.float(), (1, FACTOR, FACTOR),
                                                      (1, FACTOR, FACTOR), (0, 0, 0), False, True,
                                                      None).to(dtype=x.dtype), n_in + n_out),
    }
    if DEVICE == "cuda":
        dst = torch.empty_like(x)
        cases["copy"] = (lambda: dst.copy_(x), 2 * n_in)
    return cases


CASE_NAMES = ["copy", "lwam", "lwam_backward", "avg_pool3d", "avg_pool3d_backward", "avg_pool3d_compiled"]


@pytest.fixture(scope="module")
def record():
    """This run's record (``_record.Record``), rewritten after every case; marked complete at the end."""
    rec = _rec.Record("latent_downsample", DEVICE, implementation=implementation(DEVICE))
    yield rec
    path = rec.finish()
    if path is not None:
        print(f"record: {path}")


def _derived(results: list[dict]) -> dict:
    """Fraction of copy bandwidth per row (where the copy was measured at that shape and dtype), and the
    median GB/s of each case: recomputed after every case."""
    by_key = {(r["shape"][0], r["dtype"], r["case"]): r for r in results}
    for r in results:
        copy = by_key.get((r["shape"][0], r["dtype"], "copy"))
        if copy is not None:
            r["fraction_of_copy_bandwidth"] = r["GB/s"] / copy["GB/s"]
    return {"median_GB/s_by_case": {c: statistics.median(r["GB/s"] for r in results if r["case"] == c)
                                    for c in sorted({r["case"] for r in results})}}


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", [PAPER, LARGE], ids=["paper", "large"])
def test_bench_latent_downsample(benchmark, record, shape, dtype, case):
    if case == "copy" and DEVICE != "cuda":
        pytest.skip("copy bandwidth is the CUDA yardstick")
    if case.startswith("lwam") and DEVICE == "cuda" and implementation(DEVICE) != "lwam._C":
        # lwam._C without CUDA kernels would time the reference under the kernel's name
        verdict, why = cuda_extension_verdict(True, _extension.status())
        if verdict == "fallback":
            pytest.skip(why)
        pytest.fail(f"{case}: {why}")
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    grad = torch.randn(shape[:3] + (shape[3] // FACTOR, shape[4] // FACTOR), device=DEVICE, dtype=dtype)
    fn, nbytes = _cases(x, grad)[case]
    if case.startswith(("lwam", "avg_pool3d")) and not case.endswith("backward"):
        assert_close(fn(), reference(x, FACTOR), name=case)
    for _ in range(3):  # warm-up (and torch.compile's first call)
        fn()
    _sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rounds = 50 if DEVICE == "cuda" else 20
    benchmark.pedantic(_timed(fn), rounds=rounds, iterations=5 if DEVICE == "cuda" else 1, warmup_rounds=2)
    median = benchmark.stats.stats.median
    gbps = nbytes / median / 1e9
    benchmark.extra_info.update({"GB/s": round(gbps, 2), "bytes": nbytes, "device": DEVICE,
                                 "impl": implementation(DEVICE) if case.startswith("lwam") else case})
    record.results.append({
        "case": case, "shape": list(shape), "factor": FACTOR, "dtype": str(dtype).replace("torch.", ""),
        "median_s": median, "GB/s": gbps, "bytes": nbytes,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None,
    })
    record.update(**_derived(record.results))
