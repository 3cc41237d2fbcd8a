"""Nothing silent: one group of tests per failure mode a user would be hurt by (issue 14, items 1-8).

1 diverging runs stop with an error and write no non-finite checkpoint; 2 stale caches and resumed runs
with other inputs are refused; 3 zero / negative / non-finite numbers are errors, not defaults; 4 a second
process on a run directory is refused; 5 every anticipated CLI failure is one line with exit status 2;
6 seeded initial weights, resume falls back to an intact checkpoint, evaluation latency without warm-up;
7 Policy and model inputs checked like the training data; 8 the README's API snippet runs as written and
the docs a user needs ship with the package.

The CLI is driven in-process (``lwam.cli.main``) on a tiny synthetic LeRobot dataset (2 episodes), the
tiny preset and 2-3 training steps.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lwam.cli import main
from lwam.config import ImplConfig, get_preset
from lwam.errors import LockHeldError, NonFiniteError, StaleStateError, WeightFileError

pytest.importorskip("av")
pytest.importorskip("pyarrow")

REPO = Path(__file__).resolve().parents[1]
S = 64  # camera side of the tiny preset


def _write_dataset(root: Path, nan_at: tuple[int, int] | None = None) -> Path:
    from lwam.data.lerobot import LeRobotWriter

    rng = np.random.default_rng(0)
    w = LeRobotWriter(root, fps=20, state_dim=4, action_dim=4, video_keys=["corner", "gripper"], image_size=(S, S))
    for ep in range(2):
        t = 36
        actions = rng.uniform(-1, 1, size=(t, 4)).astype(np.float32)
        if nan_at is not None and nan_at[0] == ep:
            actions[nan_at[1], 2] = np.nan
        ims = {k: rng.integers(0, 255, size=(t, S, S, 3), dtype=np.uint8) for k in ("corner", "gripper")}
        w.add_episode(rng.normal(size=(t, 4)).astype(np.float32), actions, ims, "press the button")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A dataset and two different (untrained) tiny VAE checkpoints."""
    from lwam.model.vae import WanVAE
    from lwam.vae_train import save_vae_checkpoint

    d = tmp_path_factory.mktemp("failures")
    _write_dataset(d / "ds")
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_vae_checkpoint(WanVAE(get_preset("tiny").vae), d / f"vae{seed}.safetensors")
    return d


def _train_args(data, out, *extra, vae="vae0.safetensors"):
    return ["train", "--dataset", str(data / "ds"), "--vae", str(data / vae), "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--window-stride", "12", "--no-progress", *extra]


def _run(argv, capsys) -> tuple[int, str]:
    """lwam.cli.main in-process -> (exit status, stderr). argparse errors exit through SystemExit."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def _one_line_error(err: str) -> str:
    """The error line; asserts there is no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


REF_POOLING = ImplConfig(fused_pooling=False)  # the plain pooler: fast on CPU (no Triton interpreter)


def _tiny(**train):
    over = {"train.batch_size": 4, "train.warmup_steps": 1, "train.max_steps": 4,
            "train.log_every": 1, "train.save_every": 1}
    over.update({f"train.{k}": v for k, v in train.items()})
    return get_preset("tiny").replace(**over)


class _Windows(torch.utils.data.Dataset):
    """Synthetic latent windows; ``nan_sample`` gets NaN actions."""

    def __init__(self, cfg, n=12, nan_sample=None):
        self.cfg, self.n, self.nan_sample = cfg, n, nan_sample

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        cfg, g = self.cfg, torch.Generator().manual_seed(i)
        h, w = cfg.latent_hw()
        actions = torch.rand(cfg.chunk_size, cfg.action_dim, generator=g) * 2 - 1
        if i == self.nan_sample:
            actions[3, 1] = float("nan")
        return {"latents": torch.randn(cfg.vae.z_dim, cfg.latent_frames(), h, w, generator=g),
                "instruction": "press the button", "proprio": torch.randn(cfg.proprio_dim, generator=g),
                "actions": actions, "actions_is_pad": torch.zeros(cfg.chunk_size, dtype=torch.bool)}


