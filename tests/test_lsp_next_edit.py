"""`dgemma/nextEdit` through the real `dgemma lsp` and daemon: the document's edits reach the
model, the answer is for the version it names and inside the document, and a change while a
suggestion is on its way makes it stale (it is dropped and its daemon request stops)."""
from __future__ import annotations

import asyncio
from typing import Any

from lsprotocol import types as t

from test_lsp_e2e import SLOW, _wait_daemon, lsp_env, open_doc, running_client, slow_env  # noqa: F401  (fixtures)
from test_next_edit import STATS

URI = "file:///work/example/stats.py"


def _rename(client: Any, version: int) -> None:
    """`values` -> `numbers` in the first line, as an editor sends a typed replacement."""
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        text_document=t.VersionedTextDocumentIdentifier(uri=URI, version=version),
        content_changes=[t.TextDocumentContentChangePartial(
            range=t.Range(start=t.Position(0, 9), end=t.Position(0, 15)), text="numbers")]))


def _get(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


async def _next_edit(client: Any, line: int = 0) -> Any:
    return await client.protocol.send_request_async(
        "dgemma/nextEdit", {"textDocument": {"uri": URI}, "position": {"line": line, "character": 0}})


async def test_next_edit_answers_for_the_current_version(lsp_env: dict[str, str]) -> None:
    async with running_client(lsp_env) as client:
        open_doc(client, STATS, uri=URI)
        # Before any edit there is nothing to follow: an empty list, at once.
        first = await asyncio.wait_for(_next_edit(client), 30)
        assert list(_get(first, "edits")) == [] and _get(first, "version") == 1
        _rename(client, 2)
        res = await asyncio.wait_for(_next_edit(client), 120)
        assert _get(res, "version") == 2
        lines = STATS.replace("(values):", "(numbers):", 1).split("\n")
        for edit in _get(res, "edits"):
            rng = _get(edit, "range")
            start, end = _get(rng, "start"), _get(rng, "end")
            assert _get(start, "character") == 0 and 0 <= _get(start, "line") <= _get(end, "line") <= len(lines)
            assert isinstance(_get(edit, "newText"), str)


async def test_a_change_makes_the_suggestion_in_flight_stale(slow_env: dict[str, str]) -> None:
    async with running_client(slow_env, SLOW) as client:
        open_doc(client, STATS, uri=URI)
        _rename(client, 2)
        pending = asyncio.ensure_future(_next_edit(client))
        await _wait_daemon(slow_env, running=True, timeout=30)
        client.text_document_did_change(t.DidChangeTextDocumentParams(
            text_document=t.VersionedTextDocumentIdentifier(uri=URI, version=3),
            content_changes=[t.TextDocumentContentChangePartial(
                range=t.Range(start=t.Position(1, 12), end=t.Position(1, 13)), text="0.0")]))
        res = await asyncio.wait_for(pending, 30)
        assert list(_get(res, "edits")) == []  # for version 2: never offered for version 3
        assert await _wait_daemon(slow_env, running=False, timeout=15) < 15
