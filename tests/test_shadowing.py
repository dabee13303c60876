"""The checkout's top-level folders (`kernels/`, `daemon/`) share their names with installed
packages: transformers >= 5.25 imports Hugging Face's `kernels`. No dgemma process may let a
folder of the caller's working directory shadow them, wherever it is started."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_daemon_util import dgemma, isolated_env, short_tmp

CHECKOUT = Path(__file__).resolve().parent.parent


def test_transformers_imports_its_kernels_package_in_the_test_process():
    import transformers.activations  # noqa: F401  (imports `kernels` on transformers >= 5.25)

    kernels = sys.modules.get("kernels")
    assert kernels is None or not Path(kernels.__file__).resolve().is_relative_to(CHECKOUT)


def _trap(folder: Path) -> Path:
    """A working directory holding its own `kernels` and `daemon` packages that break on import."""
    for name in ("kernels", "daemon"):
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('the caller folder\\'s {name} was imported')\n")
    return folder


@pytest.mark.parametrize("where", ["checkout", "trap"])
def test_a_fill_from_a_shadowing_working_directory_autostarts_the_daemon(where, tmp_path):
    root = short_tmp("dgsh-")
    env = isolated_env(root)
    cwd = CHECKOUT if where == "checkout" else _trap(tmp_path / "work")
    src = tmp_path / "m.py"
    src.write_text("def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n")
    try:
        # `python -m` puts the working directory first on sys.path, as a user standing there gets.
        r = dgemma(["fill", f"{src}:3:1", "--json", "--max-tokens", "8"], env, cwd=cwd)
        assert r.returncode == 0, r.stderr
        assert set(json.loads(r.stdout)) >= {"middle", "model"}
        status = json.loads(dgemma(["status", "--json"], env, cwd=cwd).stdout)
        assert status["state"] == "ready"
        pid = status["pid"]
        # The daemon runs in its own folder, never in the caller's.
        assert Path(f"/proc/{pid}/cwd").resolve() == (root / "run").resolve()
    finally:
        dgemma(["stop"], env, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_in_process_fill_from_a_trap_folder(tmp_path):
    root = short_tmp("dgsh-")
    env = isolated_env(root)
    src = tmp_path / "m.py"
    src.write_text("x = 1\ny = 2\n")
    try:
        r = dgemma(["fill", f"{src}:2:1", "--no-daemon", "--max-tokens", "4"], env, cwd=_trap(tmp_path / "w"))
        assert r.returncode == 0, r.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_training_and_bench_entry_points_run_from_the_checkout_root():
    for args in (["-m", "train.corpus", "--help"], [str(CHECKOUT / "bench" / "quant_quality.py"), "--help"]):
        r = subprocess.run([sys.executable, *args], cwd=CHECKOUT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
