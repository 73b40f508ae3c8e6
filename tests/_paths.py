"""Where the tests find real data: ``../shared/data`` relative to the repository root.

The product never reads this folder; tests point the loaders at it explicitly.
"""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"
DATA_DIR = REPO_ROOT.parent / "shared" / "data"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def require_mnist() -> Path:
    """MNIST_DIR if it holds the four IDX files (plain or .gz), else skip the calling test."""
    missing = [n for n in MNIST_FILES if not (MNIST_DIR / n).is_file() and not (MNIST_DIR / f"{n}.gz").is_file()]
    if missing:
        pytest.skip(f"MNIST not found: {MNIST_DIR} lacks {', '.join(missing)}")
    return MNIST_DIR


def require_data(name: str) -> Path:
    """``DATA_DIR / name`` (e.g. "mnist", "cifar10", "aesop") if it exists, else skip the calling test."""
    if name == "mnist":
        return require_mnist()
    folder = DATA_DIR / name
    if not folder.is_dir() or not any(folder.iterdir()):
        pytest.skip(f"data set not found: {folder}")
    return folder
