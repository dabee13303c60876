"""The Ray Serve application: each replica holds one engine and answers docs/protocol.md's fill,
edit and next_edit over HTTP (the wire of `dgemma.daemon.remote`).

Ray Serve does the serving: its HTTP proxy takes the requests, its consistent-hash request router
sends every request of a document (the session header the clients set) to the same healthy
replica, so that replica's prefix cache hits, and the controller restarts a replica that dies.
A replica checks the bearer token before reading the body: a request without it gets 401 and
costs no model time. The engine is not thread-safe, so one thread per replica runs requests in
turn; a client that disconnects cancels its request after the current denoising step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from dgemma.daemon import protocol as proto
from dgemma.daemon.protocol import ENGINE_METHODS
from dgemma.daemon.codec import Controls, engine_kwargs, request_controls, run_request
from dgemma.daemon.config import Config
from dgemma.daemon.host import default_engine_factory, failure_error
from dgemma.daemon.remote import CONTENT_TYPE, STATUS_PATH, method_path, token_digest
from dgemma.daemon.scheduler import CancelFlag
from dgemma.engine.api import Draft
from dgemma.errors import DgemmaError

log = logging.getLogger("dgemma.cluster")

APP_NAME = "dgemma"
DEPLOYMENT = "DgemmaReplica"
ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
METHODS = {method_path(m): m for m in ENGINE_METHODS}


def _line(frame: dict[str, Any]) -> bytes:
    return json.dumps(frame, ensure_ascii=False).encode("utf-8") + b"\n"


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(proto.error(None, code, message), status_code=status)


class DgemmaReplica:
    """One engine behind Serve's HTTP proxy; Serve runs one such actor per replica."""

    def __init__(self, config: Config, model: str | None, device: str | None, token_digest: str) -> None:
        if device in (None, "cpu"):
            # A CPU replica computes on the CPUs it reserved, not on every core of a shared machine.
            import torch
            torch.set_num_threads(max(1, int(config.cluster.replica_cpus)))
        self.config = config
        self.token_digest = token_digest.encode("ascii")
        self.engine = default_engine_factory(config, model, device)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dgemma-model")
        self.served = 0
        self.cancelled = 0
        self.waiting = 0

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        return hmac.compare_digest(token_digest(token.strip()).encode("ascii"), self.token_digest)

    async def __call__(self, request: Request) -> Response:
        if not self._authorized(request):
            return _error(401, "unauthorized", "send `Authorization: Bearer <token>` with the token from the "
                                               "token file `dgemma cluster up` created")
        path = request.url.path
        if path == STATUS_PATH and request.method == "GET":
            return JSONResponse(await self.status())
        method = METHODS.get(path)
        if method is None or request.method != "POST":
            return _error(404, "invalid_request", f"no {request.method} {path[:200]}; the API is POST "
                                                  f"{', '.join(METHODS)} and GET {STATUS_PATH}")
        limits = self.config.limits
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_frame_bytes:
                return _error(413, "too_large", f"the request is over {limits.max_frame_bytes} bytes "
                                                "(limits.max_frame_bytes)")
        try:
            params = json.loads(body)
            if not isinstance(params, dict):
                raise DgemmaError("invalid_request", "the body must be a JSON object of the request's params")
            kwargs = engine_kwargs(method, params, limits, read_files=False)
            controls = request_controls(params)
        except ValueError as exc:
            return _error(400, "invalid_request", f"the body is not JSON: {exc}")
        except DgemmaError as exc:
            return _error(400, exc.code, exc.message)
        return StreamingResponse(self._frames(method, kwargs, controls), media_type=CONTENT_TYPE)

    async def _frames(self, method: str, kwargs: dict[str, Any], controls: Controls) -> AsyncIterator[bytes]:
        """The request's frames as JSON lines: its drafts while it runs, then its result or error."""
        loop = asyncio.get_running_loop()
        frames: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        flag = CancelFlag()
        received = time.monotonic()

        def on_step(d: Draft) -> None:  # the model thread: hand the draft to the loop
            loop.call_soon_threadsafe(frames.put_nowait, proto.draft(None, d.text, d.step, d.canvas))

        def run() -> dict[str, Any]:
            if flag.is_set():
                raise DgemmaError("cancelled", "cancelled")
            t0 = time.monotonic()
            payload = run_request(self.engine, method, kwargs, {**self.config.sampler, **controls.settings},
                                  on_step=on_step if controls.stream else None, cancel=flag,
                                  deadline=controls.deadline)
            payload.update(queue_ms=(t0 - received) * 1000, replica=self.replica)
            return payload

        self.waiting += 1
        job = loop.run_in_executor(self.pool, run)
        job.add_done_callback(lambda _: frames.put_nowait(None))
        try:
            while (frame := await frames.get()) is not None:
                yield _line(frame)
            try:
                yield _line(proto.result(None, job.result()))
                self.served += 1
            except DgemmaError as exc:
                yield _line(proto.error(None, exc.code, exc.message))
            except Exception as exc:  # a bug or out of memory: this request fails, the replica goes on
                err = failure_error(self.engine, exc)
                log.error("%s on a %s request", err.code, method, exc_info=exc if err.code == "internal" else None)
                yield _line(proto.error(None, err.code, err.message))
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away (Serve cancels the request): stop the model after this step.
            flag.set("disconnected")
            self.cancelled += 1
            raise
        finally:
            self.waiting -= 1

    async def status(self) -> dict[str, Any]:
        """This replica and the application's replicas by state (Serve's own view)."""
        replicas: dict[str, int] = {}
        try:
            app = (await asyncio.to_thread(serve.status)).applications.get(APP_NAME)
            if app is not None and DEPLOYMENT in app.deployments:
                replicas = {str(k): int(v) for k, v in app.deployments[DEPLOYMENT].replica_states.items()}
        except Exception as exc:  # the controller is restarting: the replica still answers for itself
            log.warning("cannot read Serve's status: %s", exc)
        cache = self.engine.prefix_cache
        return {"replica": self.replica, "model": self.engine.model_name, "device": str(self.engine.device),
                "pid": os.getpid(), "served": self.served, "cancelled": self.cancelled, "waiting": self.waiting,
                "prefix_cache": {"entries": len(cache), "hits": cache.hits, "misses": cache.misses},
                "replicas": replicas}


def build(config: Config, token_digest: str, *, model: str | None = None, device: str | None = None,
          gpus: int = 0) -> Any:
    """The application for `serve.run`: replicas per `config.cluster`, one GPU each where the
    cluster has `gpus`, CPU replicas where it has none."""
    c = config.cluster
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_cpus": c.replica_cpus, "num_gpus": 1 if gpus else 0},
        "max_ongoing_requests": c.max_ongoing_requests,
        # A document sticks to its replica; when that one is full (max_ongoing_requests) the
        # request goes to the next on the ring rather than waiting.
        "request_router_config": RequestRouterConfig(request_router_class=ROUTER,
                                                     request_router_kwargs={"num_fallback_replicas": 1}),
        "health_check_period_s": 2,
    }
    if c.min_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": c.min_replicas, "max_replicas": c.max_replicas,
                                         "target_ongoing_requests": 2}
    else:
        options["num_replicas"] = c.replicas or max(1, gpus)
    device = device or config.device or ("cuda" if gpus else "cpu")
    return serve.deployment(DgemmaReplica).options(**options).bind(config, model, device, token_digest)
