"""The divergence guard of the training loop, and strict JSON for everything a run writes.

A run that diverges (a learning rate far too high) fills its weights with inf and NaN. The
training loop (:func:`ff_kernels.paper.train.train`) stops such a run with
:class:`TrainingDiverged`, one message naming the recipe, the epoch, the step (or range of
steps) and what went non-finite, plus a hint; nothing non-finite is ever checkpointed or
written to a JSON file, so the last good checkpoint stays. Three checks:

1. the loss of every step: on the CPU at once (:class:`LossCheck`); on a GPU, where reading a
   value waits for the device, the running sum of the losses every ``every`` steps, where the
   loop reads it anyway for the progress bar (the message then gives the range of steps);
2. a step that raises while the model holds non-finite values (NaN inputs to a layer, a
   softmax of NaN logits, ...) is a divergence, not a bug;
3. before every checkpoint: every floating tensor of the model's state (parameters and
   buffers), of the optimizer's state, and every metric (:func:`nonfinite_state`).

JSON: :func:`dumps` refuses NaN and Infinity (``allow_nan=False``), and :func:`loads` refuses
them when reading (Python's json accepts both by default), so a record that holds one is
reported, not used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

EXIT_DIVERGED = 3  # ff-train's exit status for a run stopped by the guard


class TrainingDiverged(RuntimeError):
    """Training produced NaN or Inf; the run was stopped before writing any of it.

    ``local`` is False on the ranks of a parallel run that stop because another rank found
    the problem.
    """

    def __init__(self, message: str, local: bool = True) -> None:
        super().__init__(message)
        self.local = local


class NonFinite(Exception):
    """Raised inside an epoch: ``what`` went non-finite at ``steps`` (first, last) of the epoch,
    or somewhere in it when ``steps`` is None. The loop turns it into TrainingDiverged."""

    def __init__(self, what: str, steps: tuple[int, int] | None = None) -> None:
        super().__init__(what)
        self.what, self.steps = what, steps


class LossCheck:
    """Checks that every step's loss is finite without waiting for a GPU at every step.

    ``add(loss, total)`` after each step, with the epoch's running sum ``total`` of the losses
    (a tensor on the loss's device). A CPU loss is read at once; otherwise the running sum is
    read every ``every`` steps (non-finite from the first bad step on, since NaN and Inf stay in
    a sum). ``finish(total)`` reads it once more at the end of the epoch.
    """

    def __init__(self, every: int) -> None:
        self.every = int(every)
        self.steps = 0  # steps seen
        self.checked = 0  # steps known to be finite

    def add(self, loss: torch.Tensor | float, total: torch.Tensor | float) -> None:
        self.steps += 1
        if _read_at_once(loss):
            value = float(loss)
            if not math.isfinite(value):
                raise NonFinite(f"the training loss is {value}", (self.steps, self.steps))
            self.checked = self.steps
        elif self.steps - self.checked >= self.every:
            self._read(total)

    def finish(self, total: torch.Tensor | float) -> None:
        if self.steps > self.checked:
            self._read(total)

    def _read(self, total: torch.Tensor | float) -> None:
        value = float(total)
        if not math.isfinite(value):
            raise NonFinite(f"the training loss is {value}", (self.checked + 1, self.steps))
        self.checked = self.steps


def _read_at_once(loss: torch.Tensor | float) -> bool:
    """Whether reading ``loss`` costs no wait for a device (a number, or a CPU tensor)."""
    return not torch.is_tensor(loss) or loss.device.type == "cpu"


def nonfinite_names(named: Iterable[tuple[str, Any]]) -> list[str]:
    """The names of the floating tensors of ``named`` that hold a NaN or Inf.

    One float32 sum per tensor (finite whenever every element is; one pass, no copy), read with
    one wait per device; only a tensor whose sum is not finite (a NaN or Inf, or finite values
    whose sum overflows) is checked element by element.
    """
    sums: dict[torch.device, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    for name, value in named:
        if torch.is_tensor(value) and value.is_floating_point() and value.numel():
            value = value.detach()
            sums.setdefault(value.device, []).append((name, value, value.sum(dtype=torch.float32)))
    bad = []
    for entries in sums.values():
        finite = torch.isfinite(torch.stack([total for _, _, total in entries])).tolist()
        bad += [name for (name, value, _), ok in zip(entries, finite, strict=True)
                if not ok and not bool(torch.isfinite(value).all())]
    return bad


def _optimizer_tensors(optimizer: torch.optim.Optimizer, model: nn.Module) -> Iterable[tuple[str, Any]]:
    names = {id(p): n for n, p in model.named_parameters()}
    for index, (param, state) in enumerate(optimizer.state.items()):
        param_name = names.get(id(param), f"parameter {index}")
        for key, value in state.items():
            yield f"optimizer {key} of {param_name}", value


def nonfinite_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """What a checkpoint of ``model`` and ``optimizer`` would hold non-finite: the names of the
    model's state_dict entries (parameters and buffers) and of the optimizer's state."""
    named = list(model.state_dict(keep_vars=True).items())
    if optimizer is not None:
        named += list(_optimizer_tensors(optimizer, model))
    return nonfinite_names(named)


def nonfinite_values(record: Any, prefix: str = "") -> list[str]:
    """The keys (dotted paths) of the float values of a JSON-like ``record`` that are NaN or Inf."""
    if isinstance(record, float):
        return [] if math.isfinite(record) else [prefix or "the value"]
    if isinstance(record, dict):
        return [k for key, value in record.items() for k in nonfinite_values(value, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(record, (list, tuple)):
        return [k for i, value in enumerate(record) for k in nonfinite_values(value, f"{prefix}[{i}]")]
    return []


def describe_names(names: list[str], limit: int = 3) -> str:
    """"a, b, c and 4 more"."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def lr_hint(config: Any) -> str:
    """"lower the learning rate (--lr is 1e+10, --head-lr is 0.01)": the config's learning rates."""
    rates = [(name, value) for name, value in vars(config).items()
             if (name == "lr" or name.endswith("_lr")) and isinstance(value, (int, float))]
    if not rates:
        return "lower the learning rate"
    shown = ", ".join(f"--{name.replace('_', '-')} is {value:g}" for name, value in rates)
    return f"lower the learning rate ({shown})"


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} (NaN or Infinity is not JSON)")


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that refuses NaN and Infinity (ValueError) instead of writing invalid JSON."""
    return json.dumps(obj, allow_nan=False, **kwargs)


def dump(obj: Any, file, **kwargs: Any) -> None:
    """``json.dump`` that refuses NaN and Infinity."""
    json.dump(obj, file, allow_nan=False, **kwargs)


def loads(text: str) -> Any:
    """``json.loads`` that refuses NaN and Infinity (ValueError naming the constant)."""
    return json.loads(text, parse_constant=_reject_constant)
