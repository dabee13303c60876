"""Memory plan from the config alone: the shipped 26B-A4B config must fit 18 GiB at 8k with NVFP4 experts,
with CUDA graphs and without.

The plan's counts are checked against the real code: a denoising step's allocations (recorded by the
CPU allocator through the profiler) on the dynamic cache and through the static step (with a graph
replay's allocations stood in for: none outside its pool, and the pool's estimate against the eager
forward's), an encoder pass into the static step's buffers, and a real KV cache's storage after
encoder passes.
"""

import json

import pytest
import torch
import typer
from torch.profiler import ProfilerActivity, profile
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache
from typer.testing import CliRunner

from dgemma.engine import denoise, sampler
from dgemma.engine.prefix_cache import PrefixCache, cache_bytes
from dgemma.engine.settings import SamplerSettings
from dgemma.cli.quant import register
from dgemma.quant.meta import load_config
from dgemma.engine.plan import (GIB, POOL_NOTE, format_plan, kv_cache_bytes, parse_bytes, pass_terms, plan,
                                static_capacity, static_step_terms)
from dgemma.engine.static_step import StaticStep
from tiny import tiny_config

MIB = 1 << 20


@pytest.fixture(scope="module")
def config():
    return load_config("diffusiongemma-26B-A4B")


@pytest.fixture(scope="module")
def plan_18g(config):
    return plan(config, parse_bytes("18GiB"), context=8192, graphs=False)


def test_shipped_config_matches_the_26b_a4b(config):
    tc = config.text_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.sliding_window) == (2816, 30, 1024)
    assert [i for i, t in enumerate(tc.layer_types) if t == "full_attention"] == [5, 11, 17, 23, 29]
    assert tc.num_attention_heads == 16
    assert (tc.per_layer_config[0].num_key_value_heads, tc.per_layer_config[0].head_dim) == (8, 256)
    assert (tc.per_layer_config[5].num_key_value_heads, tc.per_layer_config[5].head_dim) == (2, 512)
    assert (tc.num_experts, tc.top_k_experts, tc.moe_intermediate_size, tc.intermediate_size) == (128, 8, 704, 2112)
    assert tc.vocab_size == 262144 and tc.tie_word_embeddings and config.canvas_length == 256


def test_26b_fits_18gib_at_8k_with_nvfp4_experts(plan_18g):
    p = plan_18g
    assert p.fits and p.total <= 18 * GIB, p.to_dict()
    # Experts: 22.84 B parameters at 4.5 bits (codes + E4M3 scale per 16) = 11.96 GiB.
    assert 11.9 * GIB < p.weights["experts"] < 12.0 * GIB
    assert 4.4 * GIB < p.weights_total - p.weights["experts"] < 4.6 * GIB
    assert "vision" not in json.dumps(p.weights)
    # A denoising step at 262k vocabulary: one fp32 and one bf16 canvas x vocab held, two fp32 in the softcap.
    assert p.peak_pass == "canvas_decode"
    decode = p.passes["canvas_decode"]
    assert decode["transient: softcap, 2 fp32 logits"] > 2 * 256 * 262144 * 4
    assert sum(decode.values()) - decode["kv cache"] < 0.9 * GIB
    # The CUDA context is stated on top of the budget, not hidden in it.
    assert p.gpu_total == p.total + p.cuda_context and p.cuda_context >= 0.5 * GIB


def test_cuda_graphs_fit_18gib_with_the_prefix_in_the_static_step(config, plan_18g, monkeypatch):
    monkeypatch.delenv("DGEMMA_GRAPHS", raising=False)
    graphs = plan(config, parse_bytes("18GiB"), context=8192)  # as an engine on a GPU runs by default
    assert graphs.graphs and graphs.weights == plan_18g.weights and graphs.static_capacity == 8192
    static = static_step_terms(config)
    for name, terms in graphs.passes.items():
        assert static.items() <= terms.items(), name
        # The buffers are the prefix's one copy: the encoder writes into them (static_step.BufferCache).
        assert "kv cache" not in terms, name
    # The buffers hold the prefix, the window's for a sliding layer, and the masks; the pool holds at
    # least the softcap's two fp32 logits of the bucket's one row.
    assert static["static step: kv buffers"] >= sum(kv_cache_bytes(config, 8192).values())
    assert static["static step: graph pool (estimate)"] >= 2 * 256 * 262144 * 4
    prefill = graphs.passes["prompt_prefill"]
    dynamic_prefill = plan_18g.passes["prompt_prefill"]
    assert sum(prefill.values()) == sum(dynamic_prefill.values()) - dynamic_prefill["kv cache"] + sum(static.values())
    # Decoding outside the graph: the step's logits (a clone) and the chunked sampler or the bf16
    # logits handed to the next step; the final log-probabilities take two small chunks.
    decode = graphs.passes["canvas_decode"]
    assert graphs.peak_pass == "canvas_decode" and decode["logits (fp32, this step's)"] == 256 * 262144 * 4
    assert sum(decode.values()) - sum(static.values()) == 256 * 262144 * (4 + 2 + 2)  # 0.5 GiB
    # The README's figures: 17.94 GiB with graphs, 17.49 GiB without (plan_18g).
    assert 17.9 * GIB < graphs.total <= 18 * GIB and graphs.fits, graphs.to_dict()
    assert 17.4 * GIB < plan_18g.total < 17.5 * GIB
    assert "estimate until measured on a GPU" in POOL_NOTE and POOL_NOTE in format_plan(graphs)
    assert POOL_NOTE not in format_plan(plan_18g)
    monkeypatch.setenv("DGEMMA_GRAPHS", "0")
    assert not plan(config, parse_bytes("18GiB")).graphs


