"""Asynchronous chunk execution: the robot keeps moving while the next chunk is computed.

Synchronous execution (``RobotPolicy.select_action`` by default) asks for a chunk when the last one's
``executed_steps`` actions are spent and stands still until it arrives. :class:`ChunkScheduler` instead
requests the next chunk when ``lead_steps`` actions of the execution horizon remain, keeps executing the
current chunk (past its horizon, up to its H actions, if the answer is late), and when the new chunk arrives
aligns it to what happened meanwhile: the new chunk was predicted from the observation of step ``s``, and
``d`` actions of the old chunk have been executed since, so its first ``d`` actions are stale and dropped
(the robot continues at the new chunk's action ``d``). With ``blend="linear"`` the overlap of the old chunk's
remaining actions and the new chunk's fresh ones is mixed with a linear ramp (old weight (m - j) / (m + 1)
at overlap step j of m), which removes the jump between two chunks.

Time is counted in control steps. Two latency models:

* :class:`ThreadedRequests`: the request runs on a worker thread (an in-process policy, or a
  :class:`~lwam.policy.remote.RemotePolicy` talking to ``lwam serve``); an answer is there when the thread
  is done; ``lead_steps=None`` takes ``ceil(latency * control_hz)`` from the measured latencies;
* :class:`SimulatedLatency`: the answer is computed at once but revealed ``latency_steps`` control steps
  later (deterministic; the closed-loop evaluation's ``latency_steps`` option uses it).

With ``lead_steps=0``, ``past_horizon=False`` and no latency the scheduler executes exactly what the
synchronous queue does (tests/test_chunking.py).
"""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["ChunkScheduler", "SimulatedLatency", "ThreadedRequests", "BLEND_MODES"]

BLEND_MODES = ("none", "linear")


class SimulatedLatency:
    """Requests answered ``latency_steps`` control steps after they are made (computed at once)."""

    def __init__(self, predict: Callable[[Any], Any], latency_steps: int):
        if isinstance(latency_steps, bool) or not isinstance(latency_steps, int) or latency_steps < 0:
            raise ValueError(f"latency_steps: expected an int >= 0, got {latency_steps!r}")
        self.predict, self.latency_steps = predict, latency_steps

    def submit(self, observation: Any, clock: int) -> Any:
        return (self.predict(observation), clock + self.latency_steps)

    def ready(self, handle: Any, clock: int) -> bool:
        return clock >= handle[1]

    def result(self, handle: Any, block: bool = False) -> Any:
        return handle[0]

    def close(self) -> None:
        pass


class ThreadedRequests:
    """Requests run on one worker thread; measured latencies (seconds) are kept for the lead estimate."""

    def __init__(self, predict: Callable[[Any], Any]):
        self.predict = predict
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lwam-chunk")
        self.latencies: list[float] = []
        self._lock = threading.Lock()

    def _run(self, observation: Any) -> Any:
        t0 = time.perf_counter()
        out = self.predict(observation)
        with self._lock:
            self.latencies.append(time.perf_counter() - t0)
        return out

    def submit(self, observation: Any, clock: int) -> Future:
        return self._pool.submit(self._run, observation)

    def ready(self, handle: Future, clock: int) -> bool:
        return handle.done()

    def result(self, handle: Future, block: bool = False) -> Any:
        return handle.result()  # re-raises the request's exception in the robot loop

    def latency_s(self) -> float | None:
        """Median of the last 16 measured request latencies (None before the first)."""
        with self._lock:
            recent = self.latencies[-16:]
        return float(np.median(recent)) if recent else None

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass
class _Pending:
    handle: Any
    executed_at: int  # actions executed when the observation was taken


@dataclass
class SchedulerStats:
    requests: int = 0
    waits: int = 0            # control steps with no action to execute (the robot stood still)
    wait_seconds: float = 0.0  # ThreadedRequests: time blocked in select_action
    dropped_actions: int = 0  # stale prefix actions dropped at alignment
    late_actions: int = 0     # actions executed past the execution horizon while an answer was late
    discarded_chunks: int = 0  # answers that arrived after their whole chunk was stale

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "waits": self.waits, "wait_seconds": round(self.wait_seconds, 6),
                "dropped_actions": self.dropped_actions, "late_actions": self.late_actions,
                "discarded_chunks": self.discarded_chunks}


