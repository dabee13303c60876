"""No host syncs where a GPU step must not wait: the decoder forward, the encoder pass, the denoise loop.

Syncs are counted with `dgemma.kernels.hostsync.SyncCounter`, a TorchDispatchMode that records every
operator that makes the host wait for the device (`.item()`, `bool(t)`, `nonzero`, boolean-mask
indexing, `unique`, `repeat_interleave` without an output size, ...) plus `.tolist()`/`.numpy()`. These
operators are the same on every device, so a count taken on a CPU (or on meta tensors) is what the
code does on a GPU. Blocking copies between host and device are seen only where there are two
devices: on meta tensors, which stand in for the GPU here.

"The dispatch the GPU uses" is exercised two ways, because its Triton kernels cannot run on a CPU
except through Triton's interpreter:

* On the meta device, at the full 26B-A4B shape (30 layers, hidden 2816, 128 experts top-8, a
  256-token canvas over a 2,048-token prefix, so the sliding layers see a windowed cache), with
  ``DGEMMA_KERNELS=triton``: every line from the experts module to the kernel launch runs as it does on
  CUDA (dispatch, the sync-free expert alignment, the launch operator with its grid sizes); the launch
  operator itself runs its shape-only fake implementation there. Meta tensors hold no data, so any
  data-dependent operator would also fail outright.
* Under ``TRITON_INTERPRET=1`` in a subprocess (its own working directory, so the checkout's
  ``kernels/`` cannot shadow the package transformers imports), the same config scaled down to one
  (sliding-window) layer and width 64 but keeping 128 experts top-8 and the 256-token canvas: the
  interpreted Triton kernels compute real values, with no sync counted, and match the pure-torch
  reference path. (The interpreter runs each kernel program in Python; one layer keeps it under a
  minute.)

The compiled kernel is checked as far as a CPU allows: it lowers to an sm_90 cubin. The denoising
loop is counted on the tiny test model: one sync per canvas before its steps, one per step.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

from dgemma.engine.denoise import denoise, encode, expand_cache
from dgemma.engine.settings import SamplerSettings
from dgemma.engine.static_step import StaticStep
from dgemma.kernels.hostsync import SyncCounter, sync_reason
from dgemma.quant.meta import load_config, meta_model, with_meta_quantized_experts
from tiny import tiny_config

triton = pytest.importorskip("triton")


def test_sync_counter_sees_each_kind_of_sync() -> None:
    x = torch.arange(6.0)
    mask = x > 2
    with SyncCounter() as c:
        x.sum().item()
        bool(x.any())  # also _local_scalar_dense
        x.nonzero()
        x[mask]
        x[mask] = 0.0
        torch.unique(x)
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)  # sized: no sync
        torch.bincount(torch.tensor([1, 2]))
        x.tolist()
        x[torch.tensor([0, 2])] = 1.0  # integer index: no sync
        torch.where(mask, x, 0.0)
        torch.ones(3).to("meta")
        torch.ones(3, device="meta").copy_(torch.ones(3))
    assert c.syncs == {"_local_scalar_dense": 2, "nonzero": 1, "index with a boolean mask": 1,
                       "index_put_ with a boolean mask": 1, "_unique2": 1, "repeat_interleave without output_size": 1,
                       "bincount": 1, ".tolist()": 1, "copy from the host": 2}, c.report()
    # A copy back to the host cannot run from meta tensors (no data): asked without running it.
    assert sync_reason(torch.ops.aten._to_copy.default, (torch.ones(3, device="meta"),), {"device": "cpu"}) \
        == "copy to the host"


def test_decoder_and_encoder_passes_never_sync_at_the_26b_shape(monkeypatch) -> None:
    """Full 26B-A4B config, NVFP4 experts through the Triton dispatch, on the meta device: a cold
    prefill into a fresh cache (two 1,024-token passes), a decoder forward of two rows, a commit;
    then the prefill and commit into the static step's buffers."""
    monkeypatch.setenv("DGEMMA_KERNELS", "triton")
    config = load_config("diffusiongemma-26B-A4B")
    text = config.text_config
    assert (text.num_experts, text.top_k_experts, config.canvas_length) == (128, 8, 256)
    model = with_meta_quantized_experts(meta_model(config)).eval().to(torch.bfloat16)
    meta = torch.device("meta")
    # Once per process and device, the kernels copy their 16-entry code table to the device (a
    # warm-up, like autotuning, which also happens at the first call): done before counting.
    from dgemma.kernels.triton_w4a16 import _lut

    _lut("nvfp4", meta)
    cache = DynamicCache(config=text)
    canvas = torch.randint(0, text.vocab_size, (2, config.canvas_length), device=meta)
    with torch.no_grad():
        with SyncCounter() as prefill:
            encode(model, torch.randint(0, text.vocab_size, (1, 2048), device=meta), cache)
        sc = torch.zeros(2, config.canvas_length, text.vocab_size, dtype=torch.bfloat16, device=meta)
        positions = torch.arange(2048, 2048 + config.canvas_length, device=meta)[None]
        with SyncCounter() as decoder:
            model(decoder_input_ids=canvas, self_conditioning_logits=sc, cache=expand_cache(cache, 2),
                  decoder_position_ids=positions)
        with SyncCounter() as commit:
            encode(model, canvas[:1], cache)
    # The experts really went through the fused kernel's launches: two per layer, per 1,024-token chunk.
    for counter, chunks in ((prefill, 2), (decoder, 1), (commit, 1)):
        assert not counter.syncs, counter.report()
        assert counter.ops["dgemma.moe_w4a16_mm.default"] == 2 * text.num_hidden_layers * chunks
    # The same passes straight into the static step's buffers (static_step.BufferCache), as the
    # engine runs them with the static step, and the step's load of that cache.
    step = StaticStep(model, capacity=8192)
    buffers = step.cache()
    with torch.no_grad(), SyncCounter() as into_buffers:
        for _ in range(2):
            encode(model, torch.randint(0, text.vocab_size, (1, 1024), device=meta), buffers)
        step.load(buffers)
        encode(model, canvas[:1], buffers)
    assert not into_buffers.syncs, into_buffers.report()
    assert step.holds(buffers) and buffers.get_seq_length() == 2048 + config.canvas_length


