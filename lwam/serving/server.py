"""``lwam serve``: a websocket policy server speaking the openpi protocol.

Protocol (what ``openpi_client.websocket_client_policy.WebsocketClientPolicy`` expects, unmodified):

* on connect the server sends one binary message, the metadata dict (:meth:`PolicyServer.metadata`):
  ``observation_spec`` ({key: {"shape", "dtype"}} of every array of an observation), ``chunk_size``,
  ``action_dim``, ``executed_steps``, ``instructions`` (those with a cached text context), ``text_encoder``
  (whether it can answer any other), ``instruction_keys`` and ``implementation`` (policy, preset, device,
  dtype, inference options, camera layout, server limits, versions);
* each request is one binary message, an observation dict (lwam.policy.observation; the instruction as ``prompt``
  or ``task``), answered by ``{"actions": float32 [H, A] (or [B, H, A] for a batched observation),
  "server_timing": {"infer_ms", "queue_ms", "total_ms", "batch_size"}}``;
* every message is msgpack with numpy arrays in the openpi codec's format (lwam.serving.codec; never unpickled);
* a bad request is answered by a text message ``"error: ..."`` naming the key, the expected and the received
  value; the connection stays open and every other client keeps being served;
* ``Authorization: Api-Key <key>`` is checked when the server has a key (HTTP 401 otherwise); ``GET /healthz``
  answers 200.

Concurrency: requests are checked on arrival (event loop), queued (at most ``max_queue``; past that the answer
is ``"error: busy: ..."``), and a single batcher takes whatever has queued up, at most ``max_batch`` samples,
into one ``predict_batch`` call on a worker thread, padded to the next warmed-up batch size (powers of two up
to ``max_batch``), so each batch size is compiled once, before the port opens. SIGTERM/SIGINT: stop accepting
connections, answer every request already received, close the connections (1001) and return 0.

Messages longer than ``max_message_bytes`` get an error reply; the websocket layer itself refuses frames
over 4 x that (close code 1009) so that no client can make the server buffer more.
"""
from __future__ import annotations

import asyncio
import hmac
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from typing import Any, Callable

import numpy as np

from lwam._logging import logger
from lwam.errors import LwamError, ObservationError, WireError
from lwam.policy.observation import INSTRUCTION_KEYS, Observation, parse_observation
from lwam.serving.codec import packb, unpackb

__all__ = ["PolicyServer", "batch_sizes_for", "serve_main", "add_serve_parser", "DEFAULT_PORT"]

DEFAULT_PORT = 8000  # openpi's default
DEFAULT_MAX_MESSAGE_BYTES = 16 * 2 ** 20
HARD_LIMIT_FACTOR = 4


