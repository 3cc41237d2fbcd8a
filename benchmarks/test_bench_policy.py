"""Observation -> action latency and peak memory: the eager reference path against ``lwam.Policy``, side by
side in one run, one of them on the device at a time.

Sides, both queried the same way (``Policy.predict_batch(images [1, 3, H, W], [instruction], proprio [1, P])
-> actions [1, chunk, action_dim]`` on the CPU, so every call is synchronised):

- ``reference``: the model with ``ImplConfig.reference()`` (masked attention, complex128 RoPE, plain
  pooler, ``F.avg_pool3d``) behind ``Policy.from_model`` with every transformation off (no LoRA merge, no
  truncation, no folded pooling, full VAE, no compile, no CUDA graphs): the published way, eager;
- ``policy``: ``Policy.from_model`` with its defaults (the fast arithmetic, every exact transformation,
  torch.compile, and on CUDA graph capture).

CPU: tiny preset, fp32. CUDA: paper preset (LIBERO shapes, batch 1), bf16, random weights of the published
sizes (timing only). Before a side is built the previous one is freed, so its peak memory
(``torch.cuda.max_memory_allocated`` over build, compile, capture, warm-up and the timed rounds, less what
was allocated before) is its own; ``resident_bytes`` is what stays allocated after building. The policy's
actions are checked against the reference's (lwam.testing tolerance of the dtype) before it is timed; a
mismatch fails the case after its row is recorded (``matches_reference: false`` and the error in it).
With LWAM_BENCH_RECORD=1 the record goes to benchmarks/results/ (``_record``), rewritten after each side.
"""
from __future__ import annotations

import dataclasses
import gc
import os

import pytest
import torch

from lwam import ImplConfig, Policy, get_preset
from lwam.model.lightwam import LightWAM
from lwam.testing import assert_close

from _record import Record

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
PRESET = os.environ.get("LWAM_BENCH_PRESET", "paper" if CUDA else "tiny")
INSTRUCTION = "put the bowl on the plate"
ROUNDS = 30 if CUDA else 10
# Every Policy transformation off: the model's own forward, eager.
REFERENCE_OPTIONS = {"compile": False, "cuda_graphs": False, "merge_lora": False, "truncate": False,
                     "fold_pooling": False, "single_frame_vae": False}
SIDES = {"reference": (ImplConfig.reference(), REFERENCE_OPTIONS), "policy": (ImplConfig(), {})}
_ACTIONS: dict[str, torch.Tensor] = {}


def _free() -> int:
    """Free what the previous side left and start a fresh peak; returns the bytes still allocated."""
    gc.collect()
    if not CUDA:
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


@pytest.fixture(scope="module")
def setup():
    """The model (fp32 on the CPU; each side copies it to the device) and one observation."""
    torch.manual_seed(0)
    cfg = get_preset(PRESET)
    model = LightWAM(cfg).eval().requires_grad_(False)
    if model.text.encoder is None:
        model.text.add(INSTRUCTION, torch.randn(cfg.text.max_tokens, cfg.text.dim) * 0.1)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, cfg.data.image_height, cfg.data.image_width, generator=g) * 2 - 1
    proprio = torch.randn(1, cfg.proprio_dim, generator=g)
    return {"cfg": cfg, "model": model, "images": images, "proprio": proprio}


@pytest.fixture(scope="module")
def record(setup):
    cfg = setup["cfg"]
    rec = Record(
        "policy_latency", DEVICE.type, preset=PRESET, dtype=str(DTYPE).replace("torch.", ""),
        query="Policy.predict_batch: images + instruction + proprio -> actions on the CPU",
        image_hw=[cfg.data.image_height, cfg.data.image_width], chunk_size=cfg.chunk_size)
    yield rec
    rec.finish()


def _build(setup, side: str) -> Policy:
    impl, options = SIDES[side]
    setup["model"].set_impl(impl)
    return Policy.from_model(setup["model"], device=DEVICE, dtype=DTYPE, **options)


def _query(setup, policy):
    return policy.predict_batch(setup["images"], [INSTRUCTION], setup["proprio"])  # CPU result: synchronised


def _reference_actions(setup) -> torch.Tensor:
    if "reference" not in _ACTIONS:  # the reference side was not run first: one untimed query of it
        policy = _build(setup, "reference")
        _ACTIONS["reference"] = _query(setup, policy)
        del policy
    return _ACTIONS["reference"]


@pytest.mark.parametrize("side", list(SIDES))
def test_bench_policy_latency(benchmark, setup, record, side):
    cfg = setup["cfg"]
    expected = _reference_actions(setup) if side != "reference" else None
    base = _free()
    policy = _build(setup, side)
    out = _query(setup, policy)  # compile + capture on the policy side
    resident = torch.cuda.memory_allocated() - base if CUDA else None
    assert out.shape == (1, cfg.chunk_size, cfg.action_dim)
    mismatch = None
    if expected is None:
        _ACTIONS["reference"] = out
    else:
        try:
            assert_close(out, expected, dtype=DTYPE, name=f"{side} vs reference")
        except AssertionError as exc:
            mismatch = str(exc)

    benchmark.group = f"policy-latency-{PRESET}-{DEVICE.type}"
    benchmark.pedantic(lambda: _query(setup, policy), rounds=ROUNDS, warmup_rounds=3, iterations=1)
    s = benchmark.stats.stats
    peak = torch.cuda.max_memory_allocated() - base if CUDA else None
    benchmark.extra_info.update(side=side, preset=PRESET, peak_bytes=peak)
    row = {"side": side, "preset": PRESET, "batch_size": 1, "dtype": str(DTYPE).replace("torch.", ""),
           "impl": SIDES[side][0].to_dict(), "options": dataclasses.asdict(policy.options),
           "tokens": cfg.action_tokens(), "context_tokens": cfg.context_tokens(),
           "weights": "random weights (timing only)", "median_ms": s.median * 1e3, "min_ms": s.min * 1e3,
           "max_ms": s.max * 1e3, "rounds": s.rounds, "peak_bytes": peak, "resident_bytes": resident,
           "peak_memory_kind": ("torch.cuda.max_memory_allocated over build + first query + timed rounds"
                                if CUDA else "not measured on CPU (None)")}
    if expected is not None:
        row.update(matches_reference=mismatch is None,
                   max_abs_error_vs_reference=float((out.float() - expected.float()).abs().max()))
    record.results.append(row)
    by_side = {r["side"]: r for r in record.results}
    if "reference" in by_side and "policy" in by_side:
        ref, pol = by_side["reference"], by_side["policy"]
        record.update(speedup_vs_reference=ref["median_ms"] / pol["median_ms"],
                      memory_vs_reference=(pol["peak_bytes"] / ref["peak_bytes"]
                                           if pol["peak_bytes"] and ref["peak_bytes"] else None))
    else:
        record.update()
    del policy
    _free()
    assert mismatch is None, mismatch