@pytest.mark.parametrize("experts,dense", [("nvfp4", "nvfp4"), ("nf4", "nf4")])
def test_4bit_checkpoints_fit_18gib_with_graphs(config, experts, dense):
    # ModelOpt / compressed-tensors NVFP4 (experts and Linears), dgemma's NF4 checkpoints.
    for graphs in (True, False):
        p = plan(config, parse_bytes("18GiB"), context=8192, experts_format=experts, dense_format=dense,
                 graphs=graphs)
        assert p.fits and p.total < 16 * GIB, (graphs, p.to_dict())


def test_a_context_past_the_static_capacity_decodes_on_the_dynamic_cache(config):
    # The engine's buffers hold 8192 tokens whatever the context; a longer prefix decodes on the
    # dynamic cache, with the forward's temporaries outside any graph, beside the buffers it keeps.
    assert static_capacity(config) == 8192
    long = pass_terms(config, 16384, graphs=True)
    dynamic = pass_terms(config, 16384, graphs=False)
    static = static_step_terms(config)
    for name in ("canvas_decode", "prompt_prefill"):
        assert sum(long[name].values()) == sum(dynamic[name].values()) + sum(static.values()), name
    # A shorter context still gets the engine's full-size buffers.
    assert pass_terms(config, 4096, graphs=True)["prompt_prefill"]["static step: kv buffers"] == \
        static["static step: kv buffers"]


def test_whole_prompt_in_one_pass_would_not_fit(config):
    # On the dynamic cache every sliding layer would keep the whole prompt's keys behind its window view.
    one_pass = plan(config, parse_bytes("18GiB"), context=8192, prefill_chunk=0, graphs=False)
    assert one_pass.peak_pass == "prompt_prefill" and not one_pass.fits
    assert one_pass.passes["prompt_prefill"]["kv cache"] == sum(kv_cache_bytes(config, 8192, last_pass=8192).values())


def test_kv_cache_caps_sliding_layers_at_the_window(config):
    kv = kv_cache_bytes(config, 8192)
    # transformers keeps window - 1 tokens: 25 sliding layers x 1023 x 8 heads x 256 x (K+V) x bf16.
    assert kv["sliding_attention"] == 25 * 1023 * 8 * 256 * 2 * 2
    assert kv["full_attention"] == 5 * 8192 * 2 * 512 * 2 * 2 == 160 * MIB
    assert kv_cache_bytes(config, 512)["sliding_attention"] == 25 * 512 * 8 * 256 * 4
    # ... plus, behind the window view, the keys of the last encoder pass (a committed canvas).
    assert kv_cache_bytes(config, 8192, last_pass=256)["sliding_attention"] == 25 * 1279 * 8 * 256 * 4


@pytest.fixture(scope="module")
def sliding_model():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=512, sliding_window=32)
    return DiffusionGemmaForBlockDiffusion(cfg).to(torch.bfloat16).eval()


def _storage_bytes(cache: DynamicCache) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for layer in cache.layers for t in (layer.keys, layer.values)}
    return sum(storages.values())


def _encoded(model, *lengths: int) -> DynamicCache:
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        for n in lengths:
            denoise.encode(model, torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(n)), cache)
    return cache


def test_kv_cache_plan_matches_a_real_cache(sliding_model):
    config = sliding_model.config
    for lengths in ((100,), (100, 7), (20,)):
        cache = _encoded(sliding_model, *lengths)
        expected = kv_cache_bytes(config, sum(lengths), last_pass=lengths[-1])
        assert _storage_bytes(cache) == sum(expected.values()), lengths


