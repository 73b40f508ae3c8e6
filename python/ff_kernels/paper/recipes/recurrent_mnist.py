"""Recurrent FF with top-down connections on MNIST (Hinton 2022, section 3.4, Figure 3).

A static MNIST image is treated as a video: the bottom layer is the image, the top layer a
one-of-N label, and the hidden layers between them are updated synchronously for 8 iterations
from the normalized states of the layers below and above at the previous iteration, with
damping (new pre-normalized state = 0.3 x previous + 0.7 x computed), after an initial
bottom-up pass (:class:`~ff_kernels.nn.recurrent.FFRecurrent`). Every hidden layer learns by
its FF loss at every iteration, positive rows carrying the true label and negative rows a
wrong one, with local gradients only.

Classification (the paper's): run the net with each of the 10 labels and pick the label whose
goodness, summed over the hidden layers and averaged over iterations 3 to 5, is highest.

Hard negatives ("a single forward pass through the net to get probabilities for all the
classes"): the bottom-up pass that initializes the hidden layers does not depend on the label,
so it is that single pass. A bias-free softmax, learned on its detached normalized activities
of all hidden layers (as the supervised recipe's neutral-label softmax), gives the class
probabilities; the negative label is drawn among the wrong classes in proportion to them. The
pass is computed once per image and shared by the positive and the negative rows (and by the
10 labels at test time), and so is its layer-1 bottom-up term at every iteration
(``FFRecurrent.share_bottom_up``). Its errors are the running train error
(``train_error_softmax``) and, on the evaluation set, a fast classifier
(``<split>_error_softmax``).

The optimization defaults are those of the supervised recipe (Hinton's ffnew.m, see
:class:`~ff_kernels.paper.recipes.supervised_mnist.SupervisedMNISTConfig`): SGD with momentum 0.9,
lr 5e-4, weight decay 2e-3, the half-linear learning-rate schedule, peer normalization 0.06,
rms normalization, p(positive) = sigmoid(G - N) and images scaled to unit mean square. The
label is scaled likewise (one-hot times sqrt(10)), so both clamped layers are "normalized
activities" like the hidden layers' outputs. One default differs: the weights start "balanced"
(each neighbour's block N(0, 1 / (2 * its width))) instead of N(0, 1 / fan_in) over the
concatenated input, which gives the 10-unit label almost no say at first and learns several
times slower (see ``RecurrentMNISTConfig.init``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ... import functional
from ...nn.recurrent import INITS, BottomUp, FFRecurrent
from ..data import MnistSplits, hard_wrong_labels, random_wrong_labels
from ..options import Option
from .config import (
    DAMPING,
    DEPTH,
    EPOCHS,
    INIT,
    INPUT_NORM,
    NEGATIVES,
    PEER_NORM,
    RMS_NORM,
    SCORE_FROM,
    SCORE_TO,
    WIDTH,
    FFConfig,
    MnistConfig,
)
from .mnist_recipe import attach_mnist
from .schedule import epoch_schedule
from .supervised_mnist import EVAL_BATCH, INPUT_NORM_EPS, NUM_CLASSES, NUM_PIXELS

ITERATIONS = Option("synchronous iterations after the bottom-up pass", min=1)
RECURRENT_INIT = INIT.but(help="weight initialization: balanced = each neighbour's weight block N(0, 1 / (2 its "
                                "width)), normal = N(0, 1 / fan_in) over the concatenated input", choices=INITS)


@dataclass
class RecurrentMNISTConfig(FFConfig, MnistConfig):
    """Settings of the recurrent MNIST recipe (section 3.4); the rest is the supervised recipe's
    (see the module docstring). The paper does not say which depth gave 1.31%, so the default is
    the smaller net."""

    epochs: int = EPOCHS(60)  # section 3.4
    width: int = WIDTH(2000)  # section 3.4
    depth: int = DEPTH(2)  # section 3.4: "two or three"
    iterations: int = ITERATIONS(8)  # section 3.4
    damping: float = DAMPING(0.3)  # section 3.4: 0.3 x previous + 0.7 x computed
    score_from: int = SCORE_FROM(3)  # section 3.4: goodness averaged over iterations 3 to 5
    score_to: int = SCORE_TO(5)
    peer_norm: float = PEER_NORM(0.06)
    negatives: str = NEGATIVES("hard")  # section 3.4
    rms_norm: bool = RMS_NORM(True)
    input_norm: bool = INPUT_NORM(True)
    init: str = RECURRENT_INIT("balanced")  # docs/defaults.md: learns several times faster than normal

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.score_from <= self.score_to <= self.iterations:
            raise ValueError(
                f"the scored iterations must satisfy 1 <= score_from <= score_to <= iterations, got "
                f"score_from {self.score_from}, score_to {self.score_to}, iterations {self.iterations}"
            )


def _unit_mean_square(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x: (B, D)`` scaled to mean square 1."""
    return x / (x.square().mean(1, keepdim=True).sqrt() + INPUT_NORM_EPS)


