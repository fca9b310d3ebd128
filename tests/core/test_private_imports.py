"""No module imports a private name (``_x``) or a CLI module (``cli``, ``*_cli``: entry points,
not libraries) from another package: what a package shares is public, so its private helpers
can change without breaking a caller elsewhere. Parsed with ``ast``, every module of the tree
but the tests."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "model", "export", "quantize", "runtime", "serve", "benchmarks", "examples", "mra", "scripts")


def _package(module: str) -> str:
    """``mra.runtime.cli`` -> ``runtime``; ``mra`` -> ``mra``."""
    parts = module.split(".")
    return parts[1] if parts[0] == "mra" and len(parts) > 1 else parts[0]


def private_imports(path: Path, package: str, root: Path = ROOT) -> list[str]:
    """``file:line name from module`` for each private name ``path`` imports from another package."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [a.name for a in node.names]
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [node.module] if any(p.startswith("_") or p == "cli" or p.endswith("_cli")
                                            for p in node.module.split(".")[1:]) else []
            if private and _package(node.module) != package:
                out.append(f"{path.relative_to(root)}:{node.lineno} {', '.join(private)} from {node.module}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if any((p.startswith("_") and not p.startswith("__")) or p == "cli" or p.endswith("_cli")
                       for p in a.name.split(".")[1:]) \
                        and _package(a.name) != package:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {a.name}")
    return out


def test_no_private_name_crosses_a_package():
    found = [hit for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))
             for hit in private_imports(path, pkg)]
    assert found == []


def test_the_check_sees_a_private_import(tmp_path):
    bad = tmp_path / "bench.py"
    bad.write_text("from mra.runtime.trt_backend import _check, usable\nfrom .local import _own\n"
                   "from mra.benchmarks.timing import _same\nfrom mra.runtime.cli import answered\n")
    assert private_imports(bad, "benchmarks", tmp_path) == ["bench.py:1 _check from mra.runtime.trt_backend",
                                                            "bench.py:4 mra.runtime.cli from mra.runtime.cli"]
