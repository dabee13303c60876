"""Remote mode: the daemon forwards fill and edit to a team server (`dgemma cluster up`) over HTTP.

The wire is docs/protocol.md's requests and results, carried by HTTP instead of msgpack frames:
`POST /v1/fill` (or `/v1/edit`) with the request's params as a JSON body, answered by a stream of
JSON lines, the `draft` frames then one `result` or `error` frame. `GET /v1/status` describes the
replica that answers and the application's replicas. Every request carries
`Authorization: Bearer <token>`; the document's digest goes in Ray Serve's session header, so
Serve's consistent-hash router sends a document to the same replica (and its prefix cache) while
that replica is healthy.

Only the standard library here: a laptop in remote mode installs no Ray. The server side is
`dgemma.cluster`, which takes its paths and headers from this module.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import socket
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

from dgemma.daemon.scheduler import CancelFlag
from dgemma.errors import DgemmaError

API = "/v1"
STATUS_PATH = f"{API}/status"
# Ray Serve's default session header (RAY_SERVE_SESSION_ID_HEADER_KEY): its ConsistentHashRouter
# hashes it onto the ring of replicas.
AFFINITY_HEADER = "x-session-id"
CONTENT_TYPE = "application/x-ndjson"

CONNECT_TIMEOUT_S = 5.0
# How long a remote may stay silent before the request fails: a queued request on a busy replica
# waits without a byte, so this is generous; drafts and results reset it.
DEFAULT_READ_TIMEOUT_S = 120.0
STATUS_TIMEOUT_S = 5.0


def method_path(method: str) -> str:
    return f"{API}/{method}"


def affinity_key(document: str) -> str:
    """What routes a document: a digest, so no path or URI leaves the machine in a header."""
    return hashlib.sha256(document.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def token_digest(token: str) -> str:
    """Replicas hold the token's digest, never the token (their config is visible in Ray's state)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(path: Path) -> str:
    """The token in `path`, creating it (0600, 256 random bits) when absent."""
    try:
        return read_token(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # created meanwhile by another `up`: theirs stands
        return read_token(path)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token


def read_token(path: Path) -> str:
    """The token in `path`; FileNotFoundError when there is no such file, DgemmaError when it is unusable."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise DgemmaError("invalid_params", f"cannot read the token file {path}: {exc}") from None
    if not token or any(c.isspace() for c in token):
        raise DgemmaError("invalid_params", f"the token file {path} holds no token (one line, no spaces)")
    return token


def check_url(url: str, where: str = "remote") -> urllib.parse.SplitResult:
    """`url` split, or DgemmaError(invalid_params) saying what is wrong with it."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # a bad port raises here
    except ValueError as exc:
        raise DgemmaError("invalid_params", f"{where} = {url!r:.200} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DgemmaError("invalid_params", f"{where} = {url!r:.200} is not an http:// or https:// URL "
                                            "such as http://gpu-box:8000")
    return parts


class Remote:
    """The daemon's model when `remote` is set in config.toml: each fill or edit is one HTTP request
    to the team server. Runs on the daemon's worker thread; a cancel closes the connection, which
    Ray Serve turns into a cancel of the request on its replica."""

    def __init__(self, url: str, token_file: Path, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> None:
        parts = check_url(url)
        self.url = url.rstrip("/")
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.base = parts.path.rstrip("/")
        self.token_file = token_file
        self.read_timeout_s = read_timeout_s
        # What `status` shows for the model in service; results name the replica's own model.
        self.model_name = f"remote {self.url}"
        self.device = "remote"

    # -- one exchange -------------------------------------------------------------------------

    def _token(self) -> str:
        # Read per request: a token rotated on disk is used at once, without a restart.
        try:
            return read_token(self.token_file)
        except FileNotFoundError:
            raise DgemmaError("remote_unavailable", f"no token file {self.token_file} for the remote {self.url}; "
                                                    "copy it from the machine that ran `dgemma cluster up`") from None

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=CONNECT_TIMEOUT_S)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise self._down(exc) from None
        assert conn.sock is not None
        conn.sock.settimeout(timeout)
        return conn

    def _down(self, exc: BaseException) -> DgemmaError:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        return DgemmaError("remote_unavailable", f"the remote {self.url} does not answer ({why}); "
                                                 "is `dgemma cluster up` running there?")

    def _refused(self, resp: http.client.HTTPResponse) -> DgemmaError:
        """The error for a response that is not a stream of frames."""
        body = resp.read(64 * 1024)
        if resp.status == 401:
            return DgemmaError("remote_unavailable", f"the remote {self.url} refused the token in {self.token_file}")
        try:
            err = json.loads(body)["error"]
            return DgemmaError(str(err["code"]), str(err["message"]))
        except (ValueError, KeyError, TypeError):
            return DgemmaError("remote_unavailable", f"the remote {self.url} answered HTTP {resp.status} {resp.reason}")

    def _headers(self, document: str | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._token()}", "Accept": CONTENT_TYPE}
        if document is not None:
            headers[AFFINITY_HEADER] = affinity_key(document)
        return headers

    def forward(self, method: str, params: dict[str, Any], *, document: str | None = None,
                on_draft: Callable[[dict[str, Any]], None] | None = None, cancel: CancelFlag | None = None,
                deadline: float | None = None) -> dict[str, Any]:
        """Send `method` with wire `params`; returns the `result` map, passing each `draft` frame to
        `on_draft`. Raises DgemmaError: the remote's own error, `remote_unavailable` when it cannot be
        reached, refuses the token or ends the stream early, `cancelled` when `cancel` was set."""
        body = json.dumps({**params, "stream": on_draft is not None}).encode("utf-8")
        headers = {**self._headers(document), "Content-Type": "application/json"}
        timeout = self.read_timeout_s
        if deadline is not None:
            timeout = max(0.05, min(timeout, deadline - time.monotonic()))
        conn = self._connect(timeout)
        if cancel is not None:
            cancel.on_set(lambda: _shut(conn))
        try:
            conn.request("POST", self.base + method_path(method), body=body, headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                raise self._refused(resp)
            while True:
                line = resp.readline(1 << 26)
                if not line:
                    if cancel is not None and cancel.is_set():
                        raise DgemmaError("cancelled", "cancelled")
                    raise DgemmaError("remote_unavailable", f"the remote {self.url} closed the stream before answering "
                                                            "(its replica may have stopped); try again")
                frame = json.loads(line)
                if not isinstance(frame, dict):
                    raise ValueError(f"a line that is not a frame: {line[:80]!r}")
                kind = frame.get("type")
                if kind == "draft":
                    if on_draft is not None:
                        on_draft(frame)
                elif kind == "result":
                    return frame["result"]
                elif kind == "error":
                    raise DgemmaError(str(frame["error"]["code"]), str(frame["error"]["message"]))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if cancel is not None and cancel.is_set():
                raise DgemmaError("cancelled", "cancelled") from None
            if isinstance(exc, (socket.timeout, TimeoutError)):
                if deadline is not None and time.monotonic() >= deadline:
                    raise DgemmaError("deadline", "the deadline passed waiting for the remote") from None
                raise DgemmaError("remote_unavailable", f"the remote {self.url} sent nothing for "
                                                        f"{timeout:.0f} s") from None
            raise self._down(exc) from None
        finally:
            conn.close()

    def status(self, document: str | None = None) -> dict[str, Any]:
        """The remote's `GET /v1/status`: the replica that answered (the one serving `document`, if
        given) and the application's replicas."""
        conn = self._connect(STATUS_TIMEOUT_S)
        try:
            conn.request("GET", self.base + STATUS_PATH, headers=self._headers(document))
            resp = conn.getresponse()
            if resp.status != 200:
                raise self._refused(resp)
            return json.loads(resp.read(1 << 20))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise self._down(exc) from None
        finally:
            conn.close()


def _shut(conn: http.client.HTTPConnection) -> None:
    """Another thread's cancel: unblock the worker's read (close alone would not wake it)."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
