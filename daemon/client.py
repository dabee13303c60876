"""Clients of the daemon: a blocking one for the command line, an asyncio one for the
language server, and `ensure_daemon`, which starts a daemon when none answers (under a
file lock, so two clients racing never start two daemons).

Async use (the language server)::

    client = await AsyncClient.connect()            # starts the daemon if needed
    rid = client.new_id()
    task = asyncio.create_task(client.request("fill", {"prefix": p, "suffix": s,
                                                       "document": uri}, on_draft=show, id=rid))
    ...
    await client.cancel(rid)                         # or task.cancel(): same effect
"""
from __future__ import annotations

import asyncio
import itertools
import os
import socket as _socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

from dgemma.daemon import protocol as proto
from dgemma.daemon.config import ensure_private_dir, lock_fd, read_tcp_info, socket_path, transport
from dgemma.errors import DgemmaError

DraftCallback = Callable[[dict[str, Any]], Any]
# Starting a daemon returns as soon as its socket answers (it loads the model after
# that: Client.wait_loaded), so this only needs to cover a Python start-up on a busy machine.
START_TIMEOUT = 60.0
# How often a client asks a daemon that is loading its model whether it is done (`status`).
LOAD_POLL_S = 0.1


class DaemonUnavailable(DgemmaError):
    """No daemon answers (client side only: never sent on the wire)."""

    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


def _hello_params(token: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"protocol": proto.PROTOCOL_VERSION, "client": f"dgemma-python/{os.getpid()}"}
    if token is not None:
        params["token"] = token
    return params


def _tcp_endpoint(path: Path) -> tuple[int, str]:
    """(port, token) of the TCP daemon whose files live next to `path`."""
    try:
        return read_tcp_info(path.parent)
    except FileNotFoundError:
        raise DaemonUnavailable(f"no daemon running in {path.parent} (start one with `dgemma serve --detach`)") from None
    except ValueError as exc:
        raise DaemonUnavailable(str(exc)) from None


class ModelLoadFailed(DgemmaError):
    """The daemon answers but has no model: its load failed. It stays up in state `error`, and its
    config watcher may load a fixed model later."""

    def __init__(self, message: str) -> None:
        super().__init__("model_missing", message)


def model_loaded(status: dict[str, Any]) -> bool:
    """Whether a daemon's `status` shows its model ready: False while it loads; ModelLoadFailed,
    with the daemon's reason, when the load failed. The one rule every client waits by
    (`Client.wait_loaded`, `AsyncClient.wait_loaded`, the language server)."""
    state = status.get("state")
    if state == "loading":
        return False
    if state == "error":
        raise ModelLoadFailed(str(status.get("load_error") or "the daemon could not load its model"))
    return True


class RequestTooLarge(DgemmaError):
    """A request over the frame limit the daemon announced: refused here, before it is sent."""

    def __init__(self, message: str) -> None:
        super().__init__("too_large", message)


def _frame(rid: Any, method: str, params: dict[str, Any] | None, greeting: dict[str, Any]) -> bytes:
    """The request as a frame; DgemmaError(too_large) before anything is sent when it is over the
    limit the daemon announced (it would close the connection on it)."""
    data = proto.encode(proto.request(rid, method, params))
    limit = greeting.get("max_frame")
    if isinstance(limit, int) and len(data) - proto.HEADER.size > limit:
        raise RequestTooLarge(f"the {method} request is {len(data) - proto.HEADER.size:,} bytes, over the "
                                       f"daemon's limit of {limit:,} bytes (limits.max_frame_bytes); nothing was sent")
    return data


def _raise_error(msg: dict[str, Any]) -> None:
    err = msg.get("error") or {}
    raise DgemmaError(str(err.get("code", "internal")), str(err.get("message", "unknown error")))


# ---- blocking client ------------------------------------------------------------------

