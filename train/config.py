"""Model and generation configs of the bundled dgemma model.

A small DiffusionGemma (the transformers architecture, unchanged): shared encoder/decoder
transformer with sliding + full attention layers, a dense MLP plus a mixture of experts
in every layer (as in the 26B-A4B), tied embeddings, and a canvas of 64 tokens. The class
always builds a vision tower; it gets a tiny one here (dgemma's loader drops it, and the
shipped checkpoint does not contain its weights).
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import DiffusionGemmaConfig, DiffusionGemmaTextConfig, Gemma4VisionConfig
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    EntropyBoundSamplerConfig,
)

from dgemma.engine.loading import SAMPLER_FILE

VOCAB_SIZE = 8192
CANVAS_LENGTH = 64
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
START_OF_TURN_ID, END_OF_TURN_ID = 3, 4

PRESETS = {
    # name: (hidden, layers, heads, kv_heads, head_dim, dense_ffn, experts, top_k, expert_ffn)
    "tiny": (64, 2, 2, 1, 32, 128, 4, 2, 64),  # tests only
    "small": (256, 4, 4, 1, 64, 512, 8, 2, 256),
    "base": (320, 6, 5, 1, 64, 640, 8, 2, 320),
}


MAX_POSITIONS = 2048  # the context the engine accepts (prompt + canvases)
SLIDING_WINDOW = 128


def model_config(preset: str = "small") -> DiffusionGemmaConfig:
    """Sliding layers look back SLIDING_WINDOW tokens, the distances training covers; only
    the last (full attention) layer sees further, and training mixes in some long prompts
    for it (train.data, long_prefix)."""
    hidden, layers, heads, kv, head_dim, ffn, experts, top_k, expert_ffn = PRESETS[preset]
    layer_types = ["sliding_attention"] * layers
    layer_types[-1] = "full_attention"
    if layers >= 6:
        layer_types[layers // 2 - 1] = "full_attention"
    text = DiffusionGemmaTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        global_head_dim=head_dim,
        num_global_key_value_heads=kv,
        max_position_embeddings=MAX_POSITIONS,
        sliding_window=SLIDING_WINDOW,
        layer_types=layer_types,
        num_experts=experts,
        top_k_experts=top_k,
        moe_intermediate_size=expert_ffn,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
    )
    vision = Gemma4VisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=16,
    )
    return DiffusionGemmaConfig(
        text_config=text,
        vision_config=vision,
        canvas_length=CANVAS_LENGTH,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
    )


def generation_config() -> DiffusionGemmaGenerationConfig:
    """Defaults for a small code model on a CPU, picked by train/tune_sampler.py (on validation
    files, then checked on a development package): much cooler sampling than the 26B and few
    steps. Long schedules with a tight entropy bound did no better: every extra step re-noises
    the unaccepted slots, and a small model copies some of that noise into its answer."""
    return DiffusionGemmaGenerationConfig(
        max_new_tokens=CANVAS_LENGTH,
        max_denoising_steps=12,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=2.0),
        t_max=0.2,
        t_min=0.02,
        stability_threshold=1,
        confidence_threshold=0.02,
        bos_token_id=BOS_ID,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )


def sampler_defaults() -> dict:
    """dgemma's own settings for the bundled model (engine/loading.py's SAMPLER_FILE): three draws
    of every middle length, plus rows seeded with the lines above the cursor (a quarter renoised),
    ranked by how well each leads into the suffix under the encoder, which train.train teaches to
    predict the next token (engine/ranking.py). Picked on development packages (werkzeug,
    flask), never on the benchmark's: BENCHMARKS.md, "Bundled model quality"."""
    return {"draws": 3, "rank_by": "suffix_fit", "draft_strength": 0.25}


def save_sampler_config(path: Path) -> None:
    """Write both sampler files of a checkpoint directory."""
    generation_config().save_pretrained(str(path))
    (path / SAMPLER_FILE).write_text(json.dumps(sampler_defaults(), indent=2) + "\n")
