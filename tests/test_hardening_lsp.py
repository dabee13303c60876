"""Issue 22, the language server's side: every request gets a response, even one whose params
do not deserialize, and no input (a huge Content-Length, junk between messages, a body that is not
JSON, a message over the limit) kills the server or leaves it deaf without a clear log line.

The real ``dgemma lsp`` over its stdio; these tests never send `initialized`, so no daemon starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from dgemma.lsp.transport import MAX_MESSAGE_BYTES


def frame(obj: Any) -> bytes:
    body = json.dumps(obj).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def request(rid: Any, method: str, params: Any) -> bytes:
    return frame({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})


def run_server(data: bytes, tmp_path: Path, timeout: float = 120) -> tuple[int, list[dict[str, Any]], str]:
    """Feed `data` to `dgemma lsp`, then shutdown and exit; (exit code, responses, stderr)."""
    env = dict(os.environ, DGEMMA_RUNTIME_DIR=str(tmp_path / "rt"), DGEMMA_CONFIG_DIR=str(tmp_path / "cfg"),
               DGEMMA_DATA_DIR=str(tmp_path / "data"), DGEMMA_LSP_LOG="WARNING")
    data = (request(0, "initialize", {"capabilities": {}}) + data + request(999, "shutdown", None)
            + frame({"jsonrpc": "2.0", "method": "exit"}))
    proc = subprocess.run([sys.executable, "-m", "dgemma.cli", "lsp"], input=data, capture_output=True,
                          env=env, cwd=tmp_path, timeout=timeout)
    out, messages = proc.stdout, []
    while out:
        head, _, rest = out.partition(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        messages.append(json.loads(rest[:length]))
        out = rest[length:]
    return proc.returncode, messages, proc.stderr.decode("utf-8", "replace")


def by_id(messages: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    return {m.get("id"): m for m in messages if "id" in m and "method" not in m}


POS = {"textDocument": {"uri": "file:///a.py"}, "context": {"triggerKind": 1}}


def test_every_request_gets_a_response_even_with_bad_params(tmp_path):
    """Item 11: params that do not deserialize get InvalidParams (-32602), with the request's id."""
    bad = {
        1: "nope",
        2: {**POS, "position": {"line": -1, "character": 0}},
        3: {**POS, "position": {"line": "a", "character": 0}},
        4: {**POS, "position": {"line": 2**64, "character": 0}},
        5: {},
        6: None,
    }
    data = b"".join(request(rid, "textDocument/inlineCompletion", p) for rid, p in bad.items())
    data += request("s", "textDocument/completion", [1, 2])
    data += request(7, "textDocument/codeAction", {"textDocument": {"uri": 5}})
    data += request({"not": "an id"}, "textDocument/inlineCompletion", 5)
    code, messages, err = run_server(data, tmp_path)
    got = by_id(messages)
    for rid in [*bad, "s", 7]:
        assert rid in got and got[rid]["error"]["code"] == -32602, (rid, got.get(rid), err[-2000:])
    assert None in got and got[None]["error"]["code"] == -32602  # an unusable id: answered with id null
    assert got[999].get("result", "missing") is None and code == 0, (got.get(999), err[-2000:])
    assert "Traceback" not in err


def test_a_huge_content_length_is_refused_and_the_server_keeps_serving(tmp_path):
    """Item 12: Content-Length 99999999999 used to end in MemoryError and exit 1. Now it is
    refused (over MAX_MESSAGE_BYTES), logged once, and the next messages are answered; so are
    messages after junk lines and after a body that is not JSON."""
    data = b"Content-Length: 99999999999\r\n\r\n"
    data += request(1, "textDocument/inlineCompletion", "nope")
    data += b"this is not a header\r\n" + b"x" * 100_000 + b"\r\n"
    data += request(2, "textDocument/inlineCompletion", "nope")
    data += b"Content-Length: 99999999999\r\n\r\n"  # again: counted, not logged again
    data += b"Content-Length: 7\r\n\r\n{oops!}"
    data += request(3, "textDocument/inlineCompletion", "nope")
    data += b"Content-Length: lots\r\n\r\n"
    data += request(4, "textDocument/inlineCompletion", "nope")
    code, messages, err = run_server(data, tmp_path)
    got = by_id(messages)
    assert code == 0, err[-3000:]
    for rid in (1, 2, 3, 4):
        assert got[rid]["error"]["code"] == -32602, (rid, err[-3000:])
    assert got[None]["error"]["code"] == -32700  # the body that is not JSON: a parse error, id null
    assert err.count("over the limit of") == 1 and str(MAX_MESSAGE_BYTES) in err
    assert err.count("expected headers") == 1 and err.count("not JSON") == 1 and err.count("without a valid") == 1
    assert "MemoryError" not in err and "Traceback" not in err


def test_a_message_over_the_limit_is_skipped_whole(tmp_path):
    """A didOpen larger than MAX_MESSAGE_BYTES, actually sent: skipped, and the request after
    it is answered."""
    text = "x = 1\n" * (MAX_MESSAGE_BYTES // 6 + 1000)
    data = frame({"jsonrpc": "2.0", "method": "textDocument/didOpen",
                  "params": {"textDocument": {"uri": "file:///big.py", "languageId": "python", "version": 1,
                                              "text": text}}})
    data += request(1, "textDocument/inlineCompletion", "nope")
    code, messages, err = run_server(data, tmp_path)
    assert code == 0 and by_id(messages)[1]["error"]["code"] == -32602, err[-2000:]
    assert err.count("over the limit of") == 1
