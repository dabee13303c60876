"""The training corpus: the CPython standard library sources of the running Python.

Reproducible and PSF licensed. Files under test/, tests/, idlelib/ and site-packages
are excluded; the list is sorted so every run sees the same files in the same order.
daemon/bundled/CORPUS.txt records the list the shipped model was trained on. To train on
another machine (a lent GPU, another Python) on exactly those files:

    python -m train.corpus pack corpus.tar.gz       # here: the corpus files, by relative path
    tar xzf corpus.tar.gz -C /tmp/corpus && DGEMMA_CORPUS_ROOT=/tmp/corpus python -m train.train ...
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import sysconfig
import tarfile
from pathlib import Path

EXCLUDED_PARTS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}


MANIFEST = Path(__file__).resolve().parent.parent / "daemon" / "bundled" / "CORPUS.txt"


def stdlib_root() -> Path:
    """The running Python's standard library, or the unpacked corpus in $DGEMMA_CORPUS_ROOT."""
    return Path(os.environ.get("DGEMMA_CORPUS_ROOT") or sysconfig.get_paths()["stdlib"])


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


def manifest_mismatch(sources: list[tuple[str, str]], path: Path = MANIFEST) -> str | None:
    """Why `sources` are not the files the manifest lists (None when they are)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    listed = [line.split("\t")[0] for line in lines[lines.index("") + 1:] if line]
    have = [rel for rel, _ in sources]
    if have == listed:
        return None
    missing, extra = sorted(set(listed) - set(have)), sorted(set(have) - set(listed))
    return f"{len(missing)} listed files missing (e.g. {missing[:3]}), {len(extra)} unlisted (e.g. {extra[:3]})"


def pack(out: Path) -> None:
    """The corpus files in a .tar.gz, by their path relative to the library root."""
    root = stdlib_root()
    with tarfile.open(out, "w:gz") as tar:
        for rel, _ in read_sources():
            tar.add(root / rel, arcname=rel)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["pack"])
    ap.add_argument("out", type=Path)
    pack(ap.parse_args().out)
