"""What every MNIST recipe does first: put its data on its device."""

from __future__ import annotations

import torch

from ..data import MnistSplits, mnist_splits


def attach_mnist(recipe, config, data: MnistSplits | None) -> None:
    """Give ``recipe`` its MNIST: ``device``, ``train_images`` (N, 784) float and ``train_labels``
    (N,) int64, ``eval_images`` / ``eval_labels`` likewise, and ``eval_name`` ("test" or
    "validation").

    ``data`` (already split) is used when given, else :func:`mnist_splits` reads
    ``config.data_dir`` (``config.validation``: 50k/10k). Either way the config's subsets cut it
    and the tensors move to ``config.device``.
    """
    recipe.device = torch.device(config.device)
    if data is None:
        data = mnist_splits(config.data_dir, config.validation)
    data = data.head(config.train_subset, config.eval_subset)
    recipe.train_images, recipe.train_labels = data.train_images.to(recipe.device), data.train_labels.to(recipe.device)
    recipe.eval_images, recipe.eval_labels = data.eval_images.to(recipe.device), data.eval_labels.to(recipe.device)
    recipe.eval_name = data.eval_name