def batch_sizes_for(max_batch: int) -> list[int]:
    """Warmed-up batch sizes: 1, 2, 4, ... below ``max_batch``, and ``max_batch``."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch: expected an int >= 1, got {max_batch!r}")
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


@dataclass
class _Request:
    obs: Observation
    future: asyncio.Future
    t_received: float
    t_queued: float = field(default_factory=time.perf_counter)

    @property
    def rows(self) -> int:
        return self.obs.images.shape[0]


class PolicyServer:
    """Serve ``policy`` (lwam.policy.compiled.Policy or lwam.policy.eager.EagerPolicy) over websockets.

    ``port=0`` picks a free port (:attr:`port` holds the bound one once serving). Run with
    ``asyncio.run(server.serve(ready=...))``; ``ready(port)`` is called once the port is open.
    """

    def __init__(self, policy: Any, host: str = "127.0.0.1", port: int = DEFAULT_PORT, api_key: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_batch: int = 8, max_queue: int = 64):
        for name, v, lo in (("port", port, 0), ("max_message_bytes", max_message_bytes, 1024), ("max_queue", max_queue, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        if api_key is not None and not api_key:
            raise ValueError("api_key: expected a non-empty str or None")
        self.policy = policy
        self.host, self.port = host, port
        self.api_key = api_key
        self.max_message_bytes = max_message_bytes
        self.batch_sizes = batch_sizes_for(max_batch)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.cfg = policy.cfg
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lwam-policy")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._inflight = 0
        self.draining = False
        self.stats = {"requests": 0, "errors": 0, "busy": 0, "batches": 0, "batched_rows": 0}

    # --- metadata ------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        import torch

        import lwam

        pol, cfg = self.policy, self.cfg
        options = getattr(pol, "options", None)
        d = cfg.data
        return {
            "observation_spec": pol.observation_spec(),
            "instruction_keys": list(INSTRUCTION_KEYS),
            "chunk_size": int(cfg.chunk_size),
            "action_dim": int(cfg.action_dim),
            "executed_steps": int(pol.executed_steps),
            "instructions": list(pol.instructions),
            "text_encoder": pol.text_encoder is not None,
            "implementation": {
                "policy": f"{type(pol).__module__}.{type(pol).__name__}",
                "preset": cfg.name,
                "device": str(pol.device),
                "dtype": str(getattr(pol, "dtype", "float32")).replace("torch.", ""),
                "inference_options": asdict(options) if options is not None else None,
                "cameras": list(d.cameras), "camera_layout": d.camera_layout, "rotate_180": bool(d.rotate_180),
                "image_height": int(d.image_height), "image_width": int(d.image_width),
                "normalized_actions": getattr(pol, "normalizer", None) is None,
                "max_batch": self.max_batch, "batch_sizes": list(self.batch_sizes), "max_queue": self.max_queue,
                "max_message_bytes": self.max_message_bytes,
                "lwam_version": lwam.__version__, "torch_version": torch.__version__,
            },
        }

    # --- lifecycle -------------------------------------------------------------------------------
    def warmup(self) -> float:
        """Compile/capture every batch size (runs on the policy's worker thread). Returns seconds."""
        t0 = time.perf_counter()
        for b in self.batch_sizes:
            self.policy.warmup(b)
        return time.perf_counter() - t0

    def request_shutdown(self) -> None:
        """Drain and stop (thread-safe; what SIGTERM does)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def serve(self, ready: Callable[[int], None] | None = None, handle_signals: bool = True) -> int:
        from websockets.asyncio.server import serve

        loop = self._loop = asyncio.get_running_loop()
        self._stop, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.set()
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=self.max_queue)
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
        try:
            secs = await loop.run_in_executor(self._executor, self.warmup)
            logger.info(f"serve: warmed up batch sizes {self.batch_sizes} in {secs:.1f} s")
            if self._stop.is_set():
                return 0
            batcher = asyncio.create_task(self._batcher())
            async with serve(self._handler, self.host, self.port, compression=None,
                             max_size=HARD_LIMIT_FACTOR * self.max_message_bytes,
                             process_request=self._process_request) as server:
                self.port = server.sockets[0].getsockname()[1]
                if ready is not None:
                    ready(self.port)
                await self._stop.wait()
                self.draining = True
                server.close(close_connections=False)  # no new connections; answer what was received
                await self._idle.wait()
                for conn in list(server.connections):
                    await conn.close(1001, "server shutting down")
                await server.wait_closed()
            await self._queue.put(None)
            await batcher
            return 0
        finally:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            self._executor.shutdown(wait=True)

    # --- connections -----------------------------------------------------------------------------
    def _process_request(self, connection, request):
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
        if self.api_key is not None:
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Api-Key {self.api_key}".encode()):
                return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong 'Authorization: Api-Key ...'\n")
        return None

    async def _handler(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            await ws.send(packb(self.metadata()))
            async for message in ws:
                t = time.perf_counter()
                self._inflight += 1
                self._idle.clear()
                try:
                    reply = await self._answer(message, t)
                    await ws.send(reply)
                finally:
                    self._inflight -= 1
                    if self._inflight == 0:
                        self._idle.set()
        except ConnectionClosed:
            pass

    def _error(self, text: str) -> str:
        self.stats["errors"] += 1
        return f"error: {text}"

    async def _answer(self, message: Any, t_received: float) -> bytes | str:
        self.stats["requests"] += 1
        if self.draining:
            return self._error("server is shutting down")
        if isinstance(message, str):
            return self._error("expected a binary msgpack message (an observation dict), got a text frame")
        if len(message) > self.max_message_bytes:
            return self._error(f"message: {len(message)} bytes exceeds the server's limit of "
                               f"{self.max_message_bytes} bytes (--max-message-bytes)")
        try:
            obs = parse_observation(unpackb(message), self.cfg.data, self.cfg.proprio_dim)
        except (WireError, ObservationError) as e:
            return self._error(str(e))
        unknown = [s for s in dict.fromkeys(obs.instructions) if not self.policy.can_answer(s)]
        if unknown:
            return self._error(f"prompt/task: unknown instruction {unknown[0]!r}: no cached text context and no "
                               f"text encoder; this server answers {self.policy.instructions}")
        if obs.images.shape[0] > self.max_batch:
            return self._error(f"observation.state: a batch of {obs.images.shape[0]} exceeds the server's "
                               f"--max-batch {self.max_batch}")
        req = _Request(obs, self._loop.create_future(), t_received)
        try:
            self._queue.put_nowait(req)
        except asyncio.QueueFull:
            self.stats["busy"] += 1
            return self._error(f"busy: {self.max_queue} requests already queued (--max-queue {self.max_queue}); "
                               f"retry later")
        try:
            actions, timing = await req.future
        except LwamError as e:  # an anticipated refusal (lwam.errors): its message is for the client
            logger.warning(f"serve: request refused ({type(e).__name__}: {e})")
            return self._error(str(e))
        except Exception as e:  # an inference failure answers this batch's requests, the server goes on
            logger.warning(f"serve: inference failed ({type(e).__name__}: {e})")
            return self._error(f"inference failed ({type(e).__name__}: {e})")
        timing["total_ms"] = (time.perf_counter() - t_received) * 1e3
        return packb({"actions": actions if obs.batched else actions[0], "server_timing": timing})

    # --- batching ------------------------------------------------------------------------------
    async def _batcher(self) -> None:
        from collections import deque

        pending: deque = deque()  # taken from the queue but left for the next batch (FIFO, first)
        stopping = False
        while True:
            if not pending:
                if stopping:
                    return
                first = await self._queue.get()
                if first is None:
                    return
                pending.append(first)
            rows = sum(r.rows for r in pending)
            while rows < self.max_batch and not stopping and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:  # shutdown sentinel: answer everything taken, then stop
                    stopping = True
                    break
                pending.append(nxt)
                rows += nxt.rows
            batch, rows = self._take(pending)
            t0 = time.perf_counter()
            try:
                out = await self._loop.run_in_executor(self._executor, self._infer, batch)
            except Exception as e:
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
                continue
            infer_ms = (time.perf_counter() - t0) * 1e3
            self.stats["batches"] += 1
            self.stats["batched_rows"] += rows
            i = 0
            for r in batch:
                timing = {"infer_ms": infer_ms, "queue_ms": (t0 - r.t_queued) * 1e3, "batch_size": rows}
                if not r.future.done():
                    r.future.set_result((out[i:i + r.rows], timing))
                i += r.rows

    def _take(self, pending) -> tuple[list[_Request], int]:
        """The longest prefix of ``pending`` (FIFO) that fits ``max_batch`` and fills a warmed-up batch size
        exactly, so that no compute goes to padding (the rest waits for the next batch); the longest prefix
        that fits, padded, when no prefix fills one exactly."""
        best_exact, fit, rows = 0, 0, 0
        for i, r in enumerate(pending):
            if rows + r.rows > self.max_batch:
                break
            rows += r.rows
            fit = i + 1
            if rows in self.batch_sizes:
                best_exact = i + 1
        n = best_exact or fit
        batch = [pending.popleft() for _ in range(n)]
        return batch, sum(r.rows for r in batch)

    def _infer(self, batch: list[_Request]) -> np.ndarray:
        """Worker thread: one predict_batch over the batch's rows, padded to a warmed-up size."""
        images = np.concatenate([r.obs.images for r in batch])
        proprio = np.concatenate([r.obs.proprio for r in batch])
        instructions = [s for r in batch for s in r.obs.instructions]
        n = images.shape[0]
        size = next(b for b in self.batch_sizes if b >= n)
        if size > n:  # repeat the last row; its outputs are dropped
            pad = size - n
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
            proprio = np.concatenate([proprio, np.repeat(proprio[-1:], pad, axis=0)])
            instructions += [instructions[-1]] * pad
        out = np.asarray(self.policy.predict_batch(images, instructions, proprio), dtype=np.float32)
        return out[:n]


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def serve_main(args) -> int:
    """``lwam serve`` (argparse namespace of lwam.cli)."""
    from ipaddress import ip_address

    import torch

    from lwam.policy.loading import load_policy

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = batch_sizes_for(args.max_batch)
    api_key = args.api_key or os.environ.get("LWAM_API_KEY") or None
    try:
        loopback = ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and api_key is None:
        logger.warning(f"serve: binding {args.host} (not loopback) without an API key: anyone who can reach "
                       f"this port can query the policy")
    # SIGTERM while loading/compiling (before the event loop owns the signal): finish loading, exit 0.
    early: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: early.append(signum))
    try:
        if args.exported:
            if args.eager or args.text_cache or args.no_compile:
                raise ValueError("--exported: the file is compiled and holds its instructions; --eager, "
                                 "--text-cache and --no-compile do not apply")
            from lwam.policy.exported import load_exported
            policy = load_exported(args.exported)
        else:
            policy = load_policy(args.checkpoint, device=device, eager=args.eager, compiled=not args.no_compile,
                                 text_cache=args.text_cache, batch_sizes=sizes)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if early:
        print("lwam serve: SIGTERM during start-up; exiting before opening the port", flush=True)
        return 0
    if args.executed_steps:
        policy.executed_steps = args.executed_steps
    server = PolicyServer(policy, host=args.host, port=args.port, api_key=api_key,
                          max_message_bytes=args.max_message_bytes, max_batch=args.max_batch, max_queue=args.max_queue)

    def ready(port: int) -> None:
        print(f"lwam serve: listening on ws://{args.host}:{port} ({policy!r}, batch sizes {sizes})", flush=True)

    rc = asyncio.run(server.serve(ready=ready))
    print(f"lwam serve: stopped after {server.stats['requests']} requests ({server.stats['errors']} errors, "
          f"{server.stats['batches']} batches)", flush=True)
    return rc


