"""RemotePolicy: the robot-facing policy contract (lwam.policy.base.RobotPolicy) over a websocket connection to
``lwam serve`` (or any server speaking the openpi protocol, lwam.serving.server).

``RemotePolicy("ws://127.0.0.1:8000")`` reads the server's metadata on connect; ``predict_action_chunk(obs)``
sends a LeRobot-style observation dict (lwam.policy.observation) and returns the actions [H, A] float32;
``select_action`` / ``reset`` (the base's) keep an action queue on the client, refilled every ``executed_steps``
(the server's advertised value, assignable). A server-side error (a text reply) raises
:class:`~lwam.errors.RemotePolicyError` with the server's message.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from lwam.errors import RemotePolicyError
from lwam.policy.base import RobotPolicy
from lwam.policy.observation import IMAGE_PREFIX
from lwam.serving.codec import packb, unpackb

__all__ = ["RemotePolicy", "RemotePolicyError"]


class RemotePolicy(RobotPolicy):
    """A policy served elsewhere: ``predict_action_chunk`` is one request to the server at ``url``."""

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
        self.last_timing: dict[str, Any] = {}

    @property
    def cameras(self) -> list[str]:
        """Camera names in the server's order (from ``observation_spec``)."""
        return [k[len(IMAGE_PREFIX):] for k in self.metadata["observation_spec"] if k.startswith(IMAGE_PREFIX)]

    @property
    def chunk_size(self) -> int:
        return int(self.metadata["chunk_size"])

    @property
    def default_executed_steps(self) -> int:
        return int(self.metadata["executed_steps"])

    def observation_spec(self) -> dict[str, dict[str, Any]]:
        return dict(self.metadata["observation_spec"])

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

    def close(self) -> None:
        super().close()
        self._ws.close()
