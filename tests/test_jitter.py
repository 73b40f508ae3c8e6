"""Jittered images (section 3.3): random_shifts and the jitter recipe that trains on them."""

import pytest
import torch

from ff_kernels.paper.data import MnistSplits
from ff_kernels.paper.data.jitter import random_shifts, shift_images
from ff_kernels.paper.recipes import RECIPES, JitterMNIST, JitterMNISTConfig, SupervisedMNISTConfig


def roll_and_zero(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The definition: torch.roll, then zero the rows and columns that wrapped around."""
    out = torch.roll(image, shifts=(dy, dx), dims=(-2, -1)).clone()
    if dy > 0:
        out[..., :dy, :] = 0
    elif dy < 0:
        out[..., dy:, :] = 0
    if dx > 0:
        out[..., :, :dx] = 0
    elif dx < 0:
        out[..., :, dx:] = 0
    return out


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_each_image_is_rolled_and_zero_filled_by_its_drawn_shift(flat, dtype):
    images = torch.randint(1, 256, (300, 28, 28), generator=torch.Generator().manual_seed(1)).to(dtype)
    given = images.reshape(300, 784) if flat else images
    before = given.clone()
    out, shifts = random_shifts(given, 2, torch.Generator().manual_seed(0), return_shifts=True)
    assert out.shape == given.shape and out.dtype == dtype and torch.equal(given, before)  # input untouched
    assert shifts.shape == (300, 2) and shifts.dtype == torch.int64 and int(shifts.abs().max()) == 2
    out = out.reshape(300, 28, 28)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        assert torch.equal(out[i], roll_and_zero(images[i], dy, dx)), (i, dy, dx)


def test_all_25_shifts_occur_about_equally_often():
    _, shifts = random_shifts(torch.rand(5000, 784), 2, torch.Generator().manual_seed(0), return_shifts=True)
    pairs, counts = torch.unique(shifts, dim=0, return_counts=True)
    assert {tuple(p) for p in pairs.tolist()} == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    assert counts.min() > 5000 / 25 * 0.7 and counts.max() < 5000 / 25 * 1.3  # expected 200 each, sd ~14


def test_shift_preserves_pixel_mass_of_a_digit_away_from_the_border():
    images = torch.zeros(500, 28, 28)
    images[:, 4:24, 4:24] = torch.rand(500, 20, 20)  # MNIST's digits lie in the central 20x20 box
    out = random_shifts(images, 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.sum((1, 2)), images.sum((1, 2)), rtol=0, atol=1e-4)
    assert not torch.equal(out, images)


def test_content_at_the_border_is_lost_not_wrapped():
    image = torch.zeros(1, 5, 5)
    image[0, 4, 4] = 1.0  # bottom-right corner
    assert shift_images(image, 1, 0).sum() == 0 and shift_images(image, 0, 1).sum() == 0
    assert shift_images(image, -1, -1)[0, 3, 3] == 1.0
    assert shift_images(image, 5, 0).sum() == 0  # shifted out entirely


def test_zero_max_shift_is_the_identity_and_generators_reproduce():
    images = torch.rand(50, 784)
    assert torch.equal(random_shifts(images, 0), images)
    a = random_shifts(images, 2, torch.Generator().manual_seed(3))
    b = random_shifts(images, 2, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "images, max_shift, generator, error, message",
    [
        ("not a tensor", 2, None, TypeError, "torch.Tensor"),
        (torch.rand(4, 780), 2, None, ValueError, "square images"),
        (torch.rand(784), 2, None, ValueError, r"shape \(784,\)"),
        (torch.rand(2, 1, 28, 28), 2, None, ValueError, "(B, H, W)"),
        (torch.rand(4, 784), -1, None, ValueError, "max_shift must be in 0..27"),
        (torch.rand(4, 784), 28, None, ValueError, "max_shift must be in 0..27"),
        (torch.rand(4, 784), 1.5, None, TypeError, "max_shift must be an int"),
        (torch.rand(4, 784), True, None, TypeError, "max_shift must be an int"),
        (torch.rand(4, 784), 2, 7, TypeError, "generator must be a torch.Generator"),
    ],
)
def test_bad_inputs_are_rejected(images, max_shift, generator, error, message):
    with pytest.raises(error, match=message):
        random_shifts(images, max_shift, generator)


def synthetic_splits(n_train=64, n_eval=20):
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(n_train + n_eval, 28, 28)
    images[:, 4:24, 4:24] = torch.rand(n_train + n_eval, 20, 20, generator=g)
    images = images.reshape(-1, 784)
    labels = torch.randint(0, 10, (n_train + n_eval,), generator=g)
    return MnistSplits(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], "test")


def test_jitter_recipe_is_registered_with_the_papers_settings():
    assert RECIPES["jitter"] is JitterMNIST
    config = JitterMNISTConfig()
    assert config.epochs == 500 and config.max_shift == 2  # section 3.3
    assert isinstance(config, SupervisedMNISTConfig) and config.width == SupervisedMNISTConfig().width
    with pytest.raises(ValueError, match="max_shift"):
        JitterMNISTConfig(max_shift=-1)


def test_jitter_recipe_shifts_every_training_image_afresh_each_epoch():
    data = synthetic_splits()
    recipe = JitterMNIST(JitterMNISTConfig(epochs=2, width=16, depth=2, batch_size=16), data)
    generator = torch.Generator().manual_seed(0)
    shifted = []
    for _ in range(2):
        batches = recipe.epoch_batches(generator)
        assert sorted(torch.cat(batches).tolist()) == list(range(64))
        shifted.append(recipe.train_images.clone())
        recipe.train_step(batches[0], generator)
    clean = data.train_images
    assert torch.equal(recipe.unshifted_train_images, clean) and torch.equal(recipe.eval_images, data.eval_images)
    for epoch_images in shifted:
        assert not torch.equal(epoch_images, clean)
        torch.testing.assert_close(epoch_images.sum(1), clean.sum(1), rtol=0, atol=1e-4)  # shifted, not altered
    assert not torch.equal(shifted[0], shifted[1])  # fresh shifts each epoch
