"""The block-diffusion engine on tiny random checkpoints built from a small config."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgemma.engine.canvas import FillPlan, line_drafts, plan_rows, slot_candidates
from dgemma.engine.denoise import Ban, denoise, encode, expand_cache
from dgemma.engine.engine import Engine
from dgemma.errors import DgemmaError
from dgemma.engine.loading import load_model, resolve_model_path
from dgemma.engine.settings import SamplerSettings
from transformers import DynamicCache

FAST = {"max_denoising_steps": 3}


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine(load_model(tiny_model_dir, device="cpu"))


def test_loader_never_builds_the_vision_tower(engine: Engine) -> None:
    names = [name for name, _ in engine.model.named_parameters()]
    assert names and not any("vision" in name for name in names)
    enc = engine.model.model.encoder.language_model.layers[0]
    dec = engine.model.model.decoder.layers[0]
    assert enc.experts.gate_up_proj is dec.experts.gate_up_proj  # tied, loaded once


@pytest.mark.parametrize("batch", [1, 2])
def test_unconstrained_loop_reproduces_transformers_generate(engine: Engine, batch: int) -> None:
    steps = SamplerSettings(max_denoising_steps=6)
    prompt = torch.tensor([[2, 310, 41, 977, 5000, 12]]).repeat(batch, 1)
    ours = engine.generate(prompt, max_new_tokens=40, seed=11, settings=steps)
    torch.manual_seed(11)
    ref = engine.model.generate(prompt, max_new_tokens=40, max_denoising_steps=6, t_min=steps.t_min,
                                t_max=steps.t_max, stability_threshold=1, confidence_threshold=0.005).sequences
    assert torch.equal(ours, ref)


def test_generate_matches_with_early_stopping(engine: Engine) -> None:
    # A confidence threshold above log(vocab) makes every row stop as soon as it is stable, so the
    # finished-row bookkeeping of the loop is exercised too.
    loose = SamplerSettings(max_denoising_steps=12, confidence_threshold=20.0, stability_threshold=1)
    prompt = torch.tensor([[2, 7, 8, 9], [2, 70, 80, 90]])
    ours = engine.generate(prompt, max_new_tokens=16, seed=3, settings=loose)
    torch.manual_seed(3)
    ref = engine.model.generate(prompt, max_new_tokens=16, max_denoising_steps=12, t_min=0.4, t_max=0.8,
                                stability_threshold=1, confidence_threshold=20.0).sequences
    assert torch.equal(ours, ref)


def test_pinned_positions_never_change(engine: Engine) -> None:
    model, C = engine.model, engine.canvas_length
    cache = DynamicCache(config=engine.text_config)
    encode(model, torch.tensor([[2, 5, 6, 7]]), cache)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, engine.vocab_size, (3, C), generator=gen)
    plan = plan_rows(noise, [4, 8, 12], [101, 102, 103], engine.eos_id, engine.pad_id)
    seen = []

    def observe(state) -> None:
        assert torch.equal(state.argmax[plan.pinned], plan.tokens[plan.pinned])
        assert torch.all(state.entropy[plan.pinned] == 0)
        seen.append(state.step)

    out = denoise(model, cache, plan.tokens, plan.pinned, SamplerSettings(max_denoising_steps=5), gen,
                  on_step=observe)
    assert seen == [1, 2, 3, 4, 5]
    assert torch.equal(out.argmax[plan.pinned], plan.tokens[plan.pinned])
    assert plan.tokens[0, 4:8].tolist() == [101, 102, 103, engine.eos_id]
    assert plan.tokens[2, 12:].tolist() == [101, 102, 103, engine.eos_id]


def test_expanded_cache_shares_the_prefix_between_rows(engine: Engine) -> None:
    """expand_cache widens a batch-1 prefix to a canvas batch without copying it (also past a sliding
    layer's window), decodes as each row alone would, and appending to it leaves the original as it was."""
    model = engine.model
    cache = DynamicCache(config=engine.text_config)
    with torch.no_grad():
        encode(model, torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(0)), cache)
        wide = expand_cache(cache, 3)
        assert [type(w) for w in wide.layers] == [type(layer) for layer in cache.layers]
        assert any(layer.keys.shape[-2] < 40 for layer in cache.layers)  # a sliding layer holds the window
        for layer, w in zip(cache.layers, wide.layers):
            assert w.keys.shape[0] == w.values.shape[0] == 3 and w.get_seq_length() == layer.get_seq_length()
            assert w.keys.data_ptr() == layer.keys.data_ptr() and w.values.data_ptr() == layer.values.data_ptr()
        canvas = torch.randint(0, 512, (3, engine.canvas_length), generator=torch.Generator().manual_seed(1))
        positions = torch.arange(40, 40 + engine.canvas_length)[None]
        rows = model(decoder_input_ids=canvas, cache=wide, decoder_position_ids=positions).logits
        for i in range(3):
            alone = model(decoder_input_ids=canvas[i:i + 1], cache=expand_cache(cache, 1),
                          decoder_position_ids=positions).logits
            torch.testing.assert_close(rows[i:i + 1], alone, rtol=1e-4, atol=1e-4)
        before = [(layer.keys.clone(), layer.get_seq_length()) for layer in cache.layers]
        encode(model, canvas, wide)
        assert wide.get_seq_length() == 40 + engine.canvas_length
        for layer, (keys, length) in zip(cache.layers, before):
            assert torch.equal(layer.keys, keys) and layer.get_seq_length() == length


