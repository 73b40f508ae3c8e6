"""MNIST from the four official IDX files, verified against their published sha256.

Where the files are looked for, first match wins:

1. ``data_dir`` (argument): the folder that holds the four files itself.
2. ``$FF_KERNELS_DATA``: a data root; MNIST is read from its ``mnist/`` sub-folder.
3. The user cache, ``$XDG_CACHE_HOME/ff_kernels/mnist`` (``~/.cache/ff_kernels/mnist``);
   missing files are downloaded there from :data:`MIRRORS` when ``download`` is true.

A folder named by 1 or 2 must already hold the files: nothing is ever written there. Each file
may be stored as ``name`` or ``name.gz``. Every file is checked on load (IDX magic number,
size against its header, sha256 of the uncompressed bytes); a missing file raises
:class:`MnistMissingError`, a damaged one :class:`MnistCorruptError`.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import sys
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import DataError

ENV_VAR = "FF_KERNELS_DATA"
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

# name -> (IDX magic, sha256 of the uncompressed file) as published with the data set.
FILES = {
    "train-images-idx3-ubyte": (0x00000803, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train-labels-idx1-ubyte": (0x00000801, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "t10k-images-idx3-ubyte": (0x00000803, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "t10k-labels-idx1-ubyte": (0x00000801, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
NUM_VALIDATION = 10_000  # the paper's tuning protocol: the last 10,000 training images


class MnistMissingError(DataError, FileNotFoundError):
    """An MNIST file is not where it was looked for (and was not downloaded)."""


class MnistCorruptError(DataError, ValueError):
    """An MNIST file exists but is damaged: bad gzip, bad magic, wrong size or wrong sha256."""


def cache_dir() -> Path:
    """The download folder: ``$XDG_CACHE_HOME/ff_kernels/mnist`` or ``~/.cache/ff_kernels/mnist``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ff_kernels" / "mnist"


def _find(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, whichever exists (uncompressed first), else None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    """The file's uncompressed bytes (gunzipped when the name ends in .gz)."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as err:
        raise MnistCorruptError(f"{path}: not a valid gzip file ({err}); delete it and fetch it again") from err


def _decode(source: str, name: str, raw: bytes) -> torch.Tensor:
    """Check ``raw`` (the uncompressed IDX bytes of file ``name``, read from ``source``) and
    return its uint8 array: images (N, 28, 28), labels (N,). Damage raises MnistCorruptError."""
    magic, sha256 = FILES[name]
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise MnistCorruptError(
            f"{source}: truncated: {len(raw)} bytes, shorter than the {header_size}-byte IDX header"
        )
    found_magic = struct.unpack(">I", raw[:4])[0]
    if found_magic != magic:
        raise MnistCorruptError(f"{source}: bad IDX magic number: expected {magic:#010x}, got {found_magic:#010x}")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected_size = header_size + math.prod(dims)
    if len(raw) != expected_size:
        raise MnistCorruptError(
            f"{source}: size does not match its header {dims}: "
            f"expected {expected_size} bytes, got {len(raw)} (truncated?)"
        )
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise MnistCorruptError(f"{source}: sha256 mismatch: expected {sha256}, got {digest}")
    return torch.frombuffer(bytearray(raw[header_size:]), dtype=torch.uint8).view(*dims)


def _download(folder: Path, name: str) -> Path:
    """Fetch ``name.gz`` into ``folder`` from the first mirror that serves a verified copy.

    The download goes to a temporary file that is renamed into place only after it verifies.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.gz"
    failures = []
    for mirror in MIRRORS:
        url = f"{mirror}{name}.gz"
        print(f"ff_kernels: downloading {url}", file=sys.stderr)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".gz")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                out.write(response.read())
            _decode(url, name, _read_bytes(Path(tmp)))
            os.replace(tmp, target)
            return target
        except (OSError, MnistCorruptError) as err:
            failures.append(f"{url}: {err}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise MnistMissingError(f"could not download {name}.gz into {folder}:\n  " + "\n  ".join(failures))


def _locate(name: str, data_dir: str | os.PathLike | None, download: bool) -> Path:
    """Path of ``name`` (or ``name.gz``) following the search order in the module docstring."""
    if data_dir is not None or os.environ.get(ENV_VAR):
        folder = Path(data_dir) if data_dir is not None else Path(os.environ[ENV_VAR]) / "mnist"
        found = _find(folder, name)
        if found is None:
            origin = "data_dir" if data_dir is not None else f"${ENV_VAR}/mnist"
            raise MnistMissingError(
                f"MNIST file {name} (or {name}.gz) not found in {folder} ({origin}); put the four IDX files there, "
                f"or pass no data_dir and unset ${ENV_VAR} to download them into {cache_dir()}"
            )
        return found
    found = _find(cache_dir(), name)
    if found is not None:
        return found
    if not download:
        raise MnistMissingError(f"MNIST file {name} (or {name}.gz) not found in {cache_dir()} and download=False")
    return _download(cache_dir(), name)


def load_mnist(
    split: str = "train", data_dir: str | os.PathLike | None = None, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One official MNIST split, verified.

    Returns ``(images, labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)``, with N = 60,000
    for "train" and 10,000 for "test". See the module docstring for where files are found.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {tuple(SPLIT_FILES)}, got {split!r}")
    arrays = []
    for name in SPLIT_FILES[split]:
        path = _locate(name, data_dir, download)
        arrays.append(_decode(str(path), name, _read_bytes(path)))
    images, labels = arrays
    if images.shape[0] != labels.shape[0]:
        raise MnistCorruptError(f"MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels.long()


class MnistSplits(NamedTuple):
    """Training and evaluation data for the nets: images float32 (N, 784) in [0, 1], labels int64 (N,).

    ``eval_name`` is "validation" (the last 10,000 training images) or "test" (the official test set).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    eval_name: str

    def head(self, n_train: int | None = None, n_eval: int | None = None) -> MnistSplits:
        """Keep the first ``n_train`` training and ``n_eval`` evaluation images (None: all)."""
        for name, n, labels in (("n_train", n_train, self.train_labels), ("n_eval", n_eval, self.eval_labels)):
            available = len(labels)
            if n is not None and not 0 < n <= available:
                option = "--train-subset" if name == "n_train" else "--eval-subset"
                raise ValueError(f"{name} must be in 1..{available}, got {n} ({option}: there are {available} "
                                 f"{'training' if name == 'n_train' else 'evaluation'} images)")
        return MnistSplits(
            self.train_images[:n_train], self.train_labels[:n_train], self.eval_images[:n_eval],
            self.eval_labels[:n_eval], self.eval_name,
        )


def flatten_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 784) scaled to [0, 1]."""
    return images.reshape(images.shape[0], -1).float().div_(255.0)


def mnist_splits(
    data_dir: str | os.PathLike | None = None, validation: bool = True, download: bool = True
) -> MnistSplits:
    """The paper's protocol: 50,000 train + 10,000 validation while tuning (``validation=True``),
    or the full 60,000 train + the official 10,000 test. Use ``.head(n_train, n_eval)`` for subsets.
    """
    train_images, train_labels = load_mnist("train", data_dir, download)
    if validation:
        cut = train_images.shape[0] - NUM_VALIDATION
        eval_images, eval_labels = train_images[cut:], train_labels[cut:]
        train_images, train_labels = train_images[:cut], train_labels[:cut]
    else:
        eval_images, eval_labels = load_mnist("test", data_dir, download)
    return MnistSplits(
        flatten_images(train_images), train_labels, flatten_images(eval_images), eval_labels,
        "validation" if validation else "test",
    )
