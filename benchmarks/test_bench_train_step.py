"""Training-step throughput and peak memory: the reference step against the fast step (lwam.model.fast),
side by side in one run, on one model switched in place between the configurations.

One step = ``LightWAM.training_loss`` (video pass + action pass) + backward + grad clip + AdamW step.
CUDA: the paper preset, batch 16, bf16 autocast, LIBERO shapes (video latents [16, 16, 3, 28, 56] ->
294 video tokens, 392 action tokens, 129 context tokens). CPU: the tiny preset at batch 4 in fp32, with the
backbone frozen as in the paper.

Cases: ``reference`` (masked attention, complex128 RoPE, plain pooler, F.avg_pool3d, eager),
``fast_eager`` (every fast change but torch.compile) and ``fast`` (everything). On CPU the fast cases keep
the plain pooler: without a GPU the fused pooling op runs in Triton's *interpreter*, an emulator whose
timing means nothing (its equality is tested in tests/). Before timing, the module checks (not times) that
the reference and fast losses agree on the same weights and batch (lwam.testing tolerance of the compute
dtype). Each case warms up (compile included), synchronises before reading the clock
(``torch.cuda.synchronize``), and reports samples/s = batch / median step time. Peak memory is
``torch.cuda.max_memory_allocated`` over the timed rounds (model, gradients and optimizer state included);
on CPU it is recorded as None (not measured: a process RSS high-water mark cannot be reset per case).
CPU runs use one intra-op thread (the record's ``threads``).

Run: ``python -m pytest benchmarks/test_bench_train_step.py --benchmark-only``; with LWAM_BENCH_RECORD=1 a
JSON record goes to benchmarks/results/ (``_record``). ``LWAM_BENCH_PRESET`` overrides the preset.
"""
from __future__ import annotations

import os

import pytest
import torch

from lwam.config import get_preset
from lwam.model import fast
from lwam.model.fast import StepFlags
from lwam.model.lightwam import LightWAM
from lwam.testing import assert_close

try:
    import _record
except ImportError:  # run without benchmarks/conftest.py on the path
    _record = None

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PRESET = os.environ.get("LWAM_BENCH_PRESET", "paper" if CUDA else "tiny")
BATCH = 16 if CUDA else 4
AUTOCAST = torch.bfloat16 if CUDA else None
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = 10 if CUDA else 8
WARMUP = 3 if CUDA else 2

