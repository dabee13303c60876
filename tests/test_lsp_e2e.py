"""End to end: the real ``dgemma lsp`` (run as ``python -m dgemma.cli lsp``) over stdio, with a real
daemon it starts on demand, serving the bundled model with few denoising steps.

The bundled model may be retrained at any time and writes little sense anyway,
so the tests check the plumbing, never the text: what comes back is what the
daemon produced after post-processing, edits land where they should,
cancellation reaches the daemon, progress and errors are reported once.

One daemon is shared by the module (and by tests/test_nvim_plugin.py): it lives in
a runtime directory under pytest's base temp folder and is stopped at the end.
Tests that need a request still running when they act on it use a second
daemon with a tiny random model (see ``slow_env``).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
import pytest_asyncio
from lsprotocol import types as t
from pytest_lsp import LanguageClient, client_capabilities, make_test_lsp_client

from dgemma.daemon.client import Client

# Short middles and few denoising steps: quick on a busy CPU, and a canvas stopped
# that early is seldom empty (the tests that accept a suggestion need one).
FAST_OPTIONS = {"seed": 0, "maxTokensInvoked": 8, "maxTokensAutomatic": 8, "debounceMs": 30,
                "sampler": {"max_denoising_steps": 4}}
DOC = "def add(a, b):\n    return \n\n\nprint(add(1, 2))\n"
URI = "file:///work/example/add.py"


def _daemon_env(root: Path, model: str | None = None) -> dict[str, str]:
    """Environment for a server whose daemon lives under ``root``; no model: the bundled one."""
    rt, cfg, data = root / "rt", root / "cfg", root / "data"
    for d in (rt, cfg, data):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    env = dict(os.environ)
    env.update(DGEMMA_RUNTIME_DIR=str(rt), DGEMMA_CONFIG_DIR=str(cfg), DGEMMA_DATA_DIR=str(data))
    env.pop("DGEMMA_SOCKET", None)
    env.pop("DGEMMA_MODEL", None)
    if model is not None:
        env["DGEMMA_MODEL"] = model
    return env


def _stop_daemon(env: dict[str, str]) -> None:
    sock = Path(env["DGEMMA_RUNTIME_DIR"]) / "daemon.sock"
    try:
        with Client.connect(sock, timeout=10) as c:
            c.request("shutdown")
    except Exception:
        pass


def daemon_status(env: dict[str, str]) -> dict[str, Any]:
    with Client.connect(Path(env["DGEMMA_RUNTIME_DIR"]) / "daemon.sock", timeout=10) as c:
        return c.request("status")


@pytest.fixture(scope="session")
def lsp_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment for a language server whose daemon serves the bundled model.

    A fixed folder under the session's base temp: imported into several test
    modules, this fixture runs once per module, and all of them find the same daemon.
    """
    env = _daemon_env(tmp_path_factory.getbasetemp() / "dgemma-lsp")
    yield env
    _stop_daemon(env)


@pytest.fixture(scope="session")
def slow_env(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A daemon serving a tiny random model, for requests that must still be running.

    A random model never converges, so a request runs every denoising step of
    every canvas; the bundled model may stop a canvas early and finish before
    the test can cancel or overtake it.
    """
    env = _daemon_env(tmp_path_factory.getbasetemp() / "dgemma-lsp-slow", str(tiny_model_dir))
    yield env
    _stop_daemon(env)


def capabilities(inline: bool = True) -> t.ClientCapabilities:
    caps = client_capabilities("visual-studio-code")
    if inline:
        caps.text_document.inline_completion = t.InlineCompletionClientCapabilities()
    return caps


async def start_client(env: dict[str, str], options: dict[str, Any] | None = None,
                       inline: bool = True) -> LanguageClient:
    client = make_test_lsp_client()
    client.applied_edits = []  # type: ignore[attr-defined]
    client.statuses = []  # type: ignore[attr-defined]

    @client.feature(t.WORKSPACE_APPLY_EDIT)
    def apply_edit(params: t.ApplyWorkspaceEditParams) -> t.ApplyWorkspaceEditResult:
        client.applied_edits.append(params)  # type: ignore[attr-defined]
        return t.ApplyWorkspaceEditResult(applied=True)

    @client.feature("dgemma/status")
    def on_status(params: Any) -> None:
        client.statuses.append(params)  # type: ignore[attr-defined]

    await client.start_io(sys.executable, "-m", "dgemma.cli", "lsp", env=env)
    client.init_result = await client.initialize_session(t.InitializeParams(  # type: ignore[attr-defined]
        capabilities=capabilities(inline), initialization_options={**FAST_OPTIONS, **(options or {})},
        root_uri="file:///work/example"))
    return client


async def wait_ready(client: LanguageClient, timeout: float = 120) -> None:
    """Until the server reports the daemon ready (or failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [getattr(s, "state", None) for s in client.statuses]  # type: ignore[attr-defined]
        if "ready" in states or "error" in states:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no ready status in {timeout} s: {client.statuses}")  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def running_client(env: dict[str, str], options: dict[str, Any] | None = None, inline: bool = True,
                         ready: bool = True) -> AsyncIterator[LanguageClient]:
    """A started client (after the daemon reported ready, unless ``ready`` is False), shut down on exit."""
    client = await start_client(env, options, inline)
    try:
        if ready:
            await wait_ready(client)
        yield client
    finally:
        await client.shutdown_session()
        await client.stop()


@pytest_asyncio.fixture
async def client(lsp_env: dict[str, str]) -> AsyncIterator[LanguageClient]:
    async with running_client(lsp_env) as c:
        yield c


async def server_status(client: LanguageClient) -> dict[str, Any]:
    """``dgemma.status``; pytest-lsp may hand the result back as an object."""
    st = await client.workspace_execute_command_async(t.ExecuteCommandParams(command="dgemma.status"))
    return st if isinstance(st, dict) else vars(st)


def open_doc(client: LanguageClient, text: str = DOC, uri: str = URI, version: int = 1) -> None:
    client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri=uri, language_id="python", version=version, text=text)))


