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

Observations on the CPU are in docs/defaults.md.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from ... import functional
from ...nn import FFLinear, FFSequential
from ..data import MnistSplits, hybrid_negatives
from ..data.hybrid import BLUR_STEPS
from ..options import Option
from . import hybrid_parallel
from .config import (
    BATCH_SIZE,
    COMPUTE_DTYPE,
    DEPTH,
    EPOCHS,
    HEAD_LAYERS,
    INIT,
    INPUT_NORM,
    LINEAR_BACKEND,
    OPTIMIZER,
    PEER_NORM,
    RMS_NORM,
    WIDTH,
    FFConfig,
    MnistConfig,
)
from .layer_setup import normal_init_, peer_norm_for
from .mnist_recipe import attach_mnist
from .schedule import epoch_schedule
from .softmax_head import cross_entropy_grad_
from .supervised_mnist import COMPUTE_DTYPES, EVAL_BATCH, INPUT_NORM_EPS, NUM_CLASSES, NUM_PIXELS, make_optimizer

IMAGE_SHAPE = (1, 28, 28)
FF_ERROR_SEED = 12345  # hybrids of the evaluation images: the same every epoch and every run
BLUR = Option("blurring passes of the hybrid masks", min=0)


@dataclass
class HybridConfig(FFConfig, MnistConfig):
    """What the recipes with hybrid negatives share (unsupervised and local, section 3.2); the
    settings the paper leaves open are the supervised recipe's (docs/defaults.md)."""

    batch_size: int = BATCH_SIZE.but(min=2, help="images per batch (hybrids mix two images of a batch)")(100)
    head_layers: int = HEAD_LAYERS(3)  # section 3.2: "the last three hidden layers"
    blur_steps: int = BLUR(BLUR_STEPS)  # data/hybrid.py
    optimizer: str = OPTIMIZER("sgd")
    peer_norm: float = PEER_NORM(0.06)  # footnote 9
    rms_norm: bool = RMS_NORM(True)
    input_norm: bool = INPUT_NORM(True)
    init: str = INIT("normal")


@dataclass
class UnsupervisedMNISTConfig(HybridConfig):
    """Settings of the unsupervised MNIST recipe (section 3.2: four hidden layers of 2000 ReLUs,
    100 epochs, a softmax on the last three hidden layers)."""

    epochs: int = EPOCHS(100)  # section 3.2
    width: int = WIDTH(2000)  # section 3.2
    depth: int = DEPTH(4)  # section 3.2
    backend: str = LINEAR_BACKEND("auto")
    compute_dtype: str | None = COMPUTE_DTYPE(None)


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
        """Concatenated detached float32 outputs of the head's layers, each flattened like
        ``.flatten(1)``: (B, head input), written in one copy per layer whatever the outputs'
        memory layout (FFLocal2d's CPU outputs are channels-last)."""
        chosen = [outputs[i].detach() for i in self.head_indices]
        sizes = [math.prod(o.shape[1:]) for o in chosen]
        features = chosen[0].new_empty(chosen[0].shape[0], sum(sizes), dtype=torch.float32)
        for o, part in zip(chosen, features.split(sizes, dim=1), strict=True):
            part.view(o.shape).copy_(o)
        return features

    def head_blocks(self, outputs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The head's input as blocks for :func:`.softmax_head.cross_entropy_grad_`: each head
        layer's detached float32 output as rows (B, F_i) in its memory order (a view when the
        output is contiguous or channels-last) and the head input index of each column."""
        blocks, offset = [], 0
        for i in self.head_indices:
            o = outputs[i].detach().float()
            in_memory_order = o.dim() == 4 and not o.is_contiguous() and o.is_contiguous(memory_format=torch.channels_last)
            rows = (o.permute(0, 2, 3, 1) if in_memory_order else o).reshape(o.shape[0], -1)
            blocks.append((rows, _head_columns(tuple(o.shape[1:]), in_memory_order, offset, o.device)))
            offset += rows.shape[1]
        return blocks

    @torch.no_grad()
    def outputs_and_goodness(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One forward pass: per-layer normalized outputs and goodness (B, L) float32."""
        return self.net.outputs_and_goodness(x)

    def positive_probability(self, goodness: torch.Tensor) -> torch.Tensor:
        """p(positive) (B, L) of every layer from the goodness (B, L)."""
        return torch.stack([
            functional.positive_probability(goodness[:, i], layer.goodness_kind, layer.threshold, layer.temperature)
            for i, layer in enumerate(self.net)
        ], dim=1)


@functools.lru_cache(maxsize=64)
def _head_columns(shape: tuple[int, ...], channels_last: bool, offset: int, device: torch.device) -> torch.Tensor:
    """int64 (prod(shape),): the ``.flatten(1)`` index (plus ``offset``) of each element of an
    output of ``shape`` per row, in its memory order ((H, W, C) when ``channels_last``)."""
    index = torch.arange(math.prod(shape)).view(shape)
    if channels_last:
        index = index.permute(1, 2, 0)
    return (index.reshape(-1) + offset).to(device)


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

    def write_figures(self, run_dir) -> list:
        """The run's figures (``ff-train RECIPE --figures``): see :func:`~ff_kernels.paper.figures.write_run_figures`."""
        from ..figures import write_run_figures

        return write_run_figures(self, run_dir)

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
        """Every FF layer's update (fused SGD, or gradients for Adam) through
        FFSequential.train_steps, as ff_step / ff_backward do; returns (losses, the positive rows'
        normalized outputs per layer), the outputs computed with the weights before the update."""
        if self.config.optimizer == "sgd":
            hyper = self.sgd_hyper()
            step_fn = lambda layer, p, n: layer.ff_step(p, n, **hyper, return_step=True)
        else:
            step_fn = lambda layer, p, n: layer.ff_backward(p, n, return_step=True)
        # the rows are the images checked once (attach_mnist) and their hybrids, at unit mean square
        steps = self.model.net.train_steps(x_pos, x_neg, step_fn, inputs_checked=True)
        n_pos = x_pos.shape[0]
        return [step.loss for step in steps], [step.output[:n_pos] for step in steps]

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
        x = self.model.inputs(torch.cat([images, negatives]))  # one block of rows: the layers read it without a copy
        losses, outputs = self._ff_update(x[: labels.shape[0]], x[labels.shape[0]:])
        logits = cross_entropy_grad_(self.model.head, self.model.head_blocks(outputs), labels)
        self.optimizer.step()
        errors = (logits.argmax(1) != labels).sum()
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
            softmax_errors += (self.model.head(self.model.head_features(outputs)).argmax(1) != labels).sum()
            ff_errors += (self.model.positive_probability(g_pos).mean(1) <= 0.5).sum()
            ff_rows += images.shape[0]
            if images.shape[0] >= 2:  # a lone last image has no partner: it counts as a positive only
                hybrids = hybrid_negatives(images, generator, self.config.blur_steps)
                _, g_neg = self.model.outputs_and_goodness(self.model.inputs(hybrids))
                ff_errors += (self.model.positive_probability(g_neg).mean(1) > 0.5).sum()
                ff_rows += images.shape[0]
        n = self.eval_labels.shape[0]
        return {f"{self.eval_name}_error": float(softmax_errors) / n,
                f"{self.eval_name}_ff_error": float(ff_errors) / ff_rows}
