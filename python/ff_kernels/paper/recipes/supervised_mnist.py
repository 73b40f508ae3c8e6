"""Supervised FF on MNIST with the label in the input (Hinton 2022, section 3.3).

Positive rows are images whose first 10 pixels carry the true label (one-of-N), negative rows
the same images with a wrong label. Every hidden layer learns by its own FF loss on the
normalized output of the layer below.

Classification (the paper's procedure (i)): run the net once per label and pick the label
whose goodness, accumulated over all hidden layers but the first, is best (highest; lowest
for "neg_ssq"); with a single hidden layer its goodness is used.

Block-wise goodness (``goodness_blocks=K``, section 5.3, off by default): every hidden layer
is an FFLinear with ``blocks=K``, whose K blocks of width/K units each learn by their own FF
loss (threshold width/K) and pass on their own normalized activities. A label's score then
sums the goodness of every block of the scored layers (``FFSequential.goodness`` sums a layer's
blocks), which for the squared goodness is the layers' sum of squares, as without blocks.

Hard negatives: the paper runs "a forward pass from a neutral label" (ten entries of 0.1)
and feeds the normalized activities of all but the first hidden layer to a softmax that is
learned during training. The softmax's probabilities of the wrong labels give the hard
negative labels, sampled in proportion. The softmax sees detached activities, so no
derivative enters the FF layers. Its error on the training batches is the running train
error (``train_error_softmax``), and on the evaluation set it is the paper's fast classifier
(ii).

The defaults follow Hinton's released Matlab code (ffnew.m) where the paper is silent: see
docs/defaults.md for each value and RESULTS.md for the runs behind them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ... import functional
from ...nn import FFLinear, FFSequential
from ...ops import validation
from ...ops.ext_local2d import cpu_ops_take
from ..data import MnistSplits, hard_wrong_labels, neutral_label, overlay_label, random_wrong_labels
from . import supervised_parallel
from .config import (
    COMPUTE_DTYPE,
    DEPTH,
    EPOCHS,
    GOODNESS_BLOCKS,
    INIT,
    INPUT_NORM,
    LINEAR_BACKEND,
    NEGATIVES,
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

NUM_CLASSES = 10
NUM_PIXELS = 28 * 28
COMPUTE_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16}
EVAL_BATCH = 1000
INPUT_NORM_EPS = 1e-6


@dataclass
class SupervisedMNISTConfig(FFConfig, MnistConfig):
    """Settings of the supervised MNIST recipe (section 3.3: 4 x 2000 ReLUs, 60 epochs, hard
    negative labels from a neutral-label pass); the rest is ffnew.m's (docs/defaults.md)."""

    epochs: int = EPOCHS(60)  # section 3.3
    width: int = WIDTH(2000)  # section 3.3
    depth: int = DEPTH(4)  # section 3.3
    optimizer: str = OPTIMIZER("sgd")  # ffnew.m
    peer_norm: float = PEER_NORM(0.06)  # footnote 9; ffnew.m's 0.03 beside the halved FF derivative
    negatives: str = NEGATIVES("hard")  # section 3.3
    rms_norm: bool = RMS_NORM(True)  # ffnormrows.m: unit mean square
    input_norm: bool = INPUT_NORM(True)  # ffnew.m
    init: str = INIT("normal")  # ffnew.m
    backend: str = LINEAR_BACKEND("auto")
    compute_dtype: str | None = COMPUTE_DTYPE(None)
    goodness_blocks: int | None = GOODNESS_BLOCKS(None)  # section 5.3 (not used for its results)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.goodness_blocks is not None and self.width % self.goodness_blocks:
            raise ValueError(f"goodness_blocks must divide width ({self.width}), got {self.goodness_blocks}")
        if self.goodness_blocks is not None and self.backend == "triton":
            raise ValueError("goodness_blocks needs backend auto, cpu or reference: the fused triton kernels have "
                             "no per-block goodness (auto runs block-wise layers on CUDA in torch ops)")


class ImagePart(NamedTuple):
    """What the rows of one image share in layer 1 (see :class:`LabelInInputNet`).

    preact: (B, width) the image pixels' part of layer 1's pre-activation, unscaled:
            ``images[:, 10:] @ W[:, 10:].T``
    square: (B,) the image pixels' sum of squares, ``images[:, 10:].square().sum(1)``
    """

    preact: torch.Tensor
    square: torch.Tensor


