"""The bundled tokenizer: lossless round trip, fixed special ids, the chat template."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

BUNDLED = Path(__file__).resolve().parent.parent / "dgemma" / "bundled"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BUNDLED), local_files_only=True)


@pytest.fixture(scope="module")
def raw():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))


def test_special_ids(tok):
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<pad>", "<eos>", "<bos>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [3, 4]
    assert len(tok) == 8192


def test_no_bos_added_on_encode(tok):
    ids = tok("import os\n")["input_ids"]
    assert ids and ids[0] != tok.bos_token_id
    assert tok.decode(ids) == "import os\n"


def test_chat_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Fix this code"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nFix this code<end_of_turn>\n<start_of_turn>model\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [2, 3] and 4 in ids


@pytest.mark.parametrize("text", [
    "def f(x):\r\n\treturn x  # é 中文 😀\r\n",
    "  leading spaces\n\n\n",
    "\x00\x01\x7f\u200b\ufeff tail ",
    "x = '<eos> is text here'",
    "",
])
def test_round_trip_examples(tok, text):
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_round_trip_any_text(raw, text):
    enc = raw.encode(text, add_special_tokens=False)
    assert raw.decode(enc.ids, skip_special_tokens=False) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["\r\n", "\n", "\t", "    ", "def", " x", "é", "中", "😀", "'", "\\"]),
                max_size=40))
def test_round_trip_code_like(raw, parts):
    text = "".join(parts)
    assert raw.decode(raw.encode(text).ids, skip_special_tokens=False) == text


def test_corpus_manifest():
    text = (BUNDLED / "CORPUS.txt").read_text(encoding="utf-8")
    assert text.startswith("dgemma bundled model: training corpus")
    assert "Python 3." in text.splitlines()[1]
    assert "os.py" in text.splitlines()
