"""The engine decoding through the static step (engine/static_step.py) on a CPU, against the
dynamic cache: the same tokens for fills and edits, with rows padded to buckets, more than eight
rows, canvases committed one after another and a prefix-cache hit. On a CPU the engine runs the
static step only with DGEMMA_GRAPHS=1, and eager; the compiled step is run here by handing the
engine one. CUDA-graph capture needs a GPU and is not run here."""
from __future__ import annotations

import pytest

from dgemma.engine.engine import Engine
from dgemma.engine.loading import load_model
from dgemma.engine.static_step import StaticStep
from dgemma.errors import DgemmaError

FAST = {"max_denoising_steps": 4}
LINES = "".join(f"value_{i} = compute({i}, scale=2)\n" for i in range(40))  # past the 32-token window


def _engine(tiny_model_dir, monkeypatch, graphs: str | None) -> Engine:
    if graphs is None:
        monkeypatch.delenv("DGEMMA_GRAPHS", raising=False)
    else:
        monkeypatch.setenv("DGEMMA_GRAPHS", graphs)
    return Engine(load_model(tiny_model_dir, device="cpu"))


def _texts(result) -> list[str]:
    return [c.text for c in result.completions]


def _requests(engine: Engine) -> list[list[str]]:
    # A fill of 3 alternatives: 4 slot lengths x 3 draws = 12 rows, a bucket of 8 and one of 4
    # (padded); 40 tokens take several canvases, each committed before the next is decoded.
    # Then the same fill one keystroke on (a prefix-cache hit), an edit block by block, and a fill
    # ranked by suffix fit (an encoder pass on a view of the cache).
    return [_texts(engine.fill(LINES + "resu", "\n", n=3, max_tokens=40, seed=5, settings=FAST)),
            _texts(engine.fill(LINES + "resul", "\n", n=3, max_tokens=40, seed=5, settings=FAST)),
            _texts(engine.edit("x = 0\n", "".join(f"v{i} = {i}\n" for i in range(12)), "print(v)\n",
                               "Clean up", n=2, seed=1, settings=FAST)),
            _texts(engine.fill(LINES + "res", "\nprint(result)\n", n=2, max_tokens=20, seed=2,
                               settings={**FAST, "rank_by": "suffix_fit"}))]


@pytest.fixture(scope="module")
def dynamic_answers(tiny_model_dir) -> list[list[str]]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        engine = _engine(tiny_model_dir, monkeypatch, None)
        assert engine.static_mode is None  # the CPU's default
        return _requests(engine)


def test_static_step_gives_the_dynamic_tokens(tiny_model_dir, monkeypatch, dynamic_answers) -> None:
    engine = _engine(tiny_model_dir, monkeypatch, "1")
    assert engine.static_mode == "eager"
    assert _requests(engine) == dynamic_answers
    assert engine._static is not None and engine.prefix_cache.hits >= 1
    # 12 fill rows: 8 + 4 (padded); the edit's 2 rows; each continuation 1.
    assert set(engine._static.inputs) == {1, 2, 4, 8}


def test_compiled_static_step_gives_the_dynamic_tokens(tiny_model_dir, monkeypatch, dynamic_answers) -> None:
    engine = _engine(tiny_model_dir, monkeypatch, "1")
    engine._static = StaticStep(engine.model, engine.static_capacity, compile=True)
    assert _requests(engine) == dynamic_answers


def test_a_prefix_past_the_capacity_decodes_on_the_dynamic_cache(tiny_model_dir, monkeypatch,
                                                                 dynamic_answers) -> None:
    engine = _engine(tiny_model_dir, monkeypatch, "1")
    engine.static_capacity = 8  # every prompt here is longer
    assert _requests(engine) == dynamic_answers
    assert engine._static is None


def test_a_bad_dgemma_graphs_fails_when_the_engine_is_made(tiny_model_dir, monkeypatch) -> None:
    with pytest.raises(DgemmaError, match="DGEMMA_GRAPHS='on'"):
        _engine(tiny_model_dir, monkeypatch, "on")


def test_a_failing_static_step_falls_back_to_the_dynamic_cache(tiny_model_dir, monkeypatch, caplog) -> None:
    engine = _engine(tiny_model_dir, monkeypatch, "1")

    def broken(self, **kwargs):
        raise RuntimeError("capture failed")
    monkeypatch.setattr(StaticStep, "__call__", broken)
    first = engine.fill(LINES + "resu", "\n", max_tokens=8, seed=5, settings=FAST)
    assert engine.static_mode is None and engine._static is None
    assert "the static decoder step failed (RuntimeError: capture failed)" in caplog.text
    # From then on the engine decodes as one made with DGEMMA_GRAPHS=0 would.
    again = engine.fill(LINES + "resu", "\n", max_tokens=8, seed=5, settings=FAST)
    monkeypatch.setenv("DGEMMA_GRAPHS", "0")
    plain = Engine(engine.loaded).fill(LINES + "resu", "\n", max_tokens=8, seed=5, settings=FAST)
    assert _texts(again) == _texts(plain) and first.completions


def test_the_prefix_lives_once_in_the_static_step(tiny_model_dir, monkeypatch, dynamic_answers) -> None:
    """The engine's cache is the BufferCache over the step's buffers: a request with one alternative
    copies nothing into them, however many canvases it commits, and a prefix-cache hit is copied in
    once; several alternatives copy each branch in (the first cache keeps a copy of its own)."""
    engine = _engine(tiny_model_dir, monkeypatch, "1")
    copied: list[int] = []
    copy_in = StaticStep._copy_in

    def counted(self, cache) -> None:
        copied.append(cache.get_seq_length())
        copy_in(self, cache)
    monkeypatch.setattr(StaticStep, "_copy_in", counted)
    one = engine.fill(LINES + "resu", "\n", max_tokens=40, seed=5, settings=FAST)
    assert one.canvases > 1 and copied == []
    hit = engine.fill(LINES + "resul", "\n", max_tokens=40, seed=5, settings=FAST)
    assert hit.cached_tokens > 0 and copied == [hit.cached_tokens]
    ids, stable, _ = engine._context(engine.bos_token, LINES + "res", 56)
    cache, cached = engine._prefill(ids, stable)
    assert engine._static.holds(cache) and cached == hit.cached_tokens
    copied.clear()
    assert _texts(engine.fill(LINES + "resu", "\n", n=3, max_tokens=40, seed=5, settings=FAST)) == dynamic_answers[0]
    assert copied  # the branches
