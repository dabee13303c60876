"""How ``dgemma lsp`` reads its stdin: LSP base-protocol framing with limits, and a JSON-RPC
protocol that answers every request, even one whose params do not deserialize.

pygls 2.x (``pygls.io_.run_async``) reads ``Content-Length`` bytes whatever the header says (a
header of 99999999999 ends in MemoryError and exit 1), and when a request's params do not fit its
type (``"params": "nope"``, a negative line) its ``structure_message`` raises before any handler
runs, so the client waits forever for a response. Here:

* ``read_messages`` refuses a message over MAX_MESSAGE_BYTES (and header lines over
  MAX_HEADER_LINE_BYTES) and keeps serving: a real message (a JSON body follows its headers) is
  skipped by its length, a bogus length is dropped and reading goes on from the next
  ``Content-Length`` header, as after junk between messages. Every kind of framing problem (input that is not headers, a header block without a
  length, a message over the limit, a body that is not JSON) is logged clearly the first time
  and counted after that, so a client that talks past the server is visible once in its log
  without flooding it.
* ``DgemmaProtocol`` turns a request whose message does not deserialize into an
  ``InvalidParams`` error response with the request's id (``null`` when the id itself is unusable).
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from typing import Any, BinaryIO, Callable

import cattrs
from lsprotocol.types import EXIT, ErrorCodes, ResponseError
from pygls.exceptions import JsonRpcException
from pygls.io_ import StdoutWriter
from pygls.protocol import JsonRPCProtocol, LanguageServerProtocol
from pygls.protocol.json_rpc import JsonRPCRequestMessage, RPCRequest

log = logging.getLogger("dgemma.lsp")

# The largest message the server reads: a didOpen of a file of some tens of MB fits. A larger one
# is skipped (that document stays unknown to the server) and logged.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_HEADER_LINE_BYTES = 8 * 1024


class InvalidRequest:
    """A request that did not deserialize: answered with an error, never handled."""

    def __init__(self, msg_id: Any, method: Any, detail: str) -> None:
        self.id = msg_id if isinstance(msg_id, (int, str)) and not isinstance(msg_id, bool) else None
        self.method = method
        self.detail = detail


def _describe(exc: Exception) -> str:
    try:
        parts = cattrs.transform_error(exc) if isinstance(exc, cattrs.BaseValidationError) else [str(exc)]
    except Exception:  # deliberate: describing an error must not raise one
        parts = [str(exc)]
    text = "; ".join(parts) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


class DgemmaProtocol(LanguageServerProtocol):
    """pygls' language server protocol, where every request gets a response."""

    def structure_message(self, data: dict[str, Any]) -> Any:
        if "jsonrpc" in data and "id" in data and "method" in data and "error" not in data:
            method = data.get("method")
            try:
                kind = (self.get_message_type(method) if isinstance(method, str) else None) or JsonRPCRequestMessage
                return self._converter.structure(data, kind)
            except Exception as exc:  # deliberate: cattrs raises many kinds, and every request gets a response
                return InvalidRequest(data.get("id"), method, _describe(exc))
        return super().structure_message(data)

    def handle_message(self, message: Any) -> None:
        if isinstance(message, InvalidRequest):
            log.warning("invalid params in request %.40r (%.80r): %s", message.id, message.method, message.detail)
            send_error(self, message.id, ErrorCodes.InvalidParams, f"invalid params: {message.detail}")
            return
        if self._shutdown and isinstance(message, RPCRequest) and message.method != EXIT:
            # pygls drops requests after `shutdown` silently; the spec wants an error.
            send_error(self, message.id, ErrorCodes.InvalidRequest, "the server is shutting down")
            return
        super().handle_message(message)


def send_error(protocol: JsonRPCProtocol, msg_id: Any, code: ErrorCodes, message: str) -> None:
    """An error response; with `"id": null` when the request's id is unknown (JSON-RPC 2.0, where
    pygls' own response type would leave the id out)."""
    if msg_id is None:
        protocol._send_data({"jsonrpc": "2.0", "id": None, "error": {"code": int(code), "message": message}})
    else:
        protocol._send_response(msg_id, error=ResponseError(code=code, message=message))


