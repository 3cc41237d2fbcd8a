"""Closed-loop evaluation with a simulated inference latency (lwam.envs.evaluate latency_steps / asynchronous):
the synchronous robot waits latency_steps for every chunk, the asynchronous one only for the first; waits
hold the arm and count towards the step limit; the executed actions are aligned to their time."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("metaworld")

from lwam.envs.evaluate import evaluate  # noqa: E402

TASK = "button-press-topdown-v3"


@pytest.mark.parametrize("asynchronous", [False, True])
def test_waits_and_steps_with_simulated_latency(asynchronous):
    res = evaluate(lambda obs: np.zeros((32, 4), np.float32), [TASK], 1, executed_steps=8, max_steps=40,
                   progress=False, latency_steps=2, asynchronous=asynchronous)
    ep = res["episodes"][TASK][0]
    assert ep["steps"] == 40 and res["latency_steps"] == 2 and res["asynchronous"] is asynchronous
    if asynchronous:  # only the first chunk is waited for; later chunks arrive while the robot moves
        assert ep["waits"] == 2 and res["lead_steps"] == 2 and ep["dropped_actions"] > 0
        assert res["num_queries"] == 1 + 6  # the first at step 0, then one every 8 - 2 actions: 38 actions
    else:  # 2 waits before every 8 actions: 10 steps per chunk
        assert ep["waits"] == 8 and ep["dropped_actions"] == 0 and res["num_queries"] == 4


@pytest.mark.parametrize("asynchronous", [False, True])
def test_executed_actions_are_aligned_to_their_time(monkeypatch, asynchronous):
    """Through the real task loop: action j of the chunk asked after s executed actions encodes s + j in x
    (+1, so that a wait, zero motion, is told apart); every executed action must encode its own index."""
    from lwam.envs import metaworld

    stepped = []
    real_step = metaworld.MetaWorldTask.step

    def step(self, action):
        stepped.append(np.asarray(action, np.float32).copy())
        return real_step(self, action)

    monkeypatch.setattr(metaworld.MetaWorldTask, "step", step)

    def policy(obs):
        s = sum(1 for a in stepped if a[0] != 0)  # actions executed so far (waits have x = 0)
        return np.stack([np.array([(s + j + 1) / 1e4, 0, 0, 0], np.float32) for j in range(32)])

    res = evaluate(policy, [TASK], 1, executed_steps=8, max_steps=60, progress=False, latency_steps=3,
                   asynchronous=asynchronous, lead_steps=4)
    acted = [a for a in stepped if a[0] != 0]
    assert len(acted) + res["waits"] == 60
    assert [round(float(a[0]) * 1e4) - 1 for a in acted] == list(range(len(acted)))
    assert res["waits"] == (3 if asynchronous else 3 * res["num_queries"])
