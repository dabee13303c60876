"""Golden cases for the language server's post-processing (tests/golden/postprocess/*.txt).

One case per file: a document with a ``<CURSOR>`` marker, the model's raw
middle, and the middle the editor must show. Lines before the first section
starting with ``#`` say why the case exists.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from dgemma.engine.postprocess import Indent, clean_replacement, detect_indent, postprocess

GOLDEN = Path(__file__).parent / "golden" / "postprocess"
CASES = sorted(GOLDEN.glob("*.txt"))


def parse_case(path: Path) -> dict[str, str]:
    text = path.read_text(encoding="utf-8")
    text = text[:-1] if text.endswith("\n") else text
    sections: dict[str, str] = {}
    parts = re.split(r"(?m)^=== (\w+)\n?", text)
    names, bodies = parts[1::2], parts[2::2]
    for i, (name, body) in enumerate(zip(names, bodies)):
        # A section ends with the newline before the next header; that newline
        # belongs to the format, not to the content.
        last = i == len(names) - 1
        sections[name] = body[:-1] if body.endswith("\n") and not last else body
    return sections


def test_cases_exist() -> None:
    assert len(CASES) >= 12


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden(path: Path) -> None:
    case = parse_case(path)
    prefix, _, suffix = case["document"].partition("<CURSOR>")
    got = postprocess(case["completion"], prefix, suffix)
    assert got == case["expected"], f"{path.name}: {got!r} != {case['expected']!r}"


def test_crlf_document_gets_crlf() -> None:
    got = postprocess("a = 1\nb = 2", "x = 0\r\n", "\r\ny = 3\r\n")
    assert got == "a = 1\r\nb = 2"


def test_detect_indent() -> None:
    assert detect_indent("def f():\n  x = 1\n  if x:\n    y = 2\n").unit == "  "
    assert detect_indent("func f() {\n\tx := 1\n}\n").uses_tabs
    assert detect_indent("no indentation at all\n") == Indent("    ")


def test_max_lines() -> None:
    got = postprocess("a\nb\nc\nd", "", "", max_lines=2)
    assert got == "a\nb"


def test_replacement_keeps_the_document_style():
    doc = "func f() {\n\tx := 1\n}\n"
    # The selection ended with a newline: so does the replacement; tabs as in the document.
    assert clean_replacement("if x {\n        y()\n}", "\tx := 1\n", "func f() {\n", "}\n") == "if x {\n\t\ty()\n}\n"
    # Selected from column 0: the first line is indentation too.
    assert clean_replacement("    y()\n    z()", "\tx\n\tw", "", doc) == "\ty()\n\tz()"
    # The selection did not end with a line break: none is added at its end.
    assert clean_replacement("a + b\n", "a+b", "x = ", "\n") == "a + b"
    assert clean_replacement("a\nb", "a\n", "", "c\r\n") == "a\r\nb\r\n"


@pytest.mark.parametrize("raw", ["", "\n", "  \n\t", "\r\n"])
def test_an_empty_answer_replaces_nothing(raw):
    # Applying "\n" over the selected line `def mean(values):\n` deleted it (seen in VS Code).
    assert clean_replacement(raw, "def mean(values):\n", "", "    return sum(values)\n") == ""


DOC = "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n"


@pytest.mark.parametrize("raw", [
    "    v groupag( Exception):\n    v",           # seen in VS Code: first line indented, last one glued
    "for w in values:\n        total += w\n",       # the rewrite a user wants
    "for w in values:\n        total += w\n    ",   # ... with the partial last line reproduced
    "for w in values:\n        total += w",          # ... without the line break
    "    for w in values:\n        total += w\r\n",
])
def test_a_selection_from_first_non_blank_to_the_next_lines_indent(raw):
    # Home stops at the first non-blank and Shift+Down keeps the column: the selection is
    # 3:4-5:4, from `for` to the indentation of `return`.
    start = DOC.index("for v")
    end = DOC.index("return")
    prefix, selection, suffix = DOC[:start], DOC[start:end], DOC[end:]
    new = clean_replacement(raw, selection, prefix, suffix)
    doc = prefix + new + suffix
    lines = doc.split("\n")
    # Outside the selection nothing moved: the lines before, and `return` on its own line,
    # indented as it was.
    assert doc.startswith("def mean(values):\n    total = 0\n    ") and doc.endswith("\n    return total / len(values)\n")
    assert lines[2].startswith("    ") and not lines[2].startswith("     ")  # indented once, not twice
    assert new.endswith("\n    ")
