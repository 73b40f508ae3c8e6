"""MNIST-style IDX data sets (MNIST, Fashion-MNIST, KMNIST), recognized by their published sha256.

Each set is four IDX files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each stored as ``name`` or
``name.gz``. Every file is checked on load: IDX magic number, size against its header, and its
sha256 against the digests published with :data:`IDX_SETS` (of the uncompressed file, or of the
published ``.gz``). Which set a folder holds is found from the digests, so a folder of any of
the three trains with no extra setting; ``dataset`` names the set to insist on one, or is
:data:`UNVERIFIED` to read IDX files that match no published digest (your own data), which a
run then records.

Where the files are looked for, first match wins:

1. ``data_dir`` (argument): the folder that holds the four files itself.
2. ``$FF_KERNELS_DATA``: a data root; the set is read from its ``<key>/`` sub-folder
   (``mnist/`` unless ``dataset`` names another).
3. The user cache, ``$XDG_CACHE_HOME/ff_kernels/<key>`` (``~/.cache/ff_kernels/<key>``); missing
   files are downloaded there from the set's mirrors when ``download`` is true.

A folder named by 1 or 2 must already hold the files: nothing is ever written there. A missing
file raises :class:`MnistMissingError`, a damaged one :class:`MnistCorruptError`, files that
match no published digest :class:`UnknownDataError`.
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
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import DataError

ENV_VAR = "FF_KERNELS_DATA"
MAGIC = {"images": 0x00000803, "labels": 0x00000801}
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
NUM_VALIDATION = 10_000  # the paper's tuning protocol: the last 10,000 training images
UNVERIFIED = "unverified"


@dataclass(frozen=True)
class IdxSet:
    """A published IDX data set: its name, download mirrors and per-file sha256 digests.

    raw: file name -> sha256 of the uncompressed file (None where none is published).
    gz: file name -> sha256 of the published ``.gz`` file (empty where none is known).
    """

    name: str
    mirrors: tuple[str, ...]
    raw: dict[str, str | None]
    gz: dict[str, str]


# The digests as published: MNIST's uncompressed files (LeCun et al.); Fashion-MNIST's and KMNIST's
# .gz files (TensorFlow Datasets' url_checksums, agreeing with the md5s their authors publish) and
# the uncompressed files where a digest of them is published (KMNIST's train images: none is).
IDX_SETS = {
    "mnist": IdxSet("MNIST", (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ), raw={
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    }, gz={}),
    "fashion-mnist": IdxSet("Fashion-MNIST", ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",), raw={
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }, gz={
        "train-images-idx3-ubyte": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    }),
    "kmnist": IdxSet("KMNIST", ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",), raw={
        "train-images-idx3-ubyte": None,
        "train-labels-idx1-ubyte": "2a16eeae62da984b8bd24fa32e31d47291f01dac3fe84d5594f304f71e7d374b",
        "t10k-images-idx3-ubyte": "76fbd229ce87db80dd281af5e6670de4ad0e42fb30a7bd643972994c47c1f42e",
        "t10k-labels-idx1-ubyte": "a11dc742be8e781a40a92f53d6a4957e7b7d36df2faa097659131ebfd8fd60c6",
    }, gz={
        "train-images-idx3-ubyte": "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
        "train-labels-idx1-ubyte": "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
        "t10k-images-idx3-ubyte": "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
        "t10k-labels-idx1-ubyte": "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",
    }),
}
DATASETS = (*IDX_SETS, UNVERIFIED)


class MnistMissingError(DataError, FileNotFoundError):
    """An IDX file is not where it was looked for (and was not downloaded)."""


class MnistCorruptError(DataError, ValueError):
    """An IDX file exists but is damaged: bad gzip, bad magic, wrong size, or not the named set's file."""


class UnknownDataError(DataError, ValueError):
    """IDX files that match no published digest, read without ``dataset="unverified"``."""


def cache_dir(key: str = "mnist") -> Path:
    """The download folder of set ``key``: ``$XDG_CACHE_HOME/ff_kernels/<key>`` or ``~/.cache/ff_kernels/<key>``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ff_kernels" / key


def _find(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, whichever exists (uncompressed first), else None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


class IdxFile(NamedTuple):
    """One IDX file as read: its uncompressed bytes and the sha256 of the raw and (for a .gz) the stored bytes."""

    raw: bytes
    raw_sha256: str
    stored_sha256: str | None


def _read(path: Path) -> IdxFile:
    """The file's uncompressed bytes (gunzipped when the name ends in .gz) and their digests."""
    stored = path.read_bytes()
    if path.suffix != ".gz":
        return IdxFile(stored, hashlib.sha256(stored).hexdigest(), None)
    try:
        raw = gzip.decompress(stored)
    except (OSError, EOFError, zlib.error) as err:
        raise MnistCorruptError(f"{path}: not a valid gzip file ({err}); delete it and fetch it again") from err
    return IdxFile(raw, hashlib.sha256(raw).hexdigest(), hashlib.sha256(stored).hexdigest())