class RecurrentLabelNet(nn.Module):
    """The recurrent FF net over 784 pixels and a 10-way label, plus the bottom-up-pass softmax.

    ``net``: FFRecurrent(784, [width] * depth, 10). ``head``: bias-free nn.Linear, zero at the
    start, over the normalized states of all hidden layers after the bottom-up pass -> 10 logits.
    """

    def __init__(self, config: RecurrentMNISTConfig) -> None:
        super().__init__()
        self.config = config
        self.net = FFRecurrent(NUM_PIXELS, [config.width] * config.depth, NUM_CLASSES, damping=config.damping,
                               goodness=config.goodness, temperature=config.temperature or float(config.width),
                               rms_norm=config.rms_norm,
                               peer_norm=config.peer_norm, init=config.init)
        self.head = nn.Linear(config.width * config.depth, NUM_CLASSES, bias=False)
        nn.init.zeros_(self.head.weight)

    def bottom(self, images: torch.Tensor) -> torch.Tensor:
        """The clamped bottom layer: images (B, 784) in [0, 1], scaled to unit mean square with ``input_norm``."""
        return _unit_mean_square(images) if self.config.input_norm else images

    def top(self, labels: torch.Tensor) -> torch.Tensor:
        """The clamped top layer: int64 labels (B,) -> one-hot (B, 10), times sqrt(10) with ``input_norm``."""
        code = nn.functional.one_hot(labels, NUM_CLASSES).to(self.head.weight.dtype)
        return _unit_mean_square(code) if self.config.input_norm else code

    def head_logits(self, states: list[torch.Tensor]) -> torch.Tensor:
        """Softmax logits (B, 10) from the bottom-up-pass states (K tensors (B, width)); the
        states are normalized and detached, so only the head gets gradients."""
        features = torch.cat([self.net.normalize(s).detach().float() for s in states], dim=1)
        return self.head(features)

    @torch.no_grad()
    def label_scores(self, images: torch.Tensor, start: BottomUp | None = None) -> torch.Tensor:
        """The paper's test scores (B, 10): goodness summed over the hidden layers, averaged over
        iterations score_from..score_to, with each label clamped; oriented so higher is better.

        images: (B, 784); the net runs once on all 10 * B labelled copies, starting from the
        (label-free) bottom-up pass, computed once per image (or ``start``, its result), whose
        layer-1 term the copies also share at every iteration (``FFRecurrent.share_bottom_up``).
        """
        batch = images.shape[0]
        bottom = self.bottom(images)
        start = self.net.bottom_up(bottom) if start is None else start
        labels = torch.arange(NUM_CLASSES, device=images.device).repeat_interleave(batch)
        c = self.config
        g = self.net.goodness(bottom, self.top(labels), c.score_to, start)  # (T, 10B, K), bottom tiled
        score = g[c.score_from - 1:c.score_to].sum(2).mean(0).view(NUM_CLASSES, batch).t()
        return functional.goodness_sign(c.goodness) * score


