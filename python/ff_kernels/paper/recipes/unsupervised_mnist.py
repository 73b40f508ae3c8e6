"""Unsupervised FF on MNIST with hybrid images as negative data (Hinton 2022, section 3.2).

Positive rows are real images, negative rows hybrids of two images of the batch under a mask
of large regions (:mod:`ff_kernels.paper.data.hybrid`, Figure 1). Every hidden layer learns by its
own FF loss on the normalized output of the layer below; no label reaches the FF layers.

Evaluation (the paper's): "the normalized activity vectors of the last three hidden layers as
the inputs to a softmax that is trained to predict the label" ("using the first hidden layer
as part of the input to the linear classifier makes the test performance worse"). The
softmax is a linear layer learned with cross-entropy alongside the FF layers, on their
detached outputs for the positive (real) images of each batch, so no derivative enters the
FF layers; after training, ``ff-readout`` (:mod:`ff_kernels.paper.readout`) fits it once more on
the frozen features. ``train_error_softmax`` is its error on each training batch before the update,
``<split>_error`` its error on the evaluation set (the headline number, 1.37% in the paper
after 100 epochs of 4 x 2000 ReLUs). ``<split>_ff_error`` tells how well the FF layers
themselves separate evaluation images from hybrids of them: the fraction of the 2N rows (N
images, N hybrids, drawn with a fixed seed) whose p(positive), averaged over the layers, is on
the wrong side of 1/2.

The paper gives the architecture and the epochs only. The remaining settings (optimizer,
learning rates, weight decay, schedule, normalization, initialization, peer normalization,
softmax) are those of the supervised recipe (:mod:`.supervised_mnist`, after Hinton's
released Matlab code), whose helpers build the optimizer and the learning-rate schedule.

Observed on the CPU (all 60,000 training images, official test set): 2 x 500 ReLUs, 2 epochs:
5.31% test error, 17.8% real-vs-hybrid error; the same run with untrained FF layers (lr 1e-9,
no peer normalization) gives 6.74% and 50%. An epoch of the full 4 x 2000 net takes about
70 s of training and 4 s of evaluation on two otherwise idle Cascade Lake cores.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ... import functional
from ...nn import FFLinear, FFSequential
from ..data import MnistSplits, hybrid_negatives
from ..data.hybrid import BLUR_STEPS
from . import hybrid_parallel
from .checks import check_choices, check_sgd_settings
from .layers import normal_init_, peer_norm_for
from .mnist_setup import attach_mnist
from .schedule import LR_SCHEDULES, epoch_schedule
from .supervised_mnist import (
    COMPUTE_DTYPES,
    EVAL_BATCH,
    INITS,
    INPUT_NORM_EPS,
    NUM_CLASSES,
    NUM_PIXELS,
    OPTIMIZERS,
    SupervisedMNISTConfig,
    make_optimizer,
)

# The settings the paper leaves open default to the supervised recipe's, read from its config
# class, so that retuning them there carries over (the learning test here guards the result).
SUPERVISED = SupervisedMNISTConfig

IMAGE_SHAPE = (1, 28, 28)
FF_ERROR_SEED = 12345  # hybrids of the evaluation images: the same every epoch and every run


def check_common_settings(config, positive_ints: tuple[str, ...]) -> None:
    """Validate the settings the unsupervised recipes share with the supervised one."""
    for name in positive_ints:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if config.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (hybrids mix two images of a batch), got {config.batch_size}")
    if isinstance(config.blur_steps, bool) or not isinstance(config.blur_steps, int) or config.blur_steps < 0:
        raise ValueError(f"blur_steps must be an int >= 0, got {config.blur_steps!r}")
    check_sgd_settings(config)
    check_choices(config, (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES), ("init", INITS)))
    if config.temperature is not None and not config.temperature > 0:
        raise ValueError(f"temperature must be > 0 or None (the number of units), got {config.temperature}")
    functional.check_goodness(config.goodness)


@dataclass
class UnsupervisedMNISTConfig:
    """Settings of the unsupervised MNIST recipe.

    Section 3.2: "a network with four hidden layers of 2000 ReLUs each" trained "for 100
    epochs", a softmax on the last three hidden layers. Every field set from ``SUPERVISED``
    takes the supervised recipe's default (see :class:`SupervisedMNISTConfig` for where each
    comes from); ``blur_steps`` is :data:`~ff_kernels.paper.data.hybrid.BLUR_STEPS`.
    """

    epochs: int = 100  # section 3.2
    eval_every: int = 1  # evaluate after every N-th epoch and the last (ff_kernels.paper.train.evaluation_due)
    width: int = 2000  # section 3.2
    depth: int = 4  # section 3.2
    head_layers: int = 3  # the softmax reads the last min(head_layers, depth) hidden layers (section 3.2)
    blur_steps: int = BLUR_STEPS  # blurring passes of the hybrid masks (data/hybrid.py)
    batch_size: int = SUPERVISED.batch_size
    optimizer: str = SUPERVISED.optimizer  # "sgd" (momentum, fused into the FF layer ops) or "adam"
    lr: float = SUPERVISED.lr  # FF layers
    momentum: float = SUPERVISED.momentum  # SGD only
    weight_decay: float = SUPERVISED.weight_decay  # FF layers
    lr_schedule: str = SUPERVISED.lr_schedule  # see schedule.lr_factor
    head_lr: float = SUPERVISED.head_lr  # softmax
    head_weight_decay: float = SUPERVISED.head_weight_decay  # softmax
    peer_norm: float = SUPERVISED.peer_norm  # peer-normalization strength (footnote 9); 0 = off
    goodness: str = SUPERVISED.goodness
    # p(positive) = sigmoid((G - N) / temperature), N the layer's number of units; None: N.
    temperature: float | None = SUPERVISED.temperature
    rms_norm: bool = SUPERVISED.rms_norm  # hidden activities passed on with unit mean square (else unit length)
    input_norm: bool = SUPERVISED.input_norm  # input images scaled to unit mean square
    init: str = SUPERVISED.init  # "normal": N(0, 1 / fan_in), biases 0; "uniform": nn.Linear's init
    train_subset: int | None = None  # first N training images
    eval_subset: int | None = None  # first N evaluation images
    validation: bool = False  # True: 50k train + 10k validation; False: 60k train + official test
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    compute_dtype: str | None = None  # None, "float32" or "bfloat16" (the CPU backend's GEMMs)
    data_dir: str | None = None

    def __post_init__(self) -> None:
        check_common_settings(self, ("epochs", "eval_every", "width", "depth", "head_layers", "batch_size"))
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")


class HybridFFNet(nn.Module):
    """An FF stack trained on images vs hybrids, plus the softmax that reads its last layers.

    ``net``: an FFSequential taking input rows shaped ``input_shape`` per image.
    ``head``: bias-free nn.Linear, zero at the start, over the concatenated (flattened)
    normalized outputs of the last ``head_layers`` layers -> 10 logits.
    """

    def __init__(self, net: FFSequential, input_shape: tuple[int, ...], head_layers: int, input_norm: bool) -> None:
        super().__init__()
        self.net = net
        self.input_shape = tuple(input_shape)
        self.input_norm = input_norm
        self.head_indices = tuple(range(max(len(net) - head_layers, 0), len(net)))
        probe = torch.zeros(1, *self.input_shape, device=net[0].weight.device, dtype=net[0].weight.dtype)
        with torch.no_grad():
            sizes = [out[0].numel() for out in net.activations(probe)]
        self.head = nn.Linear(sum(sizes[i] for i in self.head_indices), NUM_CLASSES, bias=False)
        nn.init.zeros_(self.head.weight)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The net's input: flat images (B, 784) reshaped to ``(B, *input_shape)``, each scaled to
        unit mean square when ``input_norm``."""
        x = images
        if self.input_norm:
            x = x / (x.square().mean(1, keepdim=True).sqrt() + INPUT_NORM_EPS)
        return x.reshape(x.shape[0], *self.input_shape)

    def head_features(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Concatenated detached float32 outputs of the head's layers: (B, head input)."""
        return torch.cat([outputs[i].detach().flatten(1).float() for i in self.head_indices], dim=1)

    @torch.no_grad()
    def outputs_and_goodness(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One forward pass: per-layer normalized outputs and goodness (B, L) float32."""
        outputs, columns = [], []
        for layer in self.net:
            x, g = layer.forward_with_goodness(x)
            outputs.append(x)
            columns.append(g)
        return outputs, torch.stack(columns, dim=1)

    def positive_probability(self, goodness: torch.Tensor) -> torch.Tensor:
        """p(positive) (B, L) of every layer from the goodness (B, L)."""
        return torch.stack([
            functional.positive_probability(goodness[:, i], layer.goodness_fn, layer.threshold, layer.temperature)
            for i, layer in enumerate(self.net)
        ], dim=1)


def build_dense_net(config: UnsupervisedMNISTConfig) -> HybridFFNet:
    """784 -> width -> ... -> width FFLinear layers (``depth`` of them) with the softmax head."""
    sizes = [NUM_PIXELS] + [config.width] * config.depth
    layers = [
        FFLinear(d_in, d_out, goodness=config.goodness, temperature=config.temperature or float(d_out),
                 rms_norm=config.rms_norm, backend=config.backend, compute_dtype=COMPUTE_DTYPES[config.compute_dtype],
                 peer_norm=peer_norm_for(d_out, config.peer_norm))
        for d_in, d_out in itertools.pairwise(sizes)
    ]
    if config.init == "normal":
        for layer in layers:
            normal_init_(layer)
    return HybridFFNet(FFSequential(*layers), (NUM_PIXELS,), config.head_layers, config.input_norm)


class UnsupervisedMNIST:
    """MNIST with hybrid negatives and a softmax on the top layers (paper section 3.2).

    ``data`` may be given (already split) to skip loading; otherwise :func:`mnist_splits` reads
    ``config.data_dir``. The config's subsets apply either way. The model is initialized from
    ``torch.manual_seed(config.seed)``; ``scheduler`` scales the learning rates once per epoch.
    Subclasses change the net by overriding :meth:`build_model` (see :mod:`.local_mnist`).
    """

    name = "unsupervised"
    Config = UnsupervisedMNISTConfig
    train_error_name = "train_error_softmax"  # train_step counts the softmax's errors

    def __init__(self, config, data: MnistSplits | None = None) -> None:
        self.config = config
        attach_mnist(self, config, data)
        torch.manual_seed(config.seed)
        self.model = self.build_model(config).to(self.device)
        self.optimizer = make_optimizer(config, self.model)
        self.scheduler = epoch_schedule(self.optimizer, config)
        self.parallel = None  # a ParallelContext once enable_parallel is called

    @staticmethod
    def build_model(config) -> HybridFFNet:
        return build_dense_net(config)

    def enable_parallel(self, context) -> None:
        """Train as one rank of a data-parallel run (``context``: a ParallelContext); see ``hybrid_parallel``."""
        hybrid_parallel.enable(self, context)

    def sgd_hyper(self) -> dict[str, float]:
        """The FF layers' fused SGD arguments now: lr (scheduled), momentum, weight_decay."""
        ff = self.optimizer.param_groups[0]
        return {"lr": ff["lr"], "momentum": self.config.momentum, "weight_decay": ff["weight_decay"]}

    def epoch_batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        """A shuffled epoch: index tensors of ``batch_size`` training rows each; a last batch of
        one image (it has no partner to mix with) is dropped."""
        order = torch.randperm(self.train_labels.shape[0], generator=generator, device=generator.device)
        batches = list(order.to(self.device).split(self.config.batch_size))
        return [b for b in batches if b.numel() >= 2]

    def _ff_update(self, x_pos: torch.Tensor, x_neg: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every FF layer's update (fused SGD, or gradients for Adam) like FFSequential.ff_step /
        ff_backward; returns (losses, the positive rows' normalized outputs per layer), the
        outputs computed with the weights before the update."""
        hyper = self.sgd_hyper() if self.config.optimizer == "sgd" else None
        n_pos = x_pos.shape[0]
        losses, outputs = [], []
        for layer in self.model.net:
            if hyper is not None:
                step = layer.ff_step(x_pos, x_neg, **hyper, return_step=True)
            else:
                step = layer.ff_backward(x_pos, x_neg, return_step=True)
            losses.append(step.loss)
            x_pos, x_neg = step.output[:n_pos], step.output[n_pos:]
            outputs.append(x_pos)
        return losses, outputs

    def train_step(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One update on the rows ``batch`` (index tensor): FF layers on images vs hybrids, the
        softmax on the detached outputs of the images.

        Returns (mean FF loss over the layers (0-dim), softmax errors on the batch before the
        update (0-dim), batch size). In data-parallel mode this rank trains on its shard and
        returns its shard's errors and size (the loss is the whole batch's); see ``hybrid_parallel``.
        """
        if self.parallel is not None:
            return hybrid_parallel.data_parallel_step(self, batch, generator)
        images, labels = self.train_images[batch], self.train_labels[batch]
        negatives = hybrid_negatives(images, generator, self.config.blur_steps)
        self.optimizer.zero_grad(set_to_none=True)
        losses, outputs = self._ff_update(self.model.inputs(images), self.model.inputs(negatives))
        logits = self.model.head(self.model.head_features(outputs))
        nn.functional.cross_entropy(logits, labels).backward()
        self.optimizer.step()
        errors = (logits.detach().argmax(1) != labels).sum()
        return torch.stack(losses).mean(), errors, labels.shape[0]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``<split>_error``: the softmax's error on the evaluation set; ``<split>_ff_error``: the
        FF layers' error telling the evaluation images from hybrids of them (see the module doc).
        In a parallel run every rank evaluates the whole set (the replicas are identical)."""
        generator = torch.Generator(device=self.eval_images.device).manual_seed(FF_ERROR_SEED)
        softmax_errors = ff_errors = ff_rows = 0
        for images, labels in zip(self.eval_images.split(EVAL_BATCH), self.eval_labels.split(EVAL_BATCH)):
            outputs, g_pos = self.model.outputs_and_goodness(self.model.inputs(images))
            softmax_errors += int((self.model.head(self.model.head_features(outputs)).argmax(1) != labels).sum())
            ff_errors += int((self.model.positive_probability(g_pos).mean(1) <= 0.5).sum())
            ff_rows += images.shape[0]
            if images.shape[0] >= 2:  # a lone last image has no partner: it counts as a positive only
                hybrids = hybrid_negatives(images, generator, self.config.blur_steps)
                _, g_neg = self.model.outputs_and_goodness(self.model.inputs(hybrids))
                ff_errors += int((self.model.positive_probability(g_neg).mean(1) > 0.5).sum())
                ff_rows += images.shape[0]
        n = self.eval_labels.shape[0]
        return {f"{self.eval_name}_error": softmax_errors / n, f"{self.eval_name}_ff_error": ff_errors / ff_rows}
