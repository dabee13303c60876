"""How well a candidate middle leads into the code after it.

A fill decodes several rows and must pick one. A row's own confidence is a poor judge of where a
middle should end (closing it at once is the most confident thing a model can do), and the rows
that agree most with the others tend to be the short ones. The encoder pass is a causal language
model over the same weights, so it can read prefix + middle and say how expected the suffix's first
tokens are next: a middle that stops too early, runs on, or does not connect makes them unlikely.
That log-probability is the row's *fit*. It needs an encoder trained to predict the next token
(the bundled model is: train/train.py adds a next-token loss on the encoder pass), so checkpoints
opt in with ``rank_by: "suffix_fit"`` in their dgemma_sampler.json (daemon/loading.py), or a
request does in its settings.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from dgemma.daemon.denoise import encode, expand_cache

# Suffix tokens a fit reads: about two lines of code, enough to see whether the middle connects.
SUFFIX_FIT_TOKENS = 16


@torch.no_grad()
def suffix_fit(model, cache: DynamicCache, middles: list[list[int]], suffix_head: list[int],
               pad_id: int) -> list[float | None]:
    """Sum of log p(suffix_head | cached context + middle) for every middle, in one batched encoder
    pass on a view of ``cache`` (which is left as it was). An empty middle gets None: its first
    suffix token would be predicted from the last context token, whose hidden state the cache does
    not keep (and an empty fill ranks last anyway). Without suffix tokens every fit is 0."""
    fits: list[float | None] = [None if not middle else 0.0 for middle in middles]
    scored = [i for i, middle in enumerate(middles) if middle]
    if not scored or not suffix_head:
        return fits
    rows = [middles[i] + suffix_head for i in scored]
    width = max(len(row) for row in rows)
    device = cache.layers[0].keys.device
    ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long, device=device)
    # Right padding is harmless: the encoder is causal, so no scored position sees it.
    hidden = encode(model, ids, expand_cache(cache, len(rows)))
    targets = torch.tensor(suffix_head, dtype=torch.long, device=device)
    cap = model.final_logit_softcapping
    for row, i in enumerate(scored):
        # Position p predicts token p + 1: the suffix head follows the middle's last token.
        start = len(middles[i]) - 1
        logits = model.lm_head(hidden[row, start:start + len(suffix_head)]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        fits[i] = float(torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).sum())
    return fits
