"""Asynchronous chunk execution (lwam.policy.chunking): the stale prefix of a late chunk is dropped so that
every executed action is the one its chunk planned for that moment; synchronous execution is the special
case lead 0 / no latency; the robot waits only when an answer is later than the lead covers."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from lwam.policy.chunking import ChunkScheduler, SimulatedLatency, ThreadedRequests
from lwam.policy.observation import ActionQueue

H, A = 32, 2


def planned(s: int) -> np.ndarray:
    """The chunk predicted from the observation taken after s executed actions: action j is (s, j)."""
    return np.stack([np.full(H, float(s)), np.arange(H, dtype=float)], axis=1)


def run(scheduler: ChunkScheduler, steps: int) -> tuple[list, int]:
    """Drive ``steps`` control steps; the observation is the number of actions executed so far."""
    executed, out, waits = 0, [], 0
    for _ in range(steps):
        a = scheduler.step(executed)
        if a is None:
            waits += 1
            continue
        out.append((executed, int(a[0]), int(a[1])))
        executed += 1
    return out, waits


def test_lead_zero_without_latency_is_the_synchronous_queue():
    calls = []

    def predict(obs):
        calls.append(obs)
        return planned(obs)

    sched = ChunkScheduler(SimulatedLatency(predict, 0), 8, H, lead_steps=0, past_horizon=False)
    got, waits = run(sched, 50)
    q, want, executed = ActionQueue(), [], 0
    for _ in range(50):
        a = q.pop(lambda: planned(executed), 8)
        want.append((executed, int(a[0]), int(a[1])))
        executed += 1
    assert got == want and waits == 0 and calls == list(range(0, 50, 8))


@pytest.mark.parametrize("latency,lead,past", [(1, 1, True), (2, 2, True), (4, 4, True), (3, 1, True),
                                               (4, 0, False), (2, 0, False), (5, 6, True)])
def test_every_executed_action_is_aligned_to_its_time(latency, lead, past):
    """The stale-prefix rule: the action executed after t actions comes from a chunk observed after s
    actions, at index t - s (never an action planned for an earlier moment)."""
    sched = ChunkScheduler(SimulatedLatency(planned, latency), 8, H, lead_steps=lead, past_horizon=past)
    got, waits = run(sched, 300)
    assert all(s + j == t for t, s, j in got)
    assert len(got) + waits == 300
    if past and lead >= latency:  # asynchronous with enough lead: the robot never waits after the first chunk
        assert waits == latency
        assert sched.stats.dropped_actions > 0
    if not past:  # synchronous: every request costs `latency` waiting steps, chunks are used from index 0
        assert waits == latency * sched.stats.requests
        assert {j for _, _, j in got} == set(range(8))


def test_late_answers_run_past_the_horizon_not_standing_still():
    sched = ChunkScheduler(SimulatedLatency(planned, 6), 8, H, lead_steps=2, past_horizon=True)
    got, waits = run(sched, 200)
    assert waits == 6  # the first chunk only
    assert sched.stats.late_actions > 0 and max(j for _, _, j in got) >= 8
    assert all(s + j == t for t, s, j in got)


def test_linear_blend_mixes_the_overlap_with_a_ramp():
    old, new = np.zeros((H, A)), np.ones((H, A))
    sched = ChunkScheduler(SimulatedLatency(lambda obs: old if obs == 0 else new, 2), 8, H, lead_steps=3,
                           blend="linear")
    actions = [sched.step(t) for t in range(2)]  # the first chunk's latency: two waits
    assert actions == [None, None]
    executed = 0
    seen = []
    for _ in range(12):
        a = sched.step(executed)
        seen.append(float(a[0]))
        executed += 1
    # request at executed 5 (3 of 8 left); answer 2 steps later at executed 7: d = 2, overlap m = 32 - 7 = 25
    m = H - 7
    assert seen[:7] == [0.0] * 7
    assert seen[7] == pytest.approx(1 / (m + 1)) and seen[8] == pytest.approx(2 / (m + 1))


def test_batched_chunks_and_torch_tensors():
    def predict(obs):
        return torch.from_numpy(np.stack([planned(obs), planned(obs) + 100]))

    sched = ChunkScheduler(SimulatedLatency(predict, 1), 8, H, lead_steps=2, blend="linear")
    a = None
    while a is None:
        a = sched.step(0)
    assert tuple(a.shape) == (2, A) and float(a[1, 0]) == 100.0


def test_threaded_requests_measure_latency_and_keep_the_alignment():
    def slow(obs):
        time.sleep(0.02)
        return planned(obs)

    sched = ChunkScheduler(ThreadedRequests(slow), 8, H, lead_steps=None, control_hz=200.0)
    try:
        executed, got = 0, []
        for _ in range(60):
            a = sched.step(executed, block=True)
            got.append((executed, int(a[0]), int(a[1])))
            executed += 1
            time.sleep(0.005)  # a 200 Hz robot
        assert all(s + j == t for t, s, j in got)
        assert sched.requests.latency_s() >= 0.02
        assert sched.lead_steps >= 4  # ceil(0.02 s x 200 Hz)
        assert sched.stats.dropped_actions > 0
    finally:
        sched.close()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="blend"):
        ChunkScheduler(SimulatedLatency(planned, 0), 8, H, blend="cubic")
    with pytest.raises(ValueError, match="lead_steps"):
        ChunkScheduler(SimulatedLatency(planned, 0), 8, H, lead_steps=H)
    with pytest.raises(ValueError, match="ThreadedRequests"):
        ChunkScheduler(SimulatedLatency(planned, 0), 8, H, lead_steps=None, control_hz=10.0)
    with pytest.raises(ValueError, match="latency_steps"):
        SimulatedLatency(planned, -1)
