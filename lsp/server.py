"""``dgemma lsp``: a pygls language server that turns editor events into daemon requests.

One function per LSP feature, as in jedi-language-server. The concerns live in
their own modules: ``context`` (what the model sees), ``cache``, ``triggers``
(debounce and skip rules), ``backend``
(the daemon connection, its start-up and failures) and ``progress``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any
from urllib.parse import unquote, urlparse

from lsprotocol import types
from lsprotocol.converters import get_converter
from pygls.lsp.server import LanguageServer

from dgemma import __version__
from dgemma.lsp.backend import Backend, DaemonBackend
from dgemma.errors import DgemmaError
from dgemma.lsp.cache import CompletionCache
from dgemma.lsp.edits import EditHistory
from dgemma.lsp.context import RingBuffer, build_prompt, language_of, offset_at, position_at, window
from dgemma.lsp.progress import StateReporter
from dgemma.lsp.settings import Settings
from dgemma.lsp.transport import DgemmaProtocol, serve_stdio
from dgemma.lsp.triggers import automatic_lines, Debouncer, Latest, should_trigger

log = logging.getLogger("dgemma.lsp")

CMD_REWRITE = "dgemma.rewrite"
CMD_FILL = "dgemma.fill"
CMD_STATUS = "dgemma.status"
converter = get_converter()
NEXT_EDIT = "dgemma/nextEdit"  # the request, and the notification sent unasked to clients that opt in


class DgemmaLanguageServer(LanguageServer):
    def __init__(self, backend: Backend | None = None) -> None:
        # DgemmaProtocol answers every request, even one whose params do not deserialize.
        super().__init__("dgemma", __version__, protocol_cls=DgemmaProtocol)
        self.settings = Settings()
        self.ring = RingBuffer(self.settings.ring_size)
        self.cache = CompletionCache()
        # Which completion request is the newest per document; older ones stop (their daemon request too).
        self.latest = Latest()
        self.debouncer = Debouncer(self.settings.debounce_ms / 1000, self.latest)
        self.reporter = StateReporter(self)
        self.backend: Backend = backend or DaemonBackend(on_state=self.reporter.on_state)
        self.languages: dict[str, str] = {}
        self.root: str | None = None
        self.edits = EditHistory()

    def start_io(self, stdin: Any = None, stdout: Any = None) -> None:
        """Serve on stdio with dgemma's reader (lsp/transport.py): message size limit, framing
        problems logged once, the server never dies of its input."""
        serve_stdio(self, stdin, stdout)

    def apply_settings(self, options: Any) -> None:
        self.settings, problems = self.settings.merged(options)
        for problem in problems:
            self.reporter.warn_once(problem)
        self.ring.capacity = self.settings.ring_size
        self.debouncer.delay_s = self.settings.debounce_ms / 1000
        self.backend.retry_after_s = self.settings.retry_after_s

    def supports_inline_completion(self) -> bool:
        caps = self.client_capabilities
        td = caps.text_document if caps else None
        return bool(td and td.inline_completion is not None)

    def open_texts(self) -> dict[str, str]:
        return {uri: doc.source for uri, doc in self.workspace.text_documents.items()}


server = DgemmaLanguageServer()


# ---- lifecycle and document sync ------------------------------------------------------

@server.feature(types.INITIALIZE)
def initialize(ls: DgemmaLanguageServer, params: types.InitializeParams) -> None:
    ls.apply_settings(params.initialization_options)
    if params.root_uri and params.root_uri.startswith("file:"):
        ls.root = unquote(urlparse(params.root_uri).path)
    elif params.root_path:
        ls.root = params.root_path


@server.feature(types.INITIALIZED)
async def initialized(ls: DgemmaLanguageServer, params: types.InitializedParams) -> None:
    # Start (or find) the daemon now, so the model loads while the user reads
    # code rather than on the first keystroke. Failures are reported by the
    # reporter; the next request retries.
    ls.reporter.begin_startup()
    asyncio.get_running_loop().create_task(_warm_up(ls))


async def _warm_up(ls: DgemmaLanguageServer) -> None:
    try:
        await ls.backend.ensure_ready()
    except DgemmaError:
        pass  # already reported once by the reporter
    except Exception:  # pragma: no cover - never let a warm-up kill the server
        log.exception("warm-up failed")


@server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
def did_change_configuration(ls: DgemmaLanguageServer, params: types.DidChangeConfigurationParams) -> None:
    ls.apply_settings(params.settings)


@server.feature(types.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: DgemmaLanguageServer, params: types.DidOpenTextDocumentParams) -> None:
    doc = params.text_document
    ls.languages[doc.uri] = language_of(doc.uri, doc.language_id)
    ls.edits.opened(doc.uri, doc.text)
    # The top of a freshly opened file (imports, definitions) is the best guess
    # of what is useful from it until the user edits it.
    ls.ring.touch(doc.uri, 0)


@server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: DgemmaLanguageServer, params: types.DidChangeTextDocumentParams) -> None:
    uri = params.text_document.uri
    line = 0
    for change in params.content_changes:
        if isinstance(change, types.TextDocumentContentChangePartial):
            line = change.range.start.line
    ls.ring.touch(uri, line)
    ls.edits.changed(uri, ls.workspace.get_text_document(uri).source)
    # A suggestion in flight is for the text before this change: it stops, and is never shown.
    gen = ls.latest.begin(_next_key(uri))
    if ls.settings.next_edit and ls.settings.next_edit_notify:
        asyncio.get_running_loop().create_task(_notify_next_edit(ls, uri, gen))


@server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
def did_close(ls: DgemmaLanguageServer, params: types.DidCloseTextDocumentParams) -> None:
    uri = params.text_document.uri
    ls.ring.forget(uri)
    ls.languages.pop(uri, None)
    ls.latest.forget(uri)
    ls.latest.forget(_next_key(uri))
    ls.edits.forget(uri)


# ---- completions ----------------------------------------------------------------------

async def _complete(ls: DgemmaLanguageServer, uri: str, position: types.Position, automatic: bool) -> str | None:
    """The cleaned middle at ``position``, or None (skipped, superseded, failed)."""
    t0 = time.monotonic()
    gen = ls.latest.begin(uri)  # every older request for this document is stale now
    try:
        doc = ls.workspace.get_text_document(uri)
        text = doc.source  # read from disk when the editor never opened it
    except (OSError, ValueError):  # no such file (an unsaved buffer's URI), not UTF-8
        return None
    offset = offset_at(text, position.line, position.character)
    line_start = text.rfind("\n", 0, offset) + 1
    line_end = text.find("\n", offset)
    line_end = len(text) if line_end < 0 else line_end
    if not should_trigger(text[line_start:offset], text[offset:line_end], automatic, ls.settings.max_line_suffix):
        return None
    s = ls.settings
    max_tokens = s.max_tokens_automatic if automatic else s.max_tokens_invoked
    prompt = build_prompt(text, offset, uri=uri, language=ls.languages.get(uri) or language_of(uri),
                          ring=ls.ring, open_texts=ls.open_texts(), budget=s.budget, root=ls.root)
    cached = ls.cache.get(prompt.window_prefix, prompt.suffix, max_tokens)
    # An empty entry means the model had nothing here; an explicit request asks again
    # (with a random seed the answer may differ), typing does not.
    if cached or (cached == "" and automatic):
        return cached or None

    if automatic and not await ls.debouncer.settle(uri, gen):
        return None
    if not ls.backend.should_try(automatic):
        return None

    # The daemon cleans the middle (engine/postprocess.py), as it does for `dgemma fill`.
    try:
        result = await ls.latest.run(uri, gen, ls.backend.fill(
            prompt.prefix, prompt.suffix, document=uri, max_tokens=max_tokens,
            n=s.n, seed=s.seed, sampler=s.sampler,
            # Typing gets one line unless a block's body starts here; an invoked completion is a
            # request for code, which the engine answers with at least a token (engine/answers.py).
            max_lines=automatic_lines(text[:offset], text[offset:line_end], s.max_lines_automatic)
            if automatic else None,
            min_tokens=0 if automatic else 1,
        ))
    except DgemmaError as exc:
        ls.reporter.request_failed(exc)
        return None
    if result is None:  # stopped early: a newer request for this document took over
        return None
    middle = result.text
    # For `dgemma.status` and bench/lsp.py: the engine's share of this request.
    ls.reporter.last_fill = {"engine_ms": result.ms, "queue_ms": result.queue_ms, "steps": result.steps,
                             "server_ms": (time.monotonic() - t0) * 1000, "chars": len(middle)}
    # Cached even when stale: it is right for its own spot, where typing may come back.
    ls.cache.put(prompt.window_prefix, prompt.suffix, middle, max_tokens)
    # A newer request came in after the daemon answered, before this coroutine ran
    # again (too late to cancel the fill): the answer no longer fits the editor.
    if not ls.latest.is_current(uri, gen):
        return None
    return middle or None


@server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
async def inline_completion(
    ls: DgemmaLanguageServer, params: types.InlineCompletionParams
) -> types.InlineCompletionList | None:
    automatic = params.context.trigger_kind == types.InlineCompletionTriggerKind.Automatic
    middle = await _complete(ls, params.text_document.uri, params.position, automatic)
    if not middle:
        return None
    pos = params.position
    return types.InlineCompletionList(items=[
        types.InlineCompletionItem(insert_text=middle, range=types.Range(start=pos, end=pos))
    ])


@server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(resolve_provider=False))
async def completion(ls: DgemmaLanguageServer, params: types.CompletionParams) -> types.CompletionList | None:
    """The inline completion as a completion item, for clients without inline completion."""
    if ls.supports_inline_completion():
        return None
    # Clients send "invoked" for every identifier character typed, so every
    # completion request is treated as typing: debounced, skipped mid-word.
    uri, pos = params.text_document.uri, params.position
    middle = await _complete(ls, uri, pos, automatic=True)
    if not middle:
        return None
    # Clients filter items by the word before the cursor, so the edit starts at
    # that word and repeats it: otherwise the item is filtered out at once.
    text = ls.workspace.get_text_document(uri).source
    offset = offset_at(text, pos.line, pos.character)
    start = offset
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
        start -= 1
    word = text[start:offset]
    sl, sc = position_at(text, start)
    first = (word + middle).split("\n", 1)[0].strip() or middle.strip().split("\n", 1)[0]
    item = types.CompletionItem(
        label=first[:80],
        kind=types.CompletionItemKind.Snippet,
        detail="dgemma",
        documentation=types.MarkupContent(kind=types.MarkupKind.PlainText, value=word + middle),
        sort_text="0",
        filter_text=word + middle,
        insert_text_format=types.InsertTextFormat.PlainText,
        text_edit=types.TextEdit(range=types.Range(start=types.Position(sl, sc), end=pos), new_text=word + middle),
    )
    return types.CompletionList(is_incomplete=True, items=[item])


# ---- next-edit suggestions ------------------------------------------------------------

def _next_key(uri: str) -> str:
    """The `Latest` key and daemon `document` of a document's next-edit requests: a newer one
    supersedes them, ghost text and rewrites do not."""
    return f"{uri}#next"


async def _next_edits(ls: DgemmaLanguageServer, uri: str, line: int, gen: int) -> tuple[list[types.TextEdit], int | None]:
    """The suggested edits for ``uri`` as it is now, and the version they are for; none when the
    feature is off, there are no recent edits, the model proposes nothing, or the document
    changed meanwhile (a suggestion is never applied to other text)."""
    doc = ls.workspace.get_text_document(uri)
    text, version = doc.source, doc.version
    recent = ls.edits.recent(uri)
    s = ls.settings
    if not s.next_edit or not recent:
        return [], version
    try:
        found = await ls.latest.run(_next_key(uri), gen, ls.backend.next_edit(
            text, line, [vars(e) for e in recent], document=_next_key(uri), path=_file_path(uri),
            region_lines=s.next_edit_region_lines, seed=s.seed, sampler=s.sampler))
    except DgemmaError as exc:
        ls.reporter.request_failed(exc)
        return [], version
    if found is None or not ls.latest.is_current(_next_key(uri), gen) or \
            ls.workspace.get_text_document(uri).version != version:
        return [], version

    def at(line_no: int) -> types.Position:  # a line's start; past the last line, the end of the text
        return types.Position(*position_at(text, offset_at(text, line_no, 0)))
    return [types.TextEdit(range=types.Range(start=at(e["start_line"]), end=at(e["end_line"])), new_text=e["text"])
            for e in found], version


@server.feature(NEXT_EDIT)
async def next_edit(ls: DgemmaLanguageServer, params: Any) -> dict[str, Any]:
    """``dgemma/nextEdit {textDocument, position}`` -> ``{edits: TextEdit[], version}``: the edit
    that follows the document's recent edits, near ``position``. An empty list is an answer."""
    uri = _field(_field(params, "textDocument"), "uri")
    line = _field(_field(params, "position"), "line")
    if not isinstance(uri, str) or not isinstance(line, int):
        raise ValueError("dgemma/nextEdit needs {textDocument: {uri}, position: {line, character}}")
    edits, version = await _next_edits(ls, uri, line, ls.latest.begin(_next_key(uri)))
    return {"edits": [converter.unstructure(e) for e in edits], "version": version}


