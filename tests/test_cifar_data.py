"""CIFAR-10 loading: the JPEG archive + exact test set, the python batches, caching, checksums, errors.

Synthetic files stand in for the real ones (their checksums patched in); every image's pixels
encode its identity, so order and labels are checked against the documented shuffle. The real
files, when present, get fast checks only: checksums, counts, class order, and that JPEG test
images match exact ones of the same class.
"""

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ff_kernels.paper.data import DataError
from ff_kernels.paper.data import cifar10 as C
from ff_kernels.paper.data.cifar10 import Cifar10CorruptError, Cifar10MissingError, load_cifar10

from _paths import require_data

PER_CLASS = {"train": 3, "test": 2}


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No user data root; the cache in a temporary folder."""
    monkeypatch.delenv("FF_KERNELS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def identity_image(split: str, label: int, index: int) -> np.ndarray:
    """A flat-colour 32x32 RGB image whose colour encodes (split, label, index); survives JPEG."""
    return np.broadcast_to(np.array([20 * label + 10, 40 * index + 10, 200 if split == "train" else 60], np.uint8),
                           (32, 32, 3)).copy()


def identify(image_chw: torch.Tensor) -> tuple[int, int, int]:
    """(label, index, train 1 / test 0) back from an identity image (uint8 (3, 32, 32))."""
    r, g, b = (int(v) for v in image_chw.float().mean((1, 2)).round())
    return round((r - 10) / 20), round((g - 10) / 40), int(b > 130)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_archive(folder, extra_member=None):
    """A small cifar10-jpeg.tar.gz in the real layout (class-sorted), plus an exact-test npz."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / C.JPEG_ARCHIVE, "w:gz") as tar:
        for split, count in PER_CLASS.items():
            for label, name in enumerate(C.CLASSES):
                for index in range(count):
                    buffer = io.BytesIO()
                    Image.fromarray(identity_image(split, label, index)).save(buffer, "JPEG", quality=95)
                    info = tarfile.TarInfo(f"{split}/{name}/{index:04d}.jpg")
                    info.size = len(buffer.getvalue())
                    tar.addfile(info, io.BytesIO(buffer.getvalue()))
        if extra_member is not None:
            info = tarfile.TarInfo(extra_member)
            tar.addfile(info, io.BytesIO(b""))
    labels = np.repeat(np.arange(10), 2)
    x = np.stack([identity_image("test", int(y), i % 2) for i, y in enumerate(labels)])
    x[:, 0, 0, 0] = np.arange(len(labels))  # one exact pixel tells the images apart
    np.savez(folder / C.EXACT_TEST, x=x, y=labels.astype(np.int64))
    return folder


@pytest.fixture
def jpeg_dir(tmp_path, monkeypatch):
    folder = write_archive(tmp_path / "jpeg")
    monkeypatch.setitem(C.SHA256, C.JPEG_ARCHIVE, sha256(folder / C.JPEG_ARCHIVE))
    monkeypatch.setitem(C.SHA256, C.EXACT_TEST, sha256(folder / C.EXACT_TEST))
    return folder


def documented_order(split: str) -> list[tuple[int, int]]:
    """(label, index) of each image: class-sorted, then permuted by default_rng(SHUFFLE_SEED)."""
    ordered = [(label, index) for label in range(10) for index in range(PER_CLASS[split])]
    return [ordered[i] for i in np.random.default_rng(C.SHUFFLE_SEED).permutation(len(ordered))]


# ---------------------------------------------------------------- JPEG layout