class FramingLog:
    """Each kind of framing problem logged once, clearly; repeats only counted (and logged at debug)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def problem(self, kind: str, message: str) -> None:
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n == 1:
            log.error("LSP input: %s (logged once; later ones are counted)", message)
        else:
            log.debug("LSP input: %s (%d times)", message, n)


class Input:
    """A buffered byte stream over `read_some(n)` (an awaitable returning at most n bytes, b"" at
    EOF): lines of bounded length, exact reads, a look ahead, and skips that hold no more than
    one chunk in memory."""

    CHUNK = 1 << 16

    def __init__(self, read_some: Callable[[int], Any]) -> None:
        self._read_some = read_some
        self.buf = bytearray()
        self.eof = False

    async def _more(self) -> bool:
        if self.eof:
            return False
        chunk = await self._read_some(self.CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    async def readline(self, limit: int) -> bytes:
        """Up to and including the next newline, or `limit` bytes, or what is left at EOF."""
        while True:
            i = self.buf.find(b"\n", 0, limit)
            if i >= 0 or len(self.buf) >= limit or not await self._more():
                n = i + 1 if i >= 0 else min(limit, len(self.buf))
                line = bytes(self.buf[:n])
                del self.buf[:n]
                return line

    async def peek(self, n: int) -> bytes:
        while len(self.buf) < n and await self._more():
            pass
        return bytes(self.buf[:n])

    async def read(self, n: int) -> bytes:
        """`n` bytes (fewer only at EOF)."""
        while len(self.buf) < n and await self._more():
            pass
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def skip(self, n: int) -> bool:
        """Drop `n` bytes; False when the stream ended first."""
        while n > 0:
            if not self.buf and not await self._more():
                return False
            k = min(n, len(self.buf))
            del self.buf[:k]
            n -= k
        return True


async def read_messages(source: Input, protocol: JsonRPCProtocol, stop_event: threading.Event,
                        max_message: int = MAX_MESSAGE_BYTES, framing: FramingLog | None = None) -> None:
    """Read LSP messages from `source` until EOF (or `stop_event`) and hand each to `protocol`."""
    framing = framing or FramingLog()
    at_line_start = True
    resync = False  # skipping input up to the next Content-Length header
    while not stop_event.is_set():
        length: int | None = None
        bad_length = False
        seen_header = False
        while True:  # one header block
            line = await source.readline(MAX_HEADER_LINE_BYTES + 1)
            if not line:
                return
            starts_line, at_line_start = at_line_start, line.endswith(b"\n")
            if not starts_line or not at_line_start:
                # Part of an overlong line (or of a body without a line end): never a header.
                if starts_line and not resync:
                    framing.problem("long-line", f"a header line over {MAX_HEADER_LINE_BYTES} bytes; skipping "
                                                 "input up to the next Content-Length header")
                resync = True
                continue
            text = line.strip()
            name, colon, value = text.partition(b":")
            is_length = bool(colon) and name.strip().lower() == b"content-length"
            if resync and not is_length:
                continue
            resync = False
            if not text:
                if seen_header:
                    break
                continue  # blank lines between messages
            seen_header = True
            if not colon:
                framing.problem("not-a-header", f"expected headers ('Content-Length: N'), got {text[:60]!r}; "
                                                "skipping input up to the next Content-Length header")
                resync = True
                seen_header = False
                continue
            if is_length:
                value = value.strip()
                if value.isdigit() and len(value) <= 20:
                    length = int(value)
                else:
                    bad_length = True
        if length is None:
            framing.problem("no-length", "a header block without a valid Content-Length; skipped"
                            + (" (its Content-Length is not a number)" if bad_length else ""))
            resync = True
            continue
        if length > max_message:
            # A real message (a JSON body follows) is skipped by its length, so the stream stays in
            # step; a bogus length (the next thing is not a JSON body) is dropped, and the server
            # reads on from the next Content-Length header.
            head = (await source.peek(64)).lstrip()
            if head[:1] in (b"{", b"["):
                framing.problem("too-large", f"a message of {length} bytes is over the limit of {max_message} "
                                             "bytes (lsp.transport.MAX_MESSAGE_BYTES); skipped")
                if not await source.skip(length):
                    return
            else:
                framing.problem("too-large", f"a Content-Length of {length} bytes is over the limit of {max_message} "
                                             "bytes (lsp.transport.MAX_MESSAGE_BYTES) and no message follows it; "
                                             "reading on from the next Content-Length header")
                resync = True
            continue
        body = await source.read(length)
        if len(body) < length:
            return  # EOF mid-message
        try:
            message = json.loads(body, object_hook=protocol.structure_message)
        except ValueError as exc:
            framing.problem("bad-json", f"a message body that is not JSON ({exc}); answered with a parse error")
            send_error(protocol, None, ErrorCodes.ParseError, f"parse error: {str(exc)[:200]}")
            continue
        except JsonRpcException as exc:  # a notification (or response) that does not deserialize: no reply is due
            framing.problem("bad-message", f"a message that does not deserialize ({exc!r:.200}); ignored")
            continue
        except Exception:  # deliberate: the server never dies of its input
            log.exception("cannot read an LSP message")
            continue
        try:
            protocol.handle_message(message)
        except Exception:  # deliberate: nor of one handler's bug
            log.exception("cannot handle an LSP message")


def serve_stdio(server: Any, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None,
                max_message: int = MAX_MESSAGE_BYTES) -> None:
    """pygls' ``start_io`` with read_messages in place of its reader loop."""
    server._stop_event = stop_event = threading.Event()
    source = stdin or sys.stdin.buffer
    server.protocol.set_writer(StdoutWriter(stdout or sys.stdout.buffer))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pool = server.thread_pool
        read_some = getattr(source, "read1", source.read)  # read1: what is there, without waiting for n bytes

        def read(n: int) -> Any:
            return loop.run_in_executor(pool, read_some, n)

        await read_messages(Input(read), server.protocol, stop_event, max_message)

    try:
        asyncio.run(main())
    except BrokenPipeError:
        log.error("lost the connection to the client; shutting down")
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.shutdown()
