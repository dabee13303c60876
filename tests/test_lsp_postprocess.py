"""Golden cases for the language server's post-processing (tests/golden/postprocess/*.txt).

One case per file: a document with a ``<CURSOR>`` marker, the model's raw
middle, and the middle the editor must show. Lines before the first section
starting with ``#`` say why the case exists.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from dgemma.lsp.postprocess import Indent, detect_indent, postprocess

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