class RecurrentMNIST:
    """Recurrent FF with top-down connections on MNIST (paper section 3.4, Figure 3).

    ``data`` may be given (already split) to skip loading; otherwise :func:`mnist_splits` reads
    ``config.data_dir``. Either way the config's subsets apply. The model is initialized from
    ``torch.manual_seed(config.seed)``; ``scheduler`` scales both learning rates once per epoch.
    """

    name = "recurrent"
    Config = RecurrentMNISTConfig
    train_error_name = "train_error_softmax"

    def __init__(self, config: RecurrentMNISTConfig, data: MnistSplits | None = None) -> None:
        self.config = config
        attach_mnist(self, config, data)
        torch.manual_seed(config.seed)
        self.model = RecurrentLabelNet(config).to(self.device)
        # Group 0 (the FF layers) is stepped by FFRecurrent.ff_step at its scheduled lr; the
        # optimizer itself only moves the head, whose parameters alone get .grad.
        self.optimizer = torch.optim.SGD([
            {"params": list(self.model.net.parameters()), "lr": config.lr, "weight_decay": config.weight_decay},
            {"params": list(self.model.head.parameters()), "lr": config.head_lr,
             "weight_decay": config.head_weight_decay},
        ], momentum=config.momentum)
        self.scheduler = epoch_schedule(self.optimizer, config)

    def epoch_batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        """A shuffled epoch: index tensors of up to ``batch_size`` training rows each."""
        order = torch.randperm(self.train_labels.shape[0], generator=generator, device=generator.device)
        return list(order.to(self.device).split(self.config.batch_size))

    def negative_labels(self, probs: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Wrong labels (B,): drawn in proportion to ``probs`` (B, 10) among the wrong classes
        ("hard"), or uniformly among them ("random")."""
        if self.config.negatives == "hard":
            return hard_wrong_labels(probs, labels, generator)
        return random_wrong_labels(labels, NUM_CLASSES, generator)

    def train_step(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One update on the rows ``batch`` (index tensor).

        Returns (mean FF loss over the hidden layers and iterations (0-dim), softmax errors on
        the batch before the update (0-dim), batch size).
        """
        images, labels = self.train_images[batch], self.train_labels[batch]
        model = self.model
        bottom = model.bottom(images)
        start = model.net.bottom_up(bottom)  # shared by each image's positive and negative rows
        logits = model.head_logits(start.states)
        probs = torch.softmax(logits.detach(), dim=1)
        wrong = self.negative_labels(probs, labels, generator)
        self.optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(logits, labels).backward()
        ff = self.optimizer.param_groups[0]
        losses = model.net.ff_step(  # bottom tiled over the positive and the negative rows
            bottom, torch.cat([model.top(labels), model.top(wrong)]), labels.shape[0],
            self.config.iterations, lr=ff["lr"], momentum=self.config.momentum, weight_decay=ff["weight_decay"],
            states=start,
        )
        self.optimizer.step()
        errors = (probs.argmax(1) != labels).sum()
        return torch.stack(losses).mean(), errors, labels.shape[0]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Error rates on the evaluation set: ``<split>_error`` by the paper's goodness test and
        ``<split>_error_softmax`` by the bottom-up-pass softmax."""
        errors = torch.zeros(2, dtype=torch.long, device=self.eval_labels.device)  # on the device, read once
        for images, labels in zip(self.eval_images.split(EVAL_BATCH), self.eval_labels.split(EVAL_BATCH)):
            start = self.model.net.bottom_up(self.model.bottom(images))
            errors[0] += (self.model.label_scores(images, start).argmax(1) != labels).sum()
            errors[1] += (self.model.head_logits(start.states).argmax(1) != labels).sum()
        goodness_errors, softmax_errors = errors.tolist()
        n = self.eval_labels.shape[0]
        return {f"{self.eval_name}_error": goodness_errors / n, f"{self.eval_name}_error_softmax": softmax_errors / n}
