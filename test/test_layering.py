"""Imports point inward only: ros, tools -> engine -> models -> kv (checked on the source, by AST)."""
from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "infinipot_ros"

# layer -> (forbidden third-party top-level modules, forbidden sibling layers)
RULES = {
    "kv": ({"transformers", "rclpy", "cv2", "numpy"}, {"models", "engine", "ros", "tools", "msg", "srv"}),
    "models": ({"rclpy"}, {"engine", "ros", "tools", "msg", "srv"}),
    "engine": ({"rclpy", "transformers"}, {"ros", "tools", "msg", "srv"}),
    "ros": ({"transformers"}, {"tools"}),
}


def _imports(path: pathlib.Path) -> set[tuple[str, int]]:
    """(module, relative level) of every import in a file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {(a.name, 0) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add((node.module or "", node.level))
    return out


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports(layer):
    third_party, siblings = RULES[layer]
    files = sorted((PKG / layer).rglob("*.py"))
    assert files, f"no sources in {layer}/"
    bad = []
    for f in files:
        for mod, level in _imports(f):
            top = mod.split(".")[0]
            if level == 0 and top in third_party:
                bad.append(f"{f.name}: import {mod}")
            if level == 0 and top == "infinipot_ros" and mod.split(".")[1:2] and mod.split(".")[1] in siblings:
                bad.append(f"{f.name}: import {mod}")
            if level == 2 and top in siblings:  # from ..<layer> import
                bad.append(f"{f.name}: from ..{mod} import")
    assert not bad, f"{layer}/ imports outward: {bad}"


def test_rule_table_can_fail(tmp_path):
    """The checker sees a forbidden import (guards against a checker that passes everything)."""
    f = tmp_path / "x.py"
    f.write_text("from ..engine import StreamingAssistant\nimport rclpy\n")
    assert ("engine", 2) in _imports(f) and ("rclpy", 0) in _imports(f)