def matching_sets(name: str, file: IdxFile) -> set[str]:
    """The keys of the :data:`IDX_SETS` whose file ``name`` has the digest of ``file``."""
    return {key for key, s in IDX_SETS.items()
            if file.raw_sha256 == s.raw.get(name) or (file.stored_sha256 and file.stored_sha256 == s.gz.get(name))}


def _decode(source: str, name: str, raw: bytes) -> torch.Tensor:
    """Check ``raw`` (the uncompressed IDX bytes of file ``name``, read from ``source``) for its
    magic number and size and return its uint8 array: images (N, H, W), labels (N,)."""
    magic = MAGIC["images" if "images" in name else "labels"]
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
    return torch.frombuffer(bytearray(raw[header_size:]), dtype=torch.uint8).view(*dims)


def _verify(files: dict[str, tuple[Path, IdxFile]], dataset: str | None) -> str:
    """The key of the set that all ``files`` (name -> (path, file)) belong to, checked against
    ``dataset`` (None: any published set; UNVERIFIED: no check, returns UNVERIFIED)."""
    if dataset == UNVERIFIED:
        return UNVERIFIED
    matches = {name: matching_sets(name, file) for name, (_, file) in files.items()}
    candidates = set(IDX_SETS) if dataset is None else {dataset}
    for keys in matches.values():
        candidates &= keys
    if len(candidates) == 1:
        return candidates.pop()
    if dataset is None and candidates:  # identical files published by two sets: prefer MNIST's order
        return next(key for key in IDX_SETS if key in candidates)
    told = {name: keys for name, keys in matches.items() if keys}
    if dataset is not None or told:  # the set is known (named, or told by another file): this file is damaged
        expected = dataset or next(iter(next(iter(told.values()))))
        bad = next(name for name, keys in matches.items() if expected not in keys)
        path, file = files[bad]
        want = IDX_SETS[expected].raw.get(bad) or IDX_SETS[expected].gz.get(bad)
        hint = ("; its uncompressed file has no published digest, keep the published .gz"
                if IDX_SETS[expected].raw.get(bad) is None and file.stored_sha256 is None else "")
        raise MnistCorruptError(
            f"{path}: sha256 mismatch: expected {IDX_SETS[expected].name}'s {bad} ({want}), got "
            f"{file.stored_sha256 or file.raw_sha256}{hint}; pass dataset='{UNVERIFIED}' (--dataset {UNVERIFIED}) "
            f"to read it anyway"
        )
    path, file = next(iter(files.values()))
    raise UnknownDataError(
        f"{path.parent}: the IDX files match no published digest of {', '.join(s.name for s in IDX_SETS.values())} "
        f"({path.name}: sha256 {file.raw_sha256}); to train on your own IDX files pass --dataset {UNVERIFIED} "
        f"(dataset='{UNVERIFIED}'), which the run's config records"
    )