async def _notify_next_edit(ls: DgemmaLanguageServer, uri: str, gen: int) -> None:
    """After a pause in editing, the suggestion sent unasked (clients that opted in)."""
    await asyncio.sleep(ls.settings.next_edit_debounce_ms / 1000)
    if not ls.latest.is_current(_next_key(uri), gen):
        return  # typed again: the newer change asks instead
    recent = ls.edits.recent(uri)
    line = recent[-1].line + max(0, recent[-1].new.count("\n") - 1) if recent else 0
    edits, version = await _next_edits(ls, uri, line, gen)
    if edits:
        ls.protocol.notify(NEXT_EDIT, {"textDocument": {"uri": uri, "version": version},
                                       "edits": [converter.unstructure(e) for e in edits]})


def _field(obj: Any, name: str) -> Any:
    """A field of a custom request's params (pygls hands them over as attribute objects or maps)."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _file_path(uri: str) -> str | None:
    return unquote(urlparse(uri).path) if uri.startswith("file:") else None


# ---- code actions and commands --------------------------------------------------------

@server.feature(
    types.TEXT_DOCUMENT_CODE_ACTION,
    types.CodeActionOptions(code_action_kinds=[types.CodeActionKind.RefactorRewrite]),
)
def code_action(ls: DgemmaLanguageServer, params: types.CodeActionParams) -> list[types.CodeAction]:
    uri, rng = params.text_document.uri, params.range
    if rng.start == rng.end:
        # Editors ask for code actions at every cursor move to decide on a
        # lightbulb: offer the fill only when the user opened the menu.
        if params.context.trigger_kind != types.CodeActionTriggerKind.Invoked:
            return []
        return [types.CodeAction(
            title="Fill at cursor (dgemma)",
            kind=types.CodeActionKind.RefactorRewrite,
            command=types.Command(title="Fill at cursor (dgemma)", command=CMD_FILL, arguments=[uri, _pos_json(rng.start)]),
        )]
    # No instruction in the arguments: a generic client cannot prompt for one,
    # so the server regenerates the selection. Editor plugins ask the user and
    # call dgemma.rewrite with the instruction themselves.
    return [types.CodeAction(
        title="Rewrite selection…",
        kind=types.CodeActionKind.RefactorRewrite,
        command=types.Command(title="Rewrite selection…", command=CMD_REWRITE, arguments=[uri, _range_json(rng)]),
    )]


@server.command(CMD_REWRITE)
async def rewrite(ls: DgemmaLanguageServer, *args: Any) -> dict[str, Any]:
    """``dgemma.rewrite(uri, range, instruction?)`` or one map with those keys.

    Applies the replacement with ``workspace/applyEdit``; an empty instruction
    regenerates the selection as fill-in-the-middle.
    """
    a = _command_args(args, ("uri", "range", "instruction"))
    uri = _require(a, "uri", str)
    rng = _parse_range(_require(a, "range", dict))
    instruction = a.get("instruction") or ""
    if not isinstance(instruction, str):
        raise ValueError("`instruction` must be a string")
    # A selection made backwards arrives with its end first; the edit must cover the same text.
    if (rng.end.line, rng.end.character) < (rng.start.line, rng.start.character):
        rng = types.Range(start=rng.end, end=rng.start)
    doc = ls.workspace.get_text_document(uri)
    text, version = doc.source, doc.version
    start = offset_at(text, rng.start.line, rng.start.character)
    end = offset_at(text, rng.end.line, rng.end.character)
    s = ls.settings
    # The same budget as completions: a whole large file would overflow the
    # model's context. The selection itself is always sent whole.
    prefix, _ = window(text, start, s.budget)
    _, suffix = window(text, end, s.budget)
    selection = text[start:end]
    ls.reporter.busy("Rewriting selection")
    try:
        # The daemon fits the answer to the selection (engine/postprocess.py, clean_replacement).
        res = await ls.backend.edit(prefix, selection, suffix, instruction, document=_edit_key(uri),
                                    strength=s.strength, seed=s.seed, sampler=s.sampler)
    except DgemmaError as exc:
        ls.reporter.request_failed(exc, always=True)
        return {"applied": False, "error": exc.code, "message": exc.message}
    finally:
        ls.reporter.idle()
    if not res.text:
        # Applying "" would delete the selection: nothing was asked to be deleted.
        empty = DgemmaError("empty", "The model gave nothing for this selection; nothing was changed.")
        ls.reporter.request_failed(empty, always=True)
        return {"applied": False, "error": empty.code, "message": empty.message}
    applied = await _apply(ls, uri, version, rng, res.text)
    return {"applied": applied, "text": res.text}


@server.command(CMD_FILL)
async def fill(ls: DgemmaLanguageServer, *args: Any) -> dict[str, Any]:
    """``dgemma.fill(uri, position)``: insert the model's middle at ``position`` as an edit."""
    a = _command_args(args, ("uri", "position"))
    uri = _require(a, "uri", str)
    pos = _parse_position(_require(a, "position", dict))
    doc = ls.workspace.get_text_document(uri)
    text, version = doc.source, doc.version
    offset = offset_at(text, pos.line, pos.character)
    s = ls.settings
    prompt = build_prompt(text, offset, uri=uri, language=ls.languages.get(uri) or language_of(uri),
                          ring=ls.ring, open_texts=ls.open_texts(), budget=s.budget, root=ls.root)
    ls.reporter.busy("Filling")
    try:
        res = await ls.backend.fill(prompt.prefix, prompt.suffix, document=_edit_key(uri),
                                    max_tokens=s.max_tokens_invoked, n=s.n, seed=s.seed, sampler=s.sampler,
                                    min_tokens=1)
    except DgemmaError as exc:
        ls.reporter.request_failed(exc, always=True)
        return {"applied": False, "error": exc.code, "message": exc.message}
    finally:
        ls.reporter.idle()
    middle = res.text
    if not middle:
        return {"applied": False, "text": ""}
    applied = await _apply(ls, uri, version, types.Range(start=pos, end=pos), middle)
    return {"applied": applied, "text": middle}