def test_jpeg_archive_loads_in_the_documented_order(jpeg_dir):
    data = load_cifar10(jpeg_dir)
    assert data.train_images.shape == (30, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.train_labels.dtype == torch.int64 and set(data.eval_sets) == {"test", "test_exact"}
    assert "JPEG" in data.source
    for split, images, labels in (("train", data.train_images, data.train_labels), ("test", *data.eval_sets["test"])):
        ids = [identify(image) for image in images]
        assert [(label, index) for label, index, _ in ids] == documented_order(split)
        assert all(is_train == (split == "train") for _, _, is_train in ids)
        assert labels.tolist() == [label for label, _ in documented_order(split)]
    exact_x, exact_y = data.eval_sets["test_exact"]
    with np.load(jpeg_dir / C.EXACT_TEST) as z:
        order = np.random.default_rng(C.SHUFFLE_SEED).permutation(20)
        assert torch.equal(exact_x, torch.from_numpy(z["x"][order]).permute(0, 3, 1, 2))
        assert exact_y.tolist() == z["y"][order].tolist()


def test_decoded_arrays_are_cached_and_reused(jpeg_dir, monkeypatch, tmp_path):
    first = load_cifar10(jpeg_dir)
    cached = tmp_path / "cache" / "ff_kernels" / "cifar10" / f"jpeg-{C.SHA256[C.JPEG_ARCHIVE][:16]}"
    assert sorted(p.name for p in cached.iterdir()) == sorted([f"{n}.npy" for n in C._CACHE_FILES] + [C.CACHE_DIGESTS])
    monkeypatch.setattr(C, "_decode_archive", lambda *a: pytest.fail("decoded although cached"))
    second = load_cifar10(jpeg_dir)
    assert torch.equal(first.train_images, second.train_images) and torch.equal(first.train_labels, second.train_labels)


def test_damaged_cache_is_decoded_again(jpeg_dir, tmp_path):
    first = load_cifar10(jpeg_dir)
    cached = tmp_path / "cache" / "ff_kernels" / "cifar10" / f"jpeg-{C.SHA256[C.JPEG_ARCHIVE][:16]}"
    (cached / "train_images.npy").write_bytes(b"not an array")
    with pytest.warns(RuntimeWarning, match="does not match its recorded sha256"):
        again = load_cifar10(jpeg_dir)
    assert torch.equal(first.train_images, again.train_images)


def test_a_replaced_cache_is_caught_by_its_digest_and_decoded_again(jpeg_dir, tmp_path):
    """A cache whose arrays are valid but not the archive's (all-zero images) is not used."""
    first = load_cifar10(jpeg_dir)
    cached = tmp_path / "cache" / "ff_kernels" / "cifar10" / f"jpeg-{C.SHA256[C.JPEG_ARCHIVE][:16]}"
    zeros = np.zeros_like(np.load(cached / "train_images.npy"))
    np.save(cached / "train_images.npy", zeros, allow_pickle=False)
    with pytest.warns(RuntimeWarning, match="train_images.npy"):
        again = load_cifar10(jpeg_dir)
    assert torch.equal(first.train_images, again.train_images) and again.train_images.any()
    assert not (np.load(cached / "train_images.npy") == 0).all()  # rewritten, with fresh digests
    (cached / C.CACHE_DIGESTS).unlink()  # a cache written before the digests: decoded again, quietly
    assert torch.equal(load_cifar10(jpeg_dir).train_images, first.train_images)
    assert (cached / C.CACHE_DIGESTS).is_file()


def test_subsets_without_cache_decode_only_those_and_write_no_cache(jpeg_dir, tmp_path):
    small = load_cifar10(jpeg_dir, train_subset=7, eval_subset=4)
    assert not (tmp_path / "cache").exists()
    full = load_cifar10(jpeg_dir)
    assert torch.equal(small.train_images, full.train_images[:7]) and torch.equal(small.train_labels, full.train_labels[:7])
    for name in ("test", "test_exact"):
        assert torch.equal(small.eval_sets[name][0], full.eval_sets[name][0][:4])
    with pytest.raises(ValueError, match="n_train must be in 1..30, got 31"):
        load_cifar10(jpeg_dir, train_subset=31)


def test_archive_without_exact_test_set_has_only_the_jpeg_test(jpeg_dir):
    (jpeg_dir / C.EXACT_TEST).unlink()
    assert set(load_cifar10(jpeg_dir).eval_sets) == {"test"}


def test_checksum_mismatch_and_damage_are_corrupt_errors(jpeg_dir, monkeypatch):
    monkeypatch.setitem(C.SHA256, C.JPEG_ARCHIVE, "0" * 64)
    with pytest.raises(Cifar10CorruptError, match=f"{C.JPEG_ARCHIVE}: sha256 mismatch"):
        load_cifar10(jpeg_dir)
    archive = jpeg_dir / C.JPEG_ARCHIVE
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])  # truncated
    monkeypatch.setitem(C.SHA256, C.JPEG_ARCHIVE, sha256(archive))
    with pytest.raises(Cifar10CorruptError, match="unreadable archive"):
        load_cifar10(jpeg_dir)


def test_unexpected_member_is_a_corrupt_error(tmp_path, monkeypatch):
    folder = write_archive(tmp_path / "odd", extra_member="train/unicorn/0000.jpg")
    monkeypatch.setitem(C.SHA256, C.JPEG_ARCHIVE, sha256(folder / C.JPEG_ARCHIVE))
    with pytest.raises(Cifar10CorruptError, match="unexpected member 'train/unicorn/0000.jpg'"):
        load_cifar10(folder)


def test_missing_layout_names_the_folder_and_what_was_expected(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Cifar10MissingError, match=f"no CIFAR-10 in {tmp_path / 'empty'}.*{C.JPEG_ARCHIVE}") as info:
        load_cifar10(tmp_path / "empty")
    assert isinstance(info.value, DataError) and isinstance(info.value, FileNotFoundError)
    with pytest.raises(Cifar10MissingError, match="download=False"):
        load_cifar10(download=False)


def test_env_var_names_a_root_with_a_cifar10_folder(tmp_path, monkeypatch):
    folder = write_archive(tmp_path / "root" / "cifar10")
    monkeypatch.setitem(C.SHA256, C.JPEG_ARCHIVE, sha256(folder / C.JPEG_ARCHIVE))
    monkeypatch.setitem(C.SHA256, C.EXACT_TEST, sha256(folder / C.EXACT_TEST))
    monkeypatch.setenv("FF_KERNELS_DATA", str(tmp_path / "root"))
    assert load_cifar10().train_labels.shape == (30,)


