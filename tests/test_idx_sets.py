"""Which IDX data set a folder holds: MNIST, Fashion-MNIST, KMNIST by their published sha256, or
the user's own files with ``dataset="unverified"``; the run records which."""

import dataclasses
import gzip
import hashlib
import json
import re
import struct

import pytest
import torch

from ff_kernels.paper.cli import main
from ff_kernels.paper.data import mnist as idx
from ff_kernels.paper.data import mnist_splits
from ff_kernels.paper.recipes import SupervisedMNIST, SupervisedMNISTConfig

from _paths import DATA_DIR, require_mnist

SPLITS = {"train": 30, "test": 12}  # images per split of the synthetic sets


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch, tmp_path):
    monkeypatch.delenv("FF_KERNELS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def idx_bytes(array: torch.Tensor) -> bytes:
    """The IDX encoding of a uint8 array: images (N, 28, 28) or labels (N,)."""
    magic = 0x803 if array.dim() == 3 else 0x801
    return struct.pack(f">I{array.dim()}I", magic, *array.shape) + array.numpy().tobytes()


def synthetic_set(folder, seed=0, compress=False):
    """Four IDX files of random 28x28 images and labels 0-9 in ``folder``; returns name -> stored bytes."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    stored = {}
    for split, n in SPLITS.items():
        images_name, labels_name = idx.SPLIT_FILES[split]
        for name, array in ((images_name, torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)),
                            (labels_name, torch.arange(n, dtype=torch.uint8) % 10)):
            data = idx_bytes(array)
            if compress:
                data = gzip.compress(data, mtime=0)
            (folder / (f"{name}.gz" if compress else name)).write_bytes(data)
            stored[name] = data
    return stored


def register(monkeypatch, key, raw=None, gz=None):
    """Publish digests of a toy set ``key`` for this test (file name -> sha256)."""
    monkeypatch.setitem(idx.IDX_SETS, key, idx.IdxSet(key.title(), (), raw or {}, gz or {}))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_published_digests_are_well_formed_and_distinct():
    seen = {}
    for key, s in idx.IDX_SETS.items():
        assert set(s.raw) == {name for files in idx.SPLIT_FILES.values() for name in files}
        for digest in [d for d in s.raw.values() if d] + list(s.gz.values()):
            assert re.fullmatch(r"[0-9a-f]{64}", digest), (key, digest)
            assert seen.setdefault(digest, key) == key, f"{key} shares a digest with {seen[digest]}"
        assert all(s.raw[name] or name in s.gz for name in s.raw), f"{key}: a file with no digest at all"


def test_mnist_is_recognized_and_named(tmp_path):
    data = mnist_splits(require_mnist(), validation=False)
    assert data.dataset == "mnist"
    config = SupervisedMNISTConfig(width=8, depth=1, train_subset=100, eval_subset=50, data_dir=str(require_mnist()))
    recipe = SupervisedMNIST(config)
    assert config.dataset == "mnist" and recipe.data_source.startswith("MNIST, 100 training")


def test_unknown_files_are_refused_with_the_way_to_use_them_anyway(tmp_path):
    synthetic_set(tmp_path / "own")
    with pytest.raises(idx.UnknownDataError, match="match no published digest of MNIST, Fashion-MNIST, KMNIST") as err:
        mnist_splits(tmp_path / "own", validation=False)
    assert "--dataset unverified" in str(err.value)
    data = mnist_splits(tmp_path / "own", validation=False, dataset="unverified")
    assert data.dataset == "unverified" and data.train_images.shape == (SPLITS["train"], 784)


def test_the_cli_refuses_unknown_files_in_one_line_and_records_unverified_ones(tmp_path, capsys):
    synthetic_set(tmp_path / "own")
    args = ["supervised", "--data-dir", str(tmp_path / "own"), "--width", "8", "--depth", "1", "--epochs", "1",
            "--batch-size", "10", "--no-progress"]
    assert main(args + ["--run-dir", str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ff-train: error:") and "--dataset unverified" in err and "Traceback" not in err
    assert main(args + ["--run-dir", str(tmp_path / "run"), "--dataset", "unverified"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataset"] == "unverified"


def test_a_toy_set_is_recognized_by_raw_or_gz_digests(tmp_path, monkeypatch):
    raw = synthetic_set(tmp_path / "plain", seed=1)
    gz = synthetic_set(tmp_path / "gz", seed=1, compress=True)
    register(monkeypatch, "toy", raw={n: sha256(b) for n, b in raw.items()})
    assert mnist_splits(tmp_path / "plain", validation=False).dataset == "toy"
    assert mnist_splits(tmp_path / "gz", validation=False).dataset == "toy"  # the uncompressed bytes match
    register(monkeypatch, "toy", raw={n: None for n in raw}, gz={n: sha256(b) for n, b in gz.items()})
    assert mnist_splits(tmp_path / "gz", validation=False).dataset == "toy"  # the published .gz match


def test_an_uncompressed_file_whose_raw_digest_is_unpublished_asks_for_the_gz(tmp_path, monkeypatch):
    """KMNIST publishes no digest of its uncompressed training images: keep the .gz."""
    raw = synthetic_set(tmp_path / "plain", seed=2)
    gz = {n: gzip.compress(b, mtime=0) for n, b in raw.items()}
    digests = {n: sha256(b) for n, b in raw.items()}
    digests["train-images-idx3-ubyte"] = None
    register(monkeypatch, "toy", raw=digests, gz={n: sha256(b) for n, b in gz.items()})
    with pytest.raises(idx.MnistCorruptError, match="no published digest, keep the published .gz"):
        mnist_splits(tmp_path / "plain", validation=False)


def test_a_damaged_file_of_a_known_set_names_the_set(tmp_path, monkeypatch):
    raw = synthetic_set(tmp_path / "own", seed=3)
    register(monkeypatch, "toy", raw={n: sha256(b) for n, b in raw.items()})
    labels = tmp_path / "own" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1] + b"\x09")
    with pytest.raises(idx.MnistCorruptError, match="sha256 mismatch: expected Toy's t10k-labels-idx1-ubyte"):
        mnist_splits(tmp_path / "own", validation=False)


def test_train_and_test_files_of_different_sets_are_refused(tmp_path, monkeypatch):
    a, b = synthetic_set(tmp_path / "a", seed=4), synthetic_set(tmp_path / "b", seed=5)
    register(monkeypatch, "toya", raw={n: sha256(x) for n, x in a.items()})
    register(monkeypatch, "toyb", raw={n: sha256(x) for n, x in b.items()})
    for name in idx.SPLIT_FILES["test"]:
        (tmp_path / "a" / name).write_bytes(b[name])
    with pytest.raises(idx.MnistCorruptError, match="expected Toya's t10k"):
        mnist_splits(tmp_path / "a", validation=False)


def test_a_named_set_is_insisted_on():
    with pytest.raises(idx.MnistCorruptError, match="expected Fashion-MNIST's train-images-idx3-ubyte"):
        mnist_splits(require_mnist(), validation=False, dataset="fashion-mnist")
    with pytest.raises(ValueError, match="dataset must be one of"):
        mnist_splits(require_mnist(), dataset="cifar")


def test_a_resumed_run_keeps_its_data_set(tmp_path, monkeypatch, capsys):
    raw = synthetic_set(tmp_path / "own", seed=6)
    args = ["supervised", "--width", "8", "--depth", "1", "--batch-size", "10", "--no-progress",
            "--run-dir", str(tmp_path / "run")]
    assert main(args + ["--data-dir", str(require_mnist()), "--epochs", "1", "--train-subset", "60",
                        "--eval-subset", "30"]) == 0
    config_path = tmp_path / "run" / "config.json"
    assert json.loads(config_path.read_text())["dataset"] == "mnist"
    register(monkeypatch, "toy", raw={n: sha256(b) for n, b in raw.items()})
    assert main(args + ["--resume", "--epochs", "2", "--data-dir", str(tmp_path / "own")]) == 1
    assert "expected MNIST's" in capsys.readouterr().err


def test_fashion_mnist_when_present():
    folder = DATA_DIR / "fashion-mnist"
    if not all((folder / f"{n}.gz").is_file() for files in idx.SPLIT_FILES.values() for n in files):
        pytest.skip(f"Fashion-MNIST not found in {folder}")
    data = mnist_splits(folder, validation=False)
    assert data.dataset == "fashion-mnist"
    assert data.train_labels.bincount().tolist() == [6000] * 10 and data.eval_labels.bincount().tolist() == [1000] * 10


def test_unverified_data_needs_a_folder():
    with pytest.raises(idx.MnistMissingError, match="name their folder"):
        idx.load_idx("test", dataset="unverified")


def test_the_idx_set_table_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        idx.IDX_SETS["mnist"].name = "x"