def inline_params(line: int, character: int, kind: t.InlineCompletionTriggerKind = t.InlineCompletionTriggerKind.Invoked,
                  uri: str = URI) -> t.InlineCompletionParams:
    return t.InlineCompletionParams(text_document=t.TextDocumentIdentifier(uri), position=t.Position(line, character),
                                    context=t.InlineCompletionContext(trigger_kind=kind))


# ---- tests ----------------------------------------------------------------------------

async def test_progress_while_the_daemon_starts(tmp_path: Path) -> None:
    # A daemon of its own: the shared one may be up already (other modules use
    # it too), and then there is no start-up to report.
    env = _daemon_env(tmp_path)
    try:
        async with running_client(env) as client:
            # $/progress end may trail the status notification by a moment.
            for _ in range(100):
                if any(isinstance(v, t.WorkDoneProgressEnd) for vs in client.progress_reports.values() for v in vs):
                    break
                await asyncio.sleep(0.05)
            reports = [v for vs in client.progress_reports.values() for v in vs]
            assert isinstance(reports[0], t.WorkDoneProgressBegin) and reports[0].title == "dgemma"
            assert "Starting" in (reports[0].message or "")
            assert any("Loading" in (getattr(v, "message", "") or "") for v in reports)
            assert isinstance(reports[-1], t.WorkDoneProgressEnd)
            assert client.messages == []
            assert [s.state for s in client.statuses][-1] == "ready"  # type: ignore[attr-defined]
    finally:
        _stop_daemon(env)


async def test_capabilities_advertise_inline_completion(client: LanguageClient) -> None:
    result = client.init_result.capabilities  # type: ignore[attr-defined]
    assert result.inline_completion_provider is not None
    assert "dgemma.rewrite" in result.execute_command_provider.commands


async def test_inline_completion_then_cache_and_typed_through(client: LanguageClient, lsp_env: dict[str, str]) -> None:
    open_doc(client)
    res = await client.text_document_inline_completion_async(inline_params(1, 11))
    assert res is not None and len(res.items) == 1
    item = res.items[0]
    text = item.insert_text if isinstance(item.insert_text, str) else item.insert_text.value
    assert text.strip() and item.range == t.Range(t.Position(1, 11), t.Position(1, 11))

    fills = daemon_status(lsp_env)["served_by_method"].get("fill", 0)
    again = await client.text_document_inline_completion_async(inline_params(1, 11))
    assert again.items[0].insert_text == text  # served from the cache

    # Type the first character of the suggestion: the rest comes without a model call.
    typed = text[0]
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        text_document=t.VersionedTextDocumentIdentifier(uri=URI, version=2),
        content_changes=[t.TextDocumentContentChangePartial(
            range=t.Range(t.Position(1, 11), t.Position(1, 11)), text=typed)]))
    if len(text) > 1 and "\n" not in typed:
        rest = await client.text_document_inline_completion_async(
            inline_params(1, 12, t.InlineCompletionTriggerKind.Automatic))
        assert rest is not None and rest.items[0].insert_text == text[1:]
    assert daemon_status(lsp_env)["served_by_method"].get("fill", 0) == fills

    st = await server_status(client)
    assert st["state"] == "ready" and st["cache"]["hits"] >= 1
    last = st["last_fill"] if isinstance(st["last_fill"], dict) else vars(st["last_fill"])
    assert last["engine_ms"] > 0 and last["server_ms"] >= last["engine_ms"]


