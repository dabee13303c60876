"""The bundled model's training recipe: example layouts match the engine's canvases, and a short
run of the real training loop (both phases) writes a checkpoint dgemma's loader serves."""
from __future__ import annotations

import json
import math

import pytest

from dgemma.engine.loading import BUNDLED_MODEL_DIR


@pytest.fixture(scope="module")
def maker():
    from tokenizers import Tokenizer

    from train.corpus import read_sources, split
    from train.data import ExampleMaker

    train_src, _ = split(read_sources())
    return ExampleMaker(Tokenizer.from_file(str(BUNDLED_MODEL_DIR / "tokenizer.json")), train_src[:40], seed=3)


def test_fim_and_edit_examples_use_the_engine_layout(maker):
    from dgemma.engine.canvas import pinned_tail
    from train.config import BOS_ID, CANVAS_LENGTH, EOS_ID, PAD_ID

    for kind in ("fim", "cont", "edit") * 20:
        ex = maker.make(kind)
        m = ex.pinned.index(True)
        assert ex.pinned == [False] * m + [True] * (CANVAS_LENGTH - m)
        assert len(ex.target) == len(ex.base) == CANVAS_LENGTH
        # The tail is what the engine pins: suffix head, then <eos> and <pad>.
        tail = ex.target[m:]
        cut = tail.index(EOS_ID) if EOS_ID in tail else len(tail)
        assert tail == pinned_tail(tail[:cut], CANVAS_LENGTH - m, EOS_ID, PAD_ID)
        if EOS_ID in ex.target[:m]:
            end = ex.target.index(EOS_ID)
            assert set(ex.target[end + 1:m]) <= {PAD_ID}
        if kind == "edit":
            assert ex.head[:2] == [BOS_ID, 3]  # <bos><start_of_turn>
        else:
            assert ex.head == [BOS_ID] and ex.base == ex.target
            assert kind != "cont" or tail[0] == EOS_ID


def test_next_token_rows_start_at_a_line(maker):
    from train.config import BOS_ID
    from train.data import lm_batch

    ids = lm_batch(maker, 8, 64)
    assert 1 <= ids.shape[0] <= 8 and 16 <= ids.shape[1] <= 64  # rows near a file end are dropped
    assert (ids[:, 0] == BOS_ID).all() and (ids[:, 1:] != BOS_ID).all()
    for row in ids.tolist():
        text = maker.tok.decode(row[1:])
        assert any(("\n" + text) in ("\n" + t) for t in maker.texts), text[:80]


@pytest.mark.parametrize("rows,chunk", [(1, 4), (37, 8), (64, 64), (50, 256)])
def test_chunked_head_loss_matches_the_plain_softcapped_head(rows, chunk):
    import torch
    import torch.nn.functional as F

    from train.head_loss import softcapped_cross_entropy

    gen = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, 16, generator=gen, requires_grad=True)
    weight = (3 * torch.randn(300, 16, generator=gen)).requires_grad_()
    targets = torch.randint(0, 300, (rows,), generator=gen)
    cap = 30.0
    loss, acc = softcapped_cross_entropy(hidden, weight, targets, cap, chunk=chunk)
    (2.5 * loss).backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    logits = torch.tanh(hidden @ weight.T / cap) * cap
    plain = F.cross_entropy(logits, targets)
    (2.5 * plain).backward()
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(fused_grads[0], hidden.grad)
    torch.testing.assert_close(fused_grads[1], weight.grad)
    assert acc.item() == (logits.argmax(-1) == targets).float().mean().item()
    assert not acc.requires_grad


def test_packed_corpus_reads_back_as_its_manifest(tmp_path, monkeypatch):
    """What a lent GPU machine trains on: the packed files, unpacked under $DGEMMA_CORPUS_ROOT,
    are read back as the same corpus, standard library and packages alike, and checked against
    the manifest written for them."""
    import tarfile

    from train.corpus import is_stdlib, manifest_mismatch, pack, pins, read_sources, write_manifest

    here = read_sources()
    packaged = [s for s in here if not is_stdlib(s[0])]
    assert packaged, "torch and transformers are installed, so the corpus has package files"
    assert not any(rel.split("/")[1] in ("click", "typer") for rel, _ in packaged), "the held-out set leaked in"
    subset = sorted([s for s in here if is_stdlib(s[0])][:20] + packaged[:20])
    pack(tmp_path / "corpus.tar.gz", subset)
    with tarfile.open(tmp_path / "corpus.tar.gz") as tar:
        tar.extractall(tmp_path / "root", filter="data")
    monkeypatch.setenv("DGEMMA_CORPUS_ROOT", str(tmp_path / "root"))
    assert read_sources() == subset
    write_manifest(tmp_path / "CORPUS.txt", subset)
    assert manifest_mismatch(read_sources(), tmp_path / "CORPUS.txt") is None
    # a newer version of a package: the same file names, other contents
    (tmp_path / "root" / packaged[1][0]).write_text(packaged[1][1] + "\n# changed\n", encoding="utf-8")
    assert "other contents" in manifest_mismatch(read_sources(), tmp_path / "CORPUS.txt")
    (tmp_path / "root" / packaged[0][0]).unlink()
    assert "1 listed files missing" in manifest_mismatch(read_sources(), tmp_path / "CORPUS.txt")
    # what reproduces the packages' side exactly: this environment's versions, as pip requirements
    import importlib.metadata

    assert f"transformers=={importlib.metadata.version('transformers')}" in pins(tmp_path / "CORPUS.txt")


def test_short_run_writes_a_servable_checkpoint(tmp_path):
    from dgemma.engine.engine import Engine
    from dgemma.engine.loading import load_model
    from train import train

    train.main(["--preset", "tiny", "--steps", "4", "--eval-every", "2", "--lm-phase", "0.5", "--lm-length", "64",
                "--batch-size", "4", "--no-bf16", "--threads", "1", "--out", str(tmp_path)])
    state = json.loads((tmp_path / "best" / "train_state.json").read_text())
    assert state["step"] == 4  # the step-2 checkpoint was in the next-token phase: never "best"
    assert math.isfinite(state["val_loss"]) and math.isfinite(state["val_next_token_loss"])
    engine = Engine(load_model(str(tmp_path / "best"), device="cpu"))
    assert engine.settings.rank_by == "suffix_fit"  # the checkpoint carries the bundled model's row choice
    result = engine.fill("def add(a, b):\n", "\n", max_tokens=8, seed=0)
    best = result.completions[0]
    assert result.canvases >= 1 and (best.fit is not None) == bool(best.text)  # an empty middle has no fit
