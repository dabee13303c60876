"""How the engine ranks the rows it decoded for one request: agreement and suffix fit.

**Agreement.** Which decoded row the others agree with: minimum-Bayes-risk choice under edit
similarity. A fill decodes several rows at once (one per middle length, times the alternatives).
Their mean log-probability is a poor judge on a small model: a row that closes the middle at once,
or repeats a token, can be the most confident. The row most similar to the other rows is the one
the model's own samples vote for, and it maximises the expected edit similarity to them; on the
bundled model this picks better middles than the log-probability does (BENCHMARKS.md, "Bundled
model quality").

**Suffix fit.** How well a candidate middle leads into the code after it.

A fill decodes several rows and must pick one. A row's own confidence is a poor judge of where a
middle should end (closing it at once is the most confident thing a model can do), and the rows
that agree most with the others tend to be the short ones. The encoder pass is a causal language
model over the same weights, so it can read prefix + middle and say how expected the suffix's first
tokens are next: a middle that stops too early, runs on, or does not connect makes them unlikely.
That log-probability is the row's *fit*. It needs an encoder trained to predict the next token
(the bundled model is: train/train.py adds a next-token loss on the encoder pass), so checkpoints
opt in with ``rank_by: "suffix_fit"`` in their dgemma_sampler.json (engine/loading.py), or a
request does in its settings.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from dgemma.engine.denoise import encode, expand_cache


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute: cost 1) by Myers' bit-parallel algorithm, in
    Hyyrö's formulation for whole strings: one column of the DP table per character of ``b``, held
    as bit vectors in Python ints, so a pair of 200-character middles costs ~0.2 ms, not ~20."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    match: dict[str, int] = {}
    for i, ch in enumerate(b):
        match[ch] = match.get(ch, 0) | (1 << i)
    mask = (1 << len(b)) - 1
    top = 1 << (len(b) - 1)
    plus, minus, distance = mask, 0, len(b)  # vertical deltas of the first column: all +1
    for ch in a:
        eq = match.get(ch, 0)
        xv = eq | minus
        xh = ((((eq & plus) + plus) & mask) ^ plus) | eq
        h_plus = minus | (~(xh | plus) & mask)
        h_minus = plus & xh
        if h_plus & top:
            distance += 1
        elif h_minus & top:
            distance -= 1
        h_plus = ((h_plus << 1) | 1) & mask  # row 0 of the table grows by one per column
        h_minus = (h_minus << 1) & mask
        plus = h_minus | (~(xv | h_plus) & mask)
        minus = h_plus & xv
    return distance


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein / longer length, on the texts without surrounding whitespace (as
    CrossCodeEval reports it); two empty texts are identical."""
    a, b = a.strip(), b.strip()
    if not a and not b:
        return 1.0
    return 1.0 - levenshtein(a, b) / max(len(a), len(b))


def agreement(texts: list[str]) -> list[float]:
    """For each text, its mean edit similarity to the other texts (0 for a lone text)."""
    n = len(texts)
    if n < 2:
        return [0.0] * n
    total = [0.0] * n
    for i in range(n):
        for j in range(i + 1, n):
            s = 1.0 if texts[i] == texts[j] else edit_similarity(texts[i], texts[j])
            total[i] += s
            total[j] += s
    return [t / (n - 1) for t in total]


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
