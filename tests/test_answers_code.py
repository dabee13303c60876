"""A request that asks for code gets code, on the bundled model with the default config (no test
settings): the README's first command prints a diff on every seed, in this process and through
a daemon; regenerating one line of third-party code, in a short file or near the end of a
5,000-line one, answers with code and leaves every byte outside the line as it was."""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_daemon_util import Daemon, dgemma, isolated_env, short_tmp

ROOT = Path(__file__).resolve().parent.parent
SEEDS = range(10)
DGEMMA = shutil.which("dgemma", path=str(Path(sys.executable).parent)) or shutil.which("dgemma") or "dgemma"


@pytest.fixture(scope="module")
def default_daemon():
    """A daemon on the bundled model with the config a new user has: none."""
    root = short_tmp("dga-")
    env = isolated_env(root)
    (root / "cfg" / "config.toml").write_text("")
    d = Daemon(root, env)
    d.start()
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def _readme_command(seed: int, env: dict[str, str], *extra: str) -> None:
    # As the README runs it: the installed `dgemma` script, in the checkout (a `python -m` there would
    # put the checkout's kernels/ and daemon/ folders ahead of the installed packages).
    r = subprocess.run([DGEMMA, "edit", "examples/demo.py:3-5", "--dry-run", "--seed", str(seed), *extra],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("--- a/examples/demo.py"), (seed, r.stdout, r.stderr)
    assert "\n+" in r.stdout.split("\n+++ ", 1)[1], (seed, r.stdout)


def test_readme_first_command_prints_a_diff_in_process(default_daemon):
    for seed in SEEDS:
        _readme_command(seed, default_daemon.env, "--no-daemon")


def test_readme_first_command_prints_a_diff_through_the_daemon(default_daemon):
    for seed in SEEDS:
        _readme_command(seed, default_daemon.env)


def _code_lines(lines: list[str], start: int, stop: int) -> list[int]:
    """0-based indices of lines in [start, stop) that hold code (not blank, not a comment)."""
    return [i for i in range(start, stop) if lines[i].strip() and not lines[i].lstrip().startswith(("#", '"""', "'''"))]


def _regenerate(daemon: Daemon, path: Path, index: int, seed: int) -> None:
    """`dgemma edit FILE:L-L --yes`: the line comes back as code, and only it changed."""
    data = path.read_bytes()
    lines = data.decode("utf-8").splitlines(keepends=True)
    before, line, after = "".join(lines[:index]), lines[index], "".join(lines[index + 1:])
    r = dgemma(["edit", f"{path}:{index + 1}-{index + 1}", "--yes", "--seed", str(seed)], daemon.env,
               timeout=300)
    assert r.returncode == 0, (path.name, index + 1, line, r.stderr)
    new = path.read_text(encoding="utf-8")
    assert new.startswith(before) and new.endswith(after), (path.name, index + 1)
    middle = new[len(before):len(new) - len(after)]
    assert middle.strip(), (path.name, index + 1, line, middle)
    path.write_bytes(data)


@pytest.mark.parametrize("package", ["click", "rich", "pygls"])
def test_one_line_of_third_party_code_comes_back_as_code(default_daemon, tmp_path, package):
    module = pytest.importorskip(package)
    files = sorted(p for p in Path(module.__file__).parent.rglob("*.py") if p.stat().st_size > 4000)
    rng = random.Random(package)
    for k in range(2):
        source = rng.choice(files)
        path = tmp_path / f"{k}_{source.name}"
        shutil.copyfile(source, path)
        lines = path.read_text(encoding="utf-8").splitlines()
        _regenerate(default_daemon, path, rng.choice(_code_lines(lines, 5, len(lines) - 5)), seed=k)


def test_lines_near_the_end_of_a_5000_line_file_come_back_as_code(default_daemon, tmp_path):
    import click

    sources = sorted(Path(click.__file__).parent.glob("*.py"))
    text = ""
    for source in sources:
        text += source.read_text(encoding="utf-8").rstrip("\n") + "\n\n\n"
        if text.count("\n") >= 5000:
            break
    assert text.count("\n") >= 5000
    path = tmp_path / "long.py"
    path.write_text(text, encoding="utf-8")
    lines = text.splitlines()
    rng = random.Random(5000)
    for k, index in enumerate(rng.sample(_code_lines(lines, len(lines) - 60, len(lines) - 1), 4)):
        _regenerate(default_daemon, path, index, seed=k)
