"""The library never imports the paper's reproduction (``ff_kernels.paper``).

Two checks: a static one over every import statement of the library's source files (so that
an import inside a function counts too), and a dynamic one: importing every library module in a
fresh interpreter loads no ``ff_kernels.paper`` module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "ff_kernels"
PAPER = "ff_kernels.paper"
# ``python -m ff_kernels`` is the ff-train command: the one library file allowed to reach the paper side.
ENTRY_POINTS = {PACKAGE / "__main__.py"}


def _library_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if PAPER.split(".")[1] not in p.relative_to(PACKAGE).parts[:1]
                  and p not in ENTRY_POINTS)


def _module_name(path: Path) -> str:
    parts = ("ff_kernels",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(source: str, module: str, is_package: bool = False) -> list[str]:
    """Absolute names of everything ``source`` (the text of module ``module``) imports, relative
    imports resolved."""
    package = module if is_package else module.rsplit(".", 1)[0]
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def test_the_library_files_are_found():
    files = {p.relative_to(PACKAGE).as_posix() for p in _library_files()}
    assert {"__init__.py", "functional/__init__.py", "nn/linear.py", "ops/linear.py", "distributed/__init__.py"} <= files
    assert not any(f.startswith("paper/") for f in files)


def test_the_checker_resolves_relative_imports():
    source = "import torch\nfrom ..paper.train import train\nfrom .. import paper\nfrom .layer import FFLayer\n"
    names = _imported_modules(source, "ff_kernels.nn.linear")
    assert "ff_kernels.paper.train" in names and "ff_kernels.paper" in names
    assert "ff_kernels.nn.layer.FFLayer" in names and "torch" in names
    assert "ff_kernels.paper.x" in _imported_modules("from .paper import x\n", "ff_kernels", is_package=True)


def test_no_library_file_imports_the_paper_side():
    offenders = {}
    for path in _library_files():
        names = _imported_modules(path.read_text(), _module_name(path), path.name == "__init__.py")
        if bad := sorted(n for n in names if n.startswith(PAPER)):
            offenders[path.relative_to(PACKAGE).as_posix()] = bad
    assert not offenders, f"library modules import {PAPER}: {offenders}"


def test_importing_the_library_loads_nothing_of_the_paper_side():
    modules = [_module_name(p) for p in _library_files()]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({PAPER!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