INTERPRETED = textwrap.dedent(
    """
    import torch
    from transformers import DiffusionGemmaConfig, DynamicCache
    from dgemma.engine.denoise import encode
    from dgemma.kernels.hostsync import SyncCounter
    from dgemma.kernels.moe_align import moe_align
    from dgemma.kernels.triton_w4a16 import _lut
    from dgemma.quant.apply import quantize_model
    from dgemma.quant.checkpoint import materialize_meta
    from dgemma.quant.formats import quantize
    from dgemma.quant.meta import load_config, meta_model

    text = {**load_config("diffusiongemma-26B-A4B").text_config.to_dict(),
            "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 32, "moe_intermediate_size": 32, "vocab_size": 512,
            "sliding_window": 16, "layer_types": ["sliding_attention"], "per_layer_config": {}}
    config = DiffusionGemmaConfig(text_config=text, canvas_length=256)
    assert (config.text_config.num_experts, config.text_config.top_k_experts) == (128, 8)
    torch.manual_seed(0)
    model = meta_model(config).eval()
    materialize_meta(model, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05) if p.dim() > 1 else p.fill_(1.0)
    quantize_model(model, "nvfp4")

    def run():
        cache = DynamicCache(config=config.text_config)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad(), SyncCounter() as counter:
            encode(model, torch.randint(3, 512, (1, 24), generator=gen), cache)  # cold prefill past the window
            logits = model(decoder_input_ids=torch.randint(0, 512, (1, 256), generator=gen),
                           self_conditioning_logits=torch.randn(1, 256, 512, generator=gen), cache=cache,
                           decoder_position_ids=torch.arange(24, 280)[None]).logits
        return logits, counter

    logits, counter = run()
    assert not counter.syncs, counter.report()
    assert counter.ops["dgemma.moe_w4a16_mm.default"] == 2 * 2  # 2 launches x 2 passes
    import os
    os.environ["DGEMMA_KERNELS"] = "torch"
    ref, ref_counter = run()
    assert ref_counter.syncs  # the CPU reference path does sync; the count would see it
    torch.testing.assert_close(logits, ref, rtol=2e-3, atol=2e-3)

    # Blocks past the last expert's return at once: give one valid rows and an expert that exists in
    # memory; they must stay untouched (zero).
    gu = quantize(torch.randn(3, 64, 32), "nvfp4")
    rows, block_expert, n = moe_align(torch.tensor([[0, 1], [1, 0]]), 2, 16)
    assert block_expert.tolist() == [0, 1, 2]  # ceil(4 / 16) + 2 blocks; the last one unused
    rows[32:34] = torch.tensor([0, 1], dtype=torch.int32)
    a = torch.randn(2, 32)
    out = torch.ops.dgemma.moe_w4a16_mm(a, gu.packed[:2], gu.scales[:2].view(torch.uint8), gu.global_scale[:2],
                                        _lut("nvfp4", a.device), rows, block_expert, None, n, 1, 16, True, False,
                                        16, True)
    block_expert[2] = 2  # the same launch with that block given to expert 2 writes rows 0 and 1
    wrote = torch.ops.dgemma.moe_w4a16_mm(a, gu.packed, gu.scales.view(torch.uint8), gu.global_scale,
                                          _lut("nvfp4", a.device), rows, block_expert, None, n, 1, 16, True,
                                          False, 16, True)
    assert not torch.equal(out[:2], wrote[:2]) and wrote[:2].abs().max() > 0
    print("INTERPRETED-NO-SYNC-OK")
    """
)


