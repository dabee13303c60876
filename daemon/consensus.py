"""Which decoded row the others agree with: minimum-Bayes-risk choice under edit similarity.

A fill decodes several rows at once (one per middle length, times the alternatives). Their mean
log-probability is a poor judge on a small model: a row that closes the middle at once, or repeats
a token, can be the most confident. The row most similar to the other rows is the one the model's
own samples vote for, and it maximises the expected edit similarity to them; on the bundled model
this picks better middles than the log-probability does (BENCHMARKS.md, "Bundled model quality").
"""
from __future__ import annotations


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
