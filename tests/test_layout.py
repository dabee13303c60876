"""The folders read as the data path and imports run one way: kernels <- quant <- engine <- daemon
<- cluster <- cli, and daemon <- lsp (docs/architecture.md). A module may import its own layer and the
ones below it, and nothing else of dgemma's but its root package (errors). The kernels are the bottom:
they import nothing from quant/, so the packed 4-bit weight they compute on (`QuantizedWeight`, the
code tables) is defined in kernels/packed.py, and quant/ builds on it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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


def _imported_names(node: ast.AST) -> list[str]:
    """The dotted names an import statement (or a call of importlib.import_module with a literal) brings in."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0:
        module = node.module or ""
        # `from dgemma import quant` imports the layer as surely as `import dgemma.quant`.
        return [f"{module}.{a.name}" for a in node.names] if module == "dgemma" else [module]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in ("import_module", "__import__"):
            return [node.args[0].value]
    return []


def _dgemma_imports(path: Path) -> set[str]:
    """The dgemma layers a module imports, wherever in the module (lazy imports count too)."""
    layers = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        for name in _imported_names(node):
            parts = name.split(".")
            if parts[0] == "dgemma" and len(parts) > 1 and parts[1] in BELOW:
                layers.add(parts[1])
    return layers


@pytest.mark.parametrize("layer", sorted(BELOW))
def test_imports_run_one_way(layer):
    wrong = {f"{path.relative_to(ROOT)} imports dgemma.{other}"
             for path in sorted((ROOT / layer).glob("*.py"))
             for other in _dgemma_imports(path) - BELOW[layer] - {layer}}
    assert not wrong, sorted(wrong)


def test_the_checker_sees_every_form_of_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import dgemma.quant.formats\nfrom dgemma import engine\nfrom dgemma.daemon.client import Client\n"
                      "def f():\n    import importlib\n    importlib.import_module('dgemma.lsp.server')\n"
                      "from dgemma import errors\n")
    assert _dgemma_imports(module) == {"quant", "engine", "daemon", "lsp"}


def test_no_relative_imports_across_layers():
    """Relative imports hide which layer a name comes from; every package module uses dgemma.<layer>."""
    relative = [str(p.relative_to(ROOT)) for layer in BELOW for p in (ROOT / layer).glob("*.py")
                if any(isinstance(n, ast.ImportFrom) and n.level > 1 for n in ast.walk(ast.parse(p.read_text())))]
    assert not relative, relative


def test_the_packed_weight_is_a_leaf_defined_once():
    """kernels/packed.py, the 4-bit layout both the kernels and quant/ use, imports nothing of dgemma's,
    and it is the one module that defines the weight type and its code tables."""
    assert _dgemma_imports(ROOT / "kernels" / "packed.py") == set()
    defining = {str(p.relative_to(ROOT)) for layer in BELOW for p in (ROOT / layer).glob("*.py")
                for n in ast.walk(ast.parse(p.read_text()))
                if isinstance(n, ast.ClassDef) and n.name == "QuantizedWeight"
                or isinstance(n, ast.FunctionDef) and n.name in ("code_table", "dequantize", "unpack_codes")
                or isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id in ("E2M1_VALUES", "NF4_VALUES")
                                                     for t in n.targets)}
    assert defining == {"kernels/packed.py"}, sorted(defining)
