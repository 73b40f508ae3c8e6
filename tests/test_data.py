"""MNIST loading and verification, the paper's splits, and the supervised-FF label helpers."""

import dataclasses
import gzip
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ff_kernels.paper.data import (
    MnistCorruptError,
    MnistMissingError,
    hard_wrong_labels,
    load_mnist,
    mnist_splits,
    neutral_label,
    overlay_label,
    random_wrong_labels,
)
from ff_kernels.paper.data import mnist as mnist_module

from _paths import require_mnist

# Training label counts 0..9 from ../shared/data/README.md; test counts are the official ones.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TEST_LABELS = "t10k-labels-idx1-ubyte"


@pytest.fixture(scope="module")
def mnist_dir():
    return require_mnist()


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch, tmp_path):
    """Keep the user's $FF_KERNELS_DATA and cache out of these tests."""
    monkeypatch.delenv("FF_KERNELS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def uncompressed_copy(src_dir, dst_dir, split="test"):
    """Copy one split's files into dst_dir, gunzipped; returns dst_dir."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in mnist_module.SPLIT_FILES[split]:
        (dst_dir / name).write_bytes(gzip.decompress((src_dir / f"{name}.gz").read_bytes()))
    return dst_dir


def set_mirrors(monkeypatch, *mirrors, key="mnist"):
    """Make set ``key`` download from ``mirrors`` for this test."""
    monkeypatch.setitem(mnist_module.IDX_SETS, key, dataclasses.replace(mnist_module.IDX_SETS[key], mirrors=mirrors))


# ---------------------------------------------------------------- loading


def test_load_train_and_test_shapes_dtypes_counts(mnist_dir):
    images, labels = load_mnist("train", mnist_dir)
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert labels.bincount().tolist() == TRAIN_COUNTS
    assert abs(images.float().div(255).mean().item() - 0.1307) < 1e-3
    images, labels = load_mnist("test", mnist_dir)
    assert images.shape == (10000, 28, 28) and labels.bincount().tolist() == TEST_COUNTS


def test_uncompressed_files_load_the_same(mnist_dir, tmp_path):
    plain = uncompressed_copy(mnist_dir, tmp_path / "plain")
    for a, b in zip(load_mnist("test", plain), load_mnist("test", mnist_dir)):
        assert torch.equal(a, b)


def test_env_var_names_a_data_root_with_an_mnist_folder(mnist_dir, tmp_path, monkeypatch):
    uncompressed_copy(mnist_dir, tmp_path / "root" / "mnist")
    monkeypatch.setenv("FF_KERNELS_DATA", str(tmp_path / "root"))
    assert load_mnist("test")[1].bincount().tolist() == TEST_COUNTS


def test_missing_file_names_the_file_and_folder(mnist_dir, tmp_path):
    folder = uncompressed_copy(mnist_dir, tmp_path / "partial")
    (folder / TEST_LABELS).unlink()
    with pytest.raises(MnistMissingError, match=f"{TEST_LABELS}.*{folder}"):
        load_mnist("test", folder)
    with pytest.raises(MnistMissingError):  # never falls back to downloading for a named folder
        load_mnist("train", folder)


def test_bad_split_name():
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist("validation")


def corrupt_labels(folder, edit):
    path = folder / TEST_LABELS
    path.write_bytes(edit(bytearray(path.read_bytes())))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b: b[:-100], "size does not match its header"),  # truncated
        (lambda b: b + b"\0", "size does not match its header"),  # trailing garbage
        (lambda b: b[:5], "truncated"),  # shorter than the header
        (lambda b: b"\0\0\x08\x03" + b[4:], "bad IDX magic"),  # image magic on a label file
        (lambda b: b[:-1] + bytes([(b[-1] + 1) % 10]), "sha256 mismatch"),  # one label changed
    ],
    ids=["truncated", "too-long", "no-header", "bad-magic", "hash"],
)
def test_corrupt_file_raises_corrupt_error(mnist_dir, tmp_path, edit, message):
    folder = uncompressed_copy(mnist_dir, tmp_path / "bad")
    corrupt_labels(folder, edit)
    with pytest.raises(MnistCorruptError, match=message):
        load_mnist("test", folder)


def test_truncated_gzip_is_corrupt_not_missing(mnist_dir, tmp_path):
    folder = tmp_path / "gz"
    folder.mkdir()
    for name in mnist_module.SPLIT_FILES["test"]:
        shutil.copy(mnist_dir / f"{name}.gz", folder)
    data = (folder / f"{TEST_LABELS}.gz").read_bytes()
    (folder / f"{TEST_LABELS}.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(MnistCorruptError, match="gzip"):
        load_mnist("test", folder)


def test_download_into_cache_tries_mirrors_in_order(mnist_dir, tmp_path, monkeypatch):
    bad_mirror = tmp_path / "bad-mirror"
    bad_mirror.mkdir()
    for name in mnist_module.SPLIT_FILES["test"]:
        (bad_mirror / f"{name}.gz").write_bytes(gzip.compress(b"not mnist"))
    set_mirrors(monkeypatch, bad_mirror.as_uri() + "/", mnist_dir.as_uri() + "/")
    images, labels = load_mnist("test")
    assert labels.bincount().tolist() == TEST_COUNTS
    cache = tmp_path / "cache" / "ff_kernels" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in mnist_module.SPLIT_FILES["test"])
    set_mirrors(monkeypatch)  # now served from the cache
    assert torch.equal(load_mnist("test")[0], images)


def test_failed_download_lists_every_mirror(tmp_path, monkeypatch):
    set_mirrors(monkeypatch, (tmp_path / "a").as_uri() + "/", (tmp_path / "b").as_uri() + "/")
    with pytest.raises(MnistMissingError, match="(?s)could not download.*/a/.*/b/"):
        load_mnist("test")
    assert not any((tmp_path / "cache" / "ff_kernels" / "mnist").iterdir())  # no partial files left


def test_no_download_when_disabled(tmp_path):
    with pytest.raises(MnistMissingError, match="download=False"):
        load_mnist("test", download=False)


# ---------------------------------------------------------------- splits


def test_validation_split_is_the_last_10k_training_images(mnist_dir):
    s = mnist_splits(mnist_dir, validation=True)
    assert s.eval_name == "validation"
    assert s.train_images.shape == (50000, 784) and s.eval_images.shape == (10000, 784)
    assert s.train_images.dtype == torch.float32 and 0 <= s.train_images.min() and s.train_images.max() <= 1
    _, labels = load_mnist("train", mnist_dir)
    assert torch.equal(s.eval_labels, labels[50000:]) and torch.equal(s.train_labels, labels[:50000])


def test_full_split_uses_the_official_test_set(mnist_dir):
    s = mnist_splits(mnist_dir, validation=False)
    assert s.eval_name == "test" and len(s.train_labels) == 60000
    assert s.eval_labels.bincount().tolist() == TEST_COUNTS
    small = s.head(100, 20)
    assert small.train_images.shape == (100, 784) and torch.equal(small.eval_labels, s.eval_labels[:20])
    with pytest.raises(ValueError, match="n_train must be in 1..60000"):
        s.head(0)


# ---------------------------------------------------------------- labels


def test_overlay_one_hot_replaces_only_the_first_pixels():
    images = torch.rand(3, 784)
    out = overlay_label(images, torch.tensor([0, 4, 9]))
    assert out.shape == (3, 784) and out.dtype == images.dtype
    assert torch.equal(out[:, :10], torch.eye(10)[[0, 4, 9]])
    assert torch.equal(out[:, 10:], images[:, 10:])
    assert not torch.equal(images[:, :10], out[:, :10])  # the input is untouched (a copy is returned)


def test_overlay_neutral_label():
    out = overlay_label(torch.zeros(2, 784), neutral_label(2))
    assert torch.allclose(out[:, :10], torch.full((2, 10), 0.1)) and out[:, 10:].eq(0).all()


@pytest.mark.parametrize(
    "images, labels, error, message",
    [
        (torch.zeros(2, 784, dtype=torch.uint8), torch.tensor([1, 2]), TypeError, "floating-point"),
        (torch.zeros(2, 28, 28), torch.tensor([1, 2]), ValueError, r"\(B, D\)"),
        (torch.zeros(2, 784), torch.tensor([1, 2, 3]), ValueError, r"shape \(2,\)"),
        (torch.zeros(2, 784), torch.tensor([1, 2], dtype=torch.int32), TypeError, "int64"),
        (torch.zeros(2, 784), torch.tensor([1, 10]), ValueError, r"\[0, 10\)"),
        (torch.zeros(2, 784), torch.zeros(2, 9), ValueError, r"\(2, 10\)"),
        (torch.zeros(2, 784), [1, 2], TypeError, "torch.Tensor"),
    ],
)
def test_overlay_rejects_bad_inputs(images, labels, error, message):
    with pytest.raises(error, match=message):
        overlay_label(images, labels)


labels_and_classes = st.integers(2, 20).flatmap(
    lambda c: st.tuples(st.just(c), st.lists(st.integers(0, c - 1), min_size=1, max_size=64))
)


@settings(max_examples=50, deadline=None)
@given(labels_and_classes, st.integers(0, 2**31))
def test_random_wrong_labels_are_never_true(case, seed):
    num_classes, labels = case
    labels = torch.tensor(labels)
    wrong = random_wrong_labels(labels, num_classes, torch.Generator().manual_seed(seed))
    assert wrong.dtype == torch.int64 and wrong.shape == labels.shape
    assert (wrong != labels).all() and (wrong >= 0).all() and (wrong < num_classes).all()


@settings(max_examples=50, deadline=None)
@given(labels_and_classes, st.integers(0, 2**31), st.sampled_from(["softmax", "sparse", "true-only"]))
def test_hard_wrong_labels_are_never_true(case, seed, kind):
    num_classes, labels = case
    labels = torch.tensor(labels)
    gen = torch.Generator().manual_seed(seed)
    if kind == "softmax":
        probs = torch.softmax(3 * torch.randn(len(labels), num_classes, generator=gen), 1)
    elif kind == "sparse":  # zeros everywhere but one random class (sometimes the true one)
        peaks = torch.randint(num_classes, (len(labels),), generator=gen)
        probs = torch.nn.functional.one_hot(peaks, num_classes).float()
    else:  # all mass on the true label: falls back to a uniform wrong label
        probs = torch.nn.functional.one_hot(labels, num_classes).float()
    wrong = hard_wrong_labels(probs, labels, gen)
    assert wrong.dtype == torch.int64 and wrong.shape == labels.shape
    assert (wrong != labels).all() and (wrong >= 0).all() and (wrong < num_classes).all()


def test_wrong_label_frequencies():
    gen = torch.Generator().manual_seed(0)
    n = 20000
    labels = torch.full((n,), 3)
    counts = random_wrong_labels(labels, 10, gen).bincount(minlength=10).float() / n
    assert counts[3] == 0 and torch.allclose(counts[torch.arange(10) != 3], torch.full((9,), 1 / 9), atol=0.015)
    probs = torch.tensor([0.1, 0.0, 0.0, 0.6, 0.3] + [0.0] * 5).expand(n, 10)
    counts = hard_wrong_labels(probs, labels, gen).bincount(minlength=10).float() / n
    expected = torch.tensor([0.25, 0, 0, 0, 0.75] + [0] * 5)  # 0.1 : 0.3 among the wrong classes
    assert torch.allclose(counts, expected, atol=0.015)


@pytest.mark.parametrize(
    "probs, labels, error",
    [
        (torch.rand(4, 10), torch.tensor([1, 2, 3]), ValueError),
        (torch.rand(4), torch.tensor([1, 2, 3, 4]), TypeError),
        (torch.ones(4, 10, dtype=torch.long), torch.tensor([1, 2, 3, 4]), TypeError),
        (-torch.rand(4, 10), torch.tensor([1, 2, 3, 4]), ValueError),
        (torch.full((4, 10), float("nan")), torch.tensor([1, 2, 3, 4]), ValueError),
        (torch.rand(4, 10).index_put_((torch.tensor(2), torch.tensor(7)), torch.tensor(float("nan"))),
         torch.tensor([1, 2, 3, 4]), ValueError),
        (torch.rand(4, 10).index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(float("inf"))),
         torch.tensor([1, 2, 3, 4]), ValueError),
    ],
)
def test_hard_wrong_labels_rejects_bad_inputs(probs, labels, error):
    with pytest.raises(error, match="probs|labels"):
        hard_wrong_labels(probs, labels)


def test_hard_wrong_labels_take_a_softmax_with_a_graph_without_warning(recwarn):
    logits = torch.randn(5, 10, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 9])
    wrong = hard_wrong_labels(torch.softmax(logits, 1), labels, torch.Generator().manual_seed(0))
    assert (wrong != labels).all() and not [w for w in recwarn if "requires_grad" in str(w.message)]


def test_hard_wrong_labels_accept_finite_scores_whose_sum_overflows():
    probs = torch.full((3, 10), 3e38)  # each entry finite, the float32 sum is not
    labels = torch.tensor([0, 5, 9])
    wrong = hard_wrong_labels(probs, labels, torch.Generator().manual_seed(0))
    assert (wrong != labels).all()


@settings(max_examples=30, deadline=None)
@given(labels_and_classes, st.integers(0, 2**31), st.sampled_from(["softmax", "sparse", "true-only"]))
def test_hard_wrong_labels_draw_as_the_masked_multinomial(case, seed, kind):
    """The same draws as ``multinomial`` over the probabilities with the true class zeroed (a row
    with no weight left: uniform over the wrong classes), from the same generator state: the
    random stream a checkpointed run resumes with."""
    num_classes, labels = case
    labels = torch.tensor(labels)
    gen = torch.Generator().manual_seed(seed)
    if kind == "softmax":
        probs = torch.softmax(3 * torch.randn(len(labels), num_classes, generator=gen), 1)
    elif kind == "sparse":
        probs = torch.nn.functional.one_hot(torch.randint(num_classes, (len(labels),), generator=gen), num_classes).float()
    else:
        probs = torch.nn.functional.one_hot(labels, num_classes).float()
    weights = probs.clone()
    weights[torch.arange(len(labels)), labels] = 0.0
    empty = weights.sum(1) <= 0
    weights[empty] = 1.0 - torch.nn.functional.one_hot(labels[empty], num_classes).float()
    state = gen.get_state()
    expected = torch.multinomial(weights, 1, generator=gen).squeeze(1)
    gen.set_state(state)
    assert torch.equal(hard_wrong_labels(probs, labels, gen), expected)