# ---------------------------------------------------------------- python batches


def pickle_batch(images_hwc: np.ndarray, labels: list[int]) -> bytes:
    """A batch as the official files store it: data (N, 3072) rows R then G then B plane; numpy.core names."""
    data = images_hwc.transpose(0, 3, 1, 2).reshape(len(labels), -1)
    raw = pickle.dumps({b"batch_label": b"x", b"labels": labels, b"data": data}, protocol=3)
    return raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


@pytest.fixture
def batches_dir(tmp_path, monkeypatch):
    folder = tmp_path / "user" / C.BATCHES_DIR
    folder.mkdir(parents=True)
    g = np.random.default_rng(1)
    for i, name in enumerate([*C.TRAIN_BATCHES, "test_batch"]):
        images = g.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
        (folder / name).write_bytes(pickle_batch(images, [(i + j) % 10 for j in range(4)]))
        np.save(tmp_path / f"{name}.npy", images)
        monkeypatch.setitem(C.BATCH_MD5, name, hashlib.md5((folder / name).read_bytes()).hexdigest())
    return folder


def test_python_batches_load_in_file_order_channels_first(batches_dir, tmp_path):
    for folder in (batches_dir, batches_dir.parent):  # the batches folder itself or its parent
        data = load_cifar10(folder)
        expected = np.concatenate([np.load(tmp_path / f"{n}.npy") for n in C.TRAIN_BATCHES])
        assert torch.equal(data.train_images, torch.from_numpy(expected).permute(0, 3, 1, 2))
        assert data.train_labels.tolist() == [(i + j) % 10 for i in range(5) for j in range(4)]
        assert set(data.eval_sets) == {"test"} and data.eval_sets["test"][1].tolist() == [5, 6, 7, 8]
        assert "python batches" in data.source


def test_python_batches_win_over_a_jpeg_archive_beside_them(batches_dir, tmp_path):
    write_archive(batches_dir.parent)
    assert "python batches" in load_cifar10(batches_dir.parent).source


def test_python_batch_checks(batches_dir, monkeypatch):
    monkeypatch.setitem(C.BATCH_MD5, "data_batch_3", "0" * 32)
    with pytest.raises(Cifar10CorruptError, match="data_batch_3: md5 mismatch"):
        load_cifar10(batches_dir)
    evil = pickle.dumps(__import__("os").getcwd)  # refers to a function: must not be resolved
    (batches_dir / "data_batch_3").write_bytes(evil)
    monkeypatch.setitem(C.BATCH_MD5, "data_batch_3", hashlib.md5(evil).hexdigest())
    with pytest.raises(Cifar10CorruptError, match="not a CIFAR-10 batch"):
        load_cifar10(batches_dir)
    (batches_dir / "test_batch").unlink()
    (batches_dir / "data_batch_3").write_bytes(pickle_batch(np.zeros((1, 32, 32, 3), np.uint8), [0]))
    monkeypatch.setitem(C.BATCH_MD5, "data_batch_3", hashlib.md5((batches_dir / "data_batch_3").read_bytes()).hexdigest())
    with pytest.raises(Cifar10MissingError, match=f"test_batch not found in {batches_dir}"):
        load_cifar10(batches_dir)


# ---------------------------------------------------------------- the real files (fast checks)


@pytest.fixture(scope="module")
def real_archive():
    folder = require_data("cifar10")
    return folder, C._read_archive(folder / C.JPEG_ARCHIVE)


def test_real_files_checksums_counts_and_class_order(real_archive):
    folder, splits = real_archive
    C._verify(folder / C.JPEG_ARCHIVE, "sha256", C.SHA256[C.JPEG_ARCHIVE])
    C._verify(folder / C.EXACT_TEST, "sha256", C.SHA256[C.EXACT_TEST])
    for split, count in (("train", 5000), ("test", 1000)):
        labels = [label for label, _, _ in splits[split]]
        assert np.bincount(labels, minlength=10).tolist() == [count] * 10
        assert {name.split("/")[1] for _, name, _ in splits[split]} == set(C.CLASSES)
        assert all(name.split("/")[1] == C.CLASSES[label] for label, name, _ in splits[split])
    with np.load(folder / C.EXACT_TEST) as z:
        assert z["x"].shape == (10000, 32, 32, 3) and np.bincount(z["y"]).tolist() == [1000] * 10


def test_real_jpeg_test_images_match_exact_images_of_the_same_class(real_archive):
    folder, splits = real_archive
    with np.load(folder / C.EXACT_TEST) as z:
        x, y = z["x"].astype(np.float64), z["y"]
    for label in (0, 3, 9):
        members = [m for m in splits["test"] if m[0] == label][:3]
        for _, name, data in members:
            image = C._decode_jpeg(data, name).astype(np.float64)
            mse = ((x[y == label] - image) ** 2).mean((1, 2, 3)).min()
            assert 10 * np.log10(255**2 / mse) > 22, name  # the README: median 31.6 dB, minimum 24.1 dB
