"""Wire format shared by the daemon and its clients (spec: docs/protocol.md).

A frame is a 4-byte big-endian length followed by that many bytes of one msgpack map.
This module only frames and validates; it knows nothing about sockets' owners.
"""
from __future__ import annotations

import asyncio
import math
import reprlib
import socket
import struct
from typing import Any

import msgpack

from dgemma.errors import DgemmaError

PROTOCOL_VERSION = 1
# Versions this build can speak; a client announces its own in `hello`.
SUPPORTED_VERSIONS = (1,)
# Large enough for a whole source file as prefix + suffix, small enough that a hostile
# length prefix cannot make the daemon allocate gigabytes.
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
HEADER = struct.Struct(">I")
# No config may go below this: every control request (hello, status, shutdown...) must fit.
MIN_FRAME = 64 * 1024
# Before a successful `hello` a connection may send frames up to this size only (a hello is a
# few dozen bytes), must finish its hello within PREAUTH_TIMEOUT_S, and at most
# MAX_PREAUTH_CONNECTIONS connections may be waiting for theirs at once: a stranger on the TCP
# port can hold neither memory nor sockets.
PREAUTH_MAX_FRAME = MIN_FRAME
PREAUTH_TIMEOUT_S = 5.0
MAX_PREAUTH_CONNECTIONS = 64
# A request id is an integer (msgpack's 64-bit range) or a string of at most this many characters.
MAX_ID_CHARS = 256
# Error messages on the wire are cut to this many characters; text a client sent is quoted
# into them (and into the log) through `clip`, which escapes it and cuts it much shorter.
MAX_MESSAGE_CHARS = 1024

# The requests the model answers (queued for the worker, forwarded to a team server in remote mode).
ENGINE_METHODS = ("fill", "edit", "next_edit")
METHODS = ("hello", "ping", "status", *ENGINE_METHODS, "cancel", "reload", "shutdown")


class FrameTooLarge(DgemmaError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__("too_large", f"frame of {size} bytes is over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class ConnectionClosed(Exception):
    """The peer closed the stream (cleanly between frames, or mid-frame)."""


def encode(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Unpack one frame body; anything but a single msgpack map is `invalid_request`."""
    try:
        # strict_map_key=False: ids may be ints or strings, keys of nested maps too.
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
    # What garbage input raises (fuzzed): msgpack's own errors, ValueError (truncated input, extra
    # data, bad UTF-8), TypeError (a map key that cannot be hashed), OverflowError.
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError) as exc:
        raise DgemmaError("invalid_request", f"malformed msgpack frame ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise DgemmaError("invalid_request", f"a frame must hold a msgpack map, not {type(obj).__name__}")
    return obj


async def read_frame(reader: asyncio.StreamReader, max_frame: int = DEFAULT_MAX_FRAME) -> dict[str, Any]:
    """Read one frame. Raises ConnectionClosed at EOF, FrameTooLarge before reading a
    too-long body (the stream is then out of sync and must be closed), DgemmaError for a
    well-framed but malformed body (the stream stays usable)."""
    try:
        header = await reader.readexactly(HEADER.size)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ConnectionClosed() from exc
    (size,) = HEADER.unpack(header)
    if size > max_frame:
        raise FrameTooLarge(size, max_frame)
    try:
        body = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ConnectionClosed() from exc
    return decode_body(body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionClosed()
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME) -> dict[str, Any]:
    """Blocking twin of read_frame for the synchronous client."""
    (size,) = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    if size > max_frame:
        raise FrameTooLarge(size, max_frame)
    return decode_body(_recv_exactly(sock, size))


# ---- message shapes -------------------------------------------------------------------

def request(id: int | str, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": id, "method": method, "params": params or {}}


def result(id: Any, value: dict[str, Any]) -> dict[str, Any]:
    return {"id": id, "type": "result", "result": value}


def error(id: Any, code: str, message: str) -> dict[str, Any]:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS - 1] + "\u2026"
    return {"id": id, "type": "error", "error": {"code": code, "message": message}}


def draft(id: Any, text: str, step: int, canvas: int) -> dict[str, Any]:
    return {"id": id, "type": "draft", "draft": {"text": text, "step": step, "canvas": canvas}}


def hello(server: str, pid: int, max_frame: int) -> dict[str, Any]:
    """The greeting the daemon sends first on every connection."""
    return {"type": "hello", "protocol": PROTOCOL_VERSION, "versions": list(SUPPORTED_VERSIONS),
            "server": server, "pid": pid, "max_frame": max_frame}


def valid_id(rid: Any) -> bool:
    """An integer (not a boolean) or a string of at most MAX_ID_CHARS characters."""
    if isinstance(rid, bool):
        return False
    return isinstance(rid, int) or (isinstance(rid, str) and len(rid) <= MAX_ID_CHARS)


def reply_id(msg: Any) -> Any:
    """The id to answer `msg` with: its own when valid, else None (never echo junk back)."""
    rid = msg.get("id") if isinstance(msg, dict) else None
    return rid if valid_id(rid) else None


def clip(value: Any, limit: int = 64) -> str:
    """`value` (text a client sent) fit to quote in a message or a log line: control and
    non-printable characters escaped as in a Python literal, cut to about `limit` characters."""
    text = value if isinstance(value, str) else reprlib.repr(value)
    if len(text) > limit:
        text, rest = text[:limit], len(text) - limit
    else:
        rest = 0
    out = repr(text)
    return out + (f"... ({rest} more characters)" if rest else "")


def check_request(msg: dict[str, Any]) -> tuple[Any, str, dict[str, Any]]:
    """Validate the envelope of a request; returns (id, method, params)."""
    rid = msg.get("id")
    if not valid_id(rid):
        raise DgemmaError("invalid_request", f"a request needs an `id`: an integer or a string of at most "
                                             f"{MAX_ID_CHARS} characters")
    method = msg.get("method")
    if not isinstance(method, str):
        raise DgemmaError("invalid_request", "a request needs a `method` (string)")
    params = msg.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise DgemmaError("invalid_params", "`params` must be a map")
    if method not in METHODS:
        raise DgemmaError("invalid_request", f"unknown method {clip(method)}; known: {', '.join(METHODS)}")
    return rid, method, params


# ---- typed parameter access: wrong types get a precise invalid_params --------------------

_MISSING = object()


def param(params: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _MISSING,
          *, min: float | None = None, max: float | None = None) -> Any:
    value = params.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise DgemmaError("invalid_params", f"missing parameter `{name}`")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass; a client sending true for n is a bug worth reporting.
    if isinstance(value, bool) and bool not in kinds:
        raise DgemmaError("invalid_params", f"parameter `{name}` must be {_names(kinds)}, not a boolean")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds):
        raise DgemmaError("invalid_params",
                          f"parameter `{name}` must be {_names(kinds)}, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DgemmaError("invalid_params", f"parameter `{name}` must be a finite number")
    if min is not None and value < min:
        raise DgemmaError("invalid_params", f"parameter `{name}` must be >= {min}")
    if max is not None and value > max:
        raise DgemmaError("invalid_params", f"parameter `{name}` must be <= {max}")
    return value


def _names(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", dict: "a map",
             list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
