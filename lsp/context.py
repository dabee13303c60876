"""What the model sees: prefix and suffix around the cursor plus chunks of other buffers.

Budgets are in tokens but counted in characters (``CHARS_PER_TOKEN``): the
language server must not load a tokenizer (it may not even know which model
the daemon serves), and an estimate on the safe side is enough to keep the
prompt under the daemon's limits.

The prefix window starts on a line that only moves in steps of
``ALIGN_LINES``: consecutive keystrokes then send a byte-identical start of
prompt and the daemon's prefix KV cache is reused instead of re-encoding.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

from dgemma.engine.window import ALIGN_LINES, CHARS_PER_TOKEN  # the engine cuts its window on the same grid


_HASH = {
    "python", "shellscript", "sh", "bash", "zsh", "ruby", "perl", "r", "yaml", "toml",
    "dockerfile", "makefile", "cmake", "elixir", "julia", "nim", "powershell", "coffeescript",
}
_SLASH = {
    "c", "cpp", "objective-c", "objective-cpp", "cuda", "cuda-cpp", "java", "javascript",
    "javascriptreact", "typescript", "typescriptreact", "go", "rust", "swift", "kotlin",
    "scala", "csharp", "php", "dart", "jsonc", "groovy", "zig", "proto", "glsl", "hlsl",
    "solidity", "verilog", "systemverilog",
}
_DASH = {"lua", "sql", "haskell", "ada", "elm", "vhdl"}
_EXT = {
    ".py": "python", ".pyi": "python", ".sh": "shellscript", ".bash": "shellscript", ".rb": "ruby",
    ".pl": "perl", ".r": "r", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".jl": "julia",
    ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".cu": "cuda", ".java": "java",
    ".js": "javascript", ".mjs": "javascript", ".jsx": "javascriptreact", ".ts": "typescript",
    ".tsx": "typescriptreact", ".go": "go", ".rs": "rust", ".swift": "swift", ".kt": "kotlin",
    ".scala": "scala", ".cs": "csharp", ".php": "php", ".dart": "dart", ".zig": "zig",
    ".lua": "lua", ".sql": "sql", ".hs": "haskell",
}


def language_of(uri: str, language_id: str | None = None) -> str:
    if language_id:
        return language_id.lower()
    path = urlparse(uri).path
    return _EXT.get(os.path.splitext(path)[1].lower(), "")


def comment_prefix(language: str) -> str | None:
    """Line-comment leader for a language, None when we do not know one.

    Without a known comment syntax other files are left out: code pasted
    uncommented into the prompt would read as part of the current file.
    """
    if language in _HASH:
        return "#"
    if language in _SLASH:
        return "//"
    if language in _DASH:
        return "--"
    return None


def offset_at(text: str, line: int, character: int) -> int:
    """Character offset of an LSP position (UTF-16 columns clamped to the line)."""
    pos = 0
    for _ in range(line):
        nl = text.find("\n", pos)
        if nl < 0:
            return len(text)
        pos = nl + 1
    end = text.find("\n", pos)
    end = len(text) if end < 0 else end
    line_text = text[pos:end]
    return pos + _utf16_to_index(line_text, character)


def _utf16_to_index(s: str, units: int) -> int:
    if s.isascii():
        return min(units, len(s))
    n = 0
    for i, ch in enumerate(s):
        if n >= units:
            return i
        n += 2 if ord(ch) > 0xFFFF else 1
    return len(s)


def position_at(text: str, offset: int) -> tuple[int, int]:
    """LSP (line, UTF-16 character) of a character offset."""
    before = text[:offset]
    line = before.count("\n")
    col_text = before[before.rfind("\n") + 1 :]
    return line, sum(2 if ord(c) > 0xFFFF else 1 for c in col_text)


@dataclass(frozen=True)
class Budget:
    prefix_tokens: int = 1024
    suffix_tokens: int = 256
    extra_tokens: int = 512
    chunk_lines: int = 32


def window(text: str, offset: int, budget: Budget) -> tuple[str, str]:
    """Prefix and suffix around ``offset``, cut at line starts, under the budget."""
    prefix_full, suffix_full = text[:offset], text[offset:]
    max_p = budget.prefix_tokens * CHARS_PER_TOKEN
    if len(prefix_full) <= max_p:
        prefix = prefix_full
    else:
        lines = prefix_full.split("\n")
        # Earliest line from which the rest fits, then rounded *up* to the
        # alignment grid (which only shortens the prefix, so it still fits).
        start = len(prefix_full) - max_p
        acc = 0
        first = 0
        for i, ln in enumerate(lines):
            if acc >= start:
                first = i
                break
            acc += len(ln) + 1
        else:
            first = len(lines) - 1
        aligned = -(-first // ALIGN_LINES) * ALIGN_LINES
        if aligned >= len(lines):
            aligned = first
        prefix = "\n".join(lines[aligned:])
        if len(prefix) > max_p:  # one enormous line: cut inside it
            prefix = prefix[-max_p:]
    max_s = budget.suffix_tokens * CHARS_PER_TOKEN
    if len(suffix_full) <= max_s:
        suffix = suffix_full
    else:
        cut = suffix_full.rfind("\n", 0, max_s)
        suffix = suffix_full[: cut + 1] if cut > 0 else suffix_full[:max_s]
    return prefix, suffix


@dataclass
class Chunk:
    uri: str
    start: int  # first line
    text: str


def _similar(a: str, b: str) -> float:
    """Share of lines in common (llama.vim evicts chunks above 0.9)."""
    la, lb = a.split("\n"), b.split("\n")
    common = len(set(la) & set(lb))
    return 2 * common / (len(la) + len(lb)) if la or lb else 1.0


@dataclass
class RingBuffer:
    """Recently edited or visited spots in *other* buffers (most recent last).

    Spots are remembered as (uri, line) and cut into text only when a prompt
    is built, so a chunk always shows the buffer as it is now.
    """

    capacity: int = 16
    spots: "OrderedDict[str, int]" = field(default_factory=OrderedDict)

    def touch(self, uri: str, line: int) -> None:
        # One spot per buffer: the latest edit there is the most relevant, and a
        # burst of typing in one file must not flush every other file out.
        self.spots.pop(uri, None)
        self.spots[uri] = line
        while len(self.spots) > self.capacity:
            self.spots.popitem(last=False)

    def forget(self, uri: str) -> None:
        self.spots.pop(uri, None)

    def chunks(self, texts: dict[str, str], exclude_uri: str, chunk_lines: int) -> list[Chunk]:
        out: list[Chunk] = []
        for uri, line in self.spots.items():
            if uri == exclude_uri or uri not in texts:
                continue
            lines = texts[uri].split("\n")
            start = max(0, min(line - chunk_lines // 2, len(lines) - chunk_lines))
            body = "\n".join(lines[start : start + chunk_lines]).strip("\n")
            if body.strip():
                out.append(Chunk(uri, start, body))
        return out


def _display_path(uri: str, root: str | None) -> str:
    path = unquote(urlparse(uri).path) if uri.startswith("file:") else uri
    if root:
        try:
            return os.path.relpath(path, root)
        except ValueError:
            pass
    return os.path.basename(path) or path


def extra_context(
    chunks: list[Chunk],
    language: str,
    budget: Budget,
    window_text: str,
    root: str | None = None,
) -> str:
    """Commented chunks of other files to prepend to the prefix, within the budget.

    Chunks already contained in the prompt window, or nearly identical to a
    chunk already taken, are skipped. The most recent chunks win the budget
    but are printed last, nearest the code being written.
    """
    lead = comment_prefix(language)
    if lead is None or not chunks:
        return ""
    max_chars = budget.extra_tokens * CHARS_PER_TOKEN
    taken: list[str] = []
    blocks: list[str] = []
    used = 0
    for ch in reversed(chunks):
        if ch.text in window_text:
            continue
        if any(t == ch.text or _similar(ch.text, t) > 0.9 for t in taken):
            continue
        header = f"{lead} {_display_path(ch.uri, root)}"
        body = "\n".join(f"{lead} {ln}" if ln else lead for ln in ch.text.split("\n"))
        block = f"{header}\n{body}\n"
        if used + len(block) > max_chars:
            continue
        taken.append(ch.text)
        blocks.insert(0, block)
        used += len(block)
    if not blocks:
        return ""
    return f"{lead} Context from other files:\n" + "".join(blocks) + "\n"


@dataclass(frozen=True)
class Prompt:
    prefix: str  # extra context + prefix window: what the daemon gets
    suffix: str
    window_prefix: str  # the prefix window alone: the cache key
    extra: str


def build_prompt(
    text: str,
    offset: int,
    *,
    uri: str,
    language: str,
    ring: RingBuffer,
    open_texts: dict[str, str],
    budget: Budget = Budget(),
    root: str | None = None,
) -> Prompt:
    prefix, suffix = window(text, offset, budget)
    chunks = ring.chunks(open_texts, exclude_uri=uri, chunk_lines=budget.chunk_lines)
    extra = extra_context(chunks, language, budget, prefix + suffix, root)
    return Prompt(extra + prefix, suffix, prefix, extra)