class LabelInInputNet(nn.Module):
    """An FF stack over 784 pixels (label in the first 10) plus the neutral-label softmax.

    ``net``: FFSequential of ``depth`` FFLinear layers (784 -> width -> ... -> width), each
    with peer normalization when ``config.peer_norm > 0``.
    ``head``: bias-free nn.Linear, zero at the start, over the concatenated normalized outputs
    of all hidden layers but the first (all of them when depth is 1) -> 10 logits.

    Shared first layer (``share_first_layer``, on by default): the label reaches the net only
    through layer 1's 10 label pixels, and the input scaling is one factor per row. So every row
    made from one image (neutral, positive, negative, the 10 labels of the test) has the
    pre-activation ``z = s * (image part + label part) + b`` with the image part
    ``images[:, 10:] @ W[:, 10:].T`` computed once per image (:meth:`image_part`), the label
    part ``code @ W[:, :10].T`` (a row of ``W[:, :10].T`` for a one-hot label) and the row's
    scale ``s = 1 / (sqrt(mean square of the row) + eps)`` from the image's and the code's sums
    of squares. The layer takes ``z`` instead of running its GEMM; its weight gradient reads
    the pixels of each positive/negative pair once (``label_columns``: the two rows are one
    image with two labels and the same scale). Off, every row runs through the whole GEMMs
    (the plain algorithm); both agree up to float rounding.
    """

    def __init__(self, config: SupervisedMNISTConfig) -> None:
        super().__init__()
        self.goodness_kind = config.goodness
        self.input_norm = config.input_norm
        self.share_first_layer = True
        sizes = [NUM_PIXELS] + [config.width] * config.depth
        blocks = config.goodness_blocks
        block_units = config.width // (blocks or 1)  # each goodness's units: its threshold, and T if none is given
        self.net = FFSequential(
            *(
                FFLinear(d_in, d_out, goodness=config.goodness, temperature=config.temperature or float(block_units),
                         rms_norm=config.rms_norm, backend=config.backend,
                         compute_dtype=COMPUTE_DTYPES[config.compute_dtype],
                         peer_norm=peer_norm_for(d_out, config.peer_norm), blocks=blocks)
                for d_in, d_out in itertools.pairwise(sizes)
            )
        )
        if config.init == "normal":
            for layer in self.net:
                normal_init_(layer)
        self.head = nn.Linear(config.width * len(self._scored_layers()), NUM_CLASSES, bias=False)
        nn.init.zeros_(self.head.weight)

    def _scored_layers(self) -> range:
        """Layers whose goodness and activities classify: all but the first, or all if only one."""
        return range(1 if len(self.net) > 1 else 0, len(self.net))

    def inputs(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The net's input rows: ``images`` (B, 784) with ``labels`` (int64 (B,) or (B, 10) float)
        in the first 10 pixels, scaled to unit mean square when ``input_norm``."""
        x = overlay_label(images, labels, NUM_CLASSES)
        if self.input_norm:
            x = x / (x.square().mean(1, keepdim=True).sqrt() + INPUT_NORM_EPS)
        return x

    # ------------------------------------------------------------ the shared first layer

    @torch.no_grad()
    def image_part(self, images: torch.Tensor) -> ImagePart:
        """Layer 1's work that every row of an image shares: images (B, 784) -> :class:`ImagePart`."""
        layer = self.net[0]
        pixels, weight = images[:, NUM_CLASSES:], layer.weight[:, NUM_CLASSES:]
        if layer.compute_dtype not in (None, weight.dtype):  # the layer's GEMMs run in bf16: so does this one
            preact = torch.mm(pixels.to(layer.compute_dtype), weight.to(layer.compute_dtype).t()).to(weight.dtype)
        else:
            preact = torch.mm(pixels, weight.t())
        return ImagePart(preact, pixels.square().sum(1))

    def _row_divisor(self, part: ImagePart, code_square: torch.Tensor) -> torch.Tensor | None:
        """(R, B, 1) ``sqrt(mean square) + eps`` of every row (R label sets x B images) from the
        codes' sums of squares (R, B) or (R, 1); None without input_norm."""
        if not self.input_norm:
            return None
        return ((part.square + code_square) / NUM_PIXELS).sqrt().add_(INPUT_NORM_EPS).unsqueeze(-1)

    @torch.no_grad()
    def first_preacts(self, part: ImagePart, labels: torch.Tensor) -> torch.Tensor:
        """Layer 1's pre-activations (R * B, width) of R label sets over the B images of ``part``,
        row r * B + b holding image b with label ``labels[r, b]``; equal to ``x @ W.T + b`` of
        those input rows (:meth:`inputs`) up to rounding.

        labels: int64 classes (R, B), or (R, 1) for one class per set; or float codes (R, B, 10)
        or (R, 1, 10) (e.g. the neutral label). On float32 CPU tensors one compiled pass
        (``label_preacts``) writes ``(label row + image part) / divisor + bias``; elsewhere the
        same operations in torch ops.
        """
        layer = self.net[0]
        sets, batch = labels.shape[0], part.preact.shape[0]
        label_weight = layer.weight[:, :NUM_CLASSES].t()  # (10, width)
        if labels.is_floating_point():  # each code's row of label weights, indexed per (set, image)
            label_rows, code_square = torch.matmul(labels, label_weight).flatten(0, 1), labels.square().sum(2)
            index = torch.arange(label_rows.shape[0], device=labels.device).view(labels.shape[:2])
        else:  # one-hot: a row of the label weights (from a contiguous copy of the label columns,
            # whose rows are strided in the weight), and a sum of squares of 1
            label_rows, index = label_weight.contiguous(), labels
            code_square = torch.ones(labels.shape, device=labels.device)
        index = index.expand(sets, batch)
        divisor = self._row_divisor(part, code_square)  # (R, B or 1, 1) or None
        if divisor is not None:
            divisor = divisor.squeeze(-1).expand(sets, batch)
        bias = layer.bias
        if cpu_ops_take(part.preact, label_rows, divisor, bias) and part.preact.is_contiguous():
            z = torch.ops.ff_kernels.label_preacts(part.preact, label_rows, index.contiguous(),
                                                   None if divisor is None else divisor.contiguous(), bias)
            return z.flatten(0, 1)
        z = label_rows.index_select(0, index.flatten()).view(sets, batch, -1).add_(part.preact)
        if divisor is not None and bias is not None:  # z / divisor + bias in one pass
            torch.addcdiv(bias, z, divisor.unsqueeze(-1), out=z)
        elif divisor is not None:
            z.div_(divisor.unsqueeze(-1))
        elif bias is not None:
            z.add_(bias)
        return z.flatten(0, 1)

    @torch.no_grad()
    def training_rows(self, images: torch.Tensor, labels: torch.Tensor, wrong: torch.Tensor,
                      part: ImagePart) -> tuple[torch.Tensor, torch.Tensor]:
        """The positive and negative input rows (2B, 784) (positives first, one tensor) and their
        layer-1 pre-activations (2B, width) from the shared ``part``."""
        both = torch.stack([labels, wrong])  # (2, B)
        x = images.repeat(2, 1)
        x[:, :NUM_CLASSES] = nn.functional.one_hot(both.flatten(), NUM_CLASSES).to(images.dtype)
        divisor = self._row_divisor(part, torch.ones(both.shape, device=images.device))
        if divisor is not None:
            x.div_(divisor.flatten(0, 1))
        return x, self.first_preacts(part, both)

    # ------------------------------------------------------------ the two test procedures

    def features(self, x: torch.Tensor | None, preact: torch.Tensor | None = None) -> torch.Tensor:
        """Head input for x: (B, 784) -> (B, width * scored layers) float32, without gradients
        (``preact``: layer 1's pre-activations, see ``FFSequential``)."""
        with torch.no_grad():
            outputs = self.net.activations(x, preact)
        return torch.cat([outputs[i].float() for i in self._scored_layers()], dim=1)

    def neutral_features(self, images: torch.Tensor, part: ImagePart | None = None) -> torch.Tensor:
        """The head's input (B, width * scored layers) from one pass with the neutral label, no gradients.

        ``part``: the images' :meth:`image_part`, if already computed (shared first layer only).
        """
        neutral = neutral_label(images.shape[0], NUM_CLASSES, images.device, images.dtype)
        if not self.share_first_layer:
            return self.features(self.inputs(images, neutral))
        part = self.image_part(images) if part is None else part
        return self.features(None, self.first_preacts(part, neutral[:1, None]))

    def head_logits(self, images: torch.Tensor, part: ImagePart | None = None) -> torch.Tensor:
        """Procedure (ii): softmax logits (B, 10) from one pass with the neutral label
        (:meth:`neutral_features`)."""
        return self.head(self.neutral_features(images, part))

    @torch.no_grad()
    def label_scores(self, images: torch.Tensor, part: ImagePart | None = None) -> torch.Tensor:
        """Procedure (i): accumulated goodness per label (B, 10), oriented so higher is better.

        images: (B, 784); the net runs once on all 10 * B labelled copies (from the images'
        shared :meth:`image_part`, or ``part`` if given, with the shared first layer).
        """
        batch = images.shape[0]
        if self.share_first_layer:
            part = self.image_part(images) if part is None else part
            every_label = torch.arange(NUM_CLASSES, device=images.device)[:, None]  # (10, 1)
            g = self.net.goodness(None, self.first_preacts(part, every_label))  # (10 * B, L)
        else:
            labels = torch.arange(NUM_CLASSES, device=images.device).repeat_interleave(batch)
            g = self.net.goodness(self.inputs(images.repeat(NUM_CLASSES, 1), labels))  # (10 * B, L)
        total = g[:, self._scored_layers()].sum(1).view(NUM_CLASSES, batch).t()
        return functional.goodness_sign(self.goodness_kind) * total


def make_optimizer(config: SupervisedMNISTConfig, model: LabelInInputNet) -> torch.optim.Optimizer:
    """SGD(momentum) or Adam with two parameter groups: the FF layers (``lr``, ``weight_decay``)
    first, then the softmax head (``head_lr``, ``head_weight_decay``).

    With SGD the FF layers are updated by their fused ``ff_step`` (momentum buffers in the
    layers) at group 0's learning rate, so the optimizer itself only steps the head; the FF
    parameters stay in group 0 so that the learning-rate schedule scales both. On the CPU and
    CUDA the optimizer is torch's fused one (same update, one kernel per step).
    """
    groups = [
        {"params": list(model.net.parameters()), "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": list(model.head.parameters()), "lr": config.head_lr, "weight_decay": config.head_weight_decay},
    ]
    fused = model.head.weight.device.type in ("cpu", "cuda")  # one kernel per step: the Python loop costs more
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, fused=fused)
    return torch.optim.SGD(groups, momentum=config.momentum, fused=fused)


