"""`lwam train` end to end through files, without a simulator: a small LeRobot dataset written with
LeRobotWriter, an (untrained) tiny VAE file, a text-cache file -> run/final, which must carry the impl
config it trained with and the text contexts of every training instruction, so that
``Policy.from_checkpoint(run/final)`` alone answers them."""
import json

import numpy as np
import pytest
import torch

from lwam.checkpoint import IMPL_FILE, TEXT_FILE, load_impl
from lwam.cli import main
from lwam.config import ImplConfig, get_preset
from lwam.data.lerobot import LeRobotWriter
from lwam.errors import UnknownInstructionError
from lwam.policy.compiled import Policy
from lwam.model.text import TextContextCache, build_text_cache, make_text_encoder
from lwam.model.vae import WanVAE
from lwam.vae_train import save_vae_checkpoint

TASKS = ["press the red button", "open the top drawer"]
S = 64  # camera size: the tiny preset composes two S x S cameras into 64 x 128


def _frames(t, seed):
    yy, xx = np.mgrid[:S, :S].astype(np.float64)
    return (np.stack([np.stack([0.5 + 0.5 * np.sin(xx / 6 + k / 4 + seed), 0.5 + 0.5 * np.cos(yy / 5 - k / 5),
                                np.full_like(xx, seed / 7)], -1) for k in range(t)]) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    cfg = get_preset("tiny")
    w = LeRobotWriter(root / "ds", fps=20, state_dim=cfg.proprio_dim, action_dim=cfg.action_dim,
                      video_keys=list(cfg.data.cameras), image_size=(S, S))
    rng = np.random.default_rng(0)
    for i, task in enumerate(TASKS):
        t = 40
        w.add_episode(rng.normal(size=(t, cfg.proprio_dim)).astype(np.float32),
                      rng.uniform(-1, 1, size=(t, cfg.action_dim)).astype(np.float32),
                      {cam: _frames(t, i + 3 * j) for j, cam in enumerate(cfg.data.cameras)}, task)
    torch.manual_seed(0)
    save_vae_checkpoint(WanVAE(cfg.vae), root / "vae.safetensors")
    # The text cache holds the training instructions (and one more the run must not carry).
    build_text_cache([*TASKS, "an instruction not in the dataset"], cfg.text, root / "text.safetensors")
    return root


def _train(files, out, *extra):
    rc = main(["train", "--dataset", str(files / "ds"), "--vae", str(files / "vae.safetensors"),
               "--text-cache", str(files / "text.safetensors"), "--out", str(out), "--steps", "2",
               "--batch-size", "2", "--window-stride", "16", "--no-progress", *extra])
    assert rc == 0


# "fast" (the default) compiles the DiT blocks: about two minutes of inductor on a small CPU, so slow tier
# (tests/test_cli.py also checks that a default `lwam train` records ImplConfig.fast()).
@pytest.mark.parametrize("impl", ["reference", pytest.param("fast", marks=pytest.mark.slow)])
def test_lwam_train_records_impl_and_text_and_policy_answers(files, tmp_path, impl):
    run = tmp_path / "run"
    _train(files, run, *(["--impl", impl] if impl != "fast" else []))  # fast is the default
    final = run / "final"
    assert json.loads((final / IMPL_FILE).read_text()) == ImplConfig.named(impl).to_dict()
    assert load_impl(final) == ImplConfig.named(impl)
    for ckpt in (run / "checkpoints").glob("step_*"):  # every checkpoint records it, too
        assert load_impl(ckpt) == ImplConfig.named(impl)
    carried = TextContextCache.load(final / TEXT_FILE, get_preset("tiny").text)
    assert sorted(carried.instructions) == sorted(TASKS)
    want = TextContextCache.load(files / "text.safetensors", get_preset("tiny").text)
    for s in TASKS:
        torch.testing.assert_close(carried.get([s]), want.get([s]), rtol=0, atol=0)

    pol = Policy.from_checkpoint(final, compile=False)  # no other file
    assert sorted(pol.instructions) == sorted(TASKS)
    cfg = pol.cfg
    assert cfg.text.encoder == "cache"
    img = np.zeros((cfg.data.image_height, cfg.data.image_width, 3), np.uint8)
    for s in TASKS:
        out = pol.predict(img, s, np.zeros(cfg.proprio_dim, np.float32))
        assert out.shape == (cfg.chunk_size, cfg.action_dim) and np.isfinite(out).all()
    with pytest.raises(UnknownInstructionError):
        pol.predict(img, "an instruction not in the dataset", np.zeros(cfg.proprio_dim, np.float32))


def test_lwam_train_text_cache_missing_an_instruction_is_an_error(files, tmp_path, capsys):
    cfg = get_preset("tiny")
    build_text_cache(TASKS[:1], cfg.text, tmp_path / "partial.safetensors", encoder=make_text_encoder(cfg.text))
    rc = main(["train", "--dataset", str(files / "ds"), "--vae", str(files / "vae.safetensors"),
               "--text-cache", str(tmp_path / "partial.safetensors"), "--out", str(tmp_path / "run"),
               "--steps", "1", "--batch-size", "2", "--no-progress"])
    assert rc == 2 and TASKS[1] in capsys.readouterr().err
