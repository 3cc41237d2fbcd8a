"""Tests of ``lwam.train`` on the tiny preset (CPU, fp32, synthetic in-memory windows).

Kill-and-resume reaches the weights of an uninterrupted run; a 2-process gloo DDP step equals the
1-process step on the same global batch; gradient accumulation equals the full batch; the schedule and
the global batch order; metrics, loss plot, progress bar and checkpoints; bad configurations.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lwam.checkpoint import load_checkpoint
from lwam.config import ImplConfig, TrainConfig, get_preset
from lwam.model.lightwam import LightWAM
from lwam.train import Trainer, global_batch_indices, lr_lambda, read_metrics

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
N_SAMPLES = 24


def tiny_cfg(**train):
    """The tiny preset with small training settings (models get the reference pooling path: build_model)."""
    over = {"train.batch_size": 4, "train.warmup_steps": 2,
            "train.max_steps": 8, "train.log_every": 1, "train.save_every": 3, "train.seed": 0}
    over.update({f"train.{k}": v for k, v in train.items()})
    return get_preset("tiny").replace(**over)


def build_model(cfg, seed: int = 0, vae: bool = False) -> LightWAM:
    torch.manual_seed(seed)
    return LightWAM(cfg, build_vae=vae, impl=ImplConfig(fused_pooling=False))  # reference pooling: fast on CPU


class WindowDataset(torch.utils.data.Dataset):
    """Deterministic synthetic windows: sample i is a fixed function of i."""

    def __init__(self, cfg, n: int = N_SAMPLES):
        self.cfg, self.n = cfg, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        cfg = self.cfg
        g = torch.Generator().manual_seed(1000 + i)
        h, w = cfg.latent_hw()
        pad = torch.zeros(cfg.chunk_size, dtype=torch.bool)
        if i % 5 == 4:  # a few windows past the episode end
            pad[-6:] = True
        return {
            "latents": torch.randn(cfg.vae.z_dim, cfg.latent_frames(), h, w, generator=g),
            "instruction": ("press the button", "open the drawer")[i % 2],
            "proprio": torch.randn(cfg.proprio_dim, generator=g),
            "actions": torch.rand(cfg.chunk_size, cfg.action_dim, generator=g) * 2 - 1,
            "actions_is_pad": pad,
        }


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def grads_of(model) -> dict[str, torch.Tensor]:
    """The (all-reduced, clipped) gradients the optimiser stepped with, left in place by train_step."""
    return {k: p.grad.detach().clone().cpu() for k, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-7, msg=lambda m: f"{k}: {m}")


# Adam's first step is lr * g / (|g| + eps): elements whose gradient is ~eps turn fp32 summation-order
# noise into weight differences of a few percent of the step. The equivalence tests therefore compare the
# gradients tightly and the weights at a step size where 1e-5 is meaningful (updates of ~5e-5).
EQUIV_LR = 1e-4


def run_script(tmp_path: Path, name: str, body: str, args=(), env=None, timeout=120):
    """Run ``body`` as a fresh Python process (one intra-op thread), importing this module's helpers."""
    script = tmp_path / f"{name}.py"
    script.write_text("import os, sys, torch\ntorch.set_num_threads(1)\n"
                      "from test_train import *\n" + textwrap.dedent(body))
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), e.get("PYTHONPATH", "")])
    e.update(env or {})
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=e, capture_output=True,
                          text=True, timeout=timeout)


# --- 1. kill and resume --------------------------------------------------------------------------------

