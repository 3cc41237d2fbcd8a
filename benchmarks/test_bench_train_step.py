"""Training-step throughput and peak memory: ``Trainer.train_step`` -- the step ``lwam train`` runs --
with the reference implementation config against the fast one (``lwam.config.ImplConfig``), side by side
in one run, every case from the same initial weights.

One step = batch draw + collate + flow noise (the Trainer's own) + ``LightWAM.training_loss`` (video pass +
action pass) + backward + grad clip + AdamW + LR schedule. CUDA: the paper preset, batch 16, bf16 autocast
(the preset's ``mixed_precision``), LIBERO shapes (video latents [16, 16, 3, 28, 56] -> 294 video tokens,
392 action tokens, 129 context tokens). CPU: the tiny preset at batch 4 in fp32, the backbone frozen as in
the paper.

Cases: ``reference`` (``ImplConfig.reference()``: masked attention, complex128 RoPE, plain pooler,
F.avg_pool3d, eager), ``fast_eager`` (every fast change but torch.compile) and ``fast``
(``ImplConfig.fast()``, what ``lwam train`` runs). On CPU the fast cases keep the plain pooler: without a
GPU the fused pooling op runs in Triton's *interpreter*, an emulator whose timing means nothing (its
equality is tested in tests/), and without the interpreter it falls back to that plain pooler anyway.
One trainer at a time: each case builds its Trainer from the same initial weights (kept on the CPU), and
frees it before the next case starts, so its peak memory is its own. Before timing, each case's first step
must give the reference loss (lwam.testing tolerance of the compute dtype; a mismatch fails the case after
its row is recorded). Each case warms up (compile included), synchronises before reading the clock
(``torch.cuda.synchronize``), and reports samples/s = batch / median step time. Peak memory is
``torch.cuda.max_memory_allocated`` from before the trainer is built to the end of its timed rounds (model,
gradients, optimizer state and activations; nothing of another case); on CPU it is recorded as None (not
measured: a process RSS high-water mark cannot be reset per case). CPU runs use one intra-op thread (the
record's ``threads``).

Run: ``python -m pytest benchmarks/test_bench_train_step.py --benchmark-only``; with LWAM_BENCH_RECORD=1 a
JSON record goes to benchmarks/results/ (``_record``), rewritten after every case. ``LWAM_BENCH_PRESET``
overrides the preset.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import os

import pytest
import torch

from _record import Record
from lwam import ImplConfig, Trainer, get_preset
from lwam.model.fast import check_frozen
from lwam.model.lightwam import LightWAM
from lwam.testing import assert_close

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PRESET = os.environ.get("LWAM_BENCH_PRESET", "paper" if CUDA else "tiny")
BATCH = 16 if CUDA else 4
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = 6 if CUDA else 8  # paper steps take about a second: the median of 6, inside the stage share
WARMUP = 2

# On CPU the fused pooling could only run in Triton's interpreter (see the module docstring).
_FAST = ImplConfig.fast() if CUDA else ImplConfig.fast(fused_pooling=False)
CASES = {
    "reference": ImplConfig.reference(),
    "fast_eager": _FAST.replace(compile_blocks=False),
    "fast": _FAST,
}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


class _Windows(torch.utils.data.Dataset):
    """BATCH fixed training windows (cached-latent form: what ``lwam train`` trains on)."""

    def __init__(self, cfg, n: int):
        g = torch.Generator().manual_seed(0)
        h, w = cfg.latent_hw()
        self.rows = [{
            "latents": torch.randn(cfg.vae.z_dim, cfg.latent_frames(), h, w, generator=g),
            "text_context": torch.randn(cfg.text.max_tokens, cfg.text.dim, generator=g) * 0.1,
            "proprio": torch.randn(cfg.proprio_dim, generator=g),
            "actions": torch.rand(cfg.chunk_size, cfg.action_dim, generator=g) * 2 - 1,
            "actions_is_pad": torch.zeros(cfg.chunk_size, dtype=torch.bool),
        } for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _free() -> None:
    """Free what the previous case left and start a fresh peak."""
    gc.collect()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The initial model (on the CPU), the training windows and the record's shapes."""
    # CPU: one intra-op thread (tiny ops; with the cores shared, more threads mostly wait on each other --
    # 40x slower steps were seen with 2 threads on a loaded 2-core machine). Set before compiling, since
    # inductor's CPU kernels take the thread count they were compiled with. Restored afterwards.
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = get_preset(PRESET).replace(freeze_backbone=True, **{"train.batch_size": BATCH, "train.grad_accum": 1,
                                                              "train.lr": 1e-6})
    model = LightWAM(cfg, build_vae=False)
    with torch.no_grad():  # non-zero LoRA-up / adapter-up / head, as after some training
        for n, p in model.named_parameters():
            if "up_proj" in n or n == "dit.head.head.weight":
                p.normal_(0, 0.02)
    data = _Windows(cfg, BATCH)
    shapes = {"batch": BATCH, "latents": [BATCH, *data.rows[0]["latents"].shape],
              "video_tokens": cfg.video_tokens(), "action_tokens": cfg.action_tokens(),
              "context_tokens": cfg.context_tokens()}
    yield {"cfg": cfg, "model": model, "data": data, "shapes": shapes, "losses": {},
           "root": tmp_path_factory.mktemp("bench_train")}
    torch.set_num_threads(threads)


