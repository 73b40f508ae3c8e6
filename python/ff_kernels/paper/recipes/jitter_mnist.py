"""Supervised FF on jittered MNIST (Hinton 2022, section 3.3).

"FF can also be trained on jittered images: ... jittering the images by up to two pixels in
each direction to get 25 different shifts for each image ... after training for 500 epochs,
the test error was 0.64%." The recipe is the supervised one (label in the input, hard
negatives, classification by accumulated goodness; see ``supervised_mnist``) with every
training image shifted by its own random (dy, dx) in [-2, 2]^2, zero-filled, drawn afresh
every epoch. The shifts come from the data generator at the start of each epoch, so they are
part of the checkpoint's RNG state and a resumed run sees the same shifts. The label is written
into the shifted image (its first 10 pixels), so it never moves. Evaluation uses the unshifted
images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import MnistSplits
from ..data.jitter import random_shifts
from ..options import Option
from .config import EPOCHS
from .supervised_mnist import SupervisedMNIST, SupervisedMNISTConfig

MAX_SHIFT = Option("largest shift in pixels in each direction, zero-filled", min=0, below=28)


@dataclass
class JitterMNISTConfig(SupervisedMNISTConfig):
    """The supervised recipe's settings plus the jitter; see :class:`SupervisedMNISTConfig`."""

    epochs: int = EPOCHS(500)  # section 3.3: 0.64% after 500 epochs, 8x the unjittered run's 60
    max_shift: int = MAX_SHIFT(2)  # section 3.3: up to two pixels in each direction, 25 shifts


class JitterMNIST(SupervisedMNIST):
    """Supervised FF on MNIST with every training image randomly shifted each epoch (paper section 3.3)."""

    name = "jitter"
    Config = JitterMNISTConfig

    def __init__(self, config: JitterMNISTConfig, data: MnistSplits | None = None) -> None:
        super().__init__(config, data)
        self.unshifted_train_images = self.train_images

    def epoch_batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        """Draw this epoch's shift for every training image, then the shuffled batches.

        ``train_images`` (what ``train_step`` reads) becomes the shifted copy for the epoch.
        """
        self.train_images = random_shifts(self.unshifted_train_images, self.config.max_shift, generator)
        return super().epoch_batches(generator)