async def test_automatic_trigger_mid_word_is_skipped(client: LanguageClient) -> None:
    open_doc(client, "value = compute_total(x)\n")
    res = await client.text_document_inline_completion_async(
        inline_params(0, 10, t.InlineCompletionTriggerKind.Automatic))
    assert res is None


async def test_completion_fallback_without_inline_support(lsp_env: dict[str, str]) -> None:
    async with running_client(lsp_env, inline=False, ready=False) as client:
        open_doc(client)
        inline = await client.text_document_inline_completion_async(inline_params(1, 11))
        res = await client.text_document_completion_async(t.CompletionParams(
            text_document=t.TextDocumentIdentifier(URI), position=t.Position(1, 11),
            context=t.CompletionContext(trigger_kind=t.CompletionTriggerKind.Invoked)))
        assert res is not None and len(res.items) == 1
        assert res.items[0].text_edit.new_text == inline.items[0].insert_text


async def code_actions(client: LanguageClient, rng: t.Range,
                       kind: t.CodeActionTriggerKind = t.CodeActionTriggerKind.Invoked) -> list[str]:
    actions = await client.text_document_code_action_async(t.CodeActionParams(
        text_document=t.TextDocumentIdentifier(URI), range=rng,
        context=t.CodeActionContext(diagnostics=[], trigger_kind=kind)))
    # pytest-lsp's converter reads the CodeAction back through the ambiguous
    # Command | CodeAction union and may stringify the nested command.
    return [f"{a.title}: {'dgemma.rewrite' if 'dgemma.rewrite' in str(a.command) else 'dgemma.fill'}"
            for a in actions or []]


async def test_rewrite_applies_a_versioned_edit(client: LanguageClient) -> None:
    open_doc(client, version=7)
    rng = t.Range(t.Position(1, 0), t.Position(2, 0))
    assert await code_actions(client, rng) == ["Rewrite selection…: dgemma.rewrite"]
    cursor = t.Range(t.Position(1, 11), t.Position(1, 11))
    assert await code_actions(client, cursor) == ["Fill at cursor (dgemma): dgemma.fill"]
    # Asked for automatically (a lightbulb at every cursor move): nothing to offer.
    assert await code_actions(client, cursor, t.CodeActionTriggerKind.Automatic) == []

    # A selection made backwards: its end comes first.
    res = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="dgemma.rewrite",
        arguments=[URI, {"start": {"line": 2, "character": 0}, "end": {"line": 1, "character": 0}},
                   "return the sum"]))
    assert res["applied"] is True
    (edit,) = client.applied_edits  # type: ignore[attr-defined]
    (change,) = edit.edit.document_changes
    assert change.text_document.uri == URI and change.text_document.version == 7
    (te,) = change.edits
    assert te.range == rng and te.new_text == res["text"] and te.new_text.endswith("\n")


async def test_explicit_fill_command_inserts_at_the_position(client: LanguageClient) -> None:
    open_doc(client)
    res = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="dgemma.fill", arguments=[URI, {"line": 1, "character": 11}]))
    if res["applied"]:
        (edit,) = client.applied_edits  # type: ignore[attr-defined]
        (te,) = edit.edit.document_changes[0].edits
        assert te.range == t.Range(t.Position(1, 11), t.Position(1, 11)) and te.new_text == res["text"]
    else:  # the model had nothing worth inserting there
        assert res["text"] == "" and client.applied_edits == []  # type: ignore[attr-defined]