# On CPU the fused pooling could only run in Triton's interpreter (see the module docstring).
_FAST = StepFlags.fast() if CUDA else StepFlags.fast().replace(fused_pooling=False)
CASES = {
    "reference": StepFlags.reference(),
    "fast_eager": _FAST.replace(compile_blocks=False),
    "fast": _FAST,
}
_RESULTS: dict[str, dict] = {}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _batch(cfg, b: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, w = cfg.latent_hw()
    f, ds = cfg.latent_frames(), cfg.train.video_downsample
    batch = {
        "latents": torch.randn(b, cfg.vae.z_dim, f, h, w, generator=g),
        "text_context": torch.randn(b, cfg.text.max_tokens, cfg.text.dim, generator=g) * 0.1,
        "proprio": torch.randn(b, cfg.proprio_dim, generator=g),
        "actions": torch.rand(b, cfg.chunk_size, cfg.action_dim, generator=g) * 2 - 1,
        "actions_is_pad": torch.zeros(b, cfg.chunk_size, dtype=torch.bool),
        "flow_eps": torch.randn(b, cfg.vae.z_dim, f, h // ds, w // ds, generator=g),
        "flow_u": torch.rand(b, generator=g),
    }
    return {k: v.to(DEVICE) for k, v in batch.items()}


@pytest.fixture(scope="module")
def setup():
    # CPU: one intra-op thread (tiny ops; with the cores shared, more threads mostly wait on each other --
    # 40x slower steps were seen with 2 threads on a loaded 2-core machine). Set before compiling, since
    # inductor's CPU kernels take the thread count they were compiled with. Restored afterwards.
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = get_preset(PRESET).replace(freeze_backbone=True)
    model = LightWAM(cfg, build_vae=False).to(DEVICE)
    with torch.no_grad():  # non-zero LoRA-up / adapter-up / head, as after some training
        for n, p in model.named_parameters():
            if "up_proj" in n or n == "dit.head.head.weight":
                p.normal_(0, 0.02)
    batch = _batch(cfg, BATCH)
    shapes = {"batch": BATCH, "latents": list(batch["latents"].shape), "video_tokens": cfg.video_tokens(),
              "action_tokens": cfg.action_tokens(), "context_tokens": cfg.context_tokens()}
    # Correctness first (not timed): same weights, same batch and noise -> the same loss.
    losses = {}
    for name, flags in CASES.items():
        fast.configure(model, flags)
        losses[name] = fast.training_step(model, batch, autocast_dtype=AUTOCAST)
    for name, loss in losses.items():
        assert_close(loss, losses["reference"], dtype=DTYPE, name=f"{name} loss vs reference")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, betas=(0.9, 0.95),
                            weight_decay=0.01, foreach=True)
    yield {"cfg": cfg, "model": model, "batch": batch, "opt": opt, "shapes": shapes,
           "losses": {k: float(v) for k, v in losses.items()}}
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", list(CASES))
def test_bench_train_step(benchmark, setup, case):
    model, batch, opt = setup["model"], setup["batch"], setup["opt"]
    flags = CASES[case]
    fast.configure(model, flags)

    def step():
        loss = fast.training_step(model, batch, opt, autocast_dtype=AUTOCAST, grad_clip=1.0)
        _sync()
        return loss

    for _ in range(WARMUP):  # compile (fast) and allocator warm-up
        step()
    fast.check_frozen(model, after_backward=True)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    peak = torch.cuda.max_memory_allocated() if CUDA else None
    row = {"case": case, "flags": {k: v for k, v in vars(flags).items()}, "median_s": median,
           "samples_per_s": BATCH / median, "peak_memory_bytes": peak,
           "peak_memory_kind": "torch.cuda.max_memory_allocated" if CUDA else "not measured on CPU (None)",
           "loss_check": setup["losses"][case]}
    benchmark.extra_info.update({"samples/s": round(BATCH / median, 3), "preset": PRESET, "batch": BATCH,
                                 "peak_memory_GiB": None if peak is None else round(peak / 2 ** 30, 3)})
    _RESULTS[case] = row


@pytest.fixture(scope="module", autouse=True)
def _record_results(setup):
    yield
    if not _RESULTS:
        return
    ref = _RESULTS.get("reference")
    lines = []
    for name, r in _RESULTS.items():
        if ref is not None:
            r["speedup_vs_reference"] = ref["median_s"] / r["median_s"]
            if ref["peak_memory_bytes"] and r["peak_memory_bytes"]:
                r["memory_vs_reference"] = r["peak_memory_bytes"] / ref["peak_memory_bytes"]
        lines.append(f"  {name:<11} {r['samples_per_s']:9.2f} samples/s"
                     + (f"  x{r['speedup_vs_reference']:.2f}" if "speedup_vs_reference" in r else "")
                     + ("" if r["peak_memory_bytes"] is None else f"  peak {r['peak_memory_bytes'] / 2**30:.2f} GiB"))
    print(f"\ntraining step, {PRESET} preset, batch {BATCH}, {DEVICE.type} ({'bf16 autocast' if CUDA else 'fp32'}):")
    print("\n".join(lines))
    if _record is not None:
        path = _record.write_record("train_step", DEVICE.type, list(_RESULTS.values()), preset=PRESET,
                                    dtype=str(DTYPE).replace("torch.", ""), shapes=setup["shapes"],
                                    step="training_loss + backward + clip_grad_norm(1.0) + AdamW")
        if path is not None:
            print(f"record: {path}")
