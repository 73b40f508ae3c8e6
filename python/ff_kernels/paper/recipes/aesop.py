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
softmax learns with Adam at a constant rate (see :class:`AesopConfig` for the evidence).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ... import functional
from ...nn import FFLinear, FFSequential
from ..data.aesop import ALPHABET, NUM_STRINGS, STRING_LENGTH, aesop_strings
from ..data.char_negatives import generate_strings, teacher_forcing_negatives
from ..data.char_windows import one_hot_rows, prediction_windows, target_windows
from .checks import check_choices, check_sgd_settings
from .layers import normal_init_, peer_norm_for
from .schedule import LR_SCHEDULES, SCHEDULE_HELP, EpochLR, lr_factor
from .supervised_mnist import INITS, OPTIMIZERS, SupervisedMNISTConfig

SUPERVISED = SupervisedMNISTConfig
REGIMES = ("teacher", "generated", "sleep", "random")
NUM_SYMBOLS = len(ALPHABET)
EVAL_BATCH = 2000


@dataclass
class AesopConfig:
    """Settings of the Aesop recipe.

    Section 4.1 gives the data (248 strings of 100 characters, the first 10 as context), the
    input (the previous 10 characters), the architecture (3 hidden layers of 2000 ReLUs, a
    softmax predicting the next character) and the regimes. Fields set from ``SUPERVISED``
    take the supervised MNIST recipe's default (see :class:`SupervisedMNISTConfig`).

    Evidence for the others (3 x 500 ReLUs, 10 epochs, seed 0, mean log2 p per predicted
    character on the training / held-out strings after the last epoch; the 2-core CPU):
    these defaults give teacher -2.21 / -2.98, random -2.33 / -3.22, generated -2.42 / -3.30.
    A softmax that learns by SGD (momentum 0.9, lr 0.01 to 3, 5 epochs) or by Adam with a
    learning rate that follows the FF layers' schedule keeps up with the FF features too
    slowly: the random hidden layers then score as well as or better than the FF ones on the
    training strings (Adam 0.1: random -2.31, teacher -2.61 after 5 epochs), although the FF
    features are better once a softmax is fitted to them to convergence (-1.48 against -2.09
    for the random ones, same runs). FF lr 5e-4 (ffnew.m's) gives teacher -2.51 / -3.12 with a
    constant softmax rate; temperature 10 makes teacher forcing unstable (log2p falling to
    -6.9 bits in epoch 5 before recovering).
    """

    regime: str = "teacher"  # one of REGIMES (module docstring)
    epochs: int = 20
    width: int = 2000  # section 4.1
    depth: int = 3  # section 4.1
    window: int = 10  # characters the net sees (section 4.1)
    context: int = 10  # leading characters of a string that are given, not predicted (section 4.1)
    num_strings: int = NUM_STRINGS  # training strings (section 4.1)
    string_length: int = STRING_LENGTH  # section 4.1
    test_strings: int = NUM_STRINGS  # held-out strings: the chunks of the text after the training strings
    batch_size: int = SUPERVISED.batch_size  # windows per batch
    sleep_strings: int = 10  # "sleep": strings per wake-sleep cycle (their 900 windows: 9 batches of 100)
    generate_every: int | None = None  # "generated": batches between regenerations (None: once per epoch)
    optimizer: str = SUPERVISED.optimizer  # "sgd" (momentum, fused into the FF layer ops) or "adam"
    lr: float = 2e-3  # FF layers (5e-4: see above)
    momentum: float = SUPERVISED.momentum  # SGD only
    weight_decay: float = SUPERVISED.weight_decay  # FF layers
    lr_schedule: str = SUPERVISED.lr_schedule  # see schedule.lr_factor
    head_lr: float = 0.03  # softmax (Adam), not scheduled
    head_weight_decay: float = 0.0  # softmax
    peer_norm: float = SUPERVISED.peer_norm  # peer-normalization strength (footnote 9); 0 = off
    goodness: str = SUPERVISED.goodness
    # p(positive) = sigmoid((G - N) / temperature), N the layer's number of units
    temperature: float = SUPERVISED.temperature
    init: str = SUPERVISED.init  # "normal": N(0, 1 / fan_in), biases 0; "uniform": nn.Linear's init
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    data_dir: str | None = None  # folder with aesop.txt (else $FF_KERNELS_DATA/aesop)
    text_file: str | None = None  # a UTF-8 text file to use instead of aesop.txt

    def __post_init__(self) -> None:
        for name in ("epochs", "width", "depth", "window", "context", "num_strings", "string_length",
                     "test_strings", "batch_size", "sleep_strings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.generate_every is not None and (isinstance(self.generate_every, bool)
                                                or not isinstance(self.generate_every, int) or self.generate_every < 1):
            raise ValueError(f"generate_every must be None (once per epoch) or an int >= 1, got {self.generate_every!r}")
        if not self.window <= self.context < self.string_length:
            raise ValueError(f"need window <= context < string_length, got window {self.window}, "
                             f"context {self.context}, string_length {self.string_length}")
        check_sgd_settings(self)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        check_choices(self, (("regime", REGIMES), ("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES),
                             ("init", INITS)))
        functional.check_goodness(self.goodness)


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
            FFLinear(d_in, d_out, goodness=config.goodness, temperature=config.temperature, rms_norm=True,
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
            log2p_sum += float(log_probs.gather(1, y[:, None]).sum()) / math.log(2)
            errors += int((log_probs.argmax(1) != y).sum())
        log2p = log2p_sum / targets.shape[0]
        return {"log2p": log2p, "perplexity": 2.0 ** -log2p, "error": errors / targets.shape[0]}

    def evaluate(self) -> dict[str, float]:
        """``train_*`` on the training strings (Figure 5) and ``test_*`` on the held-out strings."""
        metrics = {}
        for split, strings in (("train", self.train_strings), ("test", self.test_strings)):
            metrics.update({f"{split}_{k}": v for k, v in self.scores(strings).items()})
        return metrics

    @staticmethod
    def add_arguments(parser) -> None:
        """The ``ff-train aesop`` options (defaults from :class:`AesopConfig`)."""
        d = AesopConfig()
        parser.add_argument("--regime", choices=REGIMES,
                            help=f"negative data: teacher forcing, generated by the model (online or in a sleep "
                                 f"phase), or random fixed hidden layers (default {d.regime})")
        parser.add_argument("--epochs", type=int, help=f"number of epochs (default {d.epochs})")
        parser.add_argument("--width", type=int, help=f"ReLUs per hidden layer (default {d.width})")
        parser.add_argument("--depth", type=int, help=f"number of hidden layers (default {d.depth})")
        parser.add_argument("--window", type=int, help=f"characters the net sees (default {d.window})")
        parser.add_argument("--context", type=int, help=f"given characters at the start of a string (default {d.context})")
        parser.add_argument("--num-strings", type=int, help=f"training strings (default {d.num_strings})")
        parser.add_argument("--string-length", type=int, help=f"characters per string (default {d.string_length})")
        parser.add_argument("--test-strings", type=int,
                            help=f"held-out strings, the ones after the training strings (default {d.test_strings})")
        parser.add_argument("--batch-size", type=int, help=f"predicted characters per batch (default {d.batch_size})")
        parser.add_argument("--sleep-strings", type=int,
                            help=f"sleep regime: strings per wake-sleep cycle (default {d.sleep_strings})")
        parser.add_argument("--generate-every", type=int,
                            help="generated regime: regenerate all strings every N batches (default: once per epoch)")
        parser.add_argument("--optimizer", choices=OPTIMIZERS,
                            help=f"of the FF layers; the softmax always uses Adam (default {d.optimizer})")
        parser.add_argument("--lr", type=float, help=f"learning rate of the FF layers (default {d.lr:g})")
        parser.add_argument("--momentum", type=float, help=f"SGD momentum (default {d.momentum:g})")
        parser.add_argument("--weight-decay", type=float, help=f"FF layers' weight decay (default {d.weight_decay:g})")
        parser.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                            help=f"{SCHEDULE_HELP} (default {d.lr_schedule})")
        parser.add_argument("--head-lr", type=float, help=f"Adam learning rate of the softmax (default {d.head_lr:g})")
        parser.add_argument("--head-weight-decay", type=float, help=f"default {d.head_weight_decay:g}")
        parser.add_argument("--peer-norm", type=float, help=f"peer-normalization strength, 0 = off (default {d.peer_norm:g})")
        parser.add_argument("--goodness", choices=functional.GOODNESS, help=f"default {d.goodness}")
        parser.add_argument("--temperature", type=float,
                            help=f"T in sigmoid((G - N) / T), N the layer's units (default {d.temperature:g})")
        parser.add_argument("--init", choices=INITS, help=f"weight initialization (default {d.init})")
        parser.add_argument("--seed", type=int, help=f"default {d.seed}")
        parser.add_argument("--device", help=f"cpu, cuda, cuda:1, ... (default {d.device})")
        parser.add_argument("--backend", choices=("auto", "reference", "cpu", "triton"), help=f"default {d.backend}")
        parser.add_argument("--data-dir", help="folder with aesop.txt (default: $FF_KERNELS_DATA/aesop)")
        parser.add_argument("--text", dest="text_file", help="a UTF-8 text file to use instead of aesop.txt")