def _download(key: str, folder: Path, name: str) -> Path:
    """Fetch ``name.gz`` of set ``key`` into ``folder`` from the first mirror that serves a verified copy.

    The download goes to a temporary file that is renamed into place only after it verifies.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.gz"
    failures = []
    for mirror in IDX_SETS[key].mirrors:
        url = f"{mirror}{name}.gz"
        print(f"ff_kernels: downloading {url}", file=sys.stderr)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".gz")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                out.write(response.read())
            file = _read(Path(tmp))
            _decode(url, name, file.raw)
            _verify({name: (Path(url), file)}, key)
            os.replace(tmp, target)
            return target
        except (OSError, DataError) as err:
            failures.append(f"{url}: {err}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise MnistMissingError(f"could not download {name}.gz into {folder}:\n  " + "\n  ".join(failures))


def _locate(name: str, data_dir: str | os.PathLike | None, download: bool, dataset: str | None) -> Path:
    """Path of ``name`` (or ``name.gz``) following the search order in the module docstring."""
    key = dataset if dataset in IDX_SETS else "mnist"
    if data_dir is not None or os.environ.get(ENV_VAR):
        folder = Path(data_dir) if data_dir is not None else Path(os.environ[ENV_VAR]) / key
        found = _find(folder, name)
        if found is None:
            origin = "data_dir" if data_dir is not None else f"${ENV_VAR}/{key}"
            raise MnistMissingError(
                f"IDX file {name} (or {name}.gz) not found in {folder} ({origin}); put the four IDX files there, "
                f"or pass no data_dir and unset ${ENV_VAR} to download {IDX_SETS[key].name} into {cache_dir(key)}"
            )
        return found
    if dataset == UNVERIFIED:
        raise MnistMissingError(f"dataset='{UNVERIFIED}' reads your own IDX files: name their folder (data_dir)")
    found = _find(cache_dir(key), name)
    if found is not None:
        return found
    if not download:
        raise MnistMissingError(f"IDX file {name} (or {name}.gz) not found in {cache_dir(key)} and download=False")
    return _download(key, cache_dir(key), name)


class IdxSplit(NamedTuple):
    """One split as loaded: images uint8 (N, H, W), labels int64 (N,), and the set's key."""

    images: torch.Tensor
    labels: torch.Tensor
    dataset: str


def load_idx(split: str = "train", data_dir: str | os.PathLike | None = None, download: bool = True,
             dataset: str | None = None) -> IdxSplit:
    """One split of an IDX set, verified (see the module docstring): images uint8 ``(N, 28, 28)``,
    labels int64 ``(N,)`` with N = 60,000 for "train" and 10,000 for "test", and which set it is.

    ``dataset``: a key of :data:`IDX_SETS` to insist on that set, None to accept any of them, or
    :data:`UNVERIFIED` to skip the digest check.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {tuple(SPLIT_FILES)}, got {split!r}")
    if dataset is not None and dataset not in (*IDX_SETS, UNVERIFIED):
        raise ValueError(f"dataset must be one of {(*IDX_SETS, UNVERIFIED)} or None, got {dataset!r}")
    files = {}
    for name in SPLIT_FILES[split]:
        path = _locate(name, data_dir, download, dataset)
        files[name] = (path, _read(path))
    arrays = [_decode(str(path), name, file.raw) for name, (path, file) in files.items()]
    key = _verify(files, dataset)
    images, labels = arrays
    if images.shape[0] != labels.shape[0]:
        raise MnistCorruptError(f"IDX {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return IdxSplit(images, labels.long(), key)


def load_mnist(
    split: str = "train", data_dir: str | os.PathLike | None = None, download: bool = True, dataset: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of :func:`load_idx` (MNIST when nothing else is named or found)."""
    images, labels, _ = load_idx(split, data_dir, download, dataset)
    return images, labels


class MnistSplits(NamedTuple):
    """Training and evaluation data for the nets: images float32 (N, 784) in [0, 1], labels int64 (N,).

    ``eval_name`` is "validation" (the last 10,000 training images) or "test" (the official test set);
    ``dataset`` the key of the IDX set (:data:`IDX_SETS`) or :data:`UNVERIFIED`.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    eval_name: str
    dataset: str = "mnist"

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
            self.eval_labels[:n_eval], self.eval_name, self.dataset,
        )


def flatten_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 784) scaled to [0, 1]."""
    return images.reshape(images.shape[0], -1).float().div_(255.0)


def mnist_splits(
    data_dir: str | os.PathLike | None = None, validation: bool = True, download: bool = True,
    dataset: str | None = None,
) -> MnistSplits:
    """The paper's protocol: 50,000 train + 10,000 validation while tuning (``validation=True``),
    or the full 60,000 train + the official 10,000 test, of the IDX set in ``data_dir`` (see
    :func:`load_idx` for ``dataset``; the test files must be the same set's). Use
    ``.head(n_train, n_eval)`` for subsets.
    """
    train_images, train_labels, key = load_idx("train", data_dir, download, dataset)
    if validation:
        cut = train_images.shape[0] - NUM_VALIDATION
        eval_images, eval_labels = train_images[cut:], train_labels[cut:]
        train_images, train_labels = train_images[:cut], train_labels[:cut]
    else:
        eval_images, eval_labels, _ = load_idx("test", data_dir, download, key)
    return MnistSplits(
        flatten_images(train_images), train_labels, flatten_images(eval_images), eval_labels,
        "validation" if validation else "test", key,
    )
