"""Wire format shared by the daemon and its clients (spec: docs/protocol.md).

A frame is a 4-byte big-endian length followed by that many bytes of one msgpack map.
This module only frames and validates; it knows nothing about sockets' owners.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgpack

from .errors import DgemmaError

PROTOCOL_VERSION = 1
# Versions this build can speak; a client announces its own in `hello`.
SUPPORTED_VERSIONS = (1,)
# Large enough for a whole source file as prefix + suffix, small enough that a hostile
# length prefix cannot make the daemon allocate gigabytes.
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
HEADER = struct.Struct(">I")

METHODS = ("hello", "ping", "status", "fill", "edit", "cancel", "reload", "shutdown")


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
    except Exception as exc:  # msgpack raises a zoo of types for garbage input
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
    return {"id": id, "type": "error", "error": {"code": code, "message": message}}


def draft(id: Any, text: str, step: int, canvas: int) -> dict[str, Any]:
    return {"id": id, "type": "draft", "draft": {"text": text, "step": step, "canvas": canvas}}


def hello(server: str, pid: int, max_frame: int) -> dict[str, Any]:
    """The greeting the daemon sends first on every connection."""
    return {"type": "hello", "protocol": PROTOCOL_VERSION, "versions": list(SUPPORTED_VERSIONS),
            "server": server, "pid": pid, "max_frame": max_frame}


def check_request(msg: dict[str, Any]) -> tuple[Any, str, dict[str, Any]]:
    """Validate the envelope of a request; returns (id, method, params)."""
    rid = msg.get("id")
    if not isinstance(rid, (int, str)) or isinstance(rid, bool):
        raise DgemmaError("invalid_request", "a request needs an `id` (integer or string)")
    method = msg.get("method")
    if not isinstance(method, str):
        raise DgemmaError("invalid_request", "a request needs a `method` (string)")
    params = msg.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise DgemmaError("invalid_params", "`params` must be a map")
    if method not in METHODS:
        raise DgemmaError("invalid_request", f"unknown method {method!r}; known: {', '.join(METHODS)}")
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
    if min is not None and value < min:
        raise DgemmaError("invalid_params", f"parameter `{name}` must be >= {min}")
    if max is not None and value > max:
        raise DgemmaError("invalid_params", f"parameter `{name}` must be <= {max}")
    return value


def _names(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", dict: "a map",
             list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
