"""Unsupervised FF on MNIST with local receptive fields (Hinton 2022, section 3.2, footnotes 8, 9).

The setup of :mod:`.unsupervised_mnist` (real images against hybrids, a softmax on the
normalized activities of the top layers, trained alongside on detached features) with the one
architecture the paper tried, locally connected layers without weight sharing (footnote 8):

    image (1, 28, 28)
    -> FFLocal2d(1, 28, 128, kernel=10, stride=6)    (128, 4, 4)  a 4x4 grid, 10x10 receptive fields
    -> FFLocal2d(128, 4, 220, kernel=2)              (220, 3, 3)  all channels of 2x2 adjacent grid points
    -> FFLocal2d(220, 3, 512, kernel=2)              (512, 2, 2)

i.e. 2048, 1980 and 2048 hidden units, "approximately 2000 hidden units per layer". Every layer
uses peer normalization of its hidden activities (footnote 9), 60 epochs (1.16% test error in
the paper). The paper feeds "the last three hidden layers" to the softmax; this net has three
hidden layers, so the softmax reads all of them (``head_layers`` = 3).

The FF goodness and normalization of a layer cover all its C * H * W units. The layers have no
bf16 mode (``compute_dtype``), unlike FFLinear.

Observed on the CPU: one epoch of the full-size net on the first 10,000 training images gives
10.1% test error (official test set) and 28% real-vs-hybrid error; with untrained FF layers the
softmax alone reaches 9.9% in that time, i.e. one short epoch says little about the features.
About 0.5-0.85 s per batch of 100 on two shared cores (5-9 minutes per full epoch).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...functional.local import LocalSpec
from ...nn import FFLocal2d, FFSequential
from ..data.hybrid import BLUR_STEPS
from .layers import normal_init_, peer_norm_for
from .unsupervised_mnist import (
    IMAGE_SHAPE,
    SUPERVISED,
    HybridFFNet,
    UnsupervisedMNIST,
    check_common_settings,
)

# (kernel, stride) of the three layers (footnote 8); channels come from the config.
GEOMETRY = ((10, 6), (2, 1), (2, 1))


@dataclass
class LocalMNISTConfig:
    """Settings of the local-receptive-field recipe.

    The architecture (``channels`` at the footnote-8 geometry), peer normalization on every
    layer and 60 epochs are the paper's; the fields set from ``SUPERVISED`` take the supervised
    recipe's defaults, as in the unsupervised recipe.
    """

    epochs: int = 60  # section 3.2
    eval_every: int = 1  # evaluate after every N-th epoch and the last (ff_kernels.paper.train.evaluation_due)
    channels: tuple[int, int, int] = (128, 220, 512)  # units per location of the three layers (footnote 8)
    head_layers: int = 3  # the softmax reads the last min(head_layers, 3) hidden layers
    blur_steps: int = BLUR_STEPS  # blurring passes of the hybrid masks (data/hybrid.py)
    batch_size: int = SUPERVISED.batch_size
    optimizer: str = SUPERVISED.optimizer  # "sgd" (momentum, fused into the FF layer ops) or "adam"
    lr: float = SUPERVISED.lr  # FF layers
    momentum: float = SUPERVISED.momentum  # SGD only
    weight_decay: float = SUPERVISED.weight_decay  # FF layers
    lr_schedule: str = SUPERVISED.lr_schedule  # see schedule.lr_factor
    head_lr: float = SUPERVISED.head_lr  # softmax
    head_weight_decay: float = SUPERVISED.head_weight_decay  # softmax
    # Peer-normalization strength on every layer (footnote 9), set here rather than taken from the
    # supervised recipe because this net needs it: ffnew.m's 0.03 beside the halved FF
    # derivative, as in the supervised recipe. 0 = off.
    peer_norm: float = 0.06
    goodness: str = SUPERVISED.goodness
    # p(positive) = sigmoid((G - N) / temperature), N the layer's number of units; None: N.
    temperature: float | None = SUPERVISED.temperature
    rms_norm: bool = SUPERVISED.rms_norm  # hidden activities passed on with unit mean square (else unit length)
    input_norm: bool = SUPERVISED.input_norm  # input images scaled to unit mean square
    init: str = SUPERVISED.init  # "normal": N(0, 1 / fan_in) per location, biases 0; "uniform": FFLocal2d's
    train_subset: int | None = None  # first N training images
    eval_subset: int | None = None  # first N evaluation images
    validation: bool = False  # True: 50k train + 10k validation; False: 60k train + official test
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"  # FFLocal2d's: "auto", "reference", "cpu" or "cuda"
    data_dir: str | None = None

    def __post_init__(self) -> None:
        check_common_settings(self, ("epochs", "eval_every", "head_layers", "batch_size"))
        channels = tuple(self.channels)
        if len(channels) != len(GEOMETRY) or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels
        ):
            raise ValueError(f"channels must be {len(GEOMETRY)} ints >= 1, got {self.channels!r}")
        self.channels = channels  # a tuple, also when read back from config.json (a list)


def build_local_net(config: LocalMNISTConfig) -> HybridFFNet:
    """The footnote-8 net with ``config.channels`` and the softmax head."""
    layers = []
    in_channels, in_size = IMAGE_SHAPE[0], IMAGE_SHAPE[1]
    for out_channels, (kernel, stride) in zip(config.channels, GEOMETRY):
        units = LocalSpec(in_channels, in_size, in_size, out_channels, kernel, stride).out_features
        layer = FFLocal2d(
            in_channels, in_size, out_channels, kernel, stride, goodness=config.goodness,
            temperature=config.temperature or float(units), rms_norm=config.rms_norm, backend=config.backend,
            peer_norm=peer_norm_for(units, config.peer_norm),
        )
        if config.init == "normal":
            normal_init_(layer)
        layers.append(layer)
        in_channels, in_size = layer.out_shape[0], layer.out_shape[1]
    return HybridFFNet(FFSequential(*layers), IMAGE_SHAPE, config.head_layers, config.input_norm)


class LocalMNIST(UnsupervisedMNIST):
    """MNIST with hybrid negatives on the locally connected net of footnote 8 (paper section 3.2)."""

    name = "local"
    Config = LocalMNISTConfig
    train_error_name = "train_error_softmax"

    @staticmethod
    def build_model(config: LocalMNISTConfig) -> HybridFFNet:
        return build_local_net(config)
