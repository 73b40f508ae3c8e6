"""CIFAR-10 (Krizhevsky 2009) from the official python batches or from a JPEG archive, verified.

Two layouts are understood. In a folder, the first one found wins:

1. The official python version, ``cifar-10-batches-py/`` (the folder itself or a sub-folder of
   that name): ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, each checked against its
   published md5 (:data:`BATCH_MD5`). It gives the 50,000 training images and the official test
   set, named "test".
2. ``cifar10-jpeg.tar.gz``: the 60,000 images as JPEG files ``train/<class>/NNNN.jpg`` and
   ``test/<class>/NNNN.jpg`` (class names :data:`CLASSES`), decoded with Pillow, and optionally
   ``cifar10-test-exact.npz`` beside it: the lossless official test set (``x`` uint8
   (N, 32, 32, 3), ``y`` int64 (N,)). Both files are checked against their sha256
   (:data:`SHA256`). It gives the JPEG training images, the JPEG test set ("test") and, when the
   npz is there, the exact test set ("test_exact"). The decoded arrays are cached as .npy files
   under :func:`cache_dir` (keyed by the archive's sha256), so only the first full load decodes;
   a load of a few images (``train_subset`` / ``eval_subset``) without a cache decodes just those.
   The sha256 of every cache file is recorded (:data:`CACHE_DIGESTS`) when the cache is written
   and checked whenever it is read: a cache that does not match (damaged, replaced, or written
   before the digests were kept) is decoded again, with a warning when it was damaged.

Where the folder is, first match wins: the ``data_dir`` argument; ``$FF_KERNELS_DATA/cifar10``;
the user cache ``$XDG_CACHE_HOME/ff_kernels/cifar10`` (``~/.cache/ff_kernels/cifar10``), into
which the official archive (:data:`URL`, md5 :data:`ARCHIVE_MD5`) is downloaded and unpacked when
``download`` is true. A folder named by the first two must already hold a layout; nothing is
written there.

Image order: the class-sorted sources (the JPEG archive and the npz) are put in one fixed
pseudo-random order (:data:`SHUFFLE_SEED`), so the first N images of any split are a mix of all
classes; the python batches keep their official order. Images come out as uint8 tensors
(N, 3, 32, 32) (channels first), labels int64 (N,). A missing file raises
:class:`Cifar10MissingError`, a damaged one :class:`Cifar10CorruptError`.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import pickle
import re
import sys
import tarfile
import tempfile
import urllib.request
import warnings
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from .errors import DataError
from .mnist import ENV_VAR

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (3, 32, 32)
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES_DIR = "cifar-10-batches-py"
# Published md5 of the python batches (the same list torchvision checks).
BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
TRAIN_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"
EXACT_TEST = "cifar10-test-exact.npz"
SHA256 = {
    JPEG_ARCHIVE: "6ffa8ff13dfec3fe1e0cb556901b314dc636498d6ef3d57a79e2a32625f81a0d",
    EXACT_TEST: "a6fce8670a1456a5172dcaf244b39ea2cdf86e239ad4f3c9b24c76bd009492de",
}
SHUFFLE_SEED = 0
_JPEG_NAME = re.compile(r"(train|test)/([a-z]+)/(\d+)\.jpg")
_CACHE_FILES = ("train_images", "train_labels", "test_images", "test_labels")
CACHE_DIGESTS = "sha256.json"  # {"train_images.npy": sha256 hex, ...}, written last


class Cifar10MissingError(DataError, FileNotFoundError):
    """No CIFAR-10 layout (or one of its files) where it was looked for, and none was downloaded."""


class Cifar10CorruptError(DataError, ValueError):
    """A CIFAR-10 file exists but is damaged: wrong checksum, unreadable, or not the expected format."""


class Cifar10(NamedTuple):
    """A loaded CIFAR-10: images uint8 (N, 3, 32, 32), labels int64 (N,).

    ``eval_sets`` maps a name ("test", and "test_exact" for the JPEG layout with the npz) to
    (images, labels). ``source`` says what was read, e.g. "JPEG archive /data/cifar10-jpeg.tar.gz".
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]]
    source: str

    def head(self, n_train: int | None = None, n_eval: int | None = None) -> Cifar10:
        """The first ``n_train`` training images and the first ``n_eval`` of every evaluation set (None: all)."""
        sizes = {"n_train": (n_train, len(self.train_labels))}
        sizes.update({f"n_eval ({name})": (n_eval, len(labels)) for name, (_, labels) in self.eval_sets.items()})
        for what, (n, available) in sizes.items():
            if n is not None and not 0 < n <= available:
                option = "--train-subset" if what == "n_train" else "--eval-subset"
                raise ValueError(f"{what} must be in 1..{available}, got {n} ({option}: there are {available} images)")
        return Cifar10(self.train_images[:n_train], self.train_labels[:n_train],
                       {k: (x[:n_eval], y[:n_eval]) for k, (x, y) in self.eval_sets.items()}, self.source)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ff_kernels/cifar10`` or ``~/.cache/ff_kernels/cifar10``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ff_kernels" / "cifar10"


