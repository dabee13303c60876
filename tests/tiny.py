"""Tiny random DiffusionGemma checkpoints for tests: real classes, small config, bundled tokenizer."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.models.gemma4 import Gemma4VisionConfig

from dgemma.engine.loading import BUNDLED_MODEL_DIR

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def tiny_config(vocab_size: int = 8192, canvas_length: int = 16, **text: object) -> DiffusionGemmaConfig:
    text_config = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=32,
        num_global_key_value_heads=1, sliding_window=32, layer_types=["sliding_attention", "full_attention"],
        num_experts=4, top_k_experts=2, moe_intermediate_size=32, max_position_embeddings=4096,
    )
    text_config.update(text)
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=8)
    return DiffusionGemmaConfig(text_config=text_config, vision_config=vision.to_dict(), canvas_length=canvas_length)


def build_tiny_checkpoint(path: Path, seed: int = 0, **config: object) -> Path:
    """Save a random tiny model plus the bundled tokenizer to ``path``."""
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(tiny_config(**config)).eval()
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (BUNDLED_MODEL_DIR / name).exists():
            shutil.copy(BUNDLED_MODEL_DIR / name, path / name)
    return path
