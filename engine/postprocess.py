"""Clean a raw model answer into the text every client shows or writes.

A fill-in-the-middle model returns the text between prefix and suffix, but
nothing stops it from re-typing what already follows the cursor, closing a
bracket the document closes anyway, or indenting with spaces in a tab file.
A rewrite must also fit its selection exactly: what precedes the selection on
its first line and follows it on its last stay where they are. The daemon
applies these rules to every answer (``engine/answers.py``), so the shell and
the editors get the same text. Each rule is one function so the golden cases in
``tests/golden/`` can name the rule they pin down.
"""
from __future__ import annotations

from dataclasses import dataclass

_CLOSERS = ")]}"
_OPENERS = "([{"
_PAIR = {")": "(", "]": "[", "}": "{"}
# What may be swallowed from a *partial* overlap with the rest of the line:
# punctuation only, because "x = 1" against a rest of "1 + 2" must survive.
_OVERLAP_CHARS = set(")]}>\"'`;,:")


@dataclass(frozen=True)
class Indent:
    """The document's indentation: ``"\\t"`` or a run of spaces."""

    unit: str

    @property
    def uses_tabs(self) -> bool:
        return self.unit == "\t"


def _leading_blanks(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def detect_indent(text: str, default: Indent = Indent("    ")) -> Indent:
    """Guess the indentation unit from the leading whitespace of the lines."""
    tabs = spaces = 0
    widths: dict[int, int] = {}
    prev = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        lead = _leading_blanks(line)
        if lead.startswith("\t"):
            tabs += 1
            prev = 0
            continue
        n = len(lead)
        if n:
            spaces += 1
        # Differences between consecutive indents reveal the unit even in files
        # that never indent by exactly one unit from column 0.
        d = abs(n - prev)
        if d:
            widths[d] = widths.get(d, 0) + 1
        prev = n
    if tabs > spaces:
        return Indent("\t")
    if not spaces:
        return default
    width = max((w for w in widths if w in (2, 3, 4, 8)), key=lambda w: (widths[w], -w), default=4)
    return Indent(" " * width)


def _lines_after_cursor(suffix: str) -> tuple[str, list[str]]:
    """Split the suffix into the rest of the cursor's line and the lines below."""
    rest, _, below = suffix.partition("\n")
    return rest, below.split("\n") if below else []


def drop_whitespace_only(text: str) -> str:
    return "" if not text.strip() else text


def trim_trailing_whitespace(text: str, rest_of_line: str) -> str:
    """Strip trailing blanks; keep a trailing newline only when code follows on the line.

    When the cursor sits before ``def g():`` a middle ``"def f(): ...\\n\\n"`` must keep
    its newlines or the two definitions would be glued together.
    """
    lines = [ln.rstrip(" \t") for ln in text.split("\n")]
    if rest_of_line.strip():
        # Keep the indentation that the rest of the line lands on.
        lines[-1] = text.split("\n")[-1]
        return "\n".join(lines)
    return "\n".join(lines).rstrip(" \t\n")


def _width(line: str) -> int:
    lead = _leading_blanks(line)
    return sum(4 if c == "\t" else 1 for c in lead)


def _same_line(mine: str, theirs: str) -> bool:
    if mine.strip() != theirs.strip():
        return False
    # A bare closer ("}", "end", ")") repeats only at the same depth: an inner
    # block's "}" is not the outer block's "}" that follows the cursor.
    if len(mine.strip()) <= 3 or mine.strip() in ("end", "fi", "done", "esac"):
        return _width(mine) == _width(theirs)
    return True


def drop_repeated_lines(text: str, suffix: str) -> str:
    """Cut the middle where it starts re-typing the lines below the cursor.

    The model often writes the block's closing line (``}``, ``return x``)
    that the suffix already holds. Lines are compared stripped, so a small
    indentation difference does not hide a repeat, except for bare closers.
    """
    rest, below = _lines_after_cursor(suffix)
    nonblank = [ln for ln in below if ln.strip()]
    if not nonblank:
        return text
    nxt = nonblank[0]
    lines = text.split("\n")
    for i in range(1, len(lines)):
        if _same_line(lines[i], nxt):
            # A generic line matches too easily inside the middle; require the
            # following line to match as well when both sides have one.
            following = nonblank[1:2]
            mine = [ln for ln in lines[i + 1 :] if ln.strip()][:1]
            if following and mine and not _same_line(mine[0], following[0]):
                continue
            return "\n".join(lines[:i]).rstrip(" \t") + ("\n" if rest.strip() else "")
    return text


def drop_suffix_overlap(text: str, suffix: str) -> str:
    """Remove the end of the middle that repeats the start of the rest of the line.

    ``print(|)`` with a middle ``"hi")`` must become ``"hi"``: the editor keeps
    the document's ``)`` after the ghost text.
    """
    rest, _ = _lines_after_cursor(suffix)
    rest = rest.rstrip()
    if not rest or not text:
        return text
    # The whole rest, even followed by a newline: "    return 1\n" before a
    # rest of "    return 1" would leave the line twice.
    whole = text.rstrip(" \t\n")
    if whole.endswith(rest):
        return whole[: len(whole) - len(rest)]
    body = text.rstrip(" \t")
    for k in range(min(len(rest), len(body)), 0, -1):
        head = rest[:k]
        if body.endswith(head) and all(c in _OVERLAP_CHARS or c == " " for c in head):
            return body[: len(body) - k]
    return text


def _scan(src: str, on_bracket) -> None:
    """Feed the brackets of ``src`` outside strings and ``#`` comments to ``on_bracket``.

    Stops early when ``on_bracket`` returns False. An approximation: good enough
    to count brackets in the few thousand characters around a cursor.
    """
    quote = ""
    i = 0
    while i < len(src):
        c = src[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote or c == "\n":
                quote = ""
        elif c in "\"'`":
            quote = c
        elif c == "#" and (i == 0 or src[i - 1] in " \t\n"):
            j = src.find("\n", i)
            i = len(src) if j < 0 else j
            continue
        elif c in _OPENERS or c in _CLOSERS:
            if on_bracket(c) is False:
                return
        i += 1


def _open_brackets(prefix: str, max_chars: int = 4000) -> list[str]:
    """Brackets left open at the end of the prefix."""
    stack: list[str] = []

    def on(c: str) -> None:
        if c in _OPENERS:
            stack.append(c)
        elif stack and stack[-1] == _PAIR[c]:
            stack.pop()
        else:
            # The window started inside a bracket: forget what came before.
            stack.clear()

    _scan(prefix[-max_chars:], on)
    return stack


def _closed_by_suffix(stack: list[str], suffix: str, max_chars: int = 4000) -> int:
    """How many of the prefix's open brackets (from the top) the suffix closes."""
    local: list[str] = []
    avail = list(stack)
    claimed = 0

    def on(c: str) -> bool:
        nonlocal claimed
        if c in _OPENERS:
            local.append(c)
            return True
        if local:
            if local[-1] != _PAIR[c]:
                return False
            local.pop()
            return True
        if avail and avail[-1] == _PAIR[c]:
            avail.pop()
            claimed += 1
            return True
        # A closer for something outside our window: the document is not
        # balanced here, so stop trusting the count.
        return False

    _scan(suffix[:max_chars], on)
    return claimed


def drop_unmatched_closers(text: str, prefix: str, suffix: str) -> str:
    """Drop closing brackets at the end of the middle that the document already has.

    A bracket opened in the prefix and closed again in the suffix must not be
    closed by the middle too (``foo(bar(|))`` with a middle ``x))`` -> ``x``).
    Only the trailing run of closers is touched; brackets the middle opens
    itself are always left alone.
    """
    body_end = len(text.rstrip(" \t\n"))
    tail_start = body_end
    while tail_start > 0 and text[tail_start - 1] in _CLOSERS + " \t\n;,":
        tail_start -= 1
    if tail_start == body_end:
        return text
    stack = _open_brackets(prefix)
    ok = True

    def on(c: str) -> bool:
        nonlocal ok
        if c in _OPENERS:
            stack.append(c)
        elif stack and stack[-1] == _PAIR[c]:
            stack.pop()
        else:
            ok = False
            return False
        return True

    _scan(text[:tail_start], on)
    if not ok:
        return text
    claimed = _closed_by_suffix(stack, suffix)
    avail = stack[: len(stack) - claimed]
    out = []
    for c in text[tail_start:body_end]:
        if c in _CLOSERS:
            if avail and avail[-1] == _PAIR[c]:
                avail.pop()
                out.append(c)
            # else: the suffix closes this bracket already; drop ours.
        else:
            out.append(c)
    new_tail = "".join(out)
    if new_tail == text[tail_start:body_end]:
        return text
    return (text[:tail_start] + new_tail.rstrip(" \t\n,")) + text[body_end:]


def fix_indentation(text: str, indent: Indent, reindent_first: bool = False) -> str:
    """Re-indent continuation lines with the document's unit (tabs or spaces).

    The first line continues the cursor's line, so its leading blanks are
    usually not indentation; they are when only blanks precede the cursor on
    its line (``reindent_first``), and then they get the same treatment.
    """
    lines = text.split("\n")
    for i in range(0 if reindent_first else 1, len(lines)):
        ln = lines[i]
        lead = _leading_blanks(ln)
        if not lead:
            continue
        if indent.uses_tabs and " " in lead:
            width = 4
            cols = sum(width if c == "\t" else 1 for c in lead)
            new = "\t" * (cols // width) + " " * (cols % width)
        elif not indent.uses_tabs and "\t" in lead:
            new = lead.replace("\t", indent.unit)
        else:
            continue
        lines[i] = new + ln[len(lead) :]
    return "\n".join(lines)


def postprocess(
    raw: str,
    prefix: str,
    suffix: str,
    *,
    indent: Indent | None = None,
    max_lines: int | None = None,
) -> str:
    """Apply every rule in order; returns ``""`` when nothing worth showing is left."""
    crlf = "\r\n" in prefix or "\r\n" in suffix
    text = raw.replace("\r\n", "\n")
    prefix_n = prefix.replace("\r\n", "\n")
    suffix_n = suffix.replace("\r\n", "\n")
    rest, _ = _lines_after_cursor(suffix_n)
    line_before = prefix_n[prefix_n.rfind("\n") + 1:]
    if indent is None:
        indent = detect_indent(prefix_n[-8000:] + suffix_n[:8000])
    text = drop_repeated_lines(text, suffix_n)
    if max_lines is not None:
        text = "\n".join(text.split("\n")[:max_lines])
    text = trim_trailing_whitespace(text, rest)
    text = drop_suffix_overlap(text, suffix_n)
    text = drop_unmatched_closers(text, prefix_n, suffix_n)
    text = fix_indentation(text, indent, reindent_first=not line_before.strip())
    text = trim_trailing_whitespace(text, rest)
    text = drop_whitespace_only(text)
    return text.replace("\n", "\r\n") if crlf else text


def clean_replacement(raw: str, selection: str, prefix: str, suffix: str) -> str:
    """The text that replaces ``selection``; ``""`` when there is nothing to apply.

    - An answer that is empty or only whitespace is nothing: applying it would delete the
      selection, which no rewrite asked for.
    - When only blanks precede the selection on its first line (an editor's Home stops at the
      first non-blank), they stay in the document: the answer's first line gets the selection's
      own leading blanks instead of its own, or it would be indented twice.
    - When the selection ends with a line break, or a line break and blanks (Shift+Down keeps
      the column, stopping inside the next line's indentation), the answer ends exactly so: what
      follows the selection keeps its own line and indentation. A selection that ends inside
      code continues into the rest of that line, and gets no line break it did not have.
    - The document's indentation style and line endings.
    """
    crlf = "\r\n" in prefix or "\r\n" in selection or "\r\n" in suffix
    text, sel = raw.replace("\r\n", "\n"), selection.replace("\r\n", "\n")
    prefix, suffix = prefix.replace("\r\n", "\n"), suffix.replace("\r\n", "\n")
    if not text.strip():
        return ""
    head = prefix[prefix.rfind("\n") + 1:]
    at_line_start = not head.strip()
    if head and at_line_start:
        text = _leading_blanks(sel.split("\n", 1)[0]) + text.lstrip(" \t")
    text = fix_indentation(text, detect_indent(prefix[-8000:] + sel + suffix[:8000]), reindent_first=at_line_start)
    last = sel[sel.rfind("\n") + 1:]
    if "\n" in sel and not last.strip():
        text = text.rstrip(" \t")
        text = (text if text.endswith("\n") else text + "\n") + last
    else:
        text = text.rstrip("\n")
    return text.replace("\n", "\r\n") if crlf else text
