"""RemotePolicy: the robot-facing policy interface over a websocket connection to ``lwam serve`` (or any
server speaking the openpi protocol, lwam.serve).

``RemotePolicy("ws://127.0.0.1:8000")`` reads the server's metadata on connect; ``predict_action_chunk(obs)``
sends a LeRobot-style observation dict (lwam.observation) and returns the actions [H, A] float32;
``select_action`` / ``reset`` keep an action queue on the client, refilled every ``executed_steps`` (the
server's advertised value, assignable). A server-side error (a text reply) raises :class:`RemotePolicyError`.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from lwam.observation import IMAGE_PREFIX, ActionQueue, check_executed_steps
from lwam.wire import packb, unpackb

__all__ = ["RemotePolicy", "RemotePolicyError"]


class RemotePolicyError(RuntimeError):
    """The server answered a request with an error message."""


class RemotePolicy:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0):
        from websockets.sync.client import connect

        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"url: expected ws://HOST:PORT or wss://HOST:PORT, got {url!r}")
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self.url, self.timeout = url, timeout
        # __enter__ opens the connection on every websockets version (17.1+ warns on plain connect(...) use);
        # close() ends it.
        self._ws = connect(url, compression=None, max_size=None, additional_headers=headers,
                           open_timeout=timeout).__enter__()
        self.metadata: dict[str, Any] = unpackb(self._ws.recv(timeout))
        self.chunk_size = int(self.metadata["chunk_size"])
        self._executed_steps = int(self.metadata["executed_steps"])
        self._queue = ActionQueue()
        self.last_timing: dict[str, Any] = {}

    @property
    def cameras(self) -> list[str]:
        """Camera names in the server's order (from ``observation_spec``)."""
        return [k[len(IMAGE_PREFIX):] for k in self.metadata["observation_spec"] if k.startswith(IMAGE_PREFIX)]

    @property
    def executed_steps(self) -> int:
        return self._executed_steps

    @executed_steps.setter
    def executed_steps(self, n: int) -> None:
        self._executed_steps = check_executed_steps(n, self.chunk_size)

    def infer(self, observation: Mapping[str, Any]) -> dict[str, Any]:
        """One request -> the server's reply dict (``actions``, ``server_timing``)."""
        self._ws.send(packb(dict(observation)))
        reply = self._ws.recv(self.timeout)
        if isinstance(reply, str):
            raise RemotePolicyError(f"{self.url}: {reply}")
        out = unpackb(reply)
        self.last_timing = out.get("server_timing", {})
        return out

    def predict_action_chunk(self, observation: Mapping[str, Any]) -> np.ndarray:
        return np.asarray(self.infer(observation)["actions"], dtype=np.float32)

    def select_action(self, observation: Mapping[str, Any]) -> np.ndarray:
        return self._queue.pop(lambda: self.predict_action_chunk(observation), self.executed_steps)

    def reset(self) -> None:
        self._queue.clear()

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> "RemotePolicy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
