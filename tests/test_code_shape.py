"""The shape of the code: short functions, modules of readable length, a top level that shows the parts."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
MAX_TOP_LEVEL_MODULES = 12


def _modules():
    for folder in ("unet_dist", "jobs"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_function_over_60_lines():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_no_module_over_400_lines():
    long = [f"{path.relative_to(ROOT)} ({n} lines)" for path in _modules()
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, "modules over 400 lines:\n" + "\n".join(long)


def test_top_level_shows_the_parts():
    top = sorted(p.name for p in (ROOT / "unet_dist").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules at the top of unet_dist/: {top}"
    for package in ("train", "predict"):
        assert (ROOT / "unet_dist" / package / "__init__.py").is_file(), f"unet_dist/{package}/ is not a package"