async def _wait_daemon(env: dict[str, str], running: bool, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = await asyncio.to_thread(daemon_status, env)
        if (st["running"] is not None) == running and (running or st["queue_depth"] == 0):
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    raise AssertionError(f"daemon running={not running} after {timeout} s")


# A request long enough to be caught running: many tokens, the model's full step count.
SLOW = {"maxTokensInvoked": 256, "sampler": {"max_denoising_steps": 48}}


async def test_cancel_request_stops_the_daemon_request(slow_env: dict[str, str]) -> None:
    async with running_client(slow_env, SLOW) as client:
        open_doc(client)
        fut = asyncio.ensure_future(client.protocol.send_request_async(
            t.TEXT_DOCUMENT_INLINE_COMPLETION, inline_params(1, 11), msg_id="slow-1"))
        await _wait_daemon(slow_env, running=True, timeout=30)
        client.protocol.notify(t.CANCEL_REQUEST, t.CancelParams(id="slow-1"))
        with pytest.raises(Exception):
            await asyncio.wait_for(fut, 10)
        # The daemon stops between two denoising steps, long before 256 tokens.
        assert await _wait_daemon(slow_env, running=False, timeout=15) < 15


async def test_newer_request_supersedes_the_older(slow_env: dict[str, str]) -> None:
    async with running_client(slow_env, SLOW) as client:
        open_doc(client)
        automatic = inline_params(1, 11, t.InlineCompletionTriggerKind.Automatic)
        await client.text_document_inline_completion_async(automatic)  # short: maxTokensAutomatic
        hits = (await server_status(client))["cache"]["hits"]

        # The newer request is answered from the cache, without reaching the daemon.
        old = asyncio.ensure_future(client.text_document_inline_completion_async(inline_params(1, 11)))
        await _wait_daemon(slow_env, running=True, timeout=30)
        await client.text_document_inline_completion_async(automatic)
        assert await asyncio.wait_for(old, 10) is None  # superseded: "nothing", not an error
        assert await _wait_daemon(slow_env, running=False, timeout=15) < 15
        assert (await server_status(client))["cache"]["hits"] == hits + 1

        # The newer request asks the model too.
        old = asyncio.ensure_future(client.text_document_inline_completion_async(inline_params(1, 11)))
        await _wait_daemon(slow_env, running=True, timeout=30)
        client.workspace_did_change_configuration(t.DidChangeConfigurationParams(
            settings={"dgemma": {"maxTokensInvoked": 8, "sampler": FAST_OPTIONS["sampler"]}}))
        newer = await asyncio.wait_for(client.text_document_inline_completion_async(inline_params(1, 10)), 60)
        assert await asyncio.wait_for(old, 10) is None
        assert newer is None or newer.items
        assert await _wait_daemon(slow_env, running=False, timeout=15) < 15


async def test_ghost_text_does_not_cancel_a_rewrite(slow_env: dict[str, str]) -> None:
    async with running_client(slow_env, SLOW) as client:
        open_doc(client)
        rewrite = asyncio.ensure_future(client.workspace_execute_command_async(t.ExecuteCommandParams(
            command="dgemma.rewrite",
            arguments=[URI, {"start": {"line": 0, "character": 0}, "end": {"line": 2, "character": 0}},
                       "add type hints"])))
        await _wait_daemon(slow_env, running=True, timeout=30)
        # The user goes on typing in the same file: ghost text is asked for
        # while the rewrite runs, and waits for it in the daemon's queue.
        ghost = asyncio.ensure_future(client.text_document_inline_completion_async(
            inline_params(1, 11, t.InlineCompletionTriggerKind.Automatic)))
        queued = await _queued_behind(slow_env, "edit", timeout=30)
        res = await asyncio.wait_for(rewrite, 120)
        assert res["applied"] is True, res
        assert queued, "the rewrite ended before the ghost text reached the daemon: nothing was tested"
        await asyncio.wait_for(ghost, 60)


async def _queued_behind(env: dict[str, str], method: str, timeout: float) -> bool:
    """Whether a request comes to wait in the daemon's queue behind the running `method`
    request; False when that one stops running first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = await asyncio.to_thread(daemon_status, env)
        if (st["running"] or {}).get("method") != method:
            return False
        if st["queue_depth"] > 0:
            return True
        await asyncio.sleep(0.05)
    raise AssertionError(f"the daemon's {method} request still runs, alone, after {timeout} s")


async def test_load_failure_is_reported_once(tmp_path: Path) -> None:
    env = _daemon_env(tmp_path, str(tmp_path / "no-such-model"))
    try:
        async with running_client(env) as client:
            open_doc(client)
            for col in range(4):
                kind = t.InlineCompletionTriggerKind.Automatic if col % 2 else t.InlineCompletionTriggerKind.Invoked
                assert await client.text_document_inline_completion_async(inline_params(1, 11, kind)) is None
            errors = [m for m in client.messages if m.type == t.MessageType.Error]
            assert len(errors) == 1 and "no-such-model" in errors[0].message
            states = [s.state for s in client.statuses]  # type: ignore[attr-defined]
            assert "error" in states
    finally:
        _stop_daemon(env)