class ChunkScheduler:
    """One action per control step from chunks that arrive late.

    ``requests``: :class:`SimulatedLatency` or :class:`ThreadedRequests` (``predict(observation)`` -> chunk
    [H, A] or [B, H, A]). ``executed_steps``: the execution horizon (an int, or a callable returning it,
    read at every step). ``lead_steps``: request the next chunk when this many actions of the horizon remain
    (None: from the measured latency and ``control_hz``; 0: at the end of the horizon). ``past_horizon``:
    keep executing the current chunk past its horizon while an answer is pending (False: stand still, as
    synchronous execution does). ``blend``: "none" or "linear" (module docstring).

    :meth:`step` returns the next action, or None for a control step the robot must wait (the answer is
    not there and the chunk is spent; with ThreadedRequests and ``block=True`` it waits instead)."""

    def __init__(self, requests: Any, executed_steps: int | Callable[[], int], chunk_size: int,
                 lead_steps: int | None = 0, control_hz: float | None = None, past_horizon: bool = True,
                 blend: str = "none"):
        if blend not in BLEND_MODES:
            raise ValueError(f"blend: expected one of {BLEND_MODES}, got {blend!r}")
        if lead_steps is not None and (isinstance(lead_steps, bool) or not isinstance(lead_steps, int)
                                       or not 0 <= lead_steps < chunk_size):
            raise ValueError(f"lead_steps: expected an int in [0, {chunk_size}) or None, got {lead_steps!r}")
        if lead_steps is None:
            if not isinstance(requests, ThreadedRequests):
                raise ValueError("lead_steps=None (from measured latency) needs ThreadedRequests")
            if control_hz is None or not (isinstance(control_hz, (int, float)) and control_hz > 0):
                raise ValueError(f"control_hz: expected a rate > 0 with lead_steps=None, got {control_hz!r}")
        self.requests = requests
        self._executed_steps = executed_steps
        self.chunk_size = int(chunk_size)
        self._lead = lead_steps
        self.control_hz = control_hz
        self.past_horizon = past_horizon
        self.blend = blend
        self.reset()

    # --- state -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the chunk and any pending answer (a pending thread finishes; its answer is ignored)."""
        self.chunk: Any = None
        self.start = 0       # actions executed when the current chunk's observation was taken
        self.executed = 0    # actions executed so far
        self.clock = 0       # control steps so far (actions and waits)
        self.pending: _Pending | None = None
        self.stats = SchedulerStats()

    @property
    def horizon(self) -> int:
        """The execution horizon now (``executed_steps``, read from its callable when given one)."""
        n = self._executed_steps() if callable(self._executed_steps) else self._executed_steps
        return int(n)

    @property
    def lead_steps(self) -> int:
        if self._lead is not None:
            return self._lead
        lat = self.requests.latency_s()
        if lat is None:
            return 0
        return min(self.horizon - 1, max(0, math.ceil(lat * self.control_hz)))

    # --- the per-step logic --------------------------------------------------------------------
    def _request(self, observation: Any) -> None:
        self.stats.requests += 1
        self.pending = _Pending(self.requests.submit(observation, self.clock), self.executed)

    def _absorb(self) -> None:
        """Switch to the pending answer if it is there, dropping its stale prefix."""
        p = self.pending
        if p is None or not self.requests.ready(p.handle, self.clock):
            return
        new = self.requests.result(p.handle)
        self.pending = None
        d = self.executed - p.executed_at
        if d >= new.shape[-2]:
            self.stats.discarded_chunks += 1
            return
        if self.blend == "linear" and self.chunk is not None:
            new = _blend(self.chunk, self.executed - self.start, new, d)
        self.stats.dropped_actions += d
        self.chunk, self.start = new, p.executed_at

    def step(self, observation: Any, block: bool = True) -> Any:
        """The action to execute at this control step (``observation`` is the current one), or None."""
        self._absorb()
        if self.chunk is None and self.pending is None:
            self._request(observation)
            self._absorb()
        horizon = self.horizon
        if self.chunk is not None and self.pending is None and horizon - (self.executed - self.start) <= self.lead_steps:
            self._request(observation)
            self._absorb()
        while True:
            pos = self.executed - self.start
            limit = self.chunk_size if (self.past_horizon and self.pending is not None) else horizon
            if self.chunk is not None and pos < min(limit, self.chunk.shape[-2]):
                break
            if self.pending is None:  # spent, nothing asked for yet (lead 0 and the answer was discarded)
                self._request(observation)
                self._absorb()
                continue
            if block and isinstance(self.requests, ThreadedRequests):
                t0 = time.perf_counter()
                self.requests.result(self.pending.handle)  # wait for it
                self.stats.wait_seconds += time.perf_counter() - t0
                self._absorb()
                continue
            self.stats.waits += 1
            self.clock += 1
            return None
        if pos >= horizon:
            self.stats.late_actions += 1
        action = self.chunk[..., pos, :]
        self.executed += 1
        self.clock += 1
        return action

    def close(self) -> None:
        self.requests.close()


def _blend(old: Any, old_pos: int, new: Any, d: int) -> Any:
    """new with its overlap with old's remaining actions mixed linearly: at overlap step j of m the
    action is ((m - j) * old[old_pos + j] + (j + 1) * new[d + j]) / (m + 1)."""
    m = min(old.shape[-2] - old_pos, new.shape[-2] - d)
    if m <= 0:
        return new
    is_numpy = isinstance(new, np.ndarray)
    out = new.copy() if is_numpy else new.clone()
    j = np.arange(m, dtype=np.float32)
    w_old = (m - j) / (m + 1)
    if not is_numpy:
        import torch
        w_old = torch.as_tensor(w_old, dtype=out.dtype)
    w_old = w_old[:, None]
    out[..., d:d + m, :] = w_old * old[..., old_pos:old_pos + m, :] + (1 - w_old) * new[..., d:d + m, :]
    return out
