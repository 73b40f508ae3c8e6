"""What the CIFAR-10 recipes (FF and its backprop baseline, paper section 4) share.

Data: :func:`~ff_kernels.paper.data.cifar10.load_cifar10` (python batches, or the JPEG archive with the
exact test set), kept as uint8 on the device and scaled per batch by :func:`standardize`.
Evaluation sets, each reported as ``<name>_error`` (and more, per recipe):

    "train"       the first ``train_eval_subset`` training images (the paper's Table 1 reports
                  training error too; a full pass of the FF test procedure over all 50,000 would
                  cost five test sets)
    "test"        the official test set (the JPEG-compressed one for the JPEG archive)
    "test_exact"  the lossless official test set, when the JPEG archive comes with it

With ``validation`` the last :data:`VALIDATION_IMAGES` training images are held out and form
the one evaluation set besides "train", "validation"; training uses the images before them, and
the test sets are not loaded into the run. Settings are tuned this way; the test error is
measured once, with the chosen settings, without ``validation``.

``eval_subset`` caps every one of them. The training loop evaluates after every
``eval_every``-th epoch and after the last (``ff_kernels.paper.train.evaluation_due``); other epochs
report training metrics only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.cifar10 import Cifar10, load_cifar10
from ..options import Option
from .config import DEPTH, LOCAL_BACKEND, VALIDATION, EvaluatedConfig

MEAN = (0.4914, 0.4822, 0.4465)  # per-channel mean and standard deviation of the CIFAR-10 training
STD = (0.2470, 0.2435, 0.2616)  # images scaled to [0, 1] (the commonly used constants)
EVAL_BATCH = 500
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
VALIDATION_IMAGES = 5_000  # held out from the end of the training images by ``validation``


def standardize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ``(x / 255 - MEAN) / STD`` per channel, ``dtype`` (B, 3, H, W)."""
    mean = torch.tensor(MEAN, dtype=dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=dtype, device=images.device).view(1, 3, 1, 1)
    return (images.to(dtype) / 255.0 - mean) / std


RECEPTIVE_FIELD = Option("odd window size k of the local connections (the maps keep their 32x32 size)",
                         min=1, max=2 * IMAGE_SHAPE[1] - 1)
TRAIN_EVAL_SUBSET = Option("training error on the first N training images", min=1, none="all")
CIFAR_DIR = Option("folder with cifar-10-batches-py/ or cifar10-jpeg.tar.gz (+ cifar10-test-exact.npz)",
                   none="$FF_KERNELS_DATA/cifar10, or download the python batches")


@dataclass
class CifarConfig(EvaluatedConfig):
    """The settings every CIFAR-10 recipe has: the architecture of section 4 and the run's data,
    evaluation and device."""

    depth: int = DEPTH(2)  # Table 1: 2 or 3 hidden layers
    channels: int = Option("units per location of every 32x32 hidden map", min=1)(3)  # section 4
    receptive_field: int = RECEPTIVE_FIELD(11)  # section 4: 11x11 receptive fields
    train_eval_subset: int | None = TRAIN_EVAL_SUBSET(10_000)
    validation: bool = VALIDATION.but(
        help=f"hold out the last {VALIDATION_IMAGES:,} training images and evaluate on them instead of the test sets",
    )(False)
    backend: str = LOCAL_BACKEND("auto")
    data_dir: str | None = CIFAR_DIR(None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.receptive_field % 2 == 0:
            raise ValueError(f"receptive_field must be an odd int in 1..{2 * IMAGE_SHAPE[1] - 1} (the maps keep "
                             f"their 32x32 size), got {self.receptive_field!r}")


class CifarData:
    """Training data and evaluation sets: images uint8 (N, 3, 32, 32), labels int64 (N,), on one device.

    ``eval_sets`` maps a set's name to (images, labels); :func:`load_data` builds the recipes' sets.
    """

    def __init__(self, train_images: torch.Tensor, train_labels: torch.Tensor,
                 eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]], source: str = "given tensors") -> None:
        self.train_images, self.train_labels = train_images, train_labels
        self.eval_sets = eval_sets
        self.source = source

    def epoch_batches(self, generator: torch.Generator, batch_size: int) -> list[torch.Tensor]:
        """A shuffled epoch: index tensors of up to ``batch_size`` training rows each."""
        order = torch.randperm(self.train_labels.shape[0], generator=generator, device=generator.device)
        return list(order.to(self.train_labels.device).split(batch_size))


def load_data(config, device: torch.device) -> CifarData:
    """CIFAR-10 from ``config.data_dir`` cut to the config's subsets, on ``device``, with the evaluation
    sets of the module docstring ("train" = the first min(train_eval_subset, eval_subset) training images)."""
    if config.validation:
        data = _validation_split(load_cifar10(config.data_dir), config.train_subset, config.eval_subset)
    else:
        data = load_cifar10(config.data_dir, train_subset=config.train_subset, eval_subset=config.eval_subset)
    train_images, train_labels = data.train_images.to(device), data.train_labels.to(device)
    n_train = min(n for n in (len(train_labels), config.train_eval_subset, config.eval_subset) if n is not None)
    eval_sets = {"train": (train_images[:n_train], train_labels[:n_train])}
    eval_sets.update({name: (x.to(device), y.to(device)) for name, (x, y) in data.eval_sets.items()})
    return CifarData(train_images, train_labels, eval_sets, data.source)


def _validation_split(data: Cifar10, train_subset: int | None, eval_subset: int | None) -> Cifar10:
    """The last VALIDATION_IMAGES training images as the one evaluation set "validation", the
    ones before them as the training images; then the subsets, as ``Cifar10.head`` cuts them."""
    n = len(data.train_labels) - VALIDATION_IMAGES
    if n < 1:
        raise ValueError(f"validation holds out {VALIDATION_IMAGES} training images, but there are only "
                         f"{len(data.train_labels)}")
    held_out = {"validation": (data.train_images[n:], data.train_labels[n:])}
    split = Cifar10(data.train_images[:n], data.train_labels[:n], held_out, f"{data.source}, validation split")
    return split.head(train_subset, eval_subset)
