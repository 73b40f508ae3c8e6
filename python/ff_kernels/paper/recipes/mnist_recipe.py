"""What every MNIST-style recipe does first: read its IDX data set and put it on its device."""

from __future__ import annotations

import torch

from ...ops.validation import all_finite, describe
from ..data import IDX_SETS, MnistSplits, mnist_splits


def attach_mnist(recipe, config, data: MnistSplits | None) -> None:
    """Give ``recipe`` its IDX data set: ``device``, ``train_images`` (N, 784) float and
    ``train_labels`` (N,) int64, ``eval_images`` / ``eval_labels`` likewise, ``eval_name`` ("test"
    or "validation") and ``data_source`` (what was read, for the run's output).

    ``data`` (already split) is used when given, else :func:`mnist_splits` reads
    ``config.data_dir`` (``config.validation``: 50k/10k) and ``config.dataset`` becomes the set
    the files are (so the run's config.json names it). Either way the config's subsets cut it
    and the tensors move to ``config.device``. The images are checked once here to be finite
    floats (a ValueError names the split otherwise), so that the recipes may trust the rows
    they build from them (``validation.trusted_inputs``).
    """
    recipe.device = torch.device(config.device)
    if data is None:
        data = mnist_splits(config.data_dir, config.validation, dataset=config.dataset)
        config.dataset = data.dataset
    data = data.head(config.train_subset, config.eval_subset)
    for split, images in (("training", data.train_images), (data.eval_name, data.eval_images)):
        if not (images.is_floating_point() and all_finite(images)):
            raise ValueError(f"the {split} images must be finite floating-point values, got {describe(images)}"
                             + (" holding NaN or Inf" if images.is_floating_point() else ""))
    name = IDX_SETS[data.dataset].name if data.dataset in IDX_SETS else f"IDX files not verified ({data.dataset})"
    recipe.data_source = f"{name}, {len(data.train_labels)} training and {len(data.eval_labels)} {data.eval_name} images"
    recipe.train_images, recipe.train_labels = data.train_images.to(recipe.device), data.train_labels.to(recipe.device)
    recipe.eval_images, recipe.eval_labels = data.eval_images.to(recipe.device), data.eval_labels.to(recipe.device)
    recipe.eval_name = data.eval_name
