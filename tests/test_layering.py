"""Imports flow one way: config -> ops -> model -> state -> generation -> engine -> server.
training, eval, bench and cli sit on top; nothing below imports them."""

from __future__ import annotations

import ast
from pathlib import Path

import fast_xlstm

ROOT = Path(fast_xlstm.__file__).parent
LAYERS = {
    "config": 0, "ops": 1, "model": 2, "tokenizer": 2, "state": 3, "generation": 4, "loading": 4,
    "engine": 5, "llm": 5, "server": 6, "training": 7, "eval": 7, "bench": 7, "cli": 8, "__main__": 9, "__init__": 9,
}


def _layer_of(module: str) -> int:
    top = module.split(".")[0]
    assert top in LAYERS, f"module fast_xlstm.{module} has no layer: add it to LAYERS"
    return LAYERS[top]


def _imports(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name]) for a in node.names]
                found += [n for n in names if n]
            elif node.module and node.module.startswith("fast_xlstm."):
                found.append(node.module.removeprefix("fast_xlstm."))
        elif isinstance(node, ast.Import):
            found += [a.name.removeprefix("fast_xlstm.") for a in node.names if a.name.startswith("fast_xlstm.")]
    return found


def test_no_lower_layer_imports_a_higher_one():
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        own = "__init__" if rel.parts == ("__init__",) else rel.parts[0]
        for target in _imports(path):
            if _layer_of(target) > LAYERS[own]:
                bad.append(f"{rel} imports {target}")
    assert not bad, "\n".join(bad)


def test_the_scan_sees_imports():
    # Guard against a scanner that finds nothing and so can never fail.
    assert "ops" in _imports(ROOT / "model" / "mlstm.py") or "ops.__init__" in str(_imports(ROOT / "model" / "mlstm.py"))
    assert any(t.startswith("model") for t in _imports(ROOT / "generation" / "generate.py"))
