"""The quick variant of `lwam demo` runs end to end (collect -> VAE -> cache -> train -> eval -> report)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("metaworld")


def test_quick_demo_end_to_end(tmp_path):
    env = dict(os.environ, MUJOCO_GL="egl")
    env.pop("TRITON_INTERPRET", None)  # the demo runs the model the way a user would
    out = subprocess.run([sys.executable, "-m", "lwam.cli", "demo", "--quick", "--out", str(tmp_path / "demo"),
                          "--no-progress"], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    for key in ("success", "blind_success", "stage_seconds", "mean_action_query_latency_ms", "wall_seconds"):
        assert key in report, key
    assert set(report["success"]) == {"button-press-topdown-v3"}
    assert set(report["stage_seconds"]) >= {"collect", "train_vae", "cache_latents", "train", "eval", "eval_blind"}
    for fig in report["figures"].values():
        assert os.path.getsize(fig) > 1000, fig
    assert (tmp_path / "demo" / "checkpoint" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "checkpoint" / "stats.json").is_file()