def add_serve_parser(sub, **parser_kwargs) -> None:
    # the CLI's argument types: bad numbers and paths are refused before loading anything
    from lwam._argtypes import existing_file, nonneg_int, positive_int

    sv = sub.add_parser("serve", help="serve a checkpoint over websockets (openpi protocol, msgpack-numpy)",
                        **parser_kwargs)
    src = sv.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory (or a published .pt)")
    src.add_argument("--exported", type=existing_file, help="a .pt2 file written by `lwam export` (no compilation)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sv.add_argument("--port", type=nonneg_int, default=DEFAULT_PORT, help="0 picks a free port (printed)")
    sv.add_argument("--api-key", help="require 'Authorization: Api-Key KEY' (default: $LWAM_API_KEY, else none)")
    sv.add_argument("--max-message-bytes", type=positive_int, default=DEFAULT_MAX_MESSAGE_BYTES,
                    help="largest observation message accepted")
    sv.add_argument("--max-batch", type=positive_int, default=8, help="samples per policy call (requests batched together)")
    sv.add_argument("--max-queue", type=positive_int, default=64, help="queued requests before answering 'busy'")
    sv.add_argument("--executed-steps", type=positive_int, help="advertised executed steps (default: the checkpoint's)")
    sv.add_argument("--text-cache", type=existing_file, help="text contexts of extra instructions (safetensors or .pt)")
    sv.add_argument("--device", help="default cuda if available, else cpu")
    sv.add_argument("--threads", type=positive_int, help="torch intra-op threads (on a shared CPU, 1 is often fastest)")
    sv.add_argument("--no-compile", action="store_true", help="the transformed Policy without torch.compile")
    sv.add_argument("--eager", action="store_true", help="serve the plain eager model (debugging)")
    sv.set_defaults(func=serve_main)
