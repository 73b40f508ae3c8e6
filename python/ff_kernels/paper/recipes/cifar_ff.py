"""Supervised FF on CIFAR-10 with local receptive fields and top-down connections (Hinton 2022, section 4).

The net (:class:`~ff_kernels.paper.recipes.cifar_ff_net.FFRecurrentLocal`): 2 or 3 hidden layers, each a
32x32 topographic map with 3 ReLUs per location; every unit has an 11x11 bottom-up receptive
field in the layer below (11 x 11 x 3 = 363 inputs for the image) and, except in the last hidden
layer, an 11x11 top-down field in the layer above; the last hidden layer gets the label (10
inputs) instead. It runs as a recurrent net like the one of section 3.4: a bottom-up pass, then
synchronous damped iterations (new pre-normalized state = 0.3 x previous + 0.7 x computed).
Positive rows carry the true label, negative rows a wrong one (hard negatives from the softmax
below, as in section 3.3). Each layer learns by its own FF loss at iterations
``train_from``..``train_iterations`` (default 1..6: 6 is the last one the test scores; the paper
does not say which it trained on); "ssq" is the paper's "max ssq", "neg_ssq" its "min ssq" (positives low).

Two test procedures (the columns of the paper's Table 1):

    "compute goodness for every label"  ``<set>_error``: run the net with each label and pick the
        label with the best goodness summed over the hidden layers and iterations
        ``score_from..score_to`` (the paper runs 10 iterations and sums 4 to 6; iterations after
        ``score_to`` do not change the score, so the net stops there).
    "one-pass softmax"  ``<set>_error_softmax``: a softmax over the normalized activities of the
        bottom-up pass with a neutral label (0.1 each), learned alongside on detached
        activities (bias-free, zero at the start); its probabilities also pick the hard
        negatives, and its error on each training batch before the update is
        ``running_error_softmax``.

``<set>`` is "train" (the first ``train_eval_subset`` training images), "test" and, with the
JPEG archive, "test_exact" (see :mod:`.cifar_common`).

The paper gives the architecture, weight decay and the test procedures only. The optimizer
settings are those of the supervised MNIST recipe (Hinton's ffnew.m, see
:class:`~ff_kernels.paper.recipes.supervised_mnist.SupervisedMNISTConfig`); images are standardized per
channel (``input_norm``, not the default: then scaled per image to unit mean square, as ffnew.m
scales its MNIST rows); the label enters as a one-hot vector (neutral: 0.1 each), times
``label_scale`` (default 1; not in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ... import functional
from ..data import hard_wrong_labels, neutral_label, random_wrong_labels
from ..options import Option
from .cifar_common import IMAGE_SHAPE, NUM_CLASSES, CifarConfig, CifarData, load_data, standardize
from .cifar_ff_net import LOSSES, FFRecurrentLocal, LocalBottomUp
from .config import (
    DAMPING,
    GOODNESS,
    HEAD_LAYERS,
    INPUT_NORM,
    NEGATIVES,
    OPTIMIZER,
    RMS_NORM,
    SCORE_FROM,
    SCORE_TO,
    FFConfig,
)
from .schedule import epoch_schedule

INPUT_NORM_EPS = 1e-6
LABEL_BATCH = 100  # images per evaluation chunk: the net runs on 10 labelled copies of each
TRAIN_ITERATIONS = Option("training: FF losses at iterations up to N after the bottom-up pass", min=1)
TRAIN_FROM = Option("training: first iteration with an FF loss", min=1)
LABEL_SCALE = Option("the label input's size: one-hot (and neutral) label vectors times this factor", above=0)
LOSS = Option("threshold: each row's goodness against the threshold (the paper's); pairwise: softplus of the "
              "goodness difference between an image's true- and wrong-label rows (not in the paper)", choices=LOSSES)


@dataclass
class CifarFFConfig(FFConfig, CifarConfig):
    """Settings of the CIFAR-10 FF recipe; the comments say where each default comes from. The
    receptive field is also that of the top-down inputs."""

    train_iterations: int = TRAIN_ITERATIONS(6)  # not in the paper; 6 = the last scored iteration
    train_from: int = TRAIN_FROM(1)  # not in the paper
    score_from: int = SCORE_FROM(4)  # section 4: goodness accumulated over iterations 4 to 6
    score_to: int = SCORE_TO(6)
    damping: float = DAMPING(0.3)  # section 3.4: new state = 0.3 x previous + 0.7 x computed
    goodness: str = GOODNESS.but(help="ssq = the paper's max ssq, neg_ssq = min ssq (Table 1's two FF rows)")("ssq")
    head_layers: int = HEAD_LAYERS(3)  # the one-pass softmax reads the last min(head_layers, depth) layers
    optimizer: str = OPTIMIZER("sgd")  # the supervised recipe's (ffnew.m)
    negatives: str = NEGATIVES("hard")  # section 3.3
    loss: str = LOSS("threshold")  # the paper's
    rms_norm: bool = RMS_NORM(True)
    # not in the paper for CIFAR-10 (ffnew.m scales MNIST input rows so); off: the paper's setup as we had it
    input_norm: bool = INPUT_NORM.but(help="scale each standardized image to unit mean square before the net "
                                           "(default: standardized per channel only)")(False)
    label_scale: float = LABEL_SCALE(1.0)  # not in the paper: 1 = a plain one-hot label

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.train_from <= self.train_iterations:
            raise ValueError(f"the trained iterations must satisfy train_from <= train_iterations, got {self.train_from}, "
                             f"{self.train_iterations}")
        if not self.score_from <= self.score_to:
            raise ValueError(f"the scored iterations must satisfy score_from <= score_to, got {self.score_from}, "
                             f"{self.score_to}")


class CifarFFNet(nn.Module):
    """The recurrent local FF net plus the one-pass softmax.

    ``net``: FFRecurrentLocal over standardized images (B, 3, 32, 32) and 10-way labels.
    ``head``: bias-free nn.Linear, zero at the start, over the normalized bottom-up-pass states
    (neutral label) of the last ``head_layers`` hidden layers -> 10 logits.
    """

    def __init__(self, config: CifarFFConfig) -> None:
        super().__init__()
        self.config = config
        units = config.channels * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
        self.net = FFRecurrentLocal(IMAGE_SHAPE, config.channels, config.depth, config.receptive_field, NUM_CLASSES,
                                    config.damping, config.goodness, None, config.temperature or float(units),
                                    config.rms_norm, config.backend, loss=config.loss)
        self.head_indices = tuple(range(max(config.depth - config.head_layers, 0), config.depth))
        self.head = nn.Linear(self.net.units * len(self.head_indices), NUM_CLASSES, bias=False)
        nn.init.zeros_(self.head.weight)

    def code(self, labels: torch.Tensor) -> torch.Tensor:
        """int64 labels (B,) -> one-hot (B, 10) times ``label_scale``, in the net's dtype."""
        return nn.functional.one_hot(labels, NUM_CLASSES).to(self.head.weight.dtype) * self.config.label_scale

    def head_logits(self, images: torch.Tensor, start: LocalBottomUp | None = None) -> torch.Tensor:
        """One-pass softmax logits (B, 10) of standardized images (B, 3, 32, 32); only the head gets gradients.

        ``start``: the images' label-independent bottom-up pass (``FFRecurrentLocal.bottom_up``),
        if already computed; with it the pass only adds the neutral label's drive.
        """
        neutral = neutral_label(images.shape[0], NUM_CLASSES, images.device, images.dtype) * self.config.label_scale
        if self.net.share_bottom_up:
            start = self.net.bottom_up(images) if start is None else start
            states = self.net.states_from(start, neutral)
        else:
            states = self.net.initial_states(images, neutral)
        features = torch.cat([self.net.normalize(states[i]).flatten(1) for i in self.head_indices], dim=1)
        return self.head(features.detach())

    @torch.no_grad()
    def label_goodness(self, images: torch.Tensor, iterations: int, start: LocalBottomUp | None = None) -> torch.Tensor:
        """Every hidden layer's goodness at t = 1..``iterations`` with each label clamped, oriented so
        that higher is better: (iterations, 10, B, K) for standardized images (B, 3, 32, 32).

        The net runs once on all 10 * B labelled copies of the images (the images tiled, so that
        the copies share the label-independent work).
        """
        batch = images.shape[0]
        labels = torch.arange(NUM_CLASSES, device=images.device).repeat_interleave(batch)
        g = self.net.goodness(images, self.code(labels), iterations, start)  # (T, 10B, K)
        return functional.goodness_sign(self.config.goodness) * g.view(iterations, NUM_CLASSES, batch, -1)

    def label_scores(self, images: torch.Tensor, start: LocalBottomUp | None = None) -> torch.Tensor:
        """Goodness for every label (B, 10): :meth:`label_goodness` summed over the hidden layers
        and iterations ``score_from..score_to`` (``start``: as for :meth:`head_logits`)."""
        c = self.config
        return self.label_goodness(images, c.score_to, start)[c.score_from - 1:].sum((0, 3)).t()


