"""lwam export: a checkpoint -> one .pt2 (torch.export + AOTInductor, CPU, fp32) that answers the robot-facing
contract without the model code; the drift check against the eager model on recorded observations passes for
the same weights and refuses other weights; `lwam serve --exported` serves it. One AOT compilation (about a
minute on two cores) is shared by the module."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from lwam.checkpoint import save_checkpoint
from lwam.cli import main
from lwam.config import get_preset
from lwam.data.lerobot import LeRobotWriter
from lwam.errors import UnknownInstructionError, WeightFileError
from lwam.model.lightwam import LightWAM
from lwam.policy.base import RobotPolicy
from lwam.policy.eager import EagerPolicy
from lwam.testing import perturb_zero_inits_

TASKS = ["press the red button", "open the top drawer"]
STATS = {"observation.state": {"min": [-2.0] * 4, "max": [3.0] * 4, "mean": [0.0] * 4, "std": [1.0] * 4},
         "action": {"min": [-0.5] * 4, "max": [1.5] * 4, "mean": [0.0] * 4, "std": [1.0] * 4}}


def _model(seed: int) -> LightWAM:
    torch.manual_seed(seed)
    m = perturb_zero_inits_(LightWAM(get_preset("tiny")).eval(), torch.Generator().manual_seed(seed + 1))
    m.text.get(TASKS)  # the checkpoint carries the instructions' contexts
    return m


def _obs(seed: int, state, **instruction) -> dict:
    """A robot-facing observation of the tiny preset's two cameras (random frames), ``state`` [4]."""
    rng = np.random.default_rng(seed)
    return {"observation.images.corner": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            "observation.images.gripper": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            "observation.state": np.asarray(state, np.float32), **instruction}


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = get_preset("tiny")
    w = LeRobotWriter(root / "ds", fps=20, state_dim=cfg.proprio_dim, action_dim=cfg.action_dim,
                      video_keys=list(cfg.data.cameras), image_size=(64, 64))
    rng = np.random.default_rng(0)
    for task in TASKS:
        t = 12
        w.add_episode(rng.uniform(-1, 2, size=(t, cfg.proprio_dim)).astype(np.float32),
                      rng.uniform(-1, 1, size=(t, cfg.action_dim)).astype(np.float32),
                      {cam: rng.integers(0, 256, (t, 64, 64, 3), dtype=np.uint8) for cam in cfg.data.cameras}, task)
    model_a, model_b = _model(0), _model(5)
    save_checkpoint(model_a, root / "ckpt_a", stats=STATS)
    save_checkpoint(model_b, root / "ckpt_b", stats=STATS)
    rc, out, err = _run(["export", "--checkpoint", str(root / "ckpt_a"), "--out", str(root / "policy.pt2"),
                         "--check", str(root / "ds"), "--observations", "10"])
    assert rc == 0, err
    return {"root": root, "report": json.loads(out), "model": model_a}


def test_export_and_drift_check_on_recorded_observations(files):
    rep = files["report"]
    assert rep["export"]["instructions"] == sorted(TASKS) and rep["export"]["bytes"] > 0
    check = rep["check"]
    assert check["observations"] == 10 and check["passed"]
    assert check["max_relative_drift"] <= 1e-5 and check["tolerance"] == 1e-5


def test_exported_policy_keeps_the_contract(files):
    from lwam import load_exported

    pol = load_exported(files["root"] / "policy.pt2")
    assert isinstance(pol, RobotPolicy) and pol.instructions == sorted(TASKS)
    assert pol.executed_steps == 8 and pol.chunk_size == 32
    ref = EagerPolicy(files["model"], STATS, "cpu")
    obs = _obs(3, [0.1, -0.5, 1.0, 2.0], task=TASKS[1])
    a, b = pol.predict_action_chunk(obs), ref.predict_action_chunk(obs)
    assert a.shape == (32, 4) and np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    pol.reset()
    assert np.array_equal(pol.select_action(obs), a[0])
    batched = {k: (np.stack([v, v]) if isinstance(v, np.ndarray) else [v, TASKS[0]]) for k, v in obs.items()}
    out = pol.predict_action_chunk(batched)
    assert out.shape == (2, 32, 4) and np.allclose(out[0], a, rtol=0, atol=1e-6)
    with pytest.raises(UnknownInstructionError, match="no cached text context"):
        pol.predict_action_chunk({**obs, "task": "another instruction"})


def test_drift_check_refuses_other_weights(files):
    """The export of checkpoint A checked against checkpoint B's eager model: drift far over tolerance, exit 2,
    one line naming the drift and the tolerance."""
    root = files["root"]
    rc, out, err = _run(["export", "--checkpoint", str(root / "ckpt_b"), "--out", str(root / "policy.pt2"),
                         "--check", str(root / "ds"), "--observations", "4"])
    assert rc == 2 and "exceeds --tolerance 1e-05" in err, err
    assert json.loads(out)["check"]["max_relative_drift"] > 1e-2


def test_export_refusals(files, tmp_path):
    root = files["root"]
    rc, _, err = _run(["export", "--checkpoint", str(root / "ckpt_a"), "--out", str(root / "policy.pt2")])
    assert rc == 2 and "exists; pass --overwrite" in err
    rc, _, err = _run(["export", "--checkpoint", str(root / "ckpt_a"), "--out", str(tmp_path / "policy.onnx")])
    assert rc == 2 and "ending in .pt2" in err
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip file")
    from lwam.policy.exported import load_exported
    with pytest.raises(WeightFileError, match="not a policy exported by `lwam export`"):
        load_exported(bad)


def test_serve_exported_answers_a_client(files):
    pytest.importorskip("websockets")
    from test_serve import running

    from lwam.policy.exported import load_exported
    from lwam.policy.remote import RemotePolicy
    from lwam.serving.server import PolicyServer

    pol = load_exported(files["root"] / "policy.pt2")
    obs = _obs(4, np.zeros(4), prompt=TASKS[0])
    with running(PolicyServer(pol, port=0, max_batch=2)) as url:
        with RemotePolicy(url) as rp:
            assert rp.metadata["implementation"]["policy"] == "lwam.policy.exported.ExportedPolicy"
            got = rp.predict_action_chunk(obs)
    assert np.array_equal(got, pol.predict_action_chunk(obs))


def test_cli_serve_exported(files):
    """`lwam serve --exported F` as a process answers a client with the file's actions."""
    pytest.importorskip("websockets")
    from test_serve import serve_process

    from lwam.policy.exported import load_exported
    from lwam.policy.remote import RemotePolicy

    pol = load_exported(files["root"] / "policy.pt2")
    obs = _obs(5, np.ones(4), task=TASKS[1])
    with serve_process("--exported", files["root"] / "policy.pt2", "--max-batch", "1") as url:
        with RemotePolicy(url) as rp:
            got = rp.predict_action_chunk(obs)  # the server process runs its own thread count: summation order
    want = pol.predict_action_chunk(obs)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