@server.command(CMD_STATUS)
def status(ls: DgemmaLanguageServer, *args: Any) -> dict[str, Any]:
    """The daemon's state as the server last saw it (for status bars)."""
    return {**ls.reporter.details(), "cache": {"entries": len(ls.cache), "hits": ls.cache.hits,
                                               "misses": ls.cache.misses}}


def _edit_key(uri: str) -> str:
    """The daemon `document` of explicit edits (rewrite, fill command).

    The daemon cancels a running request when a newer one for the same
    document arrives. Ghost text uses the plain URI, so typing in the file
    cannot cancel a rewrite the user asked for; only a newer edit of the same
    file replaces it.
    """
    return f"{uri}#edit"


async def _apply(ls: DgemmaLanguageServer, uri: str, version: int | None, rng: types.Range, new_text: str) -> bool:
    edit = types.TextEdit(range=rng, new_text=new_text)
    caps = ls.client_capabilities
    we = caps.workspace.workspace_edit if caps and caps.workspace else None
    if we is not None and we.document_changes:
        # Versioned: the client refuses the edit if the user typed meanwhile,
        # instead of splicing it into the wrong place.
        wedit = types.WorkspaceEdit(document_changes=[types.TextDocumentEdit(
            text_document=types.OptionalVersionedTextDocumentIdentifier(uri=uri, version=version),
            edits=[edit],
        )])
    else:
        wedit = types.WorkspaceEdit(changes={uri: [edit]})
    res = await ls.workspace_apply_edit_async(types.ApplyWorkspaceEditParams(edit=wedit, label="dgemma"))
    return bool(res and res.applied)