class Client:
    """One connection, one request at a time (the command line needs no more)."""

    def __init__(self, sock: _socket.socket, path: Path, token: str | None = None) -> None:
        self.sock = sock
        self.path = path
        self._ids = itertools.count(1)
        self.greeting = proto.recv_frame(sock)
        if self.greeting.get("type") != "hello":
            raise DaemonUnavailable(f"{path} does not speak the dgemma protocol")
        self.info = self._call("hello", _hello_params(token))

    @classmethod
    def connect(cls, path: Path | None = None, *, autostart: bool = False, model: str | None = None,
                device: str | None = None, timeout: float | None = None) -> "Client":
        path = Path(path) if path else socket_path()
        if autostart:
            ensure_daemon(path, model=model, device=device)
        token: str | None = None
        if transport() == "tcp":
            port, token = _tcp_endpoint(path)
            sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            address: Any = ("127.0.0.1", port)
        else:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            address = str(path)
        try:
            sock.settimeout(5.0)
            sock.connect(address)
            sock.settimeout(timeout)
            return cls(sock, path, token)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise DaemonUnavailable(f"no daemon running at {path} (start one with `dgemma serve --detach`)") from None
        except (OSError, proto.ConnectionClosed) as exc:
            sock.close()
            raise DaemonUnavailable(f"cannot talk to the daemon at {path}: {exc or type(exc).__name__}") from None
        except BaseException:
            sock.close()
            raise

    def _call(self, method: str, params: dict[str, Any] | None, on_draft: DraftCallback | None = None) -> dict[str, Any]:
        rid = next(self._ids)
        data = _frame(rid, method, params, self.greeting)
        try:
            self.sock.sendall(data)
            while True:
                msg = proto.recv_frame(self.sock, 1 << 30)
                if msg.get("id") not in (rid, None):
                    continue
                kind = msg.get("type")
                if kind == "draft":
                    if on_draft is not None:
                        on_draft(msg["draft"])
                elif kind == "result":
                    return msg["result"]
                elif kind == "error":
                    _raise_error(msg)
        except proto.ConnectionClosed:
            raise DaemonUnavailable(f"the daemon at {self.path} closed the connection") from None
        except OSError as exc:
            raise DaemonUnavailable(f"lost the daemon at {self.path}: {exc}") from None

    def request(self, method: str, params: dict[str, Any] | None = None,
                on_draft: DraftCallback | None = None) -> dict[str, Any]:
        """Send one request; returns its result, raises DgemmaError for its error."""
        return self._call(method, params, on_draft)

    def wait_loaded(self, on_loading: Callable[[], None] | None = None) -> dict[str, Any]:
        """Block while the daemon loads its model (`model_loaded`), calling `on_loading` once if it
        is; returns the daemon's status. Raises ModelLoadFailed when the load failed."""
        st = self.request("status")
        if not model_loaded(st) and on_loading is not None:
            on_loading()
        while not model_loaded(st):
            time.sleep(LOAD_POLL_S)
            st = self.request("status")
        return st

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---- asyncio client -------------------------------------------------------------------

