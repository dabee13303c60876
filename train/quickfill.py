"""A minimal FIM decoder used only to monitor training (the product uses dgemma's engine).

Same canvas layout as the engine: encoder gets <bos>+prefix, canvas = m noisy slots then
the pinned suffix head. Each step keeps the argmax of the lowest-entropy slots (a growing
fraction) and renoises the rest; self-conditioning gets the previous logits with one-hot
pinned positions.
"""
from __future__ import annotations

import torch

from train.config import BOS_ID, EOS_ID, PAD_ID


def pinned_onehot_logits(logits, target, pinned, scale: float = 60.0):
    onehot = torch.nn.functional.one_hot(target, logits.shape[-1]).to(logits.dtype) * scale
    return torch.where(pinned[..., None], onehot, logits)


@torch.no_grad()
def quick_fill(model, tok, prefix: str, suffix: str, m: int = 32, steps: int = 12,
               max_prefix: int = 192, generator: torch.Generator | None = None) -> str:
    C = model.config.canvas_length
    V = model.config.text_config.vocab_size
    body = tok.encode(prefix).ids if prefix else []
    enc = [BOS_ID] + body[-(max_prefix - 1):]
    suf = tok.encode(suffix).ids if suffix else []
    tail = (suf + [EOS_ID] + [PAD_ID] * C)[: C - m]
    dev = model.device  # the random draws stay on the CPU generator: same fills on any device
    target = torch.tensor([[0] * m + tail], device=dev)
    pinned = torch.tensor([[False] * m + [True] * (C - m)], device=dev)
    canvas = torch.where(pinned, target, torch.randint(0, V, (1, C), generator=generator).to(dev))
    out = model(input_ids=torch.tensor([enc], device=dev), decoder_input_ids=canvas, use_cache=True)
    cache = out.past_key_values
    logits = out.logits
    for s in range(steps):
        if s > 0:
            sc = pinned_onehot_logits(logits, target, pinned)
            logits = model(cache=cache, decoder_input_ids=canvas,
                           self_conditioning_logits=sc).logits
        probs = logits[0, :m].float().softmax(-1)
        ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        best = probs.argmax(-1)
        k = max(1, round(m * (s + 1) / steps))
        keep = torch.zeros(m, dtype=torch.bool, device=dev)
        keep[ent.argsort()[:k]] = True
        noise = torch.randint(0, V, (m,), generator=generator).to(dev)
        canvas = canvas.clone()
        canvas[0, :m] = torch.where(keep, best, noise)
    ids = canvas[0, :m].tolist()
    if EOS_ID in ids:
        ids = ids[: ids.index(EOS_ID)]
    return tok.decode([i for i in ids if i != PAD_ID])