def test_slot_candidates_fit_the_canvas() -> None:
    assert slot_candidates(256, 256) == [64, 128, 192, 224]
    assert slot_candidates(16, 16) == [4, 8, 12, 14]
    assert slot_candidates(256, 10) == [10]


def test_line_drafts_are_the_lines_above_a_line_start() -> None:
    assert line_drafts("def f():\n    x = 1\n\n    y = 2\n") == ["    y = 2", "    x = 1\n    y = 2"]
    # The cursor's own indentation is already in the prefix; a draft that does not share it loses its own.
    assert line_drafts("def f():\n    x = 1\n    ") == ["x = 1", "def f():\n    x = 1"]
    assert line_drafts("if a:\n        b()\n    ") == ["    b()", "if a:\n        b()"]
    assert line_drafts("x = 1\n") == ["x = 1"]
    assert line_drafts("def f():\n    x = fo") == []  # mid-line: no whole-line drafts
    assert line_drafts("") == []


def test_plan_seeds_draft_rows_and_leaves_the_others_noise(engine: Engine) -> None:
    seed = [40, 41, 42, 43, 44, 45]
    m = engine.canvas_length - 2
    plan = engine._plan([(m, None), (m, seed)], [7, 8], 0.25, torch.Generator().manual_seed(0), engine.canvas_length)
    kept = torch.tensor(seed + [engine.eos_id] + [engine.pad_id] * (m - len(seed) - 1))
    # A plain row starts from noise, not from an empty seed's <eos> <pad>...
    assert (plan.tokens[0, :m] == engine.pad_id).sum() < m // 2
    assert (plan.tokens[1, :m] == kept).float().mean() > 0.5
    assert plan.tokens[1, m:].tolist() == [7, 8]


def test_fill_with_line_drafts(engine: Engine) -> None:
    settings = {**FAST, "draft_strength": 0.25, "rank_by": "suffix_fit"}
    a = engine.fill("def f(a):\n    x = a + 1\n", "\n    return x\n", max_tokens=12, seed=3, settings=settings)
    b = engine.fill("def f(a):\n    x = a + 1\n", "\n    return x\n", max_tokens=12, seed=3, settings=settings)
    assert a.completions and [c.text for c in a.completions] == [c.text for c in b.completions]


def test_fill_returns_ranked_alternatives(engine: Engine) -> None:
    res = engine.fill("def add(a, b):\n    return", "\n", n=3, max_tokens=20, seed=4, settings=FAST)
    assert 1 <= len(res.completions) <= 3
    # Best first: the rows the others agree with (ranking.py); an empty middle last. This
    # checkpoint ranks by agreement, so no fit is measured.
    assert all(c.fit is None for c in res.completions)
    keys = [(bool(c.text), c.agreement) for c in res.completions]
    assert keys == sorted(keys, reverse=True)
    assert all(0.0 <= c.agreement <= 1.0 for c in res.completions)
    assert all(c.tokens <= 20 for c in res.completions)
    assert res.prompt_tokens > 0 and res.steps > 0 and res.seed == 4


def test_fill_longer_than_a_canvas_continues_block_by_block(engine: Engine) -> None:
    res = engine.fill("x = [", "]\n", max_tokens=40, seed=2, settings=FAST)
    best = res.completions[0]
    if not best.finished:  # a random model rarely closes the middle; then it spends the budget
        assert best.tokens == 40
        assert res.canvases >= 3


def test_same_seed_same_output(engine: Engine) -> None:
    a = engine.fill("import os\n", "", seed=9, max_tokens=12, settings=FAST)
    b = engine.fill("import os\n", "", seed=9, max_tokens=12, settings=FAST)
    assert [c.text for c in a.completions] == [c.text for c in b.completions]