def _command_args(args: tuple[Any, ...], names: tuple[str, ...]) -> dict[str, Any]:
    if len(args) == 1 and isinstance(args[0], dict) and names[0] in args[0]:
        return dict(args[0])
    return {n: v for n, v in zip(names, args)}


def _require(a: dict[str, Any], name: str, kind: type) -> Any:
    v = a.get(name)
    if not isinstance(v, kind):
        raise ValueError(f"missing or invalid argument `{name}`")
    return v


def _parse_position(d: dict[str, Any]) -> types.Position:
    return types.Position(line=int(d["line"]), character=int(d["character"]))


def _parse_range(d: dict[str, Any]) -> types.Range:
    return types.Range(start=_parse_position(d["start"]), end=_parse_position(d["end"]))


def _pos_json(p: types.Position) -> dict[str, int]:
    return {"line": p.line, "character": p.character}


def _range_json(r: types.Range) -> dict[str, Any]:
    return {"start": _pos_json(r.start), "end": _pos_json(r.end)}


def main() -> None:
    """Run the language server on stdio (``dgemma lsp``)."""
    level = os.environ.get("DGEMMA_LSP_LOG", "WARNING").upper()
    # stdout carries the protocol: logs must go to stderr only, one line per record whatever
    # a client sent (the daemon's SafeFormatter).
    from dgemma.daemon.logs import SafeFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(handlers=[handler], level=getattr(logging, level, logging.WARNING))
    server.start_io()


if __name__ == "__main__":
    main()
