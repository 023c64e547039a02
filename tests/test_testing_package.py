"""Test and benchmark scaffolding lives in delf_tf/testing/, which the library never imports."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_library_does_not_import_its_test_scaffolding():
    importers = []
    for path in (REPO / "delf_tf").rglob("*.py"):
        if "testing" in path.relative_to(REPO / "delf_tf").parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if any(name.startswith("delf_tf.testing") for name in names):
                importers.append(str(path.relative_to(REPO)))
    assert importers == []


def test_scaffolding_moved_out_of_the_library_modules():
    for module in ("soak", "synthetic_releases", "synthetic_training"):
        assert importlib.util.find_spec(f"delf_tf.testing.{module}") is not None
    for old in ("delf_tf.serving.soak", "delf_tf.releases.synthetic", "delf_tf.training.synthetic"):
        assert importlib.util.find_spec(old) is None, old