def test_prefix_cache_hit_equals_cold_run(tiny_model_dir) -> None:
    warm = Engine(load_model(tiny_model_dir, device="cpu"))
    cold = Engine(load_model(tiny_model_dir, device="cpu"), prefix_cache_bytes=0)
    lines = "".join(f"value_{i} = compute({i}, scale=2)\n" for i in range(40))
    first = warm.fill(lines + "resu", "\n", seed=5, max_tokens=8, settings=FAST)
    assert first.cached_tokens == 0
    # One more keystroke on the same line: everything up to the line start comes from the cache.
    second = warm.fill(lines + "resul", "\n", seed=5, max_tokens=8, settings=FAST)
    reference = cold.fill(lines + "resul", "\n", seed=5, max_tokens=8, settings=FAST)
    assert second.cached_tokens > 0.9 * second.prompt_tokens
    assert reference.cached_tokens == 0
    assert [c.text for c in second.completions] == [c.text for c in reference.completions]
    assert warm.prefix_cache.hits == 1


def test_prefix_cache_is_bounded_by_bytes(tiny_model_dir) -> None:
    engine = Engine(load_model(tiny_model_dir, device="cpu"), prefix_cache_bytes=200_000)
    for i in range(6):
        engine.fill("".join(f"line_{i}_{j} = {j}\n" for j in range(30)), "", seed=1, max_tokens=4,
                    settings={"max_denoising_steps": 1})
        assert engine.prefix_cache.bytes <= 200_000
    assert 0 < len(engine.prefix_cache) < 6


def test_drafts_stream_and_cancel_stops_within_one_step(engine: Engine) -> None:
    cancel = threading.Event()
    drafts = []

    def on_step(draft) -> None:
        drafts.append(draft)
        if len(drafts) == 2:
            cancel.set()

    with pytest.raises(DgemmaError) as err:
        engine.fill("a = 1\n", "", seed=1, settings={"max_denoising_steps": 20}, on_step=on_step, cancel=cancel)
    assert err.value.code == "cancelled"
    assert len(drafts) == 2 and all(isinstance(d.text, str) for d in drafts)
    assert [d.step for d in drafts] == [1, 2]


def test_deadline(engine: Engine) -> None:
    with pytest.raises(DgemmaError) as err:
        engine.fill("a = 1\n", "", deadline=time.monotonic() - 1, settings=FAST)
    assert err.value.code == "deadline"


def test_edit_seeds_from_the_selection(engine: Engine) -> None:
    selection = "total = total + 1\n"
    # strength 0: no slot is renoised, so the first canvas starts as the selection itself.
    res = engine.edit("x = 0\n", selection, "print(total)\n", "Rewrite this", strength=0.0, seed=3, settings=FAST)
    assert res.canvases == 1 and isinstance(res.text, str)


def test_long_selection_is_rewritten_block_by_block(engine: Engine) -> None:
    selection = "".join(f"v{i} = {i}\n" for i in range(20))  # far more than one 16-token canvas
    res = engine.edit("", selection, "", "Clean up", seed=1, settings={"max_denoising_steps": 1})
    assert res.canvases >= 3


@pytest.mark.parametrize("call, code", [
    (lambda e: e.fill("", ""), "invalid_params"),
    (lambda e: e.edit("", "x = 1\n" * 3000, "", "go"), "too_large"),  # a prefix is windowed; a selection is not
    (lambda e: e.fill("a", "", n=0), "invalid_params"),
    (lambda e: e.fill("a", "", max_tokens=0), "invalid_params"),
    (lambda e: e.fill("a", "", settings={"t_min": 0.9, "t_max": 0.5}), "invalid_params"),
    (lambda e: e.fill("a", "", settings={"temperature": 1.0}), "invalid_params"),
    (lambda e: e.fill("a", "", settings={"draws": 0}), "invalid_params"),
    (lambda e: e.fill("a", "", settings={"rank_by": "longest"}), "invalid_params"),
    (lambda e: e.fill("a", "", settings={"draft_strength": 1.0}), "invalid_params"),
    (lambda e: e.fill(b"a", ""), "invalid_params"),
    (lambda e: e.edit("a", "b", "c", "   "), "invalid_params"),
    (lambda e: e.edit("a", "b", "c", "go", strength=2.0), "invalid_params"),
])
def test_bad_input_raises_one_documented_error(engine: Engine, call, code: str) -> None:
    with pytest.raises(DgemmaError) as err:
        call(engine)
    assert err.value.code == code and err.value.message