def shuffle_order(n: int) -> np.ndarray:
    """The fixed order (int64 (n,)) in which class-sorted sources are returned."""
    return np.random.default_rng(SHUFFLE_SEED).permutation(n)


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, algorithm: str, expected: str) -> None:
    found = _digest(path, algorithm)
    if found != expected:
        raise Cifar10CorruptError(f"{path}: {algorithm} mismatch: expected {expected}, got {found}")


def _to_tensors(images_hwc: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 32, 32, 3) and int (N,) -> uint8 (N, 3, 32, 32) contiguous, int64 (N,)."""
    images = torch.from_numpy(np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2)))
    return images, torch.from_numpy(np.array(labels, dtype=np.int64))


def _check_arrays(source: str, images: np.ndarray, labels: np.ndarray) -> None:
    """images uint8 (N, 32, 32, 3) and labels (N,) in 0..9, else Cifar10CorruptError."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise Cifar10CorruptError(f"{source}: images must be uint8 (N, 32, 32, 3), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise Cifar10CorruptError(f"{source}: {images.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and not (labels.min() >= 0 and labels.max() < len(CLASSES)):
        raise Cifar10CorruptError(f"{source}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")


# ---------------------------------------------------------------- the official python batches


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch (a dict of bytes, lists and numpy arrays) and nothing else."""

    _NUMPY: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self._NUMPY:
            raise pickle.UnpicklingError(f"a CIFAR-10 batch does not refer to {module}.{name}")
        if name == "_reconstruct":
            for candidate in ("numpy._core.multiarray", "numpy.core.multiarray"):
                try:
                    return importlib.import_module(candidate)._reconstruct
                except ImportError:
                    continue
        return getattr(np, name)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One md5-verified batch file -> images uint8 (N, 32, 32, 3), labels int64 (N,)."""
    if not path.is_file():
        raise Cifar10MissingError(f"CIFAR-10 batch {path.name} not found in {path.parent}")
    _verify(path, "md5", BATCH_MD5[path.name])
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="bytes").load()
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise Cifar10CorruptError(f"{path}: not a CIFAR-10 batch ({type(err).__name__}: {err})") from err
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise Cifar10CorruptError(f"{path}: data must be (N, 3072), got {data.shape}")
    images = data.reshape(-1, *IMAGE_SHAPE).transpose(0, 2, 3, 1)
    _check_arrays(str(path), images, labels)
    return images, labels


def _batches_folder(folder: Path) -> Path | None:
    """``folder`` or ``folder/cifar-10-batches-py`` if it holds ``data_batch_1``, else None."""
    for candidate in (folder, folder / BATCHES_DIR):
        if (candidate / TRAIN_BATCHES[0]).is_file():
            return candidate
    return None


