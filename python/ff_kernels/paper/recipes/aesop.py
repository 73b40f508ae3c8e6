"""Next-character prediction on Aesop's fables with FF (Hinton 2022, section 4.1, Figure 5).

Data (:mod:`ff_kernels.paper.data.aesop`): 248 strings of 100 characters over a 30-symbol alphabet.
The first 10 characters of a string are context; each of the other 90 is predicted from the
10 characters before it. A window of 10 characters enters the net as 300 one-hot inputs
(scaled to unit mean square), through ``depth`` FF layers of ``width`` ReLUs. A softmax over
the normalized activities of all hidden layers predicts the next character; it learns by
cross-entropy on the real windows, on detached activities, so no derivative enters the FF
layers.

Positive data of the FF layers: the real windows that end with a predicted character. The
regimes differ in the negative data (:mod:`ff_kernels.paper.data.char_negatives`):

- ``teacher``: teacher forcing. Each real window with its last character replaced by a wrong
  one drawn from the softmax's prediction given the 10 real characters before it (the true
  character excluded, so that a negative never equals its positive, as with the supervised
  recipe's hard negative labels).
- ``generated``: at the start of every epoch (and every ``generate_every`` batches, if set) the
  model generates, from the first 10 characters of each string, the other 90 (each drawn from
  its own prediction given the 10 characters before it, real or generated); the negatives are
  the windows of these strings at the positions of the batch's positives. Positives and
  negatives update together.
- ``sleep``: the offline version of ``generated``. The strings are taken in groups of
  ``sleep_strings``: a wake phase updates the FF layers (and the softmax) with the positives
  of the group only, batch by batch; then the model as it is after waking generates the
  group's strings and a sleep phase updates the FF layers with their windows only, over the
  same batches. Phases of a whole epoch (all wake, then all sleep) fail: on 3 x 500 ReLUs the
  features the softmax learned while awake are gone after sleeping (log2p -3.7 bits after 10
  epochs, -8.4 at epoch 3; with groups of 10 strings see the numbers below).
- ``random``: the hidden layers keep their random initial weights; only the softmax learns.

Evaluation (after each epoch), on the 248 training strings as in Figure 5 (``train_*``) and on
the next ``test_strings`` strings of the text, never trained on (``test_*``): for all 90
predicted characters of every string, the mean of log2 p(true character) (``*_log2p``), the
per-character perplexity ``2 ** -log2p`` (``*_perplexity``) and the fraction whose most
probable character is wrong (``*_error``). A string's sum of log2 probabilities is 90 times its
``log2p``. Uniform guessing scores log2p = -log2(30) = -4.91 bits, perplexity 30.

The paper gives only the data, the architecture and the regimes. The FF layers' settings
follow the supervised MNIST recipe (:mod:`.supervised_mnist`, after Hinton's ffnew.m: SGD with
momentum 0.9, weight decay, the half-linear schedule, threshold N at temperature 1, unit mean
square activities, peer normalization, N(0, 1 / fan_in) weights) except the learning rate; the
softmax learns with Adam at a constant rate (docs/defaults.md has the evidence).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ...nn import FFLinear, FFSequential
from ..data.aesop import ALPHABET, aesop_strings
from ..data.aesop import NUM_STRINGS as NUM_STRINGS_DEFAULT
from ..data.aesop import STRING_LENGTH as STRING_LENGTH_DEFAULT
from ..data.char_negatives import generate_strings, teacher_forcing_negatives
from ..data.char_windows import one_hot_rows, prediction_windows, target_windows
from ..options import Option
from .config import (
    DEPTH,
    HEAD_LR,
    HEAD_WEIGHT_DECAY,
    INIT,
    LINEAR_BACKEND,
    LR,
    OPTIMIZER,
    PEER_NORM,
    WIDTH,
    FFConfig,
    RecipeConfig,
)
from .layer_setup import normal_init_, peer_norm_for
from .schedule import EpochLR, lr_factor

REGIMES = ("teacher", "generated", "sleep", "random")
NUM_SYMBOLS = len(ALPHABET)
EVAL_BATCH = 2000


REGIME = Option("negative data: teacher (teacher forcing), generated (strings the model generates), sleep "
                "(generated offline, in wake and sleep phases) or random (fixed random hidden layers)", choices=REGIMES)
WINDOW = Option("characters the net sees", min=1)
CONTEXT = Option("leading characters of a string that are given, not predicted", min=1)
NUM_STRINGS = Option("training strings", min=1)
STRING_LENGTH = Option("characters per string", min=1)
TEST_STRINGS = Option("held-out strings: the chunks of the text after the training strings", min=1)
SLEEP_STRINGS = Option("sleep: strings per wake-sleep cycle", min=1)
GENERATE_EVERY = Option("generated: batches between regenerations", min=1, none="once per epoch")
AESOP_DIR = Option("folder with aesop.txt", none="$FF_KERNELS_DATA/aesop")
TEXT_FILE = Option("a UTF-8 text file to use instead of aesop.txt", flag="--text")


@dataclass
class AesopConfig(FFConfig, RecipeConfig):
    """Settings of the Aesop recipe. Section 4.1 gives the data, the input, the architecture and
    the regimes; the FF layers' other settings are the supervised recipe's, the learning rates
    are chosen here (docs/defaults.md)."""

    regime: str = REGIME("teacher")  # section 4.1's (a), (b) and (c)
    width: int = WIDTH(2000)  # section 4.1
    depth: int = DEPTH(3)  # section 4.1
    window: int = WINDOW(10)  # section 4.1
    context: int = CONTEXT(10)  # section 4.1
    num_strings: int = NUM_STRINGS(NUM_STRINGS_DEFAULT)  # section 4.1
    string_length: int = STRING_LENGTH(STRING_LENGTH_DEFAULT)  # section 4.1
    test_strings: int = TEST_STRINGS(NUM_STRINGS_DEFAULT)
    sleep_strings: int = SLEEP_STRINGS(10)  # their 900 windows: 9 batches of 100
    generate_every: int | None = GENERATE_EVERY(None)
    optimizer: str = OPTIMIZER("sgd")
    lr: float = LR(2e-3)  # docs/defaults.md
    head_lr: float = HEAD_LR(0.03)  # Adam, not scheduled
    head_weight_decay: float = HEAD_WEIGHT_DECAY(0.0)
    peer_norm: float = PEER_NORM(0.06)
    init: str = INIT("normal")
    backend: str = LINEAR_BACKEND("auto")
    data_dir: str | None = AESOP_DIR(None)
    text_file: str | None = TEXT_FILE(None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.window <= self.context < self.string_length:
            raise ValueError(f"need window <= context < string_length, got window {self.window}, "
                             f"context {self.context}, string_length {self.string_length}")


class CharFFNet(nn.Module):
    """FF layers over one-hot windows of characters plus the next-character softmax.

    ``net``: FFSequential of ``depth`` FFLinear layers (window * 30 -> width -> ... -> width).
    ``head``: nn.Linear (zero at the start) from the concatenated normalized outputs of all
    hidden layers (depth * width) to 30 logits. Each layer's output has unit mean square; the
    concatenation is divided by sqrt(depth * width) to unit length, so that the softmax's
    learning rate means the same at every width.
    """

    def __init__(self, config: AesopConfig) -> None:
        super().__init__()
        sizes = [config.window * NUM_SYMBOLS] + [config.width] * config.depth
        self.net = FFSequential(*(
            FFLinear(d_in, d_out, goodness=config.goodness, temperature=config.temperature or float(d_out), rms_norm=True,
                     backend=config.backend, peer_norm=peer_norm_for(d_out, config.peer_norm))
            for d_in, d_out in itertools.pairwise(sizes)
        ))
        if config.init == "normal":
            for layer in self.net:
                normal_init_(layer)
        self.head = nn.Linear(config.width * config.depth, NUM_SYMBOLS)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def inputs(self, windows: torch.Tensor) -> torch.Tensor:
        """Windows of codes (B, W) -> one-hot rows (B, W * 30) scaled to unit mean square (times sqrt(30))."""
        return one_hot_rows(windows, NUM_SYMBOLS) * math.sqrt(NUM_SYMBOLS)

    def logits(self, windows: torch.Tensor) -> torch.Tensor:
        """Next-character logits (B, 30) after each window (B, W); gradients reach the head only."""
        with torch.no_grad():
            features = torch.cat(self.net.activations(self.inputs(windows)), dim=1).float()
        return self.head(features / math.sqrt(features.shape[1]))

    @torch.no_grad()
    def next_char_probs(self, windows: torch.Tensor) -> torch.Tensor:
        """softmax(logits) (B, 30) of the character after each window (B, W)."""
        return torch.softmax(self.logits(windows), dim=1)


def make_optimizer(config: AesopConfig, model: CharFFNet) -> torch.optim.Adam:
    """Adam with two parameter groups: the FF layers (``lr``, ``weight_decay``), then the softmax
    (``head_lr``, ``head_weight_decay``).

    The softmax always learns with Adam: plain SGD on it converges too slowly to show within a
    few epochs what the features are worth. With ``optimizer="sgd"`` the FF layers are updated
    by their fused ``ff_step`` at group 0's learning rate and weight decay, never get a
    ``.grad``, and so Adam leaves them alone; group 0 only carries their schedule.
    """
    return torch.optim.Adam([
        {"params": list(model.net.parameters()), "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": list(model.head.parameters()), "lr": config.head_lr, "weight_decay": config.head_weight_decay},
    ])


class AesopBatch(NamedTuple):
    """One item of an epoch.

    phase: "both" (positives and negatives), "wake" (positives only) or "sleep" (negatives only).
    rows: indices (B,) of predicted characters; row ``i * P + k`` is character ``context + k``
        of training string ``i`` (P = string_length - context).
    generate: indices of training strings the model generates anew before this step, or None.
    """

    phase: str
    rows: torch.Tensor
    generate: torch.Tensor | None


class AesopFF:
    """Next-character FF on Aesop's fables (paper section 4.1) in one of the :data:`REGIMES`.

    ``strings`` (train (S, L), test (S', L) int64) may be given to skip loading the text;
    otherwise :func:`aesop_strings` reads ``config.data_dir`` / ``config.text_file``. The model
    is initialized from ``torch.manual_seed(config.seed)``, so runs of the regimes with the same
    seed start from the same weights and see the same batches.
    """

    name = "aesop"
    Config = AesopConfig
    data_name = "aesop"
    train_error_name = "train_error_softmax"  # softmax errors on the training batches, before each update

    def __init__(self, config: AesopConfig, strings: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if strings is None:
            load = {"data_dir": config.data_dir, "length": config.string_length, "text_file": config.text_file}
            strings = (aesop_strings(num_strings=config.num_strings, **load),
                       aesop_strings(num_strings=config.test_strings, first=config.num_strings, **load))
        self.train_strings, self.test_strings = (s.to(self.device) for s in strings)
        w, c = config.window, config.context
        self.inputs = prediction_windows(self.train_strings, w, c)  # (S * P, W), P = L - context
        self.positives = target_windows(self.train_strings, w, c)  # (S * P, W)
        self.targets = self.positives[:, -1]  # (S * P,)
        self.generated: torch.Tensor | None = None  # negative windows of the model's strings (S * P, W)
        torch.manual_seed(config.seed)
        self.model = CharFFNet(config).to(self.device)
        self.optimizer = make_optimizer(config, self.model)
        self.scheduler = EpochLR(self.optimizer, [
            lambda done: lr_factor(self.config.lr_schedule, done + 1, self.config.epochs),
            lambda done: 1.0,
        ])

    def epoch_batches(self, generator: torch.Generator) -> list[AesopBatch]:
        """A shuffled epoch of batches of up to ``batch_size`` predicted characters (see :class:`AesopBatch`).

        "teacher", "random": every predicted character once, in random order. "generated": the
        same, and all strings are generated before the first batch (and before every
        ``generate_every``-th one). "sleep": the strings in
        random order, in groups of ``sleep_strings``; for each group a wake phase over its
        predicted characters in random order, then the group is generated and a sleep phase
        goes over the same batches.
        """
        per_string = self.config.string_length - self.config.context
        num_strings = self.train_strings.shape[0]
        device = generator.device
        if self.config.regime != "sleep":
            order = torch.randperm(num_strings * per_string, generator=generator, device=device).to(self.device)
            everything = torch.arange(num_strings, device=self.device) if self.config.regime == "generated" else None
            every = self.config.generate_every
            return [AesopBatch("both", rows, everything if (i == 0 if every is None else i % every == 0) else None)
                    for i, rows in enumerate(order.split(self.config.batch_size))]
        batches = []
        strings = torch.randperm(num_strings, generator=generator, device=device).to(self.device)
        for group in strings.split(self.config.sleep_strings):
            rows = self._rows_of(group)
            order = torch.randperm(rows.shape[0], generator=generator, device=device).to(self.device)
            phase = rows[order].split(self.config.batch_size)
            batches += [AesopBatch("wake", r, None) for r in phase]
            batches += [AesopBatch("sleep", r, group if i == 0 else None) for i, r in enumerate(phase)]
        return batches

    def generate(self, strings: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The model's strings (S, L): the first ``context`` characters of ``strings``, the rest sampled."""
        return generate_strings(strings, self.config.window, self.config.context, self.model.next_char_probs,
                                generator)

    def _regenerate(self, strings: torch.Tensor, generator: torch.Generator) -> None:
        """Replace the negative windows of the training strings ``strings`` (indices (G,)) by the
        windows of strings the model generates from their context now."""
        if self.generated is None:
            self.generated = torch.empty_like(self.positives)
        windows = target_windows(self.generate(self.train_strings[strings], generator), self.config.window,
                                 self.config.context)
        self.generated[self._rows_of(strings)] = windows

    def _rows_of(self, strings: torch.Tensor) -> torch.Tensor:
        """The rows (G * P,) of the predicted characters of training strings ``strings`` (G,), string by string."""
        per_string = self.config.string_length - self.config.context
        return (strings[:, None] * per_string + torch.arange(per_string, device=self.device)).flatten()

    def train_step(self, batch: AesopBatch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One update on the predicted characters ``batch.rows``.

        Returns (loss, softmax errors on the batch before the update, number of characters it
        counted): the loss is the FF layers' mean loss, or for "random" the softmax's
        cross-entropy; sleep batches count no characters.
        """
        if batch.generate is not None:
            self._regenerate(batch.generate, generator)
        positives = self.positives[batch.rows]
        self.optimizer.zero_grad(set_to_none=True)
        errors, counted, loss = torch.zeros((), dtype=torch.int64), 0, None
        if batch.phase != "sleep":
            targets = self.targets[batch.rows]
            logits = self.model.logits(self.inputs[batch.rows])
            loss = nn.functional.cross_entropy(logits, targets)
            loss.backward()
            errors, counted = (logits.detach().argmax(1) != targets).sum(), targets.shape[0]
        regime = self.config.regime
        if regime != "random":
            if batch.phase == "wake":
                negatives = positives[:0]
            elif regime == "teacher":
                negatives = teacher_forcing_negatives(positives, torch.softmax(logits.detach(), 1), generator)
            else:
                negatives = self.generated[batch.rows]
            if batch.phase == "sleep":
                positives = positives[:0]
            loss = self._ff_update(self.model.inputs(positives), self.model.inputs(negatives))
        self.optimizer.step()
        return loss.detach(), errors, counted

    def _ff_update(self, x_pos: torch.Tensor, x_neg: torch.Tensor) -> torch.Tensor:
        """Train the FF layers on positive (Bp, D) and negative (Bn, D) rows; their mean loss (0-dim)."""
        if self.config.optimizer == "sgd":
            group = self.optimizer.param_groups[0]
            losses = self.model.net.ff_step(x_pos, x_neg, lr=group["lr"], momentum=self.config.momentum,
                                            weight_decay=group["weight_decay"])
        else:
            losses = self.model.net.ff_backward(x_pos, x_neg)
        return torch.stack(losses).mean()

    @torch.no_grad()
    def scores(self, strings: torch.Tensor) -> dict[str, float]:
        """log2p, perplexity and error (module docstring) over the predicted characters of ``strings`` (S, L)."""
        inputs = prediction_windows(strings, self.config.window, self.config.context)
        targets = target_windows(strings, self.config.window, self.config.context)[:, -1]
        log2p_sum, errors = 0.0, 0
        for x, y in zip(inputs.split(EVAL_BATCH), targets.split(EVAL_BATCH)):
            log_probs = torch.log_softmax(self.model.logits(x), dim=1)
            log2p_sum += log_probs.gather(1, y[:, None]).sum(dtype=torch.float64) / math.log(2)
            errors += (log_probs.argmax(1) != y).sum()
        log2p = float(log2p_sum) / targets.shape[0]  # one read of the device per evaluation
        return {"log2p": log2p, "perplexity": 2.0 ** -log2p, "error": float(errors) / targets.shape[0]}

    def evaluate(self) -> dict[str, float]:
        """``train_*`` on the training strings (Figure 5) and ``test_*`` on the held-out strings."""
        metrics = {}
        for split, strings in (("train", self.train_strings), ("test", self.test_strings)):
            metrics.update({f"{split}_{k}": v for k, v in self.scores(strings).items()})
        return metrics