def test_missing_model_is_one_clear_sentence(tmp_path) -> None:
    with pytest.raises(DgemmaError) as err:
        load_model("google/diffusiongemma-26B-A4B-it")
    assert err.value.code == "model_missing"
    assert "google/diffusiongemma-26B-A4B-it" in err.value.message and "\n" not in err.value.message
    with pytest.raises(DgemmaError):
        load_model(tmp_path)


def test_a_broken_hub_cache_entry_is_not_reported_missing(tmp_path, monkeypatch) -> None:
    """A model the offline Hugging Face cache holds only part of says so, with what failed."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(DgemmaError, match="is not on this machine"):
        resolve_model_path("someone/absent")
    with pytest.raises(DgemmaError, match="is not on this machine"):
        resolve_model_path("not a/model id")
    repo = tmp_path / "models--someone--partial"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")  # the snapshot it names never arrived
    with pytest.raises(DgemmaError, match="only partly in the Hugging Face cache") as err:
        resolve_model_path("someone/partial")
    assert err.value.code == "model_missing" and "snapshot" in err.value.message
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)  # the snapshot, without its files
    with pytest.raises(DgemmaError, match="download is incomplete: there is no config.json"):
        resolve_model_path("someone/partial")
    (repo / "snapshots" / "0123abcd" / "config.json").write_text("{}")
    assert resolve_model_path("someone/partial") == repo / "snapshots" / "0123abcd"


text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["\r\n", "é\r\nü", "\t\tx\r\n", "🙂 = 1\r\n", "日本語\n\n"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=text, suffix=text)
def test_fill_keeps_prefix_and_suffix_byte_identical(engine: Engine, prefix: str, suffix: str) -> None:
    if not prefix and not suffix:
        return
    res = engine.fill(prefix, suffix, seed=0, max_tokens=6, settings={"max_denoising_steps": 1})
    document = prefix + res.text + suffix
    assert document.encode("utf-8").startswith(prefix.encode("utf-8"))
    assert document.encode("utf-8").endswith(suffix.encode("utf-8"))
    # The model saw exactly the text: the tokenizer round-trips both sides.
    assert engine.tokenizer.decode(engine._encode(prefix)) == prefix
    assert engine.tokenizer.decode(engine._encode(suffix)) == suffix


def test_rows_beyond_the_batch_budget_decode_in_turn(tiny_model_dir) -> None:
    narrow = Engine(load_model(tiny_model_dir, device="cpu"), max_rows=1)
    res = narrow.fill("a = 1\n", "b = 2\n", n=2, seed=0, max_tokens=4, settings={"max_denoising_steps": 2})
    assert res.canvases == 1 and res.steps == 2 * len(slot_candidates(16, 4)) * 2
    assert Engine(load_model(tiny_model_dir, device="cpu"), logits_budget_bytes=1).max_rows == 1


def test_fill_plan_rows_per_canvas() -> None:
    # One line on the 26B's 256-slot canvas: a 64-slot canvas, two lengths, once; 128 decoder tokens a step.
    line = FillPlan.of(256, line_canvas=64, max_lines=1, draws=3, line_draws=1)
    assert (line.canvas, line.rows(0, 128), line.rows(1, 128)) == (64, [(32, None), (48, None)], [])
    assert line.decoder_tokens(128) == 128
    # Any other fill: the whole canvas, every length, each drawn `draws` times, drafts on the first canvas.
    full = FillPlan.of(256, line_canvas=64, max_lines=2, draws=2, line_draws=1, drafts=[[5, 6]])
    assert full.canvas == 256 and full.rows(0, 256) == [(64, None), (128, None), (192, None), (224, None),
                                                        (224, [5, 6])] * 2
    assert full.rows(1, 256) == [(64, None), (128, None), (192, None), (224, None)]
    # line_canvas 0 turns the line plan off; a minimum length lifts the shorter lengths to it.
    assert not FillPlan.of(256, 0, 1, 1, 1).line
    assert FillPlan.of(256, 64, 1, 1, 1, min_tokens=40).rows(0, 128) == [(40, None), (48, None)]
    assert FillPlan.of(256, 64, 1, 1, 1, min_tokens=100).rows(0, 128) == [(48, None)]


def test_a_one_line_fill_decodes_one_short_canvas(engine: Engine) -> None:
    settings = {**FAST, "line_canvas": 8}
    res = engine.fill("def f(a):\n    x = ", "\n    return x\n", max_tokens=32, max_lines=1, seed=0,
                      settings=settings)
    assert res.canvases == 1 and res.rows == 2  # lengths 4 and 6 of an 8-slot canvas
    assert all(c.tokens <= 6 for c in res.completions)
    full = engine.fill("def f(a):\n    x = ", "\n    return x\n", max_tokens=32, seed=0, settings=settings)
    assert full.rows >= len(slot_candidates(engine.canvas_length, 32))


@pytest.mark.parametrize("max_lines", [None, 1])
def test_min_tokens_keeps_the_middle_from_ending_early(engine: Engine, max_lines) -> None:
    for seed in range(4):
        res = engine.fill("x = ", "\n", n=3, max_tokens=12, max_lines=max_lines, min_tokens=5, seed=seed,
                          settings=FAST)
        assert res.completions and all(c.tokens >= 5 for c in res.completions), [c.tokens for c in res.completions]
    with pytest.raises(DgemmaError, match="min_tokens"):
        engine.fill("x = ", "\n", max_tokens=4, min_tokens=5)


def test_rows_the_request_does_not_accept_rank_last(engine: Engine) -> None:
    # A budget of one canvas: `accept` judges the first canvas's text, which is then the whole middle.
    args = dict(n=3, max_tokens=4, seed=2, settings={**FAST, "draws": 3})
    first = engine.fill("def f(a):\n    return ", "\n", **args).completions
    refused = first[0].text
    again = engine.fill("def f(a):\n    return ", "\n", accept=lambda text: text != refused, **args).completions
    # The refused row is the last alternative, or none at all once enough others were decoded.
    assert len(again) == len(first) and refused not in [c.text for c in again[:-1]]


def test_ban_indices_name_every_banned_token_at_every_masked_position() -> None:
    mask = torch.tensor([[True, False, True], [False, False, False]])
    rows, cols, ids = Ban(mask, (1, 0)).indices(torch.device("cpu"))
    assert list(zip(rows.tolist(), cols.tolist(), ids.tolist())) == [(0, 0, 1), (0, 0, 0), (0, 2, 1), (0, 2, 0)]
    assert Ban(torch.zeros(2, 3, dtype=torch.bool), (1,)).indices(torch.device("cpu")) is None


def test_entropy_matches_torch_distributions() -> None:
    from dgemma.engine.sampler import entropy as _entropy

    logits = torch.randn(3, 7, 50) * 4
    logits[0, 0, 1:] = float("-inf")  # a one-hot row, as pinned positions are
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.equal(_entropy(logits), expected)


def test_fast_sampler_draws_from_the_same_distribution() -> None:
    from dgemma.engine.sampler import _sample, entropy as _entropy

    # The second row is a peaked low-temperature distribution whose tail underflows exp().
    for row in ([2.0, 0.0, -1.0, 1.0], [0.0, -95.0, -2.0, -200.0]):
        logits = torch.tensor([row]).repeat(20000, 1)
        sampled, entropy = _sample(logits, torch.Generator().manual_seed(0))
        freq = torch.bincount(sampled, minlength=4).float() / sampled.numel()
        assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.01)
        assert torch.allclose(entropy, _entropy(logits), atol=1e-5)


def test_special_token_spellings_in_code_stay_text(engine: Engine) -> None:
    ids = engine._encode('EOS = "<eos>"\n')
    assert engine.eos_id not in ids
    head_ids, _, _ = engine._context(engine.bos_token, 'x = "<eos>"', 0)
    assert head_ids[0] == engine.tokenizer.bos_token_id and engine.eos_id not in head_ids


def test_checkpoint_sampler_defaults_are_used(tmp_path) -> None:
    import json
    import shutil

    from tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "ckpt")
    config = json.loads((path / "generation_config.json").read_text())
    config.update(max_denoising_steps=7, t_max=0.7, t_min=0.3)
    (path / "generation_config.json").write_text(json.dumps(config))
    (path / "dgemma_sampler.json").write_text(json.dumps({"draws": 2, "rank_by": "suffix_fit", "t_min": 0.2}))
    settings = Engine(load_model(path, device="cpu")).settings
    assert (settings.max_denoising_steps, settings.t_max, settings.t_min) == (7, 0.7, 0.2)
    assert (settings.draws, settings.rank_by) == (2, "suffix_fit")
    (path / "dgemma_sampler.json").write_text(json.dumps({"rank_by": "longest"}))
    with pytest.raises(DgemmaError, match="rank_by must be one of"):
        Engine(load_model(path, device="cpu"))
    (path / "dgemma_sampler.json").write_text("[1, 2]")
    with pytest.raises(DgemmaError, match="JSON object"):
        load_model(path, device="cpu")
    (path / "dgemma_sampler.json").unlink()
    shutil.move(path / "tokenizer.json", tmp_path / "elsewhere.json")
    with pytest.raises(DgemmaError, match="no tokenizer"):
        load_model(path, device="cpu")
