"""Data sets, the label handling of supervised FF and the hybrid negatives of unsupervised FF."""

from .errors import DataError
from .hybrid import hybrid_images, hybrid_mask, hybrid_negatives, random_partners
from .labels import hard_wrong_labels, neutral_label, overlay_label, random_wrong_labels
from .mnist import (
    DATASETS,
    IDX_SETS,
    UNVERIFIED,
    MnistCorruptError,
    MnistMissingError,
    MnistSplits,
    UnknownDataError,
    load_idx,
    load_mnist,
    mnist_splits,
)

__all__ = [
    "DATASETS",
    "IDX_SETS",
    "UNVERIFIED",
    "DataError",
    "MnistCorruptError",
    "MnistMissingError",
    "MnistSplits",
    "UnknownDataError",
    "hard_wrong_labels",
    "hybrid_images",
    "hybrid_mask",
    "hybrid_negatives",
    "load_idx",
    "load_mnist",
    "mnist_splits",
    "neutral_label",
    "overlay_label",
    "random_partners",
    "random_wrong_labels",
]
