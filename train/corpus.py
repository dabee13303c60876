"""The training corpus: the CPython standard library of the running Python, plus the Python
sources of packages a dgemma install brings along (torch, transformers, pip, ...).

The tokenizer is trained on the standard library alone (reproducible, PSF licensed). The model
trains on both: the standard library alone is 3 M tokens, which a 2-hour run sees four times
over, and a model trained on it memorised it (next-token loss 2.5 on its training files, 3.2 on
held-out stdlib files, 4.0 on click). The packages add 48 M characters (about 14 M tokens) of
open-source (MIT, BSD, Apache 2.0, MPL 2.0) modern Python. `click` (the held-out set of
bench/infill_eval.py) and `typer` (a thin layer over click) are never part of it.

Files under test/, tests/, testing/, _vendor/ (copies of other packages) and idlelib/ are
excluded, and so are EXCLUDED_PATHS and package files over MAX_FILE_CHARS (generated tables).
The list is sorted; dgemma/bundled/CORPUS.txt records the files, the package versions and a
digest of the contents the shipped model was trained on (train.train logs whether it reads
exactly those). A fresh install may bring newer package versions, hence other files; to train on
exactly the shipped corpus, install its versions here, or pack the files and train elsewhere
(a lent GPU, another Python):

    pip install $(python -m train.corpus pins)      # the manifest's package versions
    python -m train.corpus pack corpus.tar.gz       # the corpus files, by relative path
    tar xzf corpus.tar.gz -C /tmp/corpus && DGEMMA_CORPUS_ROOT=/tmp/corpus python -m train.train ...
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import os
import sys
import sysconfig
import tarfile
from pathlib import Path

EXCLUDED_PARTS = {"test", "tests", "testing", "_vendor", "idlelib", "site-packages", "__pycache__"}
PACKAGES_DIR = "site-packages"
# import name -> distribution name (for the version in the manifest)
PACKAGES = {
    "torch": "torch", "transformers": "transformers", "huggingface_hub": "huggingface-hub", "numpy": "numpy",
    "networkx": "networkx", "jinja2": "jinja2", "markupsafe": "markupsafe", "fsspec": "fsspec",
    "filelock": "filelock", "pygls": "pygls", "lsprotocol": "lsprotocol", "cattrs": "cattrs", "attr": "attrs",
    "anyio": "anyio", "watchfiles": "watchfiles", "platformdirs": "platformdirs", "rich": "rich",
    "pygments": "pygments", "markdown_it": "markdown-it-py", "tqdm": "tqdm", "yaml": "pyyaml",
    "requests": "requests", "urllib3": "urllib3", "packaging": "packaging", "_pytest": "pytest",
    "pluggy": "pluggy", "hypothesis": "hypothesis", "triton": "triton", "bitsandbytes": "bitsandbytes",
    "setuptools": "setuptools", "pip": "pip", "idna": "idna", "charset_normalizer": "charset-normalizer",
    "regex": "regex", "sortedcontainers": "sortedcontainers", "h11": "h11",
}
# transformers' hundreds of near-copies of one modeling file, and torch's compiler stack (half of
# torch's Python, and far from the code people write).
EXCLUDED_PATHS = (f"{PACKAGES_DIR}/transformers/models/",) + tuple(
    f"{PACKAGES_DIR}/torch/{d}/" for d in ("_inductor", "_dynamo", "distributed", "ao", "_functorch", "onnx", "fx",
                                          "_higher_order_ops", "_export", "export"))
MAX_FILE_CHARS = 300_000
PACKAGES_LABEL = "Packages (under site-packages/): "
DIGEST_LABEL = "Contents sha256: "


MANIFEST = Path(__file__).resolve().parent.parent / "dgemma" / "bundled" / "CORPUS.txt"


def stdlib_root() -> Path:
    """The running Python's standard library, or the unpacked corpus in $DGEMMA_CORPUS_ROOT."""
    return Path(os.environ.get("DGEMMA_CORPUS_ROOT") or sysconfig.get_paths()["stdlib"])


def packages_root() -> Path:
    """Where the packages are: site-packages, or site-packages/ inside $DGEMMA_CORPUS_ROOT."""
    env = os.environ.get("DGEMMA_CORPUS_ROOT")
    return Path(env) / PACKAGES_DIR if env else Path(sysconfig.get_paths()["purelib"])


def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        if any(p in EXCLUDED_PARTS for p in Path(dirpath).relative_to(root).parts):
            dirnames[:] = []
            continue
        out += [Path(dirpath) / name for name in filenames if name.endswith(".py")]
    return out


def corpus_files() -> list[tuple[str, Path]]:
    """[(relative path, file)] sorted by relative path: the standard library's files by their path
    in it, then each package's as site-packages/<package>/..."""
    out = [(p.relative_to(stdlib_root()).as_posix(), p) for p in _walk(stdlib_root())]
    packages = packages_root()
    for name in PACKAGES:
        if (packages / name).is_dir():
            out += [(f"{PACKAGES_DIR}/{p.relative_to(packages).as_posix()}", p) for p in _walk(packages / name)]
    return sorted((rel, p) for rel, p in out if not rel.startswith(EXCLUDED_PATHS))