def _trainer(setup, case: str) -> Trainer:
    return Trainer(copy.deepcopy(setup["model"]), setup["data"], setup["root"] / case, setup["cfg"].train,
                   impl=CASES[case], device=DEVICE, resume=False, progress=False)


def _reference_loss(setup) -> float:
    """The reference trainer's step-0 loss (one untimed step of it when that case has not run)."""
    if "reference" not in setup["losses"]:
        tr = _trainer(setup, "reference")
        setup["losses"]["reference"] = float(tr.train_step()["loss"])
        del tr
        _free()
    return setup["losses"]["reference"]


@pytest.fixture(scope="module")
def record(setup):
    rec = Record("train_step", DEVICE.type, preset=PRESET, dtype=str(DTYPE).replace("torch.", ""),
                 shapes=setup["shapes"], step="Trainer.train_step: batch + noise + training_loss + backward + "
                                              "clip_grad_norm + AdamW + LR schedule")
    yield rec
    lines = [f"  {r['case']:<11} {r['samples_per_s']:9.2f} samples/s"
             + (f"  x{r['speedup_vs_reference']:.2f}" if "speedup_vs_reference" in r else "")
             + ("" if r["peak_memory_bytes"] is None else f"  peak {r['peak_memory_bytes'] / 2**30:.2f} GiB")
             for r in rec.results]
    print(f"\nTrainer.train_step, {PRESET} preset, batch {BATCH}, {DEVICE.type} "
          f"({'bf16 autocast' if CUDA else 'fp32'}):")
    print("\n".join(lines))
    path = rec.finish()
    if path is not None:
        print(f"record: {path}")


def _relative_to_reference(results: list[dict]) -> None:
    ref = next((r for r in results if r["case"] == "reference"), None)
    if ref is None:
        return
    for r in results:
        r["speedup_vs_reference"] = ref["median_s"] / r["median_s"]
        if ref["peak_memory_bytes"] and r["peak_memory_bytes"]:
            r["memory_vs_reference"] = r["peak_memory_bytes"] / ref["peak_memory_bytes"]


@pytest.mark.parametrize("case", list(CASES))
def test_bench_train_step(benchmark, setup, record, case):
    ref_loss = _reference_loss(setup) if case != "reference" else None
    _free()
    tr = _trainer(setup, case)
    loss = float(tr.train_step()["loss"])  # step 0: same weights, batch and noise as the reference's
    setup["losses"].setdefault(case, loss)
    mismatch = None
    if ref_loss is not None:
        try:
            assert_close(torch.tensor(loss), torch.tensor(ref_loss), dtype=DTYPE, name=f"{case} loss vs reference")
        except AssertionError as exc:
            mismatch = str(exc)

    def step():
        metrics = tr.train_step()
        _sync()
        return metrics

    for _ in range(WARMUP):  # compile (fast) and allocator warm-up
        step()
    check_frozen(tr.model, after_backward=True)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    peak = torch.cuda.max_memory_allocated() if CUDA else None
    row = {"case": case, "impl": dataclasses.asdict(CASES[case]), "median_s": median,
           "samples_per_s": BATCH / median, "peak_memory_bytes": peak,
           "peak_memory_kind": ("torch.cuda.max_memory_allocated, this trainer alone (build to last timed step)"
                                if CUDA else "not measured on CPU (None)"),
           "loss_check": loss, "matches_reference_loss": mismatch is None}
    benchmark.extra_info.update({"samples/s": round(BATCH / median, 3), "preset": PRESET, "batch": BATCH,
                                 "peak_memory_GiB": None if peak is None else round(peak / 2 ** 30, 3)})
    record.results.append(row)
    _relative_to_reference(record.results)
    record.update()
    del tr, step
    _free()
    assert mismatch is None, mismatch