KILLED_RUN = """
out, mode = sys.argv[1], sys.argv[2]
cfg = tiny_cfg()

def on_step(step, metrics):
    if mode == "after_step_5" and step == 5:
        os._exit(1)  # a hard kill: no cleanup, no atexit, no flush of anything pending
    if mode == "during_save_6" and step == 5:
        real_save = torch.save
        def dying_save(obj, f, *a, **k):  # dies half-way through writing the step-6 checkpoint
            if isinstance(obj, dict) and obj.get("step") == 6:
                os._exit(1)
            return real_save(obj, f, *a, **k)
        torch.save = dying_save

Trainer(build_model(cfg), WindowDataset(cfg), out, progress=False, on_step=on_step).train(8)
sys.exit(0)  # not reached
"""


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 8-step run: (final weights, metrics rows)."""
    out = tmp_path_factory.mktemp("reference")
    cfg = tiny_cfg()
    tr = Trainer(build_model(cfg), WindowDataset(cfg), out, progress=False)
    res = tr.train(8)
    assert res["step"] == 8
    return state_of(tr.model), read_metrics(out / "metrics.jsonl")


@pytest.mark.parametrize("mode", ["after_step_5", "during_save_6"])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, reference_run, mode):
    ref_state, ref_rows = reference_run
    out = tmp_path / "run"
    proc = run_script(tmp_path, "killed", KILLED_RUN, args=(out, mode))
    assert proc.returncode == 1, proc.stdout + proc.stderr

    ckpt_root = out / "checkpoints"
    assert sorted(p.name for p in ckpt_root.glob("step_*")) == ["step_0000003"]
    written = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert written == [1, 2, 3, 4, 5] if mode == "after_step_5" else [1, 2, 3, 4, 5, 6]
    if mode == "during_save_6":  # the half-written checkpoint is there, under its temporary name
        assert list(ckpt_root.glob(".step_0000006.tmp-*"))

    # A new process (here: this one) resumes from step 3 and continues to 8.
    cfg = tiny_cfg()
    tr = Trainer(build_model(cfg, seed=123), WindowDataset(cfg), out, progress=False)  # other init: overwritten
    assert tr.step == 3
    res = tr.train(8)
    assert res["step"] == 8 == tr.step

    assert max_diff(state_of(tr.model), ref_state) <= 1e-6
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))  # no duplicated or stale steps
    for r, q in zip(rows, ref_rows):
        assert r.keys() == q.keys()
        for k in r:
            assert math.isclose(r[k], q[k], rel_tol=1e-5, abs_tol=1e-6), (r["step"], k, r[k], q[k])
    leftovers = [p.name for p in ckpt_root.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    assert sorted(p.name for p in ckpt_root.glob("step_*")) == ["step_0000003", "step_0000006", "step_0000008"]
    assert (out / "latest").read_text().strip() == "step_0000008"


def test_resume_false_starts_over(tmp_path):
    cfg = tiny_cfg()
    Trainer(build_model(cfg), WindowDataset(cfg), tmp_path, progress=False).train(3)
    tr = Trainer(build_model(cfg), WindowDataset(cfg), tmp_path, progress=False, resume=False)
    assert tr.step == 0
    tr.train(2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


# --- 2. DDP ----------------------------------------------------------------------------------------------

DDP_RANK = """
import datetime
import torch.distributed as dist
rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=60))
cfg = tiny_cfg(lr=EQUIV_LR)
tr = Trainer(build_model(cfg, seed=0), WindowDataset(cfg), out + "/run", progress=False, resume=False)
assert type(tr.wrapped).__name__ == "DistributedDataParallel", type(tr.wrapped)
metrics = tr.train_step()
torch.save({"state": state_of(tr.model), "grads": grads_of(tr.model), "metrics": metrics}, f"{out}/rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
"""


def test_ddp_two_process_step_equals_single_process_step(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    script = tmp_path / "ddp_rank.py"
    script.write_text("import os, sys, torch\ntorch.set_num_threads(1)\nfrom test_train import *\n"
                      + textwrap.dedent(DDP_RANK))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", init, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=80)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)

    cfg = tiny_cfg(lr=EQUIV_LR)
    single = Trainer(build_model(cfg, seed=0), WindowDataset(cfg), tmp_path / "single", progress=False)
    init_state = state_of(single.model)
    m1 = single.train_step()
    s1 = state_of(single.model)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert max_diff(r0["state"], r1["state"]) == 0.0            # replicas stay in sync
    assert_grads_close(r0["grads"], grads_of(single.model))     # all-reduced grads == global-batch grads
    assert max_diff(r0["state"], s1) <= 1e-5                    # == the 1-process step on the global batch
    assert max_diff(init_state, s1) > 2e-5                      # and the step did move the weights
    assert math.isclose(r0["metrics"]["grad_norm"], m1["grad_norm"], rel_tol=1e-4)
    # Per-sample means: the two half-batch losses average to the global-batch loss.
    for k in ("loss", "video_loss", "action_loss"):
        assert math.isclose((r0["metrics"][k] + r1["metrics"][k]) / 2, m1[k], rel_tol=1e-5), k


def test_flow_noise_is_independent_of_sharding(tmp_path):
    """Noise of global sample i at step k is the same whichever rank/offset holds it, for latents and for
    raw video (whose latent shape the trainer derives from the VAE config)."""
    cfg = tiny_cfg()
    tr = Trainer(build_model(cfg), WindowDataset(cfg), tmp_path, progress=False)
    h, w = cfg.latent_hw()
    z = cfg.vae.z_dim
    for key, shape, noise_shape in (
            ("latents", (4, z, 3, h, w), (z, 3, h // 2, w // 2)),
            ("video", (4, 3, 9, 64, 128), (z, 3, h // 2, w // 2))):
        full = {key: torch.zeros(shape)}
        tr._attach_noise(full, 7, 0)
        assert full["flow_eps"].shape == (4, *noise_shape) and full["flow_u"].shape == (4,)
        for off in (0, 2):
            half = {key: torch.zeros(2, *shape[1:])}
            tr._attach_noise(half, 7, off)
            assert torch.equal(half["flow_eps"], full["flow_eps"][off:off + 2])
            assert torch.equal(half["flow_u"], full["flow_u"][off:off + 2])
        other = {key: torch.zeros(shape)}
        tr._attach_noise(other, 8, 0)
        assert not torch.equal(other["flow_eps"], full["flow_eps"])


# --- 3. gradient accumulation --------------------------------------------------------------------------

def test_grad_accumulation_equals_full_batch(tmp_path):
    states, grads, metrics = [], [], []
    for accum in (1, 2, 4):
        cfg = tiny_cfg(grad_accum=accum, lr=EQUIV_LR)
        tr = Trainer(build_model(cfg), WindowDataset(cfg), tmp_path / f"a{accum}", progress=False)
        init = state_of(tr.model)
        metrics.append(tr.train_step())
        states.append(state_of(tr.model))
        grads.append(grads_of(tr.model))
    assert max_diff(init, states[0]) > 2e-5
    for s, g, m in zip(states[1:], grads[1:], metrics[1:]):
        assert_grads_close(g, grads[0])
        assert max_diff(s, states[0]) <= 1e-5
        for k in ("loss", "video_loss", "action_loss", "grad_norm"):
            assert math.isclose(m[k], metrics[0][k], rel_tol=1e-5), k


# --- 4. schedule and batch order -----------------------------------------------------------------------

def test_lr_lambda_warmup_and_cosine():
    cfg = TrainConfig(warmup_steps=10, max_steps=50, min_lr_ratio=0.01)
    f = lr_lambda(cfg)
    warm = [f(s) for s in range(10)]
    slopes = [b - a for a, b in zip(warm, warm[1:])]
    assert all(math.isclose(d, slopes[0], rel_tol=1e-9) for d in slopes) and slopes[0] > 0  # linear
    assert 0 < f(0) <= 0.1 + 1e-12
    assert math.isclose(f(10), 1.0) and max(f(s) for s in range(60)) <= 1.0 + 1e-12
    after = [f(s) for s in range(10, 51)]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))  # non-increasing
    assert math.isclose(f(30), 0.01 + 0.99 * 0.5, rel_tol=1e-9)  # half-way through the cosine
    assert math.isclose(f(50), 0.01) and math.isclose(f(1000), 0.01)
    g = lr_lambda(TrainConfig(warmup_steps=0, max_steps=20, min_lr_ratio=0.1))
    assert math.isclose(g(0), 1.0) and math.isclose(g(20), 0.1)


def test_scheduler_in_trainer_follows_lr_lambda(tmp_path):
    cfg = tiny_cfg(warmup_steps=3, max_steps=6, save_every=100)
    tr = Trainer(build_model(cfg), WindowDataset(cfg), tmp_path, progress=False)
    tr.train(6)
    f = lr_lambda(cfg.train)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert lrs == pytest.approx([cfg.train.lr * f(s) for s in range(6)], rel=1e-9)


@pytest.mark.parametrize("n,batch", [(24, 4), (10, 4), (3, 7)])
def test_global_batch_indices_cover_each_epoch(n, batch):
    epochs = 3
    steps = math.ceil(epochs * n / batch)
    flat = [i for s in range(steps) for i in global_batch_indices(n, batch, s, seed=5)]
    assert all(len(global_batch_indices(n, batch, s, seed=5)) == batch for s in range(steps))
    for e in range(epochs):
        assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))  # every index once per epoch
    again = [i for s in range(steps) for i in global_batch_indices(n, batch, s, seed=5)]
    assert again == flat  # deterministic
    other = [i for s in range(steps) for i in global_batch_indices(n, batch, s, seed=6)]
    assert other != flat
    if n > 3:
        assert flat[:n] != flat[n:2 * n]  # reshuffled every epoch


# --- 5. metrics, plot, progress bar, checkpoints ----------------------------------------------------

def test_metrics_plot_progress_and_checkpoint_roundtrip(tmp_path, capsys):
    cfg = tiny_cfg(save_every=2)
    stats = {"actions": {"mean": [0.0] * 4, "std": [1.0] * 4}}
    tr = Trainer(build_model(cfg, vae=True), WindowDataset(cfg), tmp_path, stats=stats, progress=True)
    res = tr.train(3)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err
    assert res["step"] == 3 and set(res["metrics"]) >= {"loss", "video_loss", "action_loss", "grad_norm", "lr"}

    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000

    ckpts = [p.name for p in tr.checkpoint_dirs()]
    assert ckpts == ["step_0000002", "step_0000003"]
    assert (tmp_path / "latest").read_text().strip() == "step_0000003"
    loaded, loaded_stats = load_checkpoint(tmp_path / "checkpoints" / "step_0000003")
    assert loaded_stats == stats
    assert loaded.cfg.to_dict() == cfg.to_dict()
    assert max_diff(state_of(loaded), state_of(tr.model)) == 0.0


def test_truncated_metrics_line_from_a_kill_is_dropped_on_resume(tmp_path):
    cfg = tiny_cfg()
    Trainer(build_model(cfg), WindowDataset(cfg), tmp_path, progress=False).train(3)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.0}\n\n{"step": 5, "loss": 1.2')  # killed in the middle of a write
    tr = Trainer(build_model(cfg), WindowDataset(cfg), tmp_path, progress=False)
    assert tr.step == 3
    tr.train(6)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_checkpoint_caught_between_renames_is_recovered(tmp_path):
    """Killed inside atomic_write_dir after moving the old step_N aside: the complete copy comes back."""
    cfg = tiny_cfg()
    done = Trainer(build_model(cfg), WindowDataset(cfg), tmp_path, progress=False)
    done.train(3)
    ckpts = tmp_path / "checkpoints"
    os.replace(ckpts / "step_0000003", ckpts / ".step_0000003.old-4242")
    (ckpts / ".step_0000003.tmp-abc").mkdir()  # the half-written replacement
    tr = Trainer(build_model(cfg, seed=9), WindowDataset(cfg), tmp_path, progress=False)
    assert tr.step == 3 and max_diff(state_of(tr.model), state_of(done.model)) == 0.0
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000003"]


# --- 6. bad input --------------------------------------------------------------------------------------

def test_batch_not_divisible_by_accum_raises(tmp_path):
    cfg = tiny_cfg(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match=r"batch_size=6.*grad_accum 4"):
        Trainer(build_model(cfg), WindowDataset(cfg), tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_empty_dataset_raises(tmp_path):
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="empty"):
        Trainer(build_model(cfg), WindowDataset(cfg, n=0), tmp_path, progress=False)


def test_metrics_stay_on_device_and_are_read_once_per_log_interval(tmp_path, monkeypatch):
    cfg = tiny_cfg(log_every=4, save_every=100)
    reads, seen = [], []
    real = Trainer.read_metrics

    def counting(steps):
        reads.append([s for s, _ in steps])
        return real(steps)

    monkeypatch.setattr(Trainer, "read_metrics", staticmethod(counting))
    tr = Trainer(build_model(cfg), WindowDataset(cfg), tmp_path, progress=False,
                 on_step=lambda step, m: seen.append(isinstance(m["loss"], torch.Tensor)))
    res = tr.train(8)
    assert reads == [[4], [8]] and all(seen) and len(seen) == 8
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [4, 8]
    assert isinstance(res["metrics"]["loss"], float)
