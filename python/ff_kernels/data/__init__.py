"""Data sets and the label handling of supervised FF."""

from .labels import hard_wrong_labels, neutral_label, overlay_label, random_wrong_labels
from .mnist import MnistCorruptError, MnistMissingError, MnistSplits, load_mnist, mnist_splits

__all__ = [
    "MnistCorruptError",
    "MnistMissingError",
    "MnistSplits",
    "hard_wrong_labels",
    "load_mnist",
    "mnist_splits",
    "neutral_label",
    "overlay_label",
    "random_wrong_labels",
]
