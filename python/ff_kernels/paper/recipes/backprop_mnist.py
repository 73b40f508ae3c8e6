"""The backpropagation baseline on MNIST (Hinton 2022, section 3.1).

The same net as the FF recipes, "4 hidden layers each containing 2000 ReLUs and full
connectivity between layers", permutation invariant (flat pixels, no augmentation), trained
end to end with backpropagation of the cross-entropy of a 10-way softmax output layer. The paper
reports about 1.4% test error after 20 epochs, without regularizers (dropout or label smoothing
bring it to about 1.1%).

The paper gives no optimizer, learning rate or batch size; the defaults here are chosen by the
short runs recorded in RESULTS.md. The learning rate decays exponentially, by ``lr_decay`` per
epoch, applied per step: ``lr * lr_decay ** (step / steps_per_epoch)``. The schedule depends on
the step count only, not on the total number of epochs, so a run resumed with more epochs
continues the same curve. The step count is kept in the optimizer's parameter group, so it is
part of the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..data import MnistSplits
from ..options import Option
from . import backprop_parallel
from .config import BATCH_SIZE, DEPTH, EPOCHS, LR, LR_DECAY, OPTIMIZER, WEIGHT_DECAY, WIDTH, MnistConfig
from .mnist_recipe import attach_mnist

NUM_CLASSES = 10
NUM_PIXELS = 28 * 28
EVAL_BATCH = 1000
STEP_KEY = "schedule_step"  # optimizer param-group entry counting the updates made so far


@dataclass
class BackpropMNISTConfig(MnistConfig):
    """Settings of the backprop baseline: section 3.1's net (4 x 2000 ReLUs, fully connected,
    about 20 epochs, 1.4% test error, no regularizer); the optimizer, learning rate, its decay and
    the batch size are not in the paper (chosen by short runs: docs/defaults.md)."""

    epochs: int = EPOCHS(20)  # section 3.1
    width: int = WIDTH(2000)  # section 3.1
    depth: int = DEPTH(4)  # section 3.1
    batch_size: int = BATCH_SIZE(500)  # the work of batch 100 in a third of the time (RESULTS.md)
    lr: float = LR.but(help="initial learning rate")(2e-3)
    lr_decay: float = LR_DECAY.but(help="learning-rate factor per epoch, applied per step; 1 = constant")(0.8)
    optimizer: str = OPTIMIZER.but(help="adam, or sgd with momentum 0.9")("adam")
    weight_decay: float = WEIGHT_DECAY.but(help="L2 coefficient")(0.0)  # section 3.1: no regularizer
    dropout: float = Option("drop probability of the hidden units", min=0, below=1)(0.0)  # section 3.1: none


def mlp(config: BackpropMNISTConfig) -> nn.Sequential:
    """784 -> width (ReLU, dropout) x depth -> 10 logits, torch's default initialization."""
    layers: list[nn.Module] = []
    d_in = NUM_PIXELS
    for _ in range(config.depth):
        layers += [nn.Linear(d_in, config.width), nn.ReLU()]
        if config.dropout > 0:
            layers.append(nn.Dropout(config.dropout))
        d_in = config.width
    layers.append(nn.Linear(d_in, NUM_CLASSES))
    return nn.Sequential(*layers)


def make_optimizer(config: BackpropMNISTConfig, params, device: torch.device) -> torch.optim.Optimizer:
    """Adam or SGD with momentum 0.9 (L2 ``weight_decay``), with the schedule's step counter at 0.

    Adam uses the fused implementation (one kernel for all parameters) on CPU and CUDA: on the
    2-core CPU its step takes ~30 ms instead of ~300 ms for the 13.6 M parameters of 4 x 2000.
    """
    if config.optimizer == "adam":
        fused = device.type in ("cpu", "cuda")
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    else:
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    for group in optimizer.param_groups:
        group[STEP_KEY] = 0
    return optimizer


class BackpropMNIST:
    """Backprop baseline (paper section 3.1): the 4 x 2000 ReLU MLP trained with cross-entropy.

    ``data`` may be given (already split) to skip loading; otherwise :func:`mnist_splits` reads
    ``config.data_dir``. Either way the config's subsets apply. The model is initialized from
    ``torch.manual_seed(config.seed)``.
    """

    name = "backprop"
    Config = BackpropMNISTConfig
    train_error_name = "train_error"  # errors of the batches' forward passes, before each update

    def __init__(self, config: BackpropMNISTConfig, data: MnistSplits | None = None) -> None:
        self.config = config
        attach_mnist(self, config, data)
        self.steps_per_epoch = math.ceil(self.train_labels.shape[0] / config.batch_size)
        torch.manual_seed(config.seed)
        self.model = mlp(config).to(self.device)
        self.optimizer = make_optimizer(config, self.model.parameters(), self.device)
        self.parallel = None  # a ParallelContext once enable_parallel is called

    def enable_parallel(self, context) -> None:
        """Train as one rank of a data-parallel run (``context``: a ParallelContext); see ``backprop_parallel``."""
        backprop_parallel.enable(self, context)

    def learning_rate(self, step: int) -> float:
        """The learning rate of update number ``step`` (0-based): lr * lr_decay ** (step / steps_per_epoch)."""
        return self.config.lr * self.config.lr_decay ** (step / self.steps_per_epoch)

    def epoch_batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        """A shuffled epoch: index tensors of up to ``batch_size`` training rows each."""
        order = torch.randperm(self.train_labels.shape[0], generator=generator, device=generator.device)
        return list(order.to(self.device).split(self.config.batch_size))

    def train_step(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One backprop update on the rows ``batch`` (index tensor).

        Returns (cross-entropy of the batch (0-dim), errors on the batch before the update
        (0-dim), batch size). Dropout masks come from torch's global generator, which the
        checkpoint saves. In data-parallel mode this rank trains on its shard and returns its
        shard's loss, errors and size; see ``backprop_parallel``.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(group[STEP_KEY])
            group[STEP_KEY] += 1
        if self.parallel is not None:
            return backprop_parallel.data_parallel_step(self, batch)
        images, labels = self.train_images[batch], self.train_labels[batch]
        self.model.train()
        logits = self.model(images)
        loss = nn.functional.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        errors = (logits.detach().argmax(1) != labels).sum()
        return loss.detach(), errors, labels.shape[0]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``<split>_error``: the error rate of the softmax output on the evaluation set (in a
        parallel run every rank evaluates the whole set; the replicas are identical)."""
        self.model.eval()
        errors = 0
        for images, labels in zip(self.eval_images.split(EVAL_BATCH), self.eval_labels.split(EVAL_BATCH)):
            errors += (self.model(images).argmax(1) != labels).sum()
        return {f"{self.eval_name}_error": float(errors) / self.eval_labels.shape[0]}