class SupervisedMNIST:
    """MNIST with the label in the input (paper section 3.3): data, model, optimizer, step, evaluation.

    ``data`` may be given (already split, e.g. shared between runs) to skip loading; otherwise
    :func:`mnist_splits` reads ``config.data_dir``. Either way the config's subsets apply. The model
    is initialized from ``torch.manual_seed(config.seed)``. ``scheduler`` scales the learning
    rates once per epoch (the training loop steps it and keeps its state in the checkpoint).
    """

    name = "supervised"
    Config = SupervisedMNISTConfig
    train_error_name = "train_error_softmax"  # train_step counts the neutral-label softmax's errors

    def __init__(self, config: SupervisedMNISTConfig, data: MnistSplits | None = None) -> None:
        self.config = config
        attach_mnist(self, config, data)
        torch.manual_seed(config.seed)
        self.model = LabelInInputNet(config).to(self.device)
        self.optimizer = make_optimizer(config, self.model)
        self.scheduler = epoch_schedule(self.optimizer, config)
        self.parallel = None  # a ParallelContext once enable_parallel is called

    def enable_parallel(self, context) -> None:
        """Train as one rank of a parallel run (``context``: a ParallelContext); see ``supervised_parallel``."""
        supervised_parallel.enable(self, context)

    def train_pipeline_epoch(self, batches, generator: torch.Generator, totals) -> None:
        """Pipeline mode: train one epoch on ``batches`` (see ``supervised_parallel.pipeline_epoch``)."""
        supervised_parallel.pipeline_epoch(self, batches, generator, totals)

    def epoch_batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        """A shuffled epoch: index tensors of up to ``batch_size`` training rows each."""
        order = torch.randperm(self.train_labels.shape[0], generator=generator, device=generator.device)
        return list(order.to(self.device).split(self.config.batch_size))

    def train_step(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One update on the rows ``batch`` (index tensor).

        Returns (mean FF loss over the layers (0-dim), softmax errors on the batch before the
        update (0-dim), batch size). In data-parallel mode this rank trains on its shard and
        returns its shard's errors and size (the loss is the whole batch's).
        """
        if self.parallel is not None:
            return supervised_parallel.data_parallel_step(self, batch, generator)
        images, labels = self.train_images[batch], self.train_labels[batch]
        model = self.model
        part = model.image_part(images) if model.share_first_layer else None
        self.optimizer.zero_grad(set_to_none=True)
        # The rows below are built here from images checked once (attach_mnist) and unit-mean-square
        # labelled copies of them: the layers need not check them for NaN/Inf again. Non-finite
        # weights (a divergence) still show: in the neutral pass's goodness and in the loss,
        # which the training loop's guard checks every step.
        with validation.trusted_inputs():
            # the head's logits and its cross-entropy gradient in closed form (no autograd graph)
            logits = cross_entropy_grad_(model.head, model.neutral_features(images, part), labels)
            probs = torch.softmax(logits, dim=1)
            wrong = self.wrong_labels(probs, labels, generator)
            shared = {}
            if part is not None:  # the neutral, positive and negative rows share layer 1's image part
                x, preact = model.training_rows(images, labels, wrong, part)
                x_pos, x_neg = x.chunk(2)
                # and a positive row equals its negative one past the label: layer 1's weight gradient
                # reads the image columns once
                shared = {"preact": preact, "label_columns": NUM_CLASSES}
            else:
                x_pos, x_neg = model.inputs(images, labels), model.inputs(images, wrong)
            if self.config.optimizer == "sgd":
                losses = model.net.ff_step(x_pos, x_neg, **self.sgd_hyper(), **shared)
            else:
                losses = model.net.ff_backward(x_pos, x_neg, **shared)
        self.optimizer.step()
        errors = (probs.argmax(1) != labels).sum()
        return torch.stack(losses).mean(), errors, labels.shape[0]

    def wrong_labels(self, probs: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Negative labels (B,) for ``labels`` (B,): hard ones drawn from ``probs`` (B, 10), or random."""
        if self.config.negatives == "hard":
            return hard_wrong_labels(probs, labels, generator)
        return random_wrong_labels(labels, NUM_CLASSES, generator)

    def sgd_hyper(self) -> dict[str, float]:
        """The FF layers' fused SGD arguments now: lr (scheduled), momentum, weight_decay."""
        ff = self.optimizer.param_groups[0]
        return {"lr": ff["lr"], "momentum": self.config.momentum, "weight_decay": ff["weight_decay"]}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Error rates on the evaluation set: ``<split>_error`` by accumulated goodness (i)
        and ``<split>_error_softmax`` by the neutral-label softmax (ii). In a parallel run each
        rank evaluates its share of the set and the counts are summed."""
        images, labels = self.eval_images, self.eval_labels
        if self.parallel is not None:
            images = images.tensor_split(self.parallel.world_size)[self.parallel.rank]
            labels = labels.tensor_split(self.parallel.world_size)[self.parallel.rank]
        errors = torch.zeros(2, dtype=torch.long, device=labels.device)  # counted on the device, read once
        for image_batch, label_batch in zip(images.split(EVAL_BATCH), labels.split(EVAL_BATCH)):
            part = self.model.image_part(image_batch) if self.model.share_first_layer else None
            errors[0] += (self.model.label_scores(image_batch, part).argmax(1) != label_batch).sum()
            errors[1] += (self.model.head_logits(image_batch, part).argmax(1) != label_batch).sum()
        goodness_errors, softmax_errors = errors.tolist()
        if self.parallel is not None:
            goodness_errors, softmax_errors = self.parallel.sum([goodness_errors, softmax_errors])
        n = self.eval_labels.shape[0]
        return {f"{self.eval_name}_error": goodness_errors / n, f"{self.eval_name}_error_softmax": softmax_errors / n}
