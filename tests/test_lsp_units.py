"""The language server's pure logic: context window, ring buffer, cache, triggers, settings."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from dgemma.errors import DgemmaError
from dgemma.lsp.cache import CompletionCache
from dgemma.lsp.context import (ALIGN_LINES, CHARS_PER_TOKEN, Budget, RingBuffer, build_prompt, comment_prefix,
                                offset_at, position_at, window)
from dgemma.lsp.settings import Settings
from dgemma.lsp.triggers import Debouncer, Latest, automatic_lines, should_trigger


def _doc(n: int) -> str:
    return "\n".join(f"line_{i} = {i}" for i in range(n)) + "\n"


def test_window_fits_budget_and_starts_on_aligned_line() -> None:
    text = _doc(2000)
    budget = Budget(prefix_tokens=200, suffix_tokens=50)
    offset = text.index("line_1500 ")
    prefix, suffix = window(text, offset, budget)
    assert len(prefix) <= 200 * CHARS_PER_TOKEN
    assert len(suffix) <= 50 * CHARS_PER_TOKEN
    assert text[:offset].endswith(prefix) and text[offset:].startswith(suffix)
    first = int(prefix.split(" ", 1)[0].split("_")[1])
    assert first % ALIGN_LINES == 0
    assert suffix.endswith("\n")


def test_window_start_is_stable_while_typing() -> None:
    # Consecutive keystrokes must keep the same first line, or the daemon's
    # prefix cache misses on every key.
    text = _doc(2000)
    budget = Budget(prefix_tokens=200, suffix_tokens=50)
    offset = text.index("line_1500 ")
    p1, _ = window(text, offset, budget)
    typed = text[:offset] + "abc" + text[offset:]
    p2, _ = window(typed, offset + 3, budget)
    assert p2.startswith(p1.split("\n", 1)[0])


def test_small_document_is_whole() -> None:
    text = "a = 1\nb = 2\n"
    assert window(text, 6, Budget()) == ("a = 1\n", "b = 2\n")


def test_offsets_utf16() -> None:
    text = "x = '😀'\ny = 1\n"
    # The emoji is two UTF-16 units: character 7 is just after it.
    off = offset_at(text, 0, 7)
    assert text[off] == "'"
    assert position_at(text, off) == (0, 7)
    assert offset_at(text, 1, 2) == text.index("y") + 2
    assert offset_at(text, 9, 0) == len(text)


def test_ring_buffer_context_dedup_and_budget() -> None:
    ring = RingBuffer(capacity=3)
    helper = "def helper(x):\n    return x * 2\n"
    texts = {
        "file:///p/helper.py": helper,
        "file:///p/copy.py": helper,  # identical text: included once
        "file:///p/main.py": "print(helper(2))\n",
        "file:///p/old.py": "OLD = 1\n",
    }
    for uri in ("file:///p/old.py", "file:///p/helper.py", "file:///p/copy.py", "file:///p/main.py"):
        ring.touch(uri, 0)
    assert "file:///p/old.py" not in ring.spots  # capacity 3 evicted the oldest
    prompt = build_prompt(texts["file:///p/main.py"], 0, uri="file:///p/main.py", language="python", ring=ring,
                          open_texts=texts, budget=Budget(), root="/p")
    assert prompt.extra.count("# def helper(x):") == 1
    assert "main.py" not in prompt.extra  # the current file is never extra context
    assert prompt.prefix == prompt.extra + prompt.window_prefix
    assert all(line.startswith("#") for line in prompt.extra.strip().split("\n"))
    tiny = build_prompt(texts["file:///p/main.py"], 0, uri="file:///p/main.py", language="python", ring=ring,
                        open_texts=texts, budget=Budget(extra_tokens=5))
    assert tiny.extra == ""


def test_unknown_language_gets_no_extra_context() -> None:
    ring = RingBuffer()
    ring.touch("file:///a.txt", 0)
    p = build_prompt("x", 1, uri="file:///b.txt", language="plaintext", ring=ring,
                     open_texts={"file:///a.txt": "hello", "file:///b.txt": "x"})
    assert p.extra == "" and comment_prefix("plaintext") is None and comment_prefix("rust") == "//"


def test_cache_exact_and_typed_through() -> None:
    c = CompletionCache(capacity=4)
    c.put("def f(", ")", "a, b", 8)
    assert c.get("def f(", ")", 8) == "a, b"
    assert c.get("def f(a", ")", 8) == ", b"
    assert c.get("def f(a,", ")", 8) == " b"
    assert c.get("def f(x", ")", 8) is None  # typed something else
    assert c.get("def f(", "]", 8) is None  # suffix changed
    assert c.get("def f(a, b", ")", 8) is None  # typed all of it: nothing left to show
    for i in range(10):
        c.put(str(i), "", "z", 8)
    assert len(c) == 4


def test_cache_answers_only_requests_within_its_token_budget() -> None:
    c = CompletionCache()
    c.put("x = ", "", "short", 16)  # automatic ghost text
    assert c.get("x = ", "", 256) is None  # invoked: the short answer may be cut, ask the model
    assert c.get("x = s", "", 256) is None
    c.put("x = ", "", "the longer answer", 256)
    assert c.get("x = ", "", 16) == "the longer answer"  # typing through an invoked suggestion
    assert c.get("x = the", "", 16) == " longer answer"


def test_triggers() -> None:
    assert should_trigger("x = ", "", automatic=True)
    assert not should_trigger("pri", "nt(x)", automatic=True)  # mid-word
    assert should_trigger("print(", ")", automatic=True)  # closing punctuation is fine
    assert not should_trigger("x = ", "some_long_call(a, b)", automatic=True)
    assert not should_trigger("x = ", "y", automatic=True)
    assert should_trigger("pri", "nt(x)", automatic=False)  # invoked: the user asked


def test_automatic_ghost_text_is_one_line_unless_a_block_body_starts() -> None:
    assert automatic_lines("x = ", "", 16) == 1  # typing in a line
    assert automatic_lines("def f(a):\n    return a\n", "", 16) == 1  # a new line in a body
    assert automatic_lines("def f(a):\n    ", "", 16) == 16  # the body after a signature
    assert automatic_lines("if (x) {\r\n\t", "", 16) == 16  # CRLF, tabs, braces
    assert automatic_lines("items = [\n\n    ", "", 16) == 1  # a blank line between: not the opener's body
    assert automatic_lines("def f(a):\n    ", "pass", 16) == 1  # text after the cursor
    assert automatic_lines("    ", "", 16) == 1  # the first line of a file
    assert automatic_lines("for x in xs:  # each\n    ", "", 4) == 4  # a comment after the opener
    assert automatic_lines("s = '{'  # x\n", "", 4) == 1


async def test_debouncer_latest_wins() -> None:
    latest = Latest()
    d = Debouncer(0.02, latest)
    g1 = latest.begin("doc")
    g2 = latest.begin("doc")
    r1, r2 = await asyncio.gather(d.settle("doc", g1), d.settle("doc", g2))
    assert (r1, r2) == (False, True)
    assert await d.settle("other", latest.begin("other"), 0)


async def test_latest_stops_older_requests_of_a_document() -> None:
    latest = Latest()
    gate = asyncio.Event()

    async def daemon_request(answer: str) -> str:
        await gate.wait()
        return answer

    old = latest.begin("doc")
    running = asyncio.ensure_future(latest.run("doc", old, daemon_request("old")))
    await asyncio.sleep(0)
    new = latest.begin("doc")  # supersedes: the old daemon request is cancelled, its caller gets None
    assert await running is None and not latest.is_current("doc", old)
    gate.set()
    assert await latest.run("doc", new, daemon_request("new")) == "new"

    async def stopped(code: str) -> str:
        raise DgemmaError(code, "stopped")

    assert await latest.run("doc", new, stopped("superseded")) is None  # the daemon's word for it
    with pytest.raises(DgemmaError):
        await latest.run("doc", new, stopped("internal"))

    # The request itself cancelled ($/cancelRequest): the daemon request stops and the caller sees it.
    gate.clear()
    inner = asyncio.ensure_future(daemon_request("x"))
    outer = asyncio.ensure_future(latest.run("doc", new, inner))
    await asyncio.sleep(0)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    await asyncio.sleep(0)
    assert inner.cancelled()


def test_settings_merge() -> None:
    s, problems = Settings().merged({"dgemma": {"debounceMs": "50", "seed": 3, "bogus": 1, "maxLineSuffix": "x",
                                                "sampler": 7}})
    # The bad values are reported (once, by the server), the unknown key is not.
    assert len(problems) == 2 and "maxLineSuffix" in problems[0] and "sampler" in problems[1]
    assert s.debounce_ms == 50 and s.seed == 3 and s.max_line_suffix == Settings().max_line_suffix
    assert Settings().merged(None) == (Settings(), [])
    # Back to a random seed: null is a valid seed whatever the current one is.
    assert s.merged({"seed": None}) == (dataclasses.replace(s, seed=None), [])
    assert s.budget.prefix_tokens == Settings().prefix_tokens


def test_command_args() -> None:
    from dgemma.lsp.server import _command_args

    args = _command_args(("file:///a", {"start": 1}, "go"), ("uri", "range", "instruction"))
    assert args == {"uri": "file:///a", "range": {"start": 1}, "instruction": "go"}
    one = _command_args(({"uri": "u", "range": {}},), ("uri", "range", "instruction"))
    assert one == {"uri": "u", "range": {}}
