"""Action-query latency: eager LightWAM.predict_actions vs lwam.Policy, side by side in one run.

CPU: tiny preset, fp32, Policy compiled without graphs. CUDA: paper preset (LIBERO shapes, batch 1), bf16,
Policy compiled and CUDA-graph captured. Each call is synchronised (the Policy returns CPU actions; the
eager closure copies its actions to the CPU), with warm-up rounds. With LWAM_BENCH_RECORD=1 the medians,
peak memory and environment go to benchmarks/results/ (``_record``).
"""
import os

import pytest
import torch

from lwam.config import get_preset
from lwam.policy.compiled import Policy
from lwam.model.lightwam import LightWAM
from lwam.testing import assert_close

try:
    import _record
except ImportError:  # run without benchmarks/conftest.py on the path
    _record = None

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
PRESET = os.environ.get("LWAM_BENCH_PRESET", "paper" if CUDA else "tiny")
INSTRUCTION = "put the bowl on the plate"
ROUNDS = 30 if CUDA else 10
_RESULTS: dict[str, dict] = {}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = get_preset(PRESET)
    model = LightWAM(cfg).eval().requires_grad_(False)
    if model.text.encoder is None:
        model.text.add(INSTRUCTION, torch.randn(cfg.text.max_tokens, cfg.text.dim) * 0.1)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, cfg.data.image_height, cfg.data.image_width, generator=g) * 2 - 1
    proprio = torch.randn(1, cfg.proprio_dim, generator=g)
    peak = {}
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        m0 = torch.cuda.memory_allocated()
    policy = Policy.from_model(model, device=DEVICE, dtype=DTYPE)
    policy.predict_batch(images, [INSTRUCTION], proprio)  # compile + capture
    if CUDA:
        _sync()
        peak["policy"] = torch.cuda.max_memory_allocated() - m0
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    model.to(DEVICE, DTYPE)
    with torch.no_grad():
        ref = model.predict_actions(images.to(DEVICE), proprio.to(DEVICE), instruction=[INSTRUCTION]).float().cpu()
    if CUDA:
        _sync()
        peak["eager"] = torch.cuda.max_memory_allocated() - resident
    assert_close(policy.predict_batch(images, [INSTRUCTION], proprio), ref, dtype=DTYPE, name="policy vs eager")
    yield {"model": model, "policy": policy, "images": images, "proprio": proprio, "peak": peak, "cfg": cfg}
    if _record is not None and len(_RESULTS) == 2:
        _record.write_record("policy_latency", DEVICE.type, [
            {"side": side, "preset": PRESET, "batch_size": 1, "dtype": str(DTYPE).replace("torch.", ""),
             "image_hw": [cfg.data.image_height, cfg.data.image_width], "tokens": cfg.action_tokens(),
             "context_tokens": cfg.context_tokens(), "chunk_size": cfg.chunk_size,
             "weights": "random weights (timing only)", "peak_bytes": peak.get(side), **stats}
            for side, stats in _RESULTS.items()])


def _stats(benchmark) -> dict:
    s = benchmark.stats.stats
    return {"median_ms": s.median * 1e3, "min_ms": s.min * 1e3, "max_ms": s.max * 1e3, "rounds": s.rounds}


def test_bench_query_eager(benchmark, setup):
    model, images, proprio = setup["model"], setup["images"], setup["proprio"]

    def query():
        with torch.no_grad():
            return model.predict_actions(images.to(DEVICE), proprio.to(DEVICE), instruction=[INSTRUCTION]).cpu()

    benchmark.group = f"policy-latency-{PRESET}-{DEVICE.type}"
    benchmark.extra_info.update(side="eager", preset=PRESET, peak_bytes=setup["peak"].get("eager"))
    out = benchmark.pedantic(query, rounds=ROUNDS, warmup_rounds=3, iterations=1)
    assert out.shape == (1, setup["cfg"].chunk_size, setup["cfg"].action_dim)
    _RESULTS["eager"] = _stats(benchmark)


def test_bench_query_policy(benchmark, setup):
    policy, images, proprio = setup["policy"], setup["images"], setup["proprio"]

    def query():
        return policy.predict_batch(images, [INSTRUCTION], proprio)  # CPU result: synchronised

    benchmark.group = f"policy-latency-{PRESET}-{DEVICE.type}"
    benchmark.extra_info.update(side="policy", preset=PRESET, peak_bytes=setup["peak"].get("policy"),
                                cuda_graphs=policy.options.cuda_graphs)
    out = benchmark.pedantic(query, rounds=ROUNDS, warmup_rounds=3, iterations=1)
    assert out.shape == (1, setup["cfg"].chunk_size, setup["cfg"].action_dim)
    _RESULTS["policy"] = _stats(benchmark)