def is_stdlib(rel: str) -> bool:
    return not rel.startswith(PACKAGES_DIR + "/")


def read_sources() -> list[tuple[str, str]]:
    """[(relative path, text)] for every corpus file that decodes as UTF-8."""
    res = []
    for rel, p in corpus_files():
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip() and (is_stdlib(rel) or len(text) <= MAX_FILE_CHARS):
            res.append((rel, text))
    return res


def split(sources: list[tuple[str, str]], val_every: int = 20):
    """Deterministic train/val split by file: every `val_every`-th file (by a hash of its
    path) goes to validation."""
    train, val = [], []
    for rel, text in sources:
        h = int(hashlib.sha256(rel.encode()).hexdigest(), 16)
        (val if h % val_every == 0 else train).append((rel, text))
    return train, val


def package_versions() -> list[str]:
    """'name version' of each corpus package found in this environment."""
    out = []
    for name, dist in PACKAGES.items():
        try:
            out.append(f"{name} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def digest(sources: list[tuple[str, str]]) -> str:
    """sha256 over every (path, text): equal exactly when the corpus is the same, file for file."""
    h = hashlib.sha256()
    for rel, text in sources:
        h.update(f"{rel}\0{len(text)}\0".encode() + text.encode("utf-8"))
    return h.hexdigest()


def write_manifest(path: Path, sources: list[tuple[str, str]]) -> None:
    train, val = split(sources)
    val_set = {r for r, _ in val}
    lines = [
        "dgemma bundled model: training corpus",
        f"Python {sys.version.split()[0]} ({sys.implementation.name}), standard library at {stdlib_root()}",
        PACKAGES_LABEL + ", ".join(package_versions()),
        "Excluded directories: " + ", ".join(sorted(EXCLUDED_PARTS)) + "; paths "
        + ", ".join(EXCLUDED_PATHS) + f"; files over {MAX_FILE_CHARS} characters",
        f"{len(sources)} files ({sum(len(t) for _, t in sources)} characters); "
        f"{len(train)} train, {len(val)} validation (marked 'val')",
        f"{DIGEST_LABEL}{digest(sources)}",
        "Tokenizer trained on the standard-library files below (those not under site-packages/), "
        "validation files included; model trained on the train files only.",
        "",
    ]
    for rel, _ in sources:
        lines.append(f"{rel}\tval" if rel in val_set else rel)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _manifest(path: Path) -> tuple[list[str], list[str]]:
    """(header lines, listed files) of a manifest."""
    lines = path.read_text(encoding="utf-8").split("\n")
    end = lines.index("")
    return lines[:end], [line.split("\t")[0] for line in lines[end + 1:] if line]


def manifest_mismatch(sources: list[tuple[str, str]], path: Path = MANIFEST) -> str | None:
    """Why `sources` are not the corpus the manifest lists (None when they are)."""
    header, listed = _manifest(path)
    have = [rel for rel, _ in sources]
    if have != listed:
        missing, extra = sorted(set(listed) - set(have)), sorted(set(have) - set(listed))
        return f"{len(missing)} listed files missing (e.g. {missing[:3]}), {len(extra)} unlisted (e.g. {extra[:3]})"
    recorded = [line[len(DIGEST_LABEL):] for line in header if line.startswith(DIGEST_LABEL)]
    if recorded and recorded[0] != digest(sources):
        return "the same files with other contents (other package versions?)"
    return None


def pins(path: Path = MANIFEST) -> list[str]:
    """pip requirements for the package versions the manifest's corpus was read from."""
    header, _ = _manifest(path)
    listed = next(line for line in header if line.startswith(PACKAGES_LABEL))[len(PACKAGES_LABEL):]
    out = []
    for entry in listed.split(", "):
        name, version = entry.split(" ")
        out.append(f"{PACKAGES[name]}=={version.split('+')[0]}")  # torch's "+cpu" is the wheel's, not pip's
    return out


def pack(out: Path, sources: list[tuple[str, str]] | None = None) -> None:
    """The corpus files (default: all of them) in a .tar.gz, by their relative path: unpacked,
    that folder is a $DGEMMA_CORPUS_ROOT."""
    with tarfile.open(out, "w:gz") as tar:
        for rel, text in read_sources() if sources is None else sources:
            data = text.encode("utf-8")
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("pack", help="write the corpus files into a .tar.gz").add_argument("out", type=Path)
    sub.add_parser("pins", help="print the manifest's package versions as pip requirements")
    args = ap.parse_args()
    if args.command == "pack":
        pack(args.out)
    else:
        print("\n".join(pins()))