def test_triton_dispatch_computes_without_a_sync_under_the_interpreter(tmp_path) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", DGEMMA_KERNELS="triton")
    res = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    assert "INTERPRETED-NO-SYNC-OK" in res.stdout


@pytest.fixture(scope="module")
def tiny_model() -> DiffusionGemmaForBlockDiffusion:
    torch.manual_seed(0)
    return DiffusionGemmaForBlockDiffusion(tiny_config(vocab_size=512, canvas_length=16)).eval()


@pytest.mark.parametrize("pinned_tail", [0, 6])
@pytest.mark.parametrize("exact", [False, True])
def test_denoise_loop_syncs_once_per_step(tiny_model, pinned_tail: int, exact: bool) -> None:
    """One sync per canvas before its steps (where the pins are) and one per step (the stop check),
    also once a row has stopped before the others. The tiny model's own forward is sync-free (checked), so
    every count here is the loop's."""
    model = tiny_model
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        encode(model, torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(0)), cache)
        canvas = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(1))
        pinned = torch.zeros_like(canvas, dtype=torch.bool)
        pinned[:, 16 - pinned_tail:] = True
        with SyncCounter() as forward:
            model(decoder_input_ids=canvas, cache=expand_cache(cache, 3),
                  decoder_position_ids=torch.arange(40, 56)[None])
        assert not forward.syncs, forward.report()

        def run(steps: int, **kw) -> tuple[SyncCounter, int, list[int]]:
            seen: list[torch.Tensor] = []
            settings = SamplerSettings(max_denoising_steps=steps, **kw)
            with SyncCounter() as counter:
                out = denoise(model, cache, canvas, pinned, settings, torch.Generator().manual_seed(2),
                              exact=exact, on_step=lambda state: seen.append(state.finished.clone()))
            finish_steps = [next((i + 1 for i, f in enumerate(seen) if f[row]), 0) for row in range(3)]
            return counter, out.steps, finish_steps

        # Never confident: every run takes all its steps.
        for steps in (2, 5):
            counter, taken, _ = run(steps, confidence_threshold=1e-30)
            assert taken == steps
            assert sum(counter.syncs.values()) == steps + 1, counter.report()
        # A fully pinned row is confident at once and stable from its second step: it stops there,
        # and the other rows go on without it.
        pinned[0] = True
        counter, taken, finish_steps = run(6, stability_threshold=1)
        assert finish_steps == [2, 0, 0] and taken == 6
        assert sum(counter.syncs.values()) == taken + 1, counter.report()


@pytest.mark.parametrize("moe,fuse_gate,mul_weight", [(True, True, False), (True, False, True), (False, False, False)])
def test_kernel_compiles_for_an_h100_without_one(moe: bool, fuse_gate: bool, mul_weight: bool) -> None:
    """The compiled (not interpreted) kernel, early exit of unused MoE blocks included, lowers to an
    sm_90 cubin with Triton's bundled ptxas. Nothing runs: there is no GPU here."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dgemma.kernels.triton_w4a16 import _w4a16_kernel

    jit = _w4a16_kernel.fn
    pointers = {"a_ptr": "*bf16", "p_ptr": "*u8", "s_ptr": "*u8", "g_ptr": "*fp32", "lut_ptr": "*fp32",
                "c_ptr": "*bf16", "rows_ptr": "*i32", "expert_ptr": "*i32", "tw_ptr": "*fp32"}
    constants = dict(GROUP=16, SCALE_E4M3=True, MOE=moe, A_ROW_DIV=8 if fuse_gate else 1, MUL_WEIGHT=mul_weight,
                     FUSE_GATE=fuse_gate, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, UPCAST=False)
    names = list(jit.arg_names)
    signature = {n: pointers.get(n, "constexpr" if n in constants else "i32") for n in names}
    source = ASTSource(fn=jit, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    except RuntimeError as err:  # no ptxas in this Triton install
        pytest.skip(f"cannot compile for CUDA here: {err}")
    assert kernel.asm["cubin"]
    # The MoE kernel returns early for unused blocks: a second return besides the one at the end.
    assert kernel.asm["ttir"].count("tt.return") == (2 if moe else 1)


def test_static_step_loads_and_steps_without_a_sync(tiny_model) -> None:
    """The engine's decoder step on a GPU (engine/static_step.py): loading the prefix into its
    buffers and stepping 3 rows padded to a bucket of 4 add no sync to the loop's."""
    cache = DynamicCache(config=tiny_model.config.text_config)
    with torch.no_grad():
        encode(tiny_model, torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(0)), cache)
    canvas = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(1))
    step = StaticStep(tiny_model, capacity=64)
    settings = SamplerSettings(max_denoising_steps=3, confidence_threshold=1e-30)
    with SyncCounter() as counter:
        step.load(cache)
        out = denoise(step, cache, canvas, torch.zeros_like(canvas, dtype=torch.bool), settings,
                      torch.Generator().manual_seed(2))
    assert out.steps == 3 and sum(counter.syncs.values()) == out.steps + 1, counter.report()
