"""The draws of a denoising step: a token, the argmax and the entropy at each free canvas position.

Two samplers: transformers' own (torch.multinomial), which `generate` parity needs, and an
inverse-CDF draw several times cheaper on a CPU. The settings that steer them (temperatures,
bounds, stop rule) are in settings.py, which the config reads without torch.
"""
from __future__ import annotations

import torch


# Bytes of one (positions x vocabulary) fp32 temporary while sampling. The sampler holds a few of
# them; for a whole 256-token canvas at 262k vocabulary each would be 256 MiB.
SAMPLE_CHUNK_BYTES = 32 << 20


def chunk_positions(vocab: int) -> int:
    """Canvas positions per chunk: SAMPLE_CHUNK_BYTES of fp32 (positions x vocabulary), at least one."""
    return max(1, SAMPLE_CHUNK_BYTES // (vocab * 4))


def sample_positions(logits: torch.Tensor, index: torch.Tensor, generator: torch.Generator | None,
                      exact: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled token, argmax and entropy at the flat canvas positions ``index`` of (B, C, V) logits,
    a chunk of positions at a time so the sampler's temporaries stay small. The exact sampler takes
    all positions in one call: transformers draws them that way, and its random stream depends on it."""
    vocab = logits.shape[-1]
    flat = logits.view(-1, vocab)
    chunk = index.numel() if exact else chunk_positions(vocab)
    sampler = _sample_like_transformers if exact else _sample
    tokens, argmax, entropies = [], [], []
    for start in range(0, index.numel(), chunk):
        rows = flat[index[start:start + chunk]]
        drawn, h = sampler(rows, generator)
        tokens.append(drawn)
        argmax.append(rows.argmax(-1))
        entropies.append(h)
    return torch.cat(tokens), torch.cat(argmax), torch.cat(entropies)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``log_softmax(logits.float() * scale).gather(tokens)`` for (B, C, V) logits, (B, C) tokens and
    a ``scale`` that broadcasts to (B, C, 1) (a row's temperature): (B, C) log-probabilities, fp32.
    A chunk of positions at a time (`chunk_positions`), so two fp32 chunks (the scaled logits and
    their log-softmax) exist at once instead of two fp32 copies of the whole batch (0.5 GiB for one
    256-token canvas at 262k vocabulary); every position's numbers are the ones the whole-batch
    expression gives, since each row's log-softmax is computed on its own."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    index = tokens.reshape(-1, 1)
    scale = torch.as_tensor(scale, device=logits.device)
    scales = torch.broadcast_to(scale, (*tokens.shape, 1)).reshape(-1, 1)
    chunk = chunk_positions(vocab)
    parts = []
    for start in range(0, flat.shape[0], chunk):
        raw = flat[start:start + chunk].float() * scales[start:start + chunk]
        parts.append(torch.log_softmax(raw, dim=-1).gather(-1, index[start:start + chunk]).squeeze(-1))
        del raw
    return torch.cat(parts).view(tokens.shape)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Categorical entropy, computed as torch.distributions does it (so unconstrained canvases match
    transformers bit for bit) without its argument validation, which costs as much as the math."""
    normalized = logits - logits.logsumexp(dim=-1, keepdim=True)
    clamped = normalized.clamp(min=torch.finfo(normalized.dtype).min)
    return -(clamped * torch.softmax(normalized, dim=-1)).sum(-1)


def _sample_like_transformers(logits: torch.Tensor, generator: torch.Generator | None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits -> (N,) tokens and entropies, with transformers' own draw."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1), entropy(logits)


def _sample(logits: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits -> (N,) tokens and entropies: one uniform per position against the cumulative
    distribution, and the entropy from the same probabilities. The fused softmax and log-softmax
    kernels, not exp() of shifted logits: at low temperature most log-probabilities lie far below
    -87, where a plain exp() is 5-10x slower on a CPU (measured 144 ms vs 19 ms for 256 x 8192)."""
    probs = torch.softmax(logits, dim=-1)
    h = -(probs * torch.log_softmax(logits, dim=-1)).sum(-1)
    cdf = probs.cumsum_(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=cdf.shape[-1] - 1), h
