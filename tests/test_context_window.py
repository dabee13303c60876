"""Requests on long files fit the model's context: the engine keeps the code nearest the cursor
(engine/window.py), through the engine, the command line (with and without the daemon) and the
language server. The bundled model's context is 2,048 tokens; a 5,000-line file is ~60,000."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from lsprotocol import types as t

from dgemma.engine.engine import Engine
from dgemma.engine.loading import load_model
from dgemma.engine.window import ALIGN_LINES, cut_prefix, cut_suffix
from test_daemon_util import daemon, dgemma, isolated_env, short_tmp  # noqa: F401  (fixture)
from test_lsp_e2e import inline_params, lsp_env, open_doc, running_client  # noqa: F401  (fixture)

FAST = {"max_denoising_steps": 2}


def chars(text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """A tokenizer of one token per character."""
    return [ord(c) for c in text], [(i, i + 1) for i in range(len(text))]


def long_source(lines: int = 5000, seed: int = 0) -> str:
    rnd = random.Random(seed)
    out, n = [], 0
    while n < lines:
        k = rnd.randrange(1000)
        block = [f"class Item{k}(Base):", f'    """Item number {k}: ünïcode and\ttabs."""', "",
                 "    def value(self, x: int) -> int:", f"        return x * {k} + self.offset  # {rnd.random():.6f}",
                 ""]
        out += block
        n += len(block)
    return "\n".join(out[:lines]) + "\n"


def test_prefix_window_starts_on_a_grid_line_and_fits():
    text = "".join(f"line {i}\n" for i in range(1000))
    cut = cut_prefix(text, 500, chars, 1)
    assert len(cut.ids) <= 500 and cut.dropped > 0
    assert text[cut.dropped - 1] == "\n" and text.count("\n", 0, cut.dropped) % ALIGN_LINES == 0
    assert "".join(map(chr, cut.ids)) == text[cut.dropped:]
    # A grid line sooner would not fit: the window is as long as the grid allows.
    earlier = [p for p in range(cut.dropped) if p == 0 or text[p - 1] == "\n"]
    grid = [p for p in earlier if text.count("\n", 0, p) % ALIGN_LINES == 0]
    assert all(len(text) - p > 500 for p in grid)


def test_prefix_window_start_holds_while_the_cursor_moves_down():
    text = "".join(f"line {i}\n" for i in range(1000))
    starts = [cut_prefix(text + "".join(f"new {j}\n" for j in range(k)), 500, chars, 1).dropped for k in range(40)]
    assert starts == sorted(starts)
    assert len(set(starts)) <= 40 // ALIGN_LINES + 2  # it moves by whole grid steps, seldom


def test_prefix_window_inside_one_huge_line_and_small_texts():
    huge = "x" * 10_000
    cut = cut_prefix("a\n" + huge, 300, chars, 1)
    assert len(cut.ids) == 300 and cut.dropped == len(huge) + 2 - 300
    assert cut_prefix("short\n", 300, chars, 1).dropped == 0
    assert cut_prefix("", 300, chars, 1).ids == []
    # Cut by characters before tokenizing: a token is at most 4 characters here.
    seen = []
    cut = cut_prefix("abcd\n" * 100_000, 50, lambda s: (seen.append(len(s)), chars(s))[1], 4)
    assert max(seen) <= 50 * 4 and len(cut.ids) <= 50


def test_suffix_head_is_what_a_canvas_can_pin():
    cut = cut_suffix("0123456789" * 10, 16, chars, 1)
    assert len(cut.ids) == 16 and cut.dropped == 100 - 16
    assert cut_suffix("abc", 16, chars, 1).dropped == 0


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load_model())


def test_fill_at_the_end_of_a_long_file_then_one_line_further(engine: Engine):
    text = long_source()
    res = engine.fill(text, "", seed=1, settings=FAST, max_tokens=32)
    assert res.prefix_dropped > 0 and res.prompt_tokens + 64 <= engine.context_limit
    assert text[res.prefix_dropped - 1] == "\n"  # cut at a line start
    # One line further down: the window start holds, and all but the new lines come from the cache.
    more = text + "class Extra(Base):\n    "
    nxt = engine.fill(more, "", seed=1, settings=FAST, max_tokens=32)
    assert nxt.prefix_dropped == res.prefix_dropped
    assert nxt.cached_tokens >= res.prompt_tokens - 16


def test_edit_in_the_middle_of_a_long_file(engine: Engine):
    text = long_source()
    mid = text.index("\n", len(text) // 2) + 1
    end = text.index("\n", mid) + 1
    res = engine.edit(text[:mid], text[mid:end], text[end:], "rename it", seed=2, settings=FAST)
    assert res.prefix_dropped > 0 and res.suffix_dropped > 0 and res.prompt_tokens < engine.context_limit


def test_a_selection_longer_than_the_context_says_what_to_do(engine: Engine):
    from dgemma.errors import DgemmaError

    with pytest.raises(DgemmaError) as exc:
        engine.edit("", long_source(), "", "tidy up")
    assert exc.value.code == "too_large" and "Select fewer lines" in exc.value.message


@pytest.mark.parametrize("mode", ["daemon", "in-process"])
def test_cli_fill_and_edit_at_the_last_line_of_a_long_file(mode, daemon, tmp_path):  # noqa: F811
    if mode == "daemon":
        env, extra = daemon.env, []
    else:
        env, extra = isolated_env(short_tmp("dgw-")), ["--no-daemon"]
    f = tmp_path / "long.py"
    source = long_source().encode()
    f.write_bytes(source)
    last = source.count(b"\n")
    r = dgemma(["fill", f"{f}:{last}:1", "--json", "--max-tokens", "16", "--steps", "2", *extra], env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert isinstance(out["middle"], str) and out["prefix_dropped"] > 0 and f.read_bytes() == source
    r = dgemma(["edit", f"{f}:{last}-{last}", "-m", "return a constant", "--yes", "--steps", "2", "--seed", "5",
                *extra], env)
    new = f.read_bytes()
    if r.returncode == 0 and "applied" in r.stderr:
        head = source[:source.rindex(b"\n", 0, len(source) - 1) + 1]
        assert new.startswith(head) and new.endswith(b"\n") and new != source
    else:  # the model gave nothing: said so, and nothing written
        assert "unchanged" in r.stderr or "no change" in r.stderr, r.stderr
        assert new == source


async def test_language_server_completes_and_rewrites_at_the_end_of_a_long_file(lsp_env):  # noqa: F811
    text = long_source()
    uri = "file:///work/example/long.py"
    last = text.count("\n") - 1
    # The server's own window as large as the file: the engine must fit the context itself.
    options = {"prefixTokens": 100_000, "suffixTokens": 100_000}
    async with running_client(lsp_env, options) as client:
        open_doc(client, text, uri)
        res = await client.text_document_inline_completion_async(inline_params(last, 0, uri=uri))
        assert res is None or all(isinstance(item.insert_text, str) for item in res.items)
        rng = {"start": {"line": last, "character": 4}, "end": {"line": last + 1, "character": 0}}
        out = await client.workspace_execute_command_async(t.ExecuteCommandParams(
            command="dgemma.rewrite", arguments=[uri, rng, "return zero"]))
        assert out.get("error") in (None, "empty"), out
        if out["applied"]:
            (edit,) = client.applied_edits  # type: ignore[attr-defined]
            (te,) = edit.edit.document_changes[0].edits
            assert te.range.start == t.Position(last, 4) and te.range.end == t.Position(last + 1, 0)
            assert te.new_text.endswith("\n") and te.new_text.strip()


def test_a_huge_prefix_is_windowed_and_blocks_no_one(daemon):  # noqa: F811
    """Issue 22 (2): a prefix of several MiB used to be tokenized whole on the model worker
    (seconds) before it was refused, and the daemon kept the memory. Now it is cut by characters
    first: it is served, another client's fill after it is served too, and memory stays bounded."""
    from test_daemon_util import Raw
    from test_reliability import _rss

    big = "value = compute(item)  # padding\n" * 200_000  # 6.6 MB, under the 8 MiB frame limit
    with Raw(daemon.socket) as a, Raw(daemon.socket) as b:
        pid = a.call("status")[-1]["result"]["pid"]
        before = _rss(pid)
        rid = a.request("fill", {"prefix": big, "suffix": "", "max_tokens": 4, "stream": False,
                                 "settings": {"max_denoising_steps": 2}})
        small = b.call("fill", {"prefix": "def f(x):\n    return ", "suffix": "\n", "max_tokens": 4, "stream": False})
        assert small[-1]["type"] == "result"
        reply = a.until_done(rid)[-1]
        assert reply["type"] == "result", reply
        assert reply["result"]["prefix_dropped"] > len(big) - 20_000
    # The daemon holds no copy of the big request once it has answered (a few of its 6.6 MB
    # transient copies may stay in the allocator's free lists).
    assert _rss(pid) - before < 100 << 20
