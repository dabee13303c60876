"""The folders read as the data path and imports run one way: kernels <- quant <- engine <- daemon
<- cluster <- cli, and daemon <- lsp (docs/architecture.md). A module may import its own layer and the ones below it, and
every layer may import `dgemma.quant.formats`: the 4-bit data layout itself, which the kernels
compute on and which imports nothing of dgemma's but its errors."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORMATS = "dgemma.quant.formats"
# Each layer and what it may import besides itself (dgemma's root package: errors, __init__).
BELOW = {
    "kernels": set(),
    "quant": {"kernels"},
    "engine": {"quant", "kernels"},
    "daemon": {"engine", "quant", "kernels"},
    "cluster": {"daemon", "engine", "quant", "kernels"},
    "lsp": {"daemon", "engine"},
    "cli": {"lsp", "cluster", "daemon", "engine", "quant", "kernels"},
}


def _dgemma_imports(path: Path) -> set[str]:
    """The dgemma layers a module imports, wherever in the module (lazy imports count too)."""
    layers = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "dgemma" and len(parts) > 1 and parts[1] in BELOW and name != FORMATS:
                layers.add(parts[1])
    return layers


@pytest.mark.parametrize("layer", sorted(BELOW))
def test_imports_run_one_way(layer):
    wrong = {f"{path.relative_to(ROOT)} imports dgemma.{other}"
             for path in sorted((ROOT / layer).glob("*.py"))
             for other in _dgemma_imports(path) - BELOW[layer] - {layer}}
    assert not wrong, sorted(wrong)


def test_no_relative_imports_across_layers():
    """Relative imports hide which layer a name comes from; every package module uses dgemma.<layer>."""
    relative = [str(p.relative_to(ROOT)) for layer in BELOW for p in (ROOT / layer).glob("*.py")
                if any(isinstance(n, ast.ImportFrom) and n.level > 1 for n in ast.walk(ast.parse(p.read_text())))]
    assert not relative, relative


def test_the_formats_module_is_a_leaf():
    assert _dgemma_imports(ROOT / "quant" / "formats.py") == set()
