"""The resident daemon: an asyncio Unix-socket (or loopback TCP) server in front of one model worker thread.

Threads: the asyncio loop owns every socket and all connection state; the worker thread
owns the engine (which is not thread-safe). They meet in the Scheduler (a lock and a
condition variable) and through loop.call_soon_threadsafe for replies. The worker never
waits on a client, so a slow or vanished client cannot stall anyone else. The model in
service and the config in force belong to the worker, in `host.ModelHost`; this module
listens, checks each request at the door and dispatches it through the handler table.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import json
import logging
import os
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

from dgemma.daemon import protocol as proto
from dgemma.daemon.config import (Config, ConfigWatcher, config_path, ensure_private_dir, lock_fd, runtime_dir, socket_path,
                     tcp_info_path, transport)
from dgemma.daemon.codec import engine_kwargs, request_controls, run_request
from dgemma.engine.api import Draft
from dgemma.daemon.connection import Connection
from dgemma.daemon.remote import Remote
from dgemma.daemon.host import EngineFactory, ModelHost, default_engine_factory, failure_error
from dgemma.errors import DgemmaError
from dgemma.engine.loading import BUNDLED_MODEL_DIR
from dgemma.daemon.scheduler import STOP_REPLIES, Job, Scheduler

log = logging.getLogger("dgemma.daemon")

from dgemma import __version__ as VERSION

SERVER_NAME = f"dgemma/{VERSION}"


# ---- the server -------------------------------------------------------------------------

def _canon_model(spec: str | None) -> str:
    if spec is None:
        spec = str(BUNDLED_MODEL_DIR)
    expanded = os.path.expanduser(spec)
    return os.path.realpath(expanded) if os.path.exists(expanded) else spec


class Server:
    def __init__(self, config: Config, *, model: str | None = None, device: str | None = None,
                 socket: Path | None = None, config_file: Path | None = None,
                 engine_factory: EngineFactory | None = None,
                 progress: bool = False, config_error: str | None = None) -> None:
        """`config` is the config in force; `config_error` says why the file could not be
        used at start-up (status shows it until the file is fixed)."""
        self.socket = socket or socket_path()
        self.config_file = config_file or config_path()
        self.scheduler = Scheduler()
        # progress: the loader's own bars (tensors loaded, experts quantized) on the terminal.
        self.host = ModelHost(config, self.scheduler,
                              engine_factory or functools.partial(default_engine_factory, progress=progress),
                              cli_model=model, cli_device=device)
        self.watcher = ConfigWatcher(self.config_file, config, self.host.config_changed)
        self.watcher.error = config_error
        # The dispatch table: a handler answers with a result, or None when it replies later
        # (fill and edit from the worker, reload once the config is in force). `hello` comes first,
        # before the table is open to a connection.
        self.handlers: dict[str, Callable[[Connection, Any, dict[str, Any]], dict[str, Any] | None]] = {
            "ping": self._m_ping, "status": self._m_status,
            **{method: self._engine_method(method) for method in proto.ENGINE_METHODS},
            "cancel": self._m_cancel, "reload": self._m_reload, "shutdown": self._m_shutdown}
        assert {"hello", *self.handlers} == set(proto.METHODS), "the protocol's methods and the handlers differ"
        self.started = time.time()
        self.served = 0
        self.served_by_method: collections.Counter[str] = collections.Counter()
        self.connections: dict[int, Connection] = {}
        self._next_cid = 0
        self._strangers = 0  # connections whose hello has not succeeded yet
        self._refused = 0  # connections refused because too many strangers waited
        self._refused_logged = -1e9
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stopped: asyncio.Event | None = None
        self._worker: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.transport = transport()
        # TCP only: the secret every connection must present in `hello`, and the port.
        self.token: str | None = None
        self.port: int | None = None

    def _worker_main(self) -> None:
        self.host.load(self.host.config)
        while True:
            item = self.scheduler.take()
            if item is None:
                return
            if not isinstance(item, Job):
                try:
                    item()
                except Exception:  # the worker must survive whatever a control step does
                    log.error("control step failed", exc_info=True)
                continue
            try:
                self._run_job(item)
            finally:
                self.scheduler.done(item)

    def _run_job(self, job: Job) -> None:
        reply: dict[str, Any] | None
        try:
            if job.flag.is_set():
                raise DgemmaError("cancelled", "cancelled")
            if job.deadline is not None and time.monotonic() > job.deadline:
                raise DgemmaError("deadline", "the deadline passed while the request was queued")
            if self.host.engine is None:
                raise self.host.load_error or DgemmaError("model_missing", "no model loaded")
            reply = proto.result(job.id, self._execute(job))
        except DgemmaError as exc:
            reply = self._error_reply(job, exc)
        except Exception as exc:  # deliberate: the worker survives any engine failure and says what it was
            reply = self._exception_reply(job, exc)
        if reply is not None:
            self._call_soon(self._finish, job, reply)
        else:
            self._call_soon(self._forget, job)

    def _execute(self, job: Job) -> dict[str, Any]:
        engine = self.host.engine
        loop = self._loop
        assert loop is not None
        conn, rid = job.conn, job.id

        def send_draft(d: Draft) -> None:
            # Worker thread: hand the draft to the loop, never touch the socket here.
            loop.call_soon_threadsafe(conn.send_draft, rid, proto.draft(rid, d.text, int(d.step), int(d.canvas)))
        on_step = send_draft if job.stream else None
        settings = {**self.host.config.sampler, **job.settings}
        t0 = time.monotonic()
        if isinstance(engine, Remote):
            payload = self._forward(engine, job, settings, t0)
        else:
            payload = run_request(engine, job.method, job.kwargs, settings, on_step=on_step, cancel=job.flag,
                                  deadline=job.deadline)
        payload["queue_ms"] = (t0 - job.received) * 1000 + float(payload.get("queue_ms", 0.0))
        return payload

    def _forward(self, remote: Remote, job: Job, settings: dict[str, Any], t0: float) -> dict[str, Any]:
        """Remote mode: the request goes to the team server, its drafts come back to the client as
        they arrive, and the answer is already cleaned there (the replica runs `run_request` too);
        its `queue_ms` is the replica's wait."""
        loop = self._loop
        assert loop is not None

        def relay(frame: dict[str, Any]) -> None:
            d = frame["draft"]
            loop.call_soon_threadsafe(job.conn.send_draft, job.id,
                                      proto.draft(job.id, str(d["text"]), int(d["step"]), int(d["canvas"])))
        params = {k: v for k, v in job.kwargs.items() if v is not None}
        if settings:
            params["settings"] = settings
        if job.deadline is not None:
            params["deadline_ms"] = max(0.0, (job.deadline - t0) * 1000)
        return remote.forward(job.method, params, document=job.document, on_draft=relay if job.stream else None,
                              cancel=job.flag, deadline=job.deadline)

    def _error_reply(self, job: Job, exc: DgemmaError) -> dict[str, Any] | None:
        if exc.code not in ("cancelled", "deadline"):
            log.warning("client %d: %s %r failed: %s: %.300s", job.conn.cid, job.method, job.id, exc.code, exc.message)
        if exc.code in ("cancelled", "deadline") and job.flag.is_set():
            return _stopped(job, job.flag.reason)
        return proto.error(job.id, exc.code, exc.message)

    def _exception_reply(self, job: Job, exc: Exception) -> dict[str, Any]:
        err = failure_error(self.host.engine, exc)
        if err.code == "out_of_memory":
            log.error("out of memory on request %r of client %d", job.id, job.conn.cid)
        else:
            log.error("internal error on request %r of client %d", job.id, job.conn.cid, exc_info=exc)
        return proto.error(job.id, err.code, err.message)

    # -- loop side -------------------------------------------------------------------------

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:
                pass  # loop closed while shutting down

    def _finish(self, job: Job, reply: dict[str, Any]) -> None:
        if job.conn.jobs.get(job.id) is job:
            del job.conn.jobs[job.id]
        if log.isEnabledFor(logging.DEBUG):
            outcome = reply["error"]["code"] if reply.get("type") == "error" else "ok"
            log.debug("client %d %s %r: %s after %.0f ms", job.conn.cid, job.method, job.id, outcome,
                      (time.monotonic() - job.received) * 1000)
        self.served += 1
        self.served_by_method[job.method] += 1
        job.conn.send(reply)

    def _forget(self, job: Job) -> None:
        if job.conn.jobs.get(job.id) is job:
            del job.conn.jobs[job.id]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._next_cid += 1
        limits = self.host.config.limits
        conn = Connection(self._next_cid, reader, writer, limits.max_queued_drafts)
        self.connections[conn.cid] = conn
        loop = asyncio.get_running_loop()
        writer_task = loop.create_task(conn.write_loop())
        conn.send(proto.hello(SERVER_NAME, os.getpid(), limits.max_frame_bytes))
        authorized = self.transport != "tcp"  # TCP: nothing but a `hello` with the token until then
        # Until its hello succeeds a connection is a stranger (over TCP, anyone on the machine):
        # small frames only, a short deadline, and only so many strangers at once.
        self._strangers += 1
        stranger = True
        hello_by = loop.time() + proto.PREAUTH_TIMEOUT_S
        try:
            if self._strangers > proto.MAX_PREAUTH_CONNECTIONS:
                self._note_refused(conn)
                conn.send(proto.error(None, "too_large", f"more than {proto.MAX_PREAUTH_CONNECTIONS} connections are "
                                                         "waiting for their hello; try again"))
                await conn.flush(0.5)
                return
            while not conn.closed:
                if stranger and conn.greeted and authorized:
                    stranger = False
                    self._strangers -= 1
                try:
                    if stranger:
                        msg = await asyncio.wait_for(proto.read_frame(reader, proto.PREAUTH_MAX_FRAME),
                                                     max(0.0, hello_by - loop.time()))
                    else:
                        msg = await proto.read_frame(reader, self.host.config.limits.max_frame_bytes)
                except proto.ConnectionClosed:
                    break
                except asyncio.TimeoutError:
                    log.warning("client %d: no successful hello within %.0f s; closing", conn.cid,
                                proto.PREAUTH_TIMEOUT_S)
                    conn.send(proto.error(None, "invalid_request", f"no successful `hello` within "
                                                                   f"{proto.PREAUTH_TIMEOUT_S:.0f} s; closing"))
                    await conn.flush(0.5)
                    break
                except proto.FrameTooLarge as exc:
                    # The body was not read, so the stream is out of step: say why, then close.
                    log.warning("client %d: %s", conn.cid, exc.message)
                    conn.send(proto.error(None, exc.code, exc.message))
                    await conn.flush()
                    break
                except DgemmaError as exc:
                    log.warning("client %d: %s", conn.cid, exc.message)
                    if not authorized:
                        await self._refuse(conn, None)
                        break
                    conn.send(proto.error(None, exc.code, exc.message))
                    continue
                if not authorized:
                    if not self._token_ok(msg):
                        await self._refuse(conn, proto.reply_id(msg))
                        break
                    authorized = True
                self._dispatch(conn, msg)
        except (ConnectionError, OSError):
            pass
        finally:
            if stranger:
                self._strangers -= 1
            self._disconnect(conn)
            writer_task.cancel()
            try:
                await writer_task
            except asyncio.CancelledError:
                pass
            except Exception:  # a bug in the writer (it handles a lost socket itself): say so, close anyway
                log.error("client %d: the connection's writer failed", conn.cid, exc_info=True)
            try:
                writer.close()
            except (OSError, RuntimeError):  # already reset, or the loop is closing
                pass

    def _token_ok(self, msg: dict[str, Any]) -> bool:
        """A `hello` whose params carry this daemon's token (compared in constant time)."""
        params = msg.get("params")
        token = params.get("token") if isinstance(params, dict) else None
        return (msg.get("method") == "hello" and isinstance(token, str) and self.token is not None
                and hmac.compare_digest(token.encode("utf-8", "replace"), self.token.encode("ascii")))

    def _note_refused(self, conn: Connection) -> None:
        """Log a connection refused for want of room, at most once a minute (with the count since)."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= 60:
            log.warning("client %d: refused, %d connections already wait for their hello (%d refused so far)",
                        conn.cid, proto.MAX_PREAUTH_CONNECTIONS, self._refused)
            self._refused_logged = now

    async def _refuse(self, conn: Connection, rid: Any) -> None:
        log.warning("client %d: refused, no valid token in its first request", conn.cid)
        conn.send(proto.error(rid, "unauthorized", "present the token from daemon.tcp.json in `hello` first"))
        await conn.flush()

    def _disconnect(self, conn: Connection) -> None:
        if conn.jobs:
            log.info("client %d disconnected with %d request(s) in flight; dropping them", conn.cid, len(conn.jobs))
        conn.closed = True
        self.connections.pop(conn.cid, None)
        self.scheduler.remove(lambda j: j.conn is conn)
        self.scheduler.forget(conn.cid)
        for job in list(conn.jobs.values()):
            job.flag.set("disconnected")
        conn.jobs.clear()
        if conn.dropped_drafts:
            log.info("client %d: %d drafts dropped (slow reader)", conn.cid, conn.dropped_drafts)

    def _dispatch(self, conn: Connection, msg: dict[str, Any]) -> None:
        rid = proto.reply_id(msg)
        try:
            rid, method, params = proto.check_request(msg)
            if method == "hello":
                conn.send(proto.result(rid, self._hello(conn, params)))
                return
            if not conn.greeted:
                raise DgemmaError("invalid_request", "handshake first: send a `hello` request with your protocol version")
            value = self.handlers[method](conn, rid, params)
            if value is not None:
                self.served += 1
                self.served_by_method[method] += 1
                conn.send(proto.result(rid, value))
        except DgemmaError as exc:
            method = msg.get("method")
            # rid is valid (bounded) or None; SafeFormatter escapes whatever a client put in these.
            log.warning("client %d: %.64s %r rejected: %s: %.300s", conn.cid, method if isinstance(method, str) else "?",
                        rid, exc.code, exc.message)
            conn.send(proto.error(rid, exc.code, exc.message))
        except Exception as exc:  # a bug in a handler must not take the daemon down
            log.error("internal error handling %.64r of client %d", msg.get("method"), conn.cid, exc_info=True)
            conn.send(proto.error(rid, "internal", f"internal error: {type(exc).__name__}: {exc}"))

    def _hello(self, conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
        version = proto.param(params, "protocol", int)
        if version not in proto.SUPPORTED_VERSIONS:
            raise DgemmaError("invalid_request", f"protocol version {version} is not supported; this daemon speaks "
                                                 f"{', '.join(map(str, proto.SUPPORTED_VERSIONS))} (upgrade the older side)")
        conn.greeted = True
        return {"protocol": version, "server": SERVER_NAME, "pid": os.getpid(), "model": self.host.model_name,
                "state": self.host.state, "max_frame": self.host.config.limits.max_frame_bytes}

    def _m_ping(self, conn: Connection, rid: Any, params: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "time": time.time()}

    def _m_status(self, conn: Connection, rid: Any, params: dict[str, Any]) -> dict[str, Any] | None:
        info = self._status()
        remote = self.host.engine
        if not isinstance(remote, Remote):
            return info

        async def with_remote() -> None:
            # The team server's own view (its replicas), fetched off the loop; down is said, not raised.
            try:
                info["remote"] = {"url": remote.url, **await asyncio.to_thread(remote.status)}
            except DgemmaError as exc:
                info["remote"] = {"url": remote.url, "error": exc.message}
            conn.send(proto.result(rid, info))
        task = asyncio.get_running_loop().create_task(with_remote())
        self._background.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._background.discard)
        return None

    def _status(self) -> dict[str, Any]:
        running = self.scheduler.running
        return {
            "pid": os.getpid(), "server": SERVER_NAME, "protocol": proto.PROTOCOL_VERSION,
            "socket": f"tcp://127.0.0.1:{self.port}" if self.port is not None else str(self.socket),
            "transport": self.transport, "state": self.host.state,
            "model": self.host.model_name, "model_spec": self.host.model_spec, "device": self.host.device_name,
            "loading": self.host.loading, "load_error": self.host.load_error.message if self.host.load_error else None,
            "vram": _vram(), "queue_depth": self.scheduler.depth(),
            "running": None if running is None else {"method": running.method, "client": running.conn.cid},
            "clients": len(self.connections), "requests_served": self.served,
            "served_by_method": dict(self.served_by_method),
            "uptime_s": time.time() - self.started,
            "config_path": str(self.config_file), "config_error": self.watcher.error or self.host.apply_error,
        }

    def _engine_method(self, method: str) -> Callable[[Connection, Any, dict[str, Any]], None]:
        """The handler of a request the worker answers: it is queued as a job."""
        return lambda conn, rid, params: self._submit(conn, rid, method, params)

    def _submit(self, conn: Connection, rid: Any, method: str, params: dict[str, Any]) -> None:
        limits = self.host.config.limits
        if rid in conn.jobs:
            raise DgemmaError("invalid_request", f"request id {rid!r} is already in use on this connection")
        if len(conn.jobs) >= limits.max_pending_per_client:
            raise DgemmaError("too_large", f"too many requests in flight on this connection "
                                           f"(limit {limits.max_pending_per_client})")
        kwargs = engine_kwargs(method, params, limits)
        wanted = proto.param(params, "model", str, None)
        if wanted is not None and _canon_model(wanted) != _canon_model(self.host.model_spec):
            raise DgemmaError("invalid_params", f"this daemon serves {self.host.model_spec or 'the bundled model'}, not "
                                                f"{proto.clip(wanted, 200)}; run `dgemma stop` first, or use --no-daemon")
        controls = request_controls(params)
        job = Job(conn, rid, method, kwargs, controls.settings,
                  document=proto.param(params, "document", str, None),
                  stream=controls.stream, deadline=controls.deadline)
        conn.jobs[rid] = job
        for old in self.scheduler.put(job):
            self._finish(old, _stopped(old, "superseded"))

    def _m_cancel(self, conn: Connection, rid: Any, params: dict[str, Any]) -> dict[str, Any]:
        target = params.get("id")
        if not isinstance(target, (int, str)) or isinstance(target, bool):
            raise DgemmaError("invalid_params", "cancel needs `id`, the id of the request to cancel")
        job = conn.jobs.get(target)
        if job is None:
            return {"cancelled": False}
        if self.scheduler.remove(lambda j: j is job):
            job.flag.set("cancelled")
            self._finish(job, _stopped(job, "cancelled"))
        else:
            job.flag.set("cancelled")  # running: the worker replies after the current step
        return {"cancelled": True}

    def _m_reload(self, conn: Connection, rid: Any, params: dict[str, Any]) -> None:
        """Re-read the config now (the watcher does it on its own too) and put it in force,
        reloading the model when its settings changed or `reload_model` is true. The reply
        waits for the worker, so it describes the model actually in force (a running request
        finishes first)."""
        force = proto.param(params, "reload_model", bool, False)
        try:
            new, _ = self.watcher.reload(notify=False)  # applied once, below
        except DgemmaError as exc:
            raise DgemmaError(exc.code, f"config not reloaded, the previous one stays: {exc.message}") from None
        loads = self.host.loads

        def reply() -> None:
            error = self.host.apply_error or (self.host.load_error.message if self.host.load_error else None)
            self._call_soon(conn.send, proto.result(rid, {
                "reloaded": self.host.config == new, "model_reloaded": self.host.loads > loads, "model": self.host.model_name,
                "model_spec": self.host.model_spec, "state": self.host.state, "error": error}))

        # A load the watcher queued for this same file ran before this step and counts:
        # `reload_model` never loads the model twice.
        self.host.config_step(lambda: self.host.switch_config(new, force_model=force and self.host.loads == loads, then=reply))

    def _m_shutdown(self, conn: Connection, rid: Any, params: dict[str, Any]) -> dict[str, Any]:
        assert self._loop is not None
        self._loop.call_soon(lambda: self._loop.create_task(self.stop()))  # type: ignore[union-attr]
        return {"ok": True, "pid": os.getpid()}

    # -- lifecycle ------------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        folder = ensure_private_dir(self.socket.parent)
        lock = folder / "daemon.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            lock_fd(fd, blocking=False)
        except BlockingIOError:
            os.close(fd)
            pid = _read_pid(folder)
            raise DgemmaError("invalid_request", f"a daemon is already running (pid {pid or '?'}, socket {self.socket})") from None
        self._lock_fd = fd

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._acquire_lock()
        if self.transport == "tcp":
            await self._listen_tcp()
        else:
            await self._listen_unix()
        (self.socket.parent / "daemon.pid").write_text(json.dumps({"pid": os.getpid(), "socket": str(self.socket)}))
        self._worker = threading.Thread(target=self._worker_main, name="dgemma-model", daemon=True)
        self._worker.start()
        self.watcher.start()
        log.info("listening on %s (pid %d)", f"127.0.0.1:{self.port}" if self.port else self.socket, os.getpid())

    async def _listen_unix(self) -> None:
        # We hold the lock, so a socket file left here belongs to a dead daemon.
        try:
            self.socket.unlink()
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.socket),
                                                           limit=64 * 1024)
        finally:
            os.umask(old_umask)
        os.chmod(self.socket, 0o600)

    async def _listen_tcp(self) -> None:
        """Loopback only, ephemeral port; the port and a fresh token go into a 0600 file in
        the private runtime dir, so only this user's processes can learn the token."""
        self.token = secrets.token_hex(32)  # before accepting: no connection ever sees it unset
        self._server = await asyncio.start_server(self._handle, host="127.0.0.1", port=0, limit=64 * 1024)
        self.port = int(self._server.sockets[0].getsockname()[1])
        info = tcp_info_path(self.socket.parent)
        tmp = info.with_name(f"{info.name}.{os.getpid()}.tmp")
        try:
            tmp.unlink()  # a leftover of a dead daemon with our pid; we hold the lock
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"port": self.port, "token": self.token, "pid": os.getpid()}, f)
        os.replace(tmp, info)

    async def stop(self) -> None:
        if self._stopped is None or self._stopped.is_set():
            return
        log.info("shutting down")
        if self._server is not None:
            self._server.close()
        running = self.scheduler.running
        if running is not None:
            running.flag.set("shutdown")
        for job in self.scheduler.close():
            self._finish(job, _stopped(job, "shutdown"))
        await self.watcher.stop()
        if self._worker is not None:
            # The worker notices the flag after at most one denoising step.
            await asyncio.get_running_loop().run_in_executor(None, self._worker.join, 30)
        await asyncio.sleep(0)  # let the worker's last call_soon_threadsafe replies run
        for conn in list(self.connections.values()):
            await conn.flush(0.5)
            conn.abort()
        owned = [tcp_info_path(self.socket.parent)] if self.transport == "tcp" else [self.socket]
        for path in (*owned, self.socket.parent / "daemon.pid"):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._stopped.set()

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, lambda: loop.create_task(self.stop()))
            except (NotImplementedError, RuntimeError):
                pass
        assert self._stopped is not None
        await self._stopped.wait()


# ---- helpers ----------------------------------------------------------------------------

def _stopped(job: Job, reason: str) -> dict[str, Any] | None:
    """The reply to a request stopped early for `reason` (scheduler.STOP_REPLIES); None: nobody to tell."""
    reply = STOP_REPLIES[reason]
    return None if reply is None else proto.error(job.id, *reply)


def _vram() -> dict[str, int] | None:
    try:
        import sys
        torch = sys.modules.get("torch")  # never import torch just for status
        if torch is None or not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        return {"allocated": int(torch.cuda.memory_allocated()), "peak": int(torch.cuda.max_memory_allocated()),
                "reserved": int(torch.cuda.memory_reserved()), "free": int(free), "total": int(total)}
    except RuntimeError:  # a CUDA error: status still answers, without memory figures
        return None


def _read_pid(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "daemon.pid").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):  # gone, or not the file a daemon writes
        return None


def run(config: Config, *, model: str | None = None, device: str | None = None,
        socket: Path | None = None, progress: bool = False) -> None:
    """Serve until `shutdown`, SIGTERM or SIGINT."""
    server = Server(config, model=model, device=device, socket=socket, progress=progress)
    asyncio.run(server.serve_forever())


__all__ = ["Server", "run", "runtime_dir"]
