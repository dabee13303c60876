"""The training corpus: the CPython standard library sources of the running Python.

Reproducible and PSF licensed. Files under test/, tests/, idlelib/ and site-packages
are excluded; the list is sorted so every run sees the same files in the same order.
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

EXCLUDED_PARTS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files() -> list[Path]:
    """Sorted stdlib .py files (relative order by POSIX relative path)."""
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_parts = Path(dirpath).relative_to(root).parts
        if any(p in EXCLUDED_PARTS for p in rel_parts):
            dirnames[:] = []
            continue
        for name in filenames:
            if name.endswith(".py"):
                out.append(Path(dirpath) / name)
    out.sort(key=lambda p: p.relative_to(root).as_posix())
    return out


def read_sources() -> list[tuple[str, str]]:
    """[(relative path, text)] for every corpus file that decodes as UTF-8."""
    root = stdlib_root()
    res = []
    for p in corpus_files():
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            res.append((p.relative_to(root).as_posix(), text))
    return res


def split(sources: list[tuple[str, str]], val_every: int = 20):
    """Deterministic train/val split by file: every `val_every`-th file (by a hash of its
    path) goes to validation."""
    train, val = [], []
    for rel, text in sources:
        h = int(hashlib.sha256(rel.encode()).hexdigest(), 16)
        (val if h % val_every == 0 else train).append((rel, text))
    return train, val


def write_manifest(path: Path, sources: list[tuple[str, str]]) -> None:
    train, val = split(sources)
    val_set = {r for r, _ in val}
    lines = [
        "dgemma bundled model: training corpus",
        f"Python {sys.version.split()[0]} ({sys.implementation.name}), standard library at {stdlib_root()}",
        "Excluded directories: " + ", ".join(sorted(EXCLUDED_PARTS)),
        f"{len(sources)} files ({sum(len(t) for _, t in sources)} characters); "
        f"{len(train)} train, {len(val)} validation (marked 'val')",
        "Tokenizer trained on all files below; model trained on the train files only.",
        "",
    ]
    for rel, _ in sources:
        lines.append(f"{rel}\tval" if rel in val_set else rel)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
