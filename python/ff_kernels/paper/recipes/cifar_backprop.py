"""The backpropagation baseline on CIFAR-10 with local receptive fields (Hinton 2022, section 4, Table 1's BP row).

The bottom-up half of the FF net of :mod:`.cifar_ff`: 2 or 3 hidden layers, each a 32x32 map
with 3 ReLUs per location, every unit with an 11x11 receptive field in the layer below (no
weight sharing: :class:`~ff_kernels.paper.recipes.cifar_backprop_net.BackpropLocal2d`), then a 10-way softmax
over the last hidden layer, trained end to end with backpropagation of the cross-entropy and
weight decay. Its one test procedure is the softmax: ``<set>_error`` for the sets of
:mod:`.cifar_common`.

The paper gives the architecture and weight decay only; the optimizer, learning rate, its decay
(``lr_decay`` per epoch, stepped once per epoch by the training loop) and batch size are chosen
here, not tuned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .cifar_backprop_net import BackpropLocal2d
from .cifar_common import EVAL_BATCH, IMAGE_SHAPE, NUM_CLASSES, CifarConfig, CifarData, load_data, standardize
from .config import LR, LR_DECAY, OPTIMIZER, WEIGHT_DECAY


@dataclass
class CifarBackpropConfig(CifarConfig):
    """Settings of the CIFAR-10 backprop baseline: the architecture is the paper's, the optimizer's
    settings are chosen here (section 4 gives weight decay only)."""

    optimizer: str = OPTIMIZER.but(help="adam, or sgd with momentum 0.9")("adam")
    lr: float = LR.but(help="initial learning rate")(1e-3)
    lr_decay: float = LR_DECAY(0.9)
    weight_decay: float = WEIGHT_DECAY.but(help="L2 coefficient")(1e-4)


def local_backprop_net(config: CifarBackpropConfig) -> nn.Sequential:
    """standardized images (B, 3, 32, 32) -> ``depth`` local ReLU layers (B, C, 32, 32) -> 10 logits."""
    size = IMAGE_SHAPE[1]
    layers: list[nn.Module] = []
    in_channels = IMAGE_SHAPE[0]
    for _ in range(config.depth):
        layers.append(BackpropLocal2d(in_channels, size, config.channels, config.receptive_field,
                                      backend=config.backend))
        in_channels = config.channels
    layers += [nn.Flatten(), nn.Linear(config.channels * size * size, NUM_CLASSES)]
    return nn.Sequential(*layers)


class CifarBackprop:
    """CIFAR-10 with local receptive fields trained by backpropagation (paper section 4, Table 1's BP row).

    ``data`` (a :class:`~.cifar_common.CifarData`) may be given to share one load between runs; it
    is used as given (the config's subsets and data_dir do not apply).
    The model is initialized from ``torch.manual_seed(config.seed)``.
    """

    name = "cifar-backprop"
    Config = CifarBackpropConfig
    data_name = "cifar10"
    train_error_name = "running_error"  # errors of the batches' forward passes, before each update

    def __init__(self, config: CifarBackpropConfig, data: CifarData | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.data = data if data is not None else load_data(config, self.device)
        self.data_source = self.data.source
        torch.manual_seed(config.seed)
        self.model = local_backprop_net(config).to(self.device)
        params = self.model.parameters()
        if config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
        # The factor depends on the finished epochs only, so a resumed run continues the same curve.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda done: config.lr_decay**done)

    def epoch_batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        return self.data.epoch_batches(generator, self.config.batch_size)

    def train_step(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One backprop update; returns (cross-entropy (0-dim), errors before the update (0-dim), batch size)."""
        images, labels = standardize(self.data.train_images[batch]), self.data.train_labels[batch]
        logits = self.model(images)
        loss = nn.functional.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), (logits.detach().argmax(1) != labels).sum(), labels.shape[0]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``<set>_error`` of the softmax for every evaluation set."""
        metrics = {}
        for name, (images, labels) in self.data.eval_sets.items():
            errors = sum((self.model(standardize(x)).argmax(1) != y).sum()
                         for x, y in zip(images.split(EVAL_BATCH), labels.split(EVAL_BATCH)))
            metrics[f"{name}_error"] = float(errors) / len(labels)
        return metrics