def _load_batches(folder: Path) -> Cifar10:
    parts = [_read_batch(folder / name) for name in TRAIN_BATCHES]
    train = _to_tensors(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = _to_tensors(*_read_batch(folder / "test_batch"))
    return Cifar10(*train, {"test": test}, f"python batches {folder}")


# ---------------------------------------------------------------- the JPEG archive and the exact test set


def _read_archive(archive: Path) -> dict[str, list[tuple[int, str, bytes]]]:
    """Per split ("train", "test"): (class index, member name, JPEG bytes) of every image, sorted by class and name.

    One pass over the archive; every member must be a directory or ``split/class/NNNN.jpg``.
    """
    splits: dict[str, list] = {"train": [], "test": []}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = _JPEG_NAME.fullmatch(member.name)
                if match is None or match.group(2) not in CLASSES:
                    raise Cifar10CorruptError(f"{archive}: unexpected member {member.name!r} (expected split/class/NNNN.jpg "
                                              f"with a class in {CLASSES})")
                label = CLASSES.index(match.group(2))
                splits[match.group(1)].append((label, member.name, tar.extractfile(member).read()))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise Cifar10CorruptError(f"{archive}: unreadable archive ({type(err).__name__}: {err})") from err
    for split, members in splits.items():
        missing = [c for i, c in enumerate(CLASSES) if i not in {label for label, _, _ in members}]
        if missing:
            raise Cifar10CorruptError(f"{archive}: no {split} images of the classes {missing}")
        members.sort(key=lambda m: (m[0], m[1]))
    return splits


def _decode_jpeg(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise Cifar10CorruptError(f"{name}: not a decodable JPEG ({err})") from err
    if image.shape != (32, 32, 3):
        raise Cifar10CorruptError(f"{name}: expected a 32x32 RGB image, got shape {image.shape}")
    return image


def _decode_archive(archive: Path, limits: dict[str, int | None]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode each split in the shuffled order, only its first ``limits[split]`` images (None: all).

    Returns per split images uint8 (n, 32, 32, 3) and labels int64 (n,).
    """
    out = {}
    for split, members in _read_archive(archive).items():
        chosen = [members[i] for i in shuffle_order(len(members))[: limits[split]]]
        images = np.stack([_decode_jpeg(data, f"{archive}:{name}") for _, name, data in chosen])
        out[split] = (images, np.array([label for label, _, _ in chosen], dtype=np.int64))
    return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save into a temporary file beside ``path``, then rename: a crash leaves no half file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _write_cache(folder: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """The decoded splits as .npy files in ``folder``, then their sha256 (:data:`CACHE_DIGESTS`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CACHE_DIGESTS).unlink(missing_ok=True)  # no digests while the files change
    for split, (images, labels) in splits.items():
        _save_npy(folder / f"{split}_images.npy", images)
        _save_npy(folder / f"{split}_labels.npy", labels)
    digests = {f"{name}.npy": _file_sha256(folder / f"{name}.npy") for name in _CACHE_FILES}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{CACHE_DIGESTS}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(digests, f, indent=2)
        os.replace(tmp, folder / CACHE_DIGESTS)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cache_verified(folder: Path) -> bool:
    """Whether every cache file in ``folder`` has the sha256 recorded when it was written; a
    cache that exists but does not match gets a warning (it is decoded again)."""
    try:
        recorded = json.loads((folder / CACHE_DIGESTS).read_text())
    except (OSError, ValueError):
        return False  # no cache, or one written before the digests were kept
    try:
        bad = [name for name in (f"{n}.npy" for n in _CACHE_FILES)
               if not isinstance(recorded, dict) or recorded.get(name) != _file_sha256(folder / name)]
    except OSError:
        bad = ["a missing file"]
    if bad:
        warnings.warn(f"ff_kernels: the CIFAR-10 cache {folder} does not match its recorded sha256 ({', '.join(bad)}): "
                      "decoding the archive again", RuntimeWarning, stacklevel=3)
        return False
    return True


def _read_cache(folder: Path, limits: dict[str, int | None]) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The cached decoded archive, each split cut to its first ``limits[split]`` images (memory-mapped,
    so only those are read), or None if absent, damaged or not matching its digests (then it is
    decoded again)."""
    if not _cache_verified(folder):
        return None
    try:
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in _CACHE_FILES}
        out = {s: (arrays[f"{s}_images"][: limits[s]], arrays[f"{s}_labels"][: limits[s]]) for s in ("train", "test")}
        for split, (images, labels) in out.items():
            _check_arrays(f"{folder} ({split})", images, labels)
    except (OSError, ValueError, Cifar10CorruptError):
        return None
    return out


def _load_jpeg(folder: Path, train_subset: int | None, eval_subset: int | None) -> Cifar10:
    archive = folder / JPEG_ARCHIVE
    _verify(archive, "sha256", SHA256[JPEG_ARCHIVE])
    cached = cache_dir() / f"jpeg-{SHA256[JPEG_ARCHIVE][:16]}"
    limits = {"train": train_subset, "test": eval_subset}
    splits = _read_cache(cached, limits)
    if splits is None:
        splits = _decode_archive(archive, limits)
        if train_subset is None and eval_subset is None:
            _write_cache(cached, splits)
    eval_sets = {"test": _to_tensors(*splits["test"])}
    exact = folder / EXACT_TEST
    if exact.is_file():
        _verify(exact, "sha256", SHA256[EXACT_TEST])
        try:
            with np.load(exact, allow_pickle=False) as z:
                images, labels = z["x"], z["y"]
        except (OSError, ValueError, KeyError) as err:
            raise Cifar10CorruptError(f"{exact}: not the exact test set npz ({type(err).__name__}: {err})") from err
        _check_arrays(str(exact), images, labels)
        order = shuffle_order(len(labels))[:eval_subset]
        eval_sets["test_exact"] = _to_tensors(images[order], labels[order])
    return Cifar10(*_to_tensors(*splits["train"]), eval_sets, f"JPEG archive {archive}")


# ---------------------------------------------------------------- download and search order


def _download(folder: Path) -> Path:
    """Fetch the official archive into ``folder``, check its md5 and unpack the batches; returns their folder."""
    folder.mkdir(parents=True, exist_ok=True)
    print(f"ff_kernels: downloading {URL}", file=sys.stderr)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".cifar-10-python.", suffix=".tar.gz")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(URL, timeout=60) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        _verify(Path(tmp), "md5", ARCHIVE_MD5)
        target = folder / BATCHES_DIR
        target.mkdir(exist_ok=True)
        with tarfile.open(tmp, "r:gz") as tar:
            for name in BATCH_MD5:
                data = tar.extractfile(f"{BATCHES_DIR}/{name}").read()
                (target / name).write_bytes(data)
    except (OSError, tarfile.TarError, KeyError, AttributeError) as err:
        raise Cifar10MissingError(f"could not download and unpack {URL} into {folder}: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _describe_missing(folder: Path) -> str:
    return (f"no CIFAR-10 in {folder}: expected {BATCHES_DIR}/ (data_batch_1..5, test_batch) or {JPEG_ARCHIVE} "
            f"(optionally with {EXACT_TEST})")


def load_cifar10(
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    train_subset: int | None = None,
    eval_subset: int | None = None,
) -> Cifar10:
    """CIFAR-10 found as described in the module docstring, verified, cut to the subsets.

    ``train_subset`` / ``eval_subset``: keep the first N training images / images of every
    evaluation set (None: all).
    """
    if data_dir is not None or os.environ.get(ENV_VAR):
        folder = Path(data_dir) if data_dir is not None else Path(os.environ[ENV_VAR]) / "cifar10"
        origin = "data_dir" if data_dir is not None else f"${ENV_VAR}/cifar10"
        batches = _batches_folder(folder)
        if batches is not None:
            data = _load_batches(batches)
        elif (folder / JPEG_ARCHIVE).is_file():
            data = _load_jpeg(folder, train_subset, eval_subset)
        else:
            raise Cifar10MissingError(f"{_describe_missing(folder)} ({origin}); or pass no data_dir and unset "
                                      f"${ENV_VAR} to download the python batches into {cache_dir()}")
    else:
        batches = _batches_folder(cache_dir())
        if batches is None:
            if not download:
                raise Cifar10MissingError(f"{_describe_missing(cache_dir())} and download=False")
            batches = _download(cache_dir())
        data = _load_batches(batches)
    return data.head(train_subset, eval_subset)