class AsyncClient:
    """Many concurrent requests over one connection; replies are matched by id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: Path) -> None:
        self.reader = reader
        self.writer = writer
        self.path = path
        self.info: dict[str, Any] = {}
        self.greeting: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._drafts: dict[Any, DraftCallback] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self._lost: DgemmaError | None = None

    @classmethod
    async def connect(cls, path: Path | str | None = None, *, autostart: bool = True, model: str | None = None,
                      device: str | None = None) -> "AsyncClient":
        """Connect (starting a daemon first when `autostart` and none answers) and do
        the version handshake. Raises DaemonUnavailable."""
        path = Path(path) if path else socket_path()
        if autostart:
            await asyncio.to_thread(ensure_daemon, path, model=model, device=device)
        token: str | None = None
        try:
            if transport() == "tcp":
                port, token = _tcp_endpoint(path)
                reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 30)
            else:
                reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 30)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonUnavailable(f"no daemon running at {path}") from None
        except OSError as exc:
            raise DaemonUnavailable(f"cannot connect to the daemon at {path}: {exc}") from None
        client = cls(reader, writer, path)
        try:
            greeting = await proto.read_frame(reader, 1 << 30)
            if greeting.get("type") != "hello":
                raise DaemonUnavailable(f"{path} does not speak the dgemma protocol")
            client.greeting = greeting
            client._reader_task = asyncio.get_running_loop().create_task(client._read_loop())
            client.info = await client.request("hello", _hello_params(token))
        except proto.ConnectionClosed:
            await client.close()
            raise DaemonUnavailable(f"the daemon at {path} closed the connection") from None
        except BaseException:
            await client.close()
            raise
        return client

    @property
    def closed(self) -> bool:
        return self._lost is not None or self.writer.is_closing()

    def new_id(self) -> int:
        return next(self._ids)

    async def request(self, method: str, params: dict[str, Any] | None = None,
                      on_draft: DraftCallback | None = None, id: Any = None) -> dict[str, Any]:
        """Send a request and wait for its result (raises DgemmaError with the daemon's
        code on an error reply). `on_draft(draft)` gets {text, step, canvas} per
        denoising step; it may be a coroutine function. Cancelling the awaiting task
        sends `cancel` for this id to the daemon."""
        if self._lost is not None:
            raise self._lost
        rid = self.new_id() if id is None else id
        if rid in self._pending:
            raise DgemmaError("invalid_request", f"request id {rid!r} is already in flight")
        data = _frame(rid, method, params, self.greeting)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        if on_draft is not None:
            self._drafts[rid] = on_draft
        try:
            self.writer.write(data)
            await self.writer.drain()
            return await fut
        except asyncio.CancelledError:
            if method in ("fill", "edit") and self._lost is None:
                try:
                    self.writer.write(proto.encode(proto.request(f"cancel:{rid}", "cancel", {"id": rid})))
                except (OSError, RuntimeError):  # the connection is going: nothing runs on it to cancel
                    pass
            raise
        except (ConnectionError, OSError) as exc:
            raise DaemonUnavailable(f"lost the daemon at {self.path}: {exc}") from None
        finally:
            self._pending.pop(rid, None)
            self._drafts.pop(rid, None)

    async def wait_loaded(self, on_loading: Callable[[], Awaitable[None]] | None = None) -> dict[str, Any]:
        """`Client.wait_loaded` for asyncio: `on_loading` is awaited once if the model is loading."""
        st = await self.request("status")
        if not model_loaded(st) and on_loading is not None:
            await on_loading()
        while not model_loaded(st):
            await asyncio.sleep(LOAD_POLL_S)
            st = await self.request("status")
        return st

    async def cancel(self, rid: Any) -> bool:
        """Ask the daemon to stop request `rid` (it then ends with error `cancelled`).
        Returns whether the daemon still knew the request."""
        res = await self.request("cancel", {"id": rid})
        return bool(res.get("cancelled"))

    async def _read_loop(self) -> None:
        try:
            while True:
                msg = await proto.read_frame(self.reader, 1 << 30)
                rid = msg.get("id")
                kind = msg.get("type")
                if kind == "draft":
                    cb = self._drafts.get(rid)
                    if cb is not None:
                        try:
                            res = cb(msg["draft"])
                            if asyncio.iscoroutine(res):
                                asyncio.get_running_loop().create_task(res)
                        except Exception:  # deliberate: the caller's callback, whatever it raises,
                            pass  # must not kill the connection that every other request shares
                    continue
                fut = self._pending.get(rid)
                if fut is None or fut.done():
                    if rid is None and kind == "error":
                        # A connection-level error (malformed frame): fail everyone waiting.
                        err = msg.get("error") or {}
                        self._fail_all(DgemmaError(err.get("code", "internal"), err.get("message", "")))
                    continue
                if kind == "result":
                    fut.set_result(msg.get("result") or {})
                elif kind == "error":
                    err = msg.get("error") or {}
                    fut.set_exception(DgemmaError(str(err.get("code", "internal")), str(err.get("message", ""))))
        except (proto.ConnectionClosed, ConnectionError, OSError):
            self._fail_all(DaemonUnavailable(f"the daemon at {self.path} closed the connection"))
        except DgemmaError as exc:
            self._fail_all(exc)
        except asyncio.CancelledError:
            self._fail_all(DaemonUnavailable("connection closed"))
            raise

    def _fail_all(self, exc: DgemmaError) -> None:
        if self._lost is None:
            self._lost = exc if isinstance(exc, DaemonUnavailable) else DaemonUnavailable(exc.message)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except (asyncio.CancelledError, Exception):
                pass
        try:
            self.writer.close()
            await self.writer.wait_closed()
        except (OSError, RuntimeError):  # already lost (reset, or the loop is closing): closed either way
            pass

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


# ---- starting the daemon --------------------------------------------------------------

def daemon_answers(path: Path | None = None, timeout: float = 2.0) -> bool:
    path = Path(path) if path else socket_path()
    try:
        with Client.connect(path, timeout=timeout) as c:
            c.request("ping")
        return True
    except (DgemmaError, OSError, proto.ConnectionClosed):
        return False


@contextmanager
def _start_lock(folder: Path) -> Iterator[None]:
    fd = os.open(folder / "start.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        lock_fd(fd)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def absolute_model_spec(model: str | None) -> str | None:
    """A model given as a path, made absolute: the daemon resolves it in another working directory.
    Anything else (a hub id, None) is passed on as it is."""
    if model and os.path.exists(os.path.expanduser(model)):
        return os.path.abspath(os.path.expanduser(model))
    return model


def serve_command(path: Path, model: str | None, device: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "dgemma.cli", "serve", "--socket", str(path.absolute())]
    if model:
        cmd += ["--model", absolute_model_spec(model)]
    if device:
        cmd += ["--device", device]
    return cmd


def spawn_daemon(path: Path, model: str | None = None, device: str | None = None,
                 timeout: float = START_TIMEOUT) -> int:
    """Start `dgemma serve` in its own session, logging to daemon.log next to the socket;
    returns its pid once the socket answers. Raises DaemonUnavailable with the log's last
    line when it dies first."""
    from dgemma.daemon.logs import rotate_if_big

    folder = ensure_private_dir(path.parent)
    logfile = folder / "daemon.log"
    rotate_if_big(logfile)  # before the daemon writes: its start-up lines are read back below
    if sys.platform == "win32":
        # No sessions there: a process group of its own and no console, so closing the
        # terminal or Ctrl+C in it does not reach the daemon.
        detach: dict[str, Any] = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS}
    else:
        detach = {"start_new_session": True}
    with open(logfile, "ab") as out:
        start_at = out.tell()
        # Its own working directory, as daemons have: `-m` puts the working directory first on
        # sys.path, and the caller's (a checkout, an editor's workspace) may hold folders named
        # like installed packages. It also keeps the daemon from pinning the caller's folder.
        proc = subprocess.Popen([*serve_command(path, model, device), "--log-file", str(logfile.absolute())],
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, close_fds=True, cwd=folder, **detach)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DaemonUnavailable(f"the daemon exited at start: {_log_tail(logfile, start_at)} (log: {logfile})")
        if daemon_answers(path, timeout=2.0):
            return proc.pid
        time.sleep(0.05)
    raise DaemonUnavailable(f"the daemon did not answer within {timeout:.0f} s (log: {logfile})")


def _log_tail(logfile: Path, start_at: int) -> str:
    try:
        with open(logfile, "rb") as f:
            f.seek(start_at)
            lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if line.startswith("dgemma:"):
            return line[len("dgemma:"):].strip()
    return lines[-1] if lines else "no output"


def ensure_daemon(path: Path | str | None = None, *, model: str | None = None, device: str | None = None,
                  timeout: float = START_TIMEOUT) -> Path:
    """Make sure a daemon answers at `path`, starting one if needed. The start lock makes
    concurrent callers wait for the first one's daemon instead of starting their own."""
    path = Path(path) if path else socket_path()
    if daemon_answers(path):
        return path
    folder = ensure_private_dir(path.parent)
    with _start_lock(folder):
        if not daemon_answers(path):
            spawn_daemon(path, model=model, device=device, timeout=timeout)
    return path


__all__ = ["Client", "AsyncClient", "ensure_daemon", "spawn_daemon", "daemon_answers", "model_loaded",
           "DaemonUnavailable", "ModelLoadFailed", "RequestTooLarge"]
