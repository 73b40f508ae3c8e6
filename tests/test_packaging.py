"""Packaging metadata: one version, the console scripts point at real functions, every package ships."""

import importlib
from pathlib import Path

import pytest

import ff_kernels

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_is_the_same_in_pyproject_and_the_package():
    assert PYPROJECT["project"]["version"] == ff_kernels.__version__


def test_console_scripts_name_callables():
    for name, target in PYPROJECT["project"]["scripts"].items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_every_source_folder_with_python_files_is_a_package():
    """setup.py finds packages by their __init__.py: a folder without one would be left out of the wheel."""
    for folder in [ROOT / "fftriton", *(p for p in (ROOT / "python" / "ff_kernels").rglob("*") if p.is_dir())]:
        if folder.name != "__pycache__" and any(folder.glob("*.py")):
            assert (folder / "__init__.py").is_file(), f"{folder} has Python files but no __init__.py"