class CifarFF:
    """CIFAR-10 with local receptive fields, trained by FF (paper section 4, Table 1's FF rows).

    ``data`` (a :class:`~.cifar_common.CifarData`) may be given to share one load between runs; it
    is used as given (the config's subsets and data_dir do not apply).
    The model is initialized from ``torch.manual_seed(config.seed)``; ``scheduler`` scales both
    learning rates once per epoch.
    """

    name = "cifar"
    Config = CifarFFConfig
    data_name = "cifar10"
    train_error_name = "running_error_softmax"

    def __init__(self, config: CifarFFConfig, data: CifarData | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.data = data if data is not None else load_data(config, self.device)
        self.data_source = self.data.source
        torch.manual_seed(config.seed)
        self.model = CifarFFNet(config).to(self.device)
        groups = [
            {"params": list(self.model.net.parameters()), "lr": config.lr, "weight_decay": config.weight_decay},
            {"params": list(self.model.head.parameters()), "lr": config.head_lr,
             "weight_decay": config.head_weight_decay},
        ]
        if config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(groups)
        else:
            self.optimizer = torch.optim.SGD(groups, momentum=config.momentum)
        self.scheduler = epoch_schedule(self.optimizer, config)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """What the net sees of uint8 images (B, 3, 32, 32): the images after :func:`standardize`, and with
        ``input_norm`` each image scaled to unit mean square over its 3 x 32 x 32 values."""
        x = standardize(images)
        if self.config.input_norm:
            x = x / (x.square().mean((1, 2, 3), keepdim=True).sqrt() + INPUT_NORM_EPS)
        return x

    def epoch_batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        return self.data.epoch_batches(generator, self.config.batch_size)

    def train_step(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One update on the rows ``batch`` (index tensor).

        Returns (mean FF loss over the hidden layers and iterations (0-dim), softmax errors on the
        batch before the update (0-dim), batch size).
        """
        images = self.inputs(self.data.train_images[batch])
        labels = self.data.train_labels[batch]
        net = self.model.net
        start = net.bottom_up(images) if net.share_bottom_up else None  # shared by the neutral, positive, negative rows
        logits = self.model.head_logits(images, start)
        probs = torch.softmax(logits.detach(), dim=1)
        if self.config.negatives == "hard":
            wrong = hard_wrong_labels(probs, labels, generator)
        else:
            wrong = random_wrong_labels(labels, NUM_CLASSES, generator)
        self.optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(logits, labels).backward()
        codes = torch.cat([self.model.code(labels), self.model.code(wrong)])
        losses = net.ff_backward(images, codes, labels.shape[0], self.config.train_iterations, self.config.train_from,
                                 start=start)  # images tiled over the positive and the negative rows
        self.optimizer.step()
        return torch.stack(losses).mean(), (probs.argmax(1) != labels).sum(), labels.shape[0]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``<set>_error`` (goodness for every label) and ``<set>_error_softmax`` (one-pass softmax)
        for every evaluation set."""
        metrics = {}
        for name, (images, labels) in self.data.eval_sets.items():
            errors = torch.zeros(2, dtype=torch.long, device=images.device)  # counted on the device, read once
            for x, y in zip(images.split(LABEL_BATCH), labels.split(LABEL_BATCH)):
                x = self.inputs(x)
                start = self.model.net.bottom_up(x) if self.model.net.share_bottom_up else None
                errors[0] += (self.model.label_scores(x, start).argmax(1) != y).sum()
                errors[1] += (self.model.head_logits(x, start).argmax(1) != y).sum()
            goodness_errors, softmax_errors = errors.tolist()
            metrics[f"{name}_error"] = goodness_errors / len(labels)
            metrics[f"{name}_error_softmax"] = softmax_errors / len(labels)
        return metrics
