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

Observations on the CPU are in docs/defaults.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...functional.local import LocalSpec
from ...nn import FFLocal2d, FFSequential
from ..options import Option
from .config import EPOCHS, LOCAL_BACKEND
from .layer_setup import normal_init_, peer_norm_for
from .unsupervised_mnist import IMAGE_SHAPE, HybridConfig, HybridFFNet, UnsupervisedMNIST

# (kernel, stride) of the three layers (footnote 8); channels come from the config.
GEOMETRY = ((10, 6), (2, 1), (2, 1))


CHANNELS = Option("units per location of the three layers", min=1, metavar=("C1", "C2", "C3"))


@dataclass
class LocalMNISTConfig(HybridConfig):
    """Settings of the local-receptive-field recipe: the footnote-8 net, peer normalization on
    every layer (footnote 9) and 60 epochs (section 3.2)."""

    epochs: int = EPOCHS(60)  # section 3.2
    channels: tuple[int, int, int] = CHANNELS((128, 220, 512))  # footnote 8
    backend: str = LOCAL_BACKEND("auto")


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