def _trainer(cfg, out, **kw):
    from lwam.model.lightwam import LightWAM
    from lwam.train import Trainer

    torch.manual_seed(0)
    return Trainer(LightWAM(cfg, build_vae=False, impl=REF_POOLING), kw.pop("dataset", None) or _Windows(cfg), out,
                   progress=False, **kw)


# --- 1. diverging runs ------------------------------------------------------------------------------------
def test_1_diverging_run_stops_naming_step_and_metric_and_saves_nothing_non_finite(tmp_path):
    from safetensors.torch import load_file

    tr = _trainer(_tiny(lr=1e9), tmp_path / "run")
    with pytest.raises(NonFiniteError, match=r"at step \d+: \w+ = nan") as e:
        tr.train()
    assert e.value.step is not None and e.value.step >= 2 and e.value.metric in (
        "loss", "video_loss", "action_loss", "video_mse", "grad_norm")
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert len(saved) == e.value.step - 1  # every step before the bad one, none after
    for ck in saved:
        assert all(torch.isfinite(v).all() for v in load_file(str(ck / "model.safetensors")).values())
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())  # the bad update was not applied


def test_1_nan_in_batch_is_skipped_within_budget_else_error(tmp_path):
    cfg = _tiny(max_steps=3, save_every=3)
    data = _Windows(cfg, n=4, nan_sample=2)  # batch 4 of 4 windows: every step sees the NaN
    with pytest.raises(NonFiniteError, match="at step 1"):
        _trainer(cfg, tmp_path / "a", dataset=data).train()
    tr = _trainer(cfg, tmp_path / "b", dataset=data, max_nonfinite_skips=3)
    res = tr.train()
    assert res["step"] == 3 and tr.nonfinite_skipped == 3
    rows = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped_nonfinite"] == 1.0 for r in rows)
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


