import random

import pytest

from dgemma.engine.ranking import agreement, edit_similarity, levenshtein


def reference_levenshtein(a: str, b: str) -> int:
    """The textbook dynamic programme, row by row."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_bit_parallel_levenshtein_matches_the_dynamic_programme() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        # Small alphabets make long runs of matches and mismatches; lengths cross the 64-bit mark.
        a = "".join(rng.choice("ab c\n") for _ in range(rng.randint(0, 90)))
        b = "".join(rng.choice("abcd ") for _ in range(rng.randint(0, 90)))
        assert levenshtein(a, b) == reference_levenshtein(a, b), (a, b)
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3


def test_edit_similarity_ignores_surrounding_whitespace() -> None:
    assert edit_similarity("  return x\n", "return x") == 1.0
    assert edit_similarity("abc", "abd") == pytest.approx(2 / 3)
    assert edit_similarity("", "x = 1") == 0.0
    assert edit_similarity(" ", "\n") == 1.0


def test_agreement_favours_the_text_the_others_resemble() -> None:
    texts = ["return a + b", "return a + b  # sum", ":", "return a - b"]
    votes = agreement(texts)
    assert max(range(len(texts)), key=votes.__getitem__) == 0
    assert min(range(len(texts)), key=votes.__getitem__) == 2
    assert agreement(["only"]) == [0.0]
    assert agreement(["same", "same"]) == [1.0, 1.0]