def test_prefix_cache_keeps_compact_private_copies(sliding_model):
    cache = _encoded(sliding_model, 100)
    assert _storage_bytes(cache) > cache_bytes(cache)  # the sliding layer's view keeps all 100 tokens
    prefix = PrefixCache(1 << 20)
    prefix.store(list(range(100)), cache)
    entry = prefix._entries[tuple(range(100))][0]
    assert _storage_bytes(entry) == cache_bytes(entry) == cache_bytes(cache) == prefix.bytes
    key, copy = prefix.lookup(list(range(105)))
    assert key == tuple(range(100))
    for got, want in zip(copy.layers, cache.layers):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
        assert got.keys.untyped_storage().data_ptr() != want.keys.untyped_storage().data_ptr()
        assert got.get_seq_length() == want.get_seq_length()
    copy.layers[0].keys.zero_()  # the caller's copy is its own
    assert prefix.lookup(list(range(100)))[1].layers[0].keys.abs().sum() > 0


def _peak_allocated(fn) -> int:
    """Peak of live CPU-allocator bytes while ``fn`` runs, above its start: the profiler records
    every allocation and free of torch's CPU allocator in order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("chunk_bytes,transient", [
    (sampler.SAMPLE_CHUNK_BYTES, "transient: sampler, 4 fp32 chunks"),  # the canvas fits one sampler chunk
    (256 << 10, "transient: softcap, 2 fp32 logits"),  # small chunks: the 26B's regime at 262k vocabulary
])
def test_decode_step_allocations_match_the_plan(monkeypatch, chunk_bytes, transient):
    monkeypatch.setattr(sampler, "SAMPLE_CHUNK_BYTES", chunk_bytes)
    vocab, canvas, prompt = 16384, 64, 40
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=vocab, canvas_length=canvas)
    model = DiffusionGemmaForBlockDiffusion(cfg).to(torch.bfloat16).eval()
    cache = _encoded(model, prompt)
    # Two steps, so the second runs with the first one's self-conditioning logits held.
    settings = SamplerSettings(max_denoising_steps=2, stability_threshold=0, confidence_threshold=1e-30)
    noise = torch.randint(0, vocab, (1, canvas), generator=torch.Generator().manual_seed(1))
    free = torch.zeros(1, canvas, dtype=torch.bool)

    def step() -> None:
        with torch.no_grad():
            denoise.denoise(model, cache, noise, free, settings, torch.Generator().manual_seed(0))

    measured = _peak_allocated(step)
    terms = pass_terms(cfg, prompt)["canvas_decode"]
    assert transient in terms
    planned = sum(terms.values()) - terms["kv cache"]  # the cache exists before the step
    assert abs(measured / planned - 1) < 0.05, (measured, terms)


@pytest.fixture(scope="module")
def logits_model():
    vocab, canvas = 16384, 64
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=vocab, canvas_length=canvas)
    return DiffusionGemmaForBlockDiffusion(cfg).to(torch.bfloat16).eval()


def test_encoder_writes_into_the_static_step_buffers(logits_model):
    """With the static step the prefix lives once: the buffers are what the plan counts, and an
    encoder pass into their BufferCache leaves nothing allocated (into a dynamic cache, its KV)."""
    model = logits_model
    cfg = model.config
    step = StaticStep(model, capacity=static_capacity(cfg))
    buffers = [*step.keys, *step.values, *step.masks.values()]
    assert sum(t.nbytes for t in buffers) == static_step_terms(cfg)["static step: kv buffers"]
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(40))
    cache = step.cache()
    dynamic = DynamicCache(config=cfg.text_config)
    with torch.no_grad():
        into_buffers = _live_after(lambda: denoise.encode(model, ids, cache))
        into_dynamic = _live_after(lambda: denoise.encode(model, ids, dynamic))
    assert into_buffers == 0 and into_dynamic == _storage_bytes(dynamic) > 0
    assert all(layer.keys.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
               for layer, buffer in zip(cache.layers, step.keys))


@pytest.mark.parametrize("chunk_bytes,transient", [
    (sampler.SAMPLE_CHUNK_BYTES, "transient: sampler, 4 fp32 chunks"),  # the canvas fits one sampler chunk
    (256 << 10, "transient: next self-conditioning logits (bf16)"),  # small chunks: the 26B's regime
])
def test_static_decode_step_allocations_match_the_plan(monkeypatch, logits_model, chunk_bytes, transient):
    """The plan with graphs against the CPU allocator, through the static step eager: the graph pool's
    estimate against the peak of one eager forward of the bucket, and the rest of the denoising loop
    with the forward standing in for a replay (its logits already in the pool, nothing allocated),
    the step's inputs made on its first step and its logits cloned out, as on a GPU."""
    monkeypatch.setattr(sampler, "SAMPLE_CHUNK_BYTES", chunk_bytes)
    model = logits_model
    cfg, vocab, canvas, prompt = model.config, model.config.text_config.vocab_size, model.config.canvas_length, 40
    step = StaticStep(model, capacity=static_capacity(cfg))
    cache = step.cache()
    with torch.no_grad():
        denoise.encode(model, torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(2)), cache)
    step.load(cache)
    terms = pass_terms(cfg, prompt, graphs=True)["canvas_decode"]
    assert transient in terms and "kv cache" not in terms

    inputs = (torch.zeros(1, canvas, dtype=torch.long), torch.zeros(1, canvas, vocab, dtype=torch.bfloat16),
              torch.zeros(1, dtype=torch.bool))
    with torch.no_grad():
        pool = _peak_allocated(lambda: step._forward(*inputs))
        replayed = step._forward(*inputs)
    pool_term = terms["static step: graph pool (estimate)"]
    assert abs(pool / pool_term - 1) < 0.05, (pool, pool_term)

    monkeypatch.setattr(step, "forward", lambda *args: replayed)
    monkeypatch.setattr(step, "graphs", True)  # as on a GPU: a step begins a new replay, its logits are a clone
    settings = SamplerSettings(max_denoising_steps=2, stability_threshold=0, confidence_threshold=1e-30)
    noise = torch.randint(0, vocab, (1, canvas), generator=torch.Generator().manual_seed(1))
    free = torch.zeros(1, canvas, dtype=torch.bool)

    def steps() -> None:
        with torch.no_grad():
            denoise.denoise(step, cache, noise, free, settings, torch.Generator().manual_seed(0))

    measured = _peak_allocated(steps)
    # The buffers exist before, the pool is measured above.
    planned = sum(terms.values()) - terms["static step: kv buffers"] - pool_term
    assert abs(measured / planned - 1) < 0.05, (measured, terms)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_final_logprobs_in_chunks_are_the_whole_batch_numbers(monkeypatch, dtype):
    monkeypatch.setattr(sampler, "SAMPLE_CHUNK_BYTES", 3 * 1000 * 4)  # 3 positions a chunk, across rows
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 1000, generator=gen) * 4).to(dtype)
    tokens = torch.randint(0, 1000, (3, 7), generator=gen)
    scale = torch.tensor([0.4, 1.0, 0.8]).view(3, 1, 1)
    whole = torch.log_softmax(logits.float() * scale, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    chunked = sampler.token_logprobs(logits, tokens, scale)
    assert chunked.dtype == whole.dtype and torch.equal(chunked, whole)
    before = logits.clone()
    sampler.token_logprobs(logits, tokens, scale)
    assert torch.equal(logits, before)  # fp32 logits are read, never scaled in place


def _live_after(fn) -> int:
    """Bytes ``fn`` leaves allocated through torch's CPU allocator."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")


def test_bf16_experts_do_not_fit(config):
    assert not plan(config, parse_bytes("18GiB"), experts_format=None).fits


def test_parse_bytes():
    assert parse_bytes("18GiB") == 18 * GIB
    assert parse_bytes("24 GB") == 24 * 10**9
    assert parse_bytes("512MiB") == 512 * MIB
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_plan_cli_json_and_errors(monkeypatch):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    for graphs in ("0", None):  # both plans fit 18 GiB (see above)
        if graphs is None:
            monkeypatch.delenv("DGEMMA_GRAPHS", raising=False)
        else:
            monkeypatch.setenv("DGEMMA_GRAPHS", graphs)
        res = runner.invoke(app, ["plan", "diffusiongemma-26B-A4B", "--vram", "18GiB", "--context", "8192", "--json"])
        assert res.exit_code == 0, res.output
        data = json.loads(res.output)
        assert data["fits"] is True and data["total"] <= 18 * GIB and data["gpu_total"] > data["total"]
        assert data["graphs"] is (graphs is None)
    res = runner.invoke(app, ["plan", "diffusiongemma-26B-A4B", "--vram", "18GiB"])
    assert res.exit_code == 0 and "CUDA context" in res.output and "prefix cache: in host memory" in res.output
    assert "estimate until measured on a GPU" in res.output
    res = runner.invoke(app, ["plan", "no/such/model", "--vram", "18GiB"])
    assert res.exit_code == 1 and res.output.startswith("dgemma: ")
    res = runner.invoke(app, ["plan", "diffusiongemma-26B-A4B", "--vram", "lots"])
    assert res.exit_code == 1 and "dgemma: cannot read 'lots'" in res.output