def test_1_save_checkpoint_refuses_non_finite_weights(tmp_path):
    from lwam.checkpoint import save_checkpoint
    from lwam.model.lightwam import LightWAM

    model = LightWAM(_tiny(), build_vae=False, impl=REF_POOLING)
    with torch.no_grad():
        model.proprio_encoder.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="proprio_encoder.weight"):
        save_checkpoint(model, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_1_nan_action_in_dataset_names_episode_and_frame(tmp_path):
    from lwam.data.windows import WindowDataset

    root = _write_dataset(tmp_path / "ds", nan_at=(1, 7))
    with pytest.raises(NonFiniteError, match=r"episode 1 'action'.*frame 7 component 2 is nan"):
        WindowDataset(root, get_preset("tiny").data, frame_cache="memory")


def test_1_cli_diverging_run_exits_2_without_final(data, tmp_path, capsys):
    rc, err = _run(_train_args(data, tmp_path / "run", "--lr", "1e9", "--steps", "3"), capsys)
    assert rc == 2 and "training diverged at step" in _one_line_error(err)
    assert not (tmp_path / "run" / "final").exists()


# --- 2. stale state ---------------------------------------------------------------------------------------
def test_2_latent_cache_of_another_vae_is_refused(data, tmp_path):
    from lwam.model.lightwam import LightWAM
    from lwam.pipeline import cache_latents_stage, make_windows
    from lwam.vae_train import load_vae_checkpoint

    cfg = get_preset("tiny")
    windows, _ = make_windows(data / "ds", cfg, window_stride=12, progress=False)
    model = LightWAM(cfg)
    model.vae.load_state_dict(load_vae_checkpoint(data / "vae0.safetensors").state_dict())
    cache_latents_stage(model, windows, tmp_path / "lat.npy", progress=False)
    cache_latents_stage(model, windows, tmp_path / "lat.npy", progress=False)  # same inputs: reused
    model.vae.load_state_dict(load_vae_checkpoint(data / "vae1.safetensors").state_dict())
    with pytest.raises(StaleStateError, match=r"vae: [0-9a-f]{16} -> [0-9a-f]{16}.*delete"):
        cache_latents_stage(model, windows, tmp_path / "lat.npy", progress=False)


def test_2_resume_with_other_vae_or_changed_file_is_refused(data, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    assert _run(_train_args(data, run), capsys)[0] == 0
    rc, err = _run(_train_args(data, run, vae="vae1.safetensors"), capsys)
    line = _one_line_error(err)
    assert rc == 2 and "--vae" in line and "vae0.safetensors" in line and "--overwrite" in line
    rc, err = _run(_train_args(data, run, "--lr", "0.5"), capsys)
    assert rc == 2 and "--lr 0.5" in _one_line_error(err)
    # the same path with other content
    vae = tmp_path / "vae.safetensors"
    shutil.copy(data / "vae0.safetensors", vae)
    run2 = tmp_path / "run2"
    args = ["train", "--dataset", str(data / "ds"), "--vae", str(vae), "--out", str(run2), "--steps", "2",
            "--batch-size", "2", "--window-stride", "12", "--no-progress"]
    assert _run(args, capsys)[0] == 0
    shutil.copy(data / "vae1.safetensors", vae)
    rc, err = _run(["train", "--out", str(run2), "--no-progress"], capsys)  # left-out arguments: from run.json
    assert rc == 2 and "changed since: vae" in _one_line_error(err)
    # --overwrite starts fresh with the new file
    assert _run([*args, "--overwrite"], capsys)[0] == 0


# --- 3. zero, negative and non-finite numbers ----------------------------------------------------------
@pytest.mark.parametrize("argv, arg", [
    (["train", "--steps", "0"], "--steps"), (["train", "--steps", "-5"], "--steps"),
    (["train", "--batch-size", "0"], "--batch-size"), (["train", "--lr", "0"], "--lr"),
    (["train", "--lr", "nan"], "--lr"), (["train", "--lr", "-1e-3"], "--lr"), (["train", "--lr", "inf"], "--lr"),
    (["train", "--window-stride", "0"], "--window-stride"), (["train", "--seed", "-1"], "--seed"),
    (["train", "vae", "--steps", "0"], "--steps"), (["train", "vae", "--batch-size", "-2"], "--batch-size"),
    (["eval", "--executed-steps", "0"], "--executed-steps"), (["eval", "--max-steps", "0"], "--max-steps"),
    (["eval", "--episodes", "0"], "--episodes"), (["collect", "metaworld", "--episodes", "0"], "--episodes"),
    (["collect", "metaworld", "--size", "0"], "--size"), (["demo", "--train-steps", "0"], "--train-steps"),
    (["demo", "--seed", "-1"], "--seed"), (["experiment", "--jobs", "0"], "--jobs"),
    (["experiment", "--seeds", "0", "-1"], "--seeds"), (["experiment", "--conditions", "nope"], "--conditions"),
    (["experiment", "--blind-episodes", "0"], "--blind-episodes"),
])
def test_3_non_positive_numbers_are_errors_not_defaults(argv, arg, capsys, tmp_path):
    rc, err = _run([*argv, "--out", str(tmp_path / "o")] if argv[0] != "eval" else argv, capsys)
    assert rc == 2 and f"argument {arg}" in err
    assert not (tmp_path / "o").exists()


def test_3_trainer_config_rejects_zero(tmp_path):
    with pytest.raises(ValueError, match="train.max_steps"):
        _tiny(max_steps=0).validate()
    with pytest.raises(ValueError, match="train.lr"):
        _trainer(_tiny(lr=0.0), tmp_path / "r")
    with pytest.raises(ValueError, match="max_steps"):
        _trainer(_tiny(), tmp_path / "r2").train(max_steps=0)


def test_3_collect_without_a_single_success_is_an_error(tmp_path, capsys):
    pytest.importorskip("metaworld")
    rc, err = _run(["collect", "metaworld", "--tasks", "drawer-open-v3", "--episodes", "1", "--max-steps", "1",
                    "--out", str(tmp_path / "ds"), "--no-progress"], capsys)
    assert rc == 2 and "nothing written" in _one_line_error(err)
    assert not (tmp_path / "ds" / "meta").exists()


# --- 4. concurrent runs -----------------------------------------------------------------------------------
_HOLD = "import sys, time; from lwam import _lock; _lock.acquire(sys.argv[1], 'holder'); print('held', flush=True); time.sleep(120)"


def _holder(path: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_4_second_trainer_on_a_run_directory_is_refused_then_stale_lock_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        with pytest.raises(LockHeldError, match=rf"in use by pid {holder.pid} on host"):
            _trainer(_tiny(), run)
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    tr = _trainer(_tiny(max_steps=1), run)  # the holder died (kill -9): its lock is stale
    assert tr.train()["step"] == 1


def test_4_cli_refuses_a_busy_directory(data, tmp_path, capsys):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        rc, err = _run(_train_args(data, run), capsys)
        assert rc == 2 and f"pid {holder.pid}" in _one_line_error(err)
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "run.json").exists()


# --- 5. one error boundary --------------------------------------------------------------------------------
def _bad_files(d: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    save_file({"a": torch.ones(4)}, str(d / "ok.safetensors"))
    raw = (d / "ok.safetensors").read_bytes()
    files = {"truncated.safetensors": raw[:-8], "empty.safetensors": b"", "junk.safetensors": b"not a file" * 10,
             "empty.pth": b"", "junk.pth": b"junk junk junk"}
    out = {}
    for name, content in files.items():
        (d / name).write_bytes(content)
        out[name] = d / name

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"w": Evil()}, d / "code.pth")
    out["code.pth"] = d / "code.pth"
    torch.save({"w": torch.ones(2)}, d / "ok.pth")
    (d / "trunc.pth").write_bytes((d / "ok.pth").read_bytes()[:40])
    out["trunc.pth"] = d / "trunc.pth"
    return out


def test_5_bad_weight_files_name_the_file_and_never_advise_weights_only_false(tmp_path, data, capsys):
    from lwam.model.vae import WanVAE

    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(WeightFileError) as e:
            WanVAE(get_preset("tiny").vae).load_pretrained(path)
        assert str(path) in str(e.value) and "weights_only" not in str(e.value), (name, e.value)
        rc, err = _run(_train_args(data, tmp_path / f"run_{name}", vae=path), capsys)
        line = _one_line_error(err)
        assert rc == 2 and name in line and "weights_only" not in line


def test_5_bad_paths_and_checkpoints_are_one_line(data, tmp_path, capsys):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{not json")
    (tmp_path / "ck2").mkdir()
    (tmp_path / "ck2" / "config.json").write_text(get_preset("tiny").to_json())
    (tmp_path / "ck2" / "model.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "notds").mkdir()
    cases = [
        (["train", "--dataset", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "missing"),
        (["train", "--dataset", str(tmp_path / "notds"), "--out", str(tmp_path / "o")], "meta/info.json"),
        (["train", "--dataset", str(data / "ds"), "--vae", str(tmp_path), "--out", str(tmp_path / "o")], "not a file"),
        (["train", "--dataset", str(data / "ds"), "--out", str(tmp_path / "o")], "--vae"),
        (["eval", "--checkpoint", str(tmp_path / "nope")], "nope"),
        (["eval", "--checkpoint", str(tmp_path / "notds")], "config.json"),
        (["eval", "--checkpoint", str(tmp_path / "ck")], "not valid JSON"),
        (["eval", "--checkpoint", str(tmp_path / "ck2")], "model.safetensors"),
        (["train", "vae", "--dataset", str(tmp_path / "notds"), "--out", str(tmp_path / "v")], "meta/info.json"),
        (["info", "--preset", "huge"], "invalid choice"),
    ]
    for argv, needle in cases:
        rc, err = _run(argv, capsys)
        assert rc == 2 and needle in err and "Traceback" not in err, (argv, err)


def test_5_existing_out_dirs_say_how_to_choose(data, tmp_path, capsys):
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "report.json").write_text("{}")
    rc, err = _run(["demo", "--out", str(demo), "--no-progress"], capsys)
    assert rc == 2 and "--overwrite" in _one_line_error(err)
    vae_out = tmp_path / "vae"
    vae_out.mkdir()
    (vae_out / "vae.safetensors").write_bytes(b"x")
    rc, err = _run(["train", "vae", "--dataset", str(data / "ds"), "--out", str(vae_out), "--no-progress"], capsys)
    assert rc == 2 and "--overwrite" in _one_line_error(err)
    rc, err = _run(["collect", "metaworld", "--out", str(data / "ds"), "--no-progress"], capsys)
    assert rc == 2 and "already holds a dataset" in _one_line_error(err) and "--overwrite" in err


def test_5_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("[]")
    with pytest.raises(WeightFileError):
        main(["eval", "--checkpoint", str(tmp_path / "ck"), "--debug"])
    monkeypatch.setenv("LWAM_DEBUG", "1")
    with pytest.raises(WeightFileError):
        main(["eval", "--checkpoint", str(tmp_path / "ck")])


# --- 6. seeded init, resume fallback, evaluation latency --------------------------------------------------
def test_6_two_identical_cli_runs_give_identical_weights(data, tmp_path, capsys):
    from safetensors.torch import load_file

    torch.manual_seed(123)  # whatever the caller's RNG state: the run seeds its own initial weights
    assert _run(_train_args(data, tmp_path / "a"), capsys)[0] == 0
    torch.manual_seed(456)
    assert _run(_train_args(data, tmp_path / "b"), capsys)[0] == 0
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_6_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    run = tmp_path / "run"
    _trainer(_tiny(max_steps=3), run).train()
    newest = run / "checkpoints" / "step_0000003" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # cut short
    import logging
    logging.getLogger("lwam").propagate = True
    try:
        with caplog.at_level("WARNING", logger="lwam"):
            tr = _trainer(_tiny(max_steps=3), run)
    finally:
        logging.getLogger("lwam").propagate = False
    assert tr.step == 2 and "step_0000003" in caplog.text and "previous checkpoint" in caplog.text
    (run / "checkpoints" / "step_0000001" / "trainer.pt").write_bytes(b"")
    (run / "checkpoints" / "step_0000002" / "trainer.pt").write_bytes(b"")
    with pytest.raises(WeightFileError, match="no intact checkpoint"):
        _trainer(_tiny(max_steps=3), run)


def test_6_evaluation_latency_excludes_the_warm_up_call(monkeypatch):
    pytest.importorskip("metaworld")
    import lwam.envs.evaluate as ev

    clock = {"t": 0.0}
    monkeypatch.setattr(ev.time, "perf_counter", lambda: clock["t"])
    calls = []

    def policy(obs):  # the first call "compiles" for 5 s, every later one takes 2 ms (fake clock)
        clock["t"] += 5.0 if not calls else 0.002
        calls.append(1)
        return np.zeros((16, 4), np.float32)

    res = ev.evaluate(policy, ["button-press-topdown-v3"], 1, executed_steps=4, max_steps=8, progress=False)
    assert res["warmup_ms"] == pytest.approx(5000.0)
    assert res["num_queries"] == 2 and res["query_latency_ms"] == pytest.approx(2.0)


# --- 7. Policy and model inputs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def policy_and_model():
    from lwam.policy.compiled import Policy
    from lwam.model.lightwam import LightWAM

    torch.manual_seed(0)
    model = LightWAM(get_preset("tiny")).eval()
    return Policy.from_model(model, compile=False), model


def test_7_policy_rejects_inputs_unlike_the_training_data(policy_and_model):
    pol, model = policy_and_model
    h, w = model.cfg.data.image_height, model.cfg.data.image_width
    prop = np.zeros(model.cfg.proprio_dim, np.float32)
    ok = np.zeros((h, w, 3), np.uint8)
    assert pol.predict(ok, "press the button", prop).shape == (model.cfg.chunk_size, model.cfg.action_dim)
    with pytest.raises(ValueError, match=rf"expected H x W = {h} x {w}.*got 128 x 128"):
        pol.predict(np.zeros((128, 128, 3), np.uint8), "press the button", prop)
    with pytest.raises(ValueError, match=r"\[-1, 1\].*0\.\.255"):
        pol.predict(torch.full((3, h, w), 200.0), "press the button", prop)
    nan_img = torch.zeros(3, h, w)
    nan_img[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images: expected finite"):
        pol.predict(nan_img, "press the button", prop)
    with pytest.raises(ValueError, match="proprio: expected finite"):
        pol.predict(ok, "press the button", np.full(model.cfg.proprio_dim, np.nan, np.float32))
    with pytest.raises(ValueError, match="instructions: expected 2"):
        pol.predict_batch(np.zeros((2, h, w, 3), np.uint8), ["a", "b", "c"], np.zeros((2, 4), np.float32))


def test_7_model_rejects_wrong_images_instruction_count_and_uint8_video(policy_and_model):
    _, model = policy_and_model
    cfg = model.cfg
    h, w = cfg.data.image_height, cfg.data.image_width
    prop = torch.zeros(2, cfg.proprio_dim)
    with pytest.raises(ValueError, match=r"images: expected float values in \[-1, 1\]"):
        model.predict_actions(torch.full((2, 3, h, w), 255.0), prop, instruction="x")
    with pytest.raises(ValueError, match=rf"{h} x {w}"):
        model.predict_actions(torch.zeros(2, 3, h, 2 * w), prop, instruction="x")
    with pytest.raises(ValueError, match="instruction: expected one str or 2"):
        model.predict_actions(torch.zeros(2, 3, h, w), prop, instruction=["x", "y", "z"])
    batch = {"video": torch.zeros(2, 3, cfg.data.num_frames, h, w, dtype=torch.uint8), "instruction": ["x", "y"],
             "proprio": prop, "actions": torch.zeros(2, cfg.chunk_size, cfg.action_dim)}
    with pytest.raises(TypeError, match="video: expected float"):
        model.training_loss(batch)
    batch["video"] = torch.full_like(batch["video"], 200, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"video: expected float values in \[-1, 1\]"):
        model.training_loss(batch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is missing")
def test_7_cuda_device_without_cuda_is_a_clear_error(policy_and_model, tmp_path):
    from lwam.checkpoint import save_checkpoint
    from lwam.policy.compiled import Policy

    _, model = policy_and_model
    with pytest.raises(ValueError, match="device: 'cuda' requested but CUDA is not available"):
        Policy.from_model(model, device="cuda", compile=False)
    save_checkpoint(model, tmp_path / "ck")
    with pytest.raises(ValueError, match="CUDA is not available"):
        Policy.from_checkpoint(tmp_path / "ck", device="cuda")


# --- 8. newcomer frictions --------------------------------------------------------------------------------
def _readme_api_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_8_readme_api_snippet_runs_as_written(tmp_path):
    """The snippet verbatim in a fresh interpreter, in an empty directory."""
    code = _readme_api_snippet()
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code + "\nprint('OK', tuple(chunk.shape))"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = get_preset("tiny")
    assert f"OK ({cfg.chunk_size}, {cfg.action_dim})" in out.stdout


def test_8_docs_ship_with_the_repository_and_the_cli_explains_itself(capsys):
    for p in [*(REPO / "lwam").rglob("*.py"), REPO / "README.md"]:
        text = p.read_text()
        assert "SPEC.md" not in text and "DESIGN.md" not in text, p
    for doc in ("docs/model.md", "docs/design.md"):
        assert (REPO / doc).is_file()
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.match(r"lwam \d+\.\d+", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    helptext = capsys.readouterr().out
    assert "{paper,robotwin,tiny}" in helptext and "(default: 0)" in helptext and "--overwrite" in helptext
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(default: 200)" in capsys.readouterr().out
