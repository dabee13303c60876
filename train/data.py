"""Training examples in exactly the canvas layouts of docs/engine.md.

Every example is (encoder head, encoder body, canvas input base, canvas target, pinned):

* FIM:   encoder = <bos> + tok(prefix); canvas = slots(m) ++ (tok(suffix) + <eos> + <pad>*)[:C-m]
         slot target = (tok(middle) + <eos> + <pad>*)[:m]  (middle[:m] when longer)
* continuation: FIM with an empty suffix (pinned tail = <eos> <pad> ...)
* next-token warm-up (lm_batch): <bos> + code from a line start, for the causal encoder alone
* edit:  encoder = chat_template(instruction) + tok(prefix); slots seeded from a corrupted
         copy of the target (token replacements, a few deletions/duplications); loss on the
         target.

Pinned positions carry the target and get no loss. Prefix and suffix are tokenized
separately, cut at character positions, as the engine does.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

from train.config import BOS_ID, CANVAS_LENGTH, EOS_ID, PAD_ID, VOCAB_SIZE

INSTRUCTIONS = [
    "Fix this code",
    "Rewrite this",
    "Clean up",
    "Fix the bug",
    "Fix this",
    "Fix the typo",
    "Tidy this up",
    "Correct this code",
    "Make this work",
    "Rewrite this code",
    "Clean up this code",
    "Fix the syntax error",
]
SLOT_CHOICES = (16, 32, 48, 56)


@dataclass
class Example:
    kind: str
    head: list[int]  # never truncated (<bos> or the chat template)
    body: list[int]  # prefix code tokens, left-truncated to fit
    base: list[int]  # canvas input before diffusion noise (len C)
    target: list[int]  # canvas target (len C)
    pinned: list[bool]  # len C


def chat_prompt(tok, instruction: str) -> list[int]:
    text = f"<bos><start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n"
    return tok.encode(text).ids


class ExampleMaker:
    def __init__(self, tok, sources: list[tuple[str, str]], max_prefix: int = 128,
                 canvas: int = CANVAS_LENGTH, seed: int = 0, long_prefix: int = 384,
                 long_frac: float = 0.06):
        self.tok = tok
        self.texts = [t for _, t in sources]
        self.cum = []
        total = 0
        for t in self.texts:
            total += len(t)
            self.cum.append(total)
        self.total = total
        self.max_prefix = max_prefix
        self.long_prefix = long_prefix
        self.long_frac = long_frac
        self.C = canvas
        self.rng = random.Random(seed)
        self.templates = {i: chat_prompt(tok, i) for i in INSTRUCTIONS}
        self._starts: dict[int, list[int]] = {}

    def enc(self, s: str) -> list[int]:
        return self.tok.encode(s).ids if s else []

    def pick_text(self) -> tuple[str, list[int]]:
        r = self.rng.randrange(self.total)
        i = bisect.bisect_right(self.cum, r)
        if i not in self._starts:
            t = self.texts[i]
            self._starts[i] = [0] + [j + 1 for j, ch in enumerate(t) if ch == "\n" and j + 1 < len(t)]
        return self.texts[i], self._starts[i]

    def lm_sequence(self, length: int) -> list[int]:
        """``<bos>`` and the code from a random line start on, ``length`` tokens in all (shorter at a
        file's end): what the engine's encoder sees, for the next-token warm-up."""
        text, starts = self.pick_text()
        a = self.rng.choice(starts)
        return ([BOS_ID] + self.enc(text[a:a + length * 8]))[:length]

    def pick_m(self) -> int:
        if self.rng.random() < 0.5:
            return self.rng.choice(SLOT_CHOICES)
        return self.rng.randint(8, 60)

    def cut(self, text: str, starts: list[int], kind: str) -> tuple[int, int]:
        rng = self.rng
        n = len(text)
        if kind == "cont":
            if rng.random() < 0.7:
                a = rng.choice(starts)
            else:
                a = rng.randrange(n)
            return a, min(n, a + 1500)
        if kind == "edit" or rng.random() < 0.8:
            # whole lines (single line half the time), optionally without the final newline
            i = rng.randrange(len(starts))
            k = 1 if rng.random() < 0.5 else rng.randint(2, 8 if kind != "edit" else 5)
            a = starts[i]
            b = starts[i + k] if i + k < len(starts) else n
            if rng.random() < 0.5 and b > a and text[b - 1] == "\n":
                b -= 1
            if kind != "edit" and rng.random() < 0.25:
                line = text[a:b]
                a += len(line) - len(line.lstrip(" \t"))
            if kind != "edit" and rng.random() < 0.03:
                b = a  # nothing to insert
            return a, max(a, b)
        a = rng.randrange(n)
        b = min(n, a + rng.randint(1, 160))
        return a, b

    def corrupt(self, ids: list[int]) -> list[int]:
        """A plausible 'before' version of the code: replaced tokens (drawn from the same
        snippet or the vocabulary), a few deleted or duplicated tokens."""
        rng = self.rng
        out = list(ids)
        if not out:
            return out
        rate = rng.uniform(0.03, 0.3)
        for j in range(len(out)):
            if rng.random() < rate:
                out[j] = rng.choice(ids) if rng.random() < 0.6 else rng.randrange(5, VOCAB_SIZE)
        for _ in range(rng.randint(0, 3)):
            if out and rng.random() < 0.5:
                del out[rng.randrange(len(out))]
            elif out:
                j = rng.randrange(len(out))
                out.insert(j, out[j])
        return out

    def make(self, kind: str, cap: int | None = None) -> Example:
        C = self.C
        cap = cap or self.max_prefix
        text, starts = self.pick_text()
        a, b = self.cut(text, starts, kind)
        prefix, middle, suffix = text[:a], text[a:b], text[b:]
        if kind == "cont":
            suffix = ""
            if b < len(text):
                middle = middle  # long continuation: only middle[:m] is used
        # prefix: keep the last max_prefix chars' worth (tokens are >= 1 char), tokenize
        body = self.enc(prefix[-cap * 8:])
        if len(prefix) > cap * 8 and body:
            body = body[1:]  # first token may be a cut word
        mid = self.enc(middle)
        suf = self.enc(suffix[: C * 8])[:C]
        if kind == "edit":
            m = min(60, max(8, len(mid) + self.rng.randint(1, 12))) if self.rng.random() < 0.7 else self.pick_m()
            instr = self.rng.choice(INSTRUCTIONS)
            head = self.templates[instr]
        else:
            m = self.pick_m()
            head = [BOS_ID]
        slot_target = (mid + [EOS_ID] + [PAD_ID] * m)[:m]
        tail = (suf + [EOS_ID] + [PAD_ID] * C)[: C - m]
        target = slot_target + tail
        if kind == "edit":
            seed = self.corrupt(mid)
            base = (seed + [EOS_ID] + [PAD_ID] * m)[:m] + tail
        else:
            base = list(target)
        pinned = [False] * m + [True] * (C - m)
        body = body[-(cap - len(head)):] if cap > len(head) else []
        return Example(kind, head, body, base, target, pinned)


KIND_WEIGHTS = (("fim", 0.6), ("cont", 0.15), ("edit", 0.25))


class Batcher:
    """Draws a pool of examples, sorts it by encoder length and cuts batches that share
    one encoder length (left-truncating the code part; <bos>/template stay first), so no
    padding is ever needed in the encoder."""

    def __init__(self, maker: ExampleMaker, batch_size: int = 16, pool_batches: int = 8):
        self.maker = maker
        self.bs = batch_size
        self.pool_batches = pool_batches
        self.queue: list[list[Example]] = []

    def _kind(self) -> str:
        r = self.maker.rng.random()
        acc = 0.0
        for k, w in KIND_WEIGHTS:
            acc += w
            if r < acc:
                return k
        return KIND_WEIGHTS[-1][0]

    def _fill(self) -> None:
        mk = self.maker
        cap = mk.long_prefix if mk.rng.random() < mk.long_frac else mk.max_prefix
        pool = [mk.make(self._kind(), cap) for _ in range(self.bs * self.pool_batches)]
        pool.sort(key=lambda e: len(e.head) + len(e.body))
        batches = [pool[i: i + self.bs] for i in range(0, len(pool), self.bs)]
        self.maker.rng.shuffle(batches)
        self.queue.extend(batches)

    def next_examples(self) -> list[Example]:
        if not self.queue:
            self._fill()
        return self.queue.pop()


def lm_batch(maker: ExampleMaker, batch_size: int, length: int) -> torch.Tensor:
    """(B, L) next-token training rows, cut to the shortest drawn so no padding is needed."""
    rows = [maker.lm_sequence(length) for _ in range(batch_size)]
    rows = [r for r in rows if len(r) >= length // 4] or rows
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows], dtype=torch.long)


def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
    L = min(len(e.head) + len(e.body) for e in examples)
    keep = [e for e in examples if len(e.head) <= L]
    enc = []
    for e in keep:
        nb = L - len(e.head)
        enc.append(e.head + (e.body[len(e.body) - nb:] if nb else []))
    return {
        "input_ids": torch.tensor(enc, dtype=torch.long),
        "base": torch.tensor([e.base for e in keep], dtype=torch.long),
        "target": torch.tensor([e.target for e in keep], dtype=torch.long),
        "pinned": torch.tensor([e.pinned for e in keep], dtype=torch.bool),
    }
