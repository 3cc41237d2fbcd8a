"""The `lwam` commands chained the way a user runs them: collect -> train vae -> train -> eval."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("metaworld")


def _lwam(*args, timeout=600):
    env = dict(os.environ, MUJOCO_GL="egl")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-m", "lwam.cli", *args, "--no-progress"], capture_output=True,
                         text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"lwam {' '.join(args)} failed:\n{out.stderr[-4000:]}"
    return out.stdout


def test_collect_train_vae_train_eval(tmp_path):
    ds, vae, run = tmp_path / "ds", tmp_path / "vae", tmp_path / "run"
    col = json.loads(_lwam("collect", "metaworld", "--tasks", "button-press-topdown-v3", "--episodes", "1",
                           "--max-steps", "150", "--out", str(ds)))
    assert col["expert_success"]["button-press-topdown-v3"] == 1.0
    _lwam("train", "vae", "--dataset", str(ds), "--out", str(vae), "--steps", "2", "--batch-size", "2",
          "--max-clips", "4", "--window-stride", "8")
    assert (vae / "vae.safetensors").is_file()
    _lwam("train", "--dataset", str(ds), "--vae", str(vae / "vae.safetensors"), "--out", str(run),
          "--steps", "3", "--batch-size", "2", "--window-stride", "8")
    assert (run / "final" / "model.safetensors").is_file() and (run / "metrics.jsonl").is_file()
    from lwam.checkpoint import load_impl
    from lwam.config import ImplConfig
    assert load_impl(run / "final") == ImplConfig.fast()  # `lwam train` runs the fast implementation by default
    ev = json.loads(_lwam("eval", "--checkpoint", str(run / "final"), "--tasks", "button-press-topdown-v3",
                          "--episodes", "1", "--max-steps", "16", "--eager", "--blind"))
    assert set(ev) == {"policy", "blind"}
    assert 0.0 <= ev["policy"]["success_rate"] <= 1.0


def test_train_without_vae_for_tiny_is_a_clear_error(tmp_path):
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "lwam.cli", "train", "--dataset", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "error" in out.stderr
