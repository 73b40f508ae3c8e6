"""Input checks shared by the op dispatchers: each error names the layer, the expected and the received."""

from __future__ import annotations

import contextlib
import math
import threading

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16)

# Every op input is checked for NaN/Inf (one read of it) while check_finite_inputs is on, the
# default; training loops that have already validated their data may turn it off. On the CPU a
# bad input raises at once. On other devices (CUDA) the answer stays on the device, so that no
# step waits for it: see check_on_device.
check_finite_inputs = True
# Device-side check flags are read (one wait for the device) every this many checks.
finite_check_interval = 256
_trust = threading.local()  # .on: the inputs of the ops called now are known finite (trusted_inputs)

# (layer, input name, problem, device) -> 0-dim bool tensor on that device: the problem was seen there.
_deferred_failures: dict[tuple[str, str, str, torch.device], torch.Tensor] = {}
_unread_checks = 0


def describe(t: torch.Tensor) -> str:
    """A short description of a tensor for error messages: shape, dtype and device."""
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_blocks(layer: str, blocks, units: int) -> int | None:
    """``blocks`` of a block-wise layer of ``units`` units: None (off) or a positive int dividing
    ``units`` (a bool is refused), else ValueError naming what was expected and what came."""
    if blocks is None:
        return None
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1 or units % blocks:
        raise ValueError(f"{layer}: blocks must be None or a positive int that divides the layer's {units} units, "
                         f"got {blocks!r}")
    return blocks


def check_matrix(name: str, layer: str, x: torch.Tensor, features: int, like: torch.Tensor, finite: bool = True) -> None:
    """Check that ``x`` is a (B, features) floating matrix on ``like``'s device with ``like``'s dtype
    (and finite, unless ``finite=False``: the caller checks that itself)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != features:
        raise ValueError(f"{layer}: {name} must have shape (batch, {features}), got {describe(x)}")
    if x.dtype != like.dtype:
        raise TypeError(f"{layer}: {name} must have dtype {like.dtype} (the layer's), got {describe(x)}")
    if x.device != like.device:
        raise ValueError(f"{layer}: {name} must be on {like.device} (the layer's device), got {describe(x)}")
    if finite:
        check_finite(layer, name, x)


def checking_inputs() -> bool:
    """Whether the op inputs are checked now: ``check_finite_inputs`` is on and this thread is
    not inside :func:`trusted_inputs`."""
    return check_finite_inputs and not getattr(_trust, "on", False)


@contextlib.contextmanager
def trusted_inputs(trusted: bool = True):
    """Within (when ``trusted``), this thread's FF layers and ops skip the NaN/Inf checks of their
    input tensors (:func:`check_finite`: x, x_pos, x_neg, preact) and the layers' overflow bound;
    the checks of parameters, shapes and hyper-parameters stay. For inputs that are known finite
    and of bounded length: the normalized outputs of a layer whose goodness was finite (see
    ``nn.layer.output_is_checked``), which FFSequential feeds to the layer above, and rows a
    recipe builds from data it checked once (``FFSequential.train_steps(inputs_checked=True)``)."""
    previous = getattr(_trust, "on", False)
    _trust.on = previous or trusted
    try:
        yield
    finally:
        _trust.on = previous


def check_finite(layer: str, name: str, x: torch.Tensor) -> None:
    """Raise ValueError if ``x`` holds a NaN or Inf (nothing while the inputs are not checked, see
    :func:`checking_inputs`): at once for a CPU tensor, deferred for one on another device (see
    :func:`check_on_device`)."""
    if not checking_inputs() or x.numel() == 0:
        return
    if checks_at_once(x.device):
        if not all_finite(x):
            raise ValueError(f"{layer}: {name} contains NaN or Inf ({describe(x)})")
        return
    check_on_device(layer, name, ~torch.isfinite(x).all(), "contains NaN or Inf")


def check_on_device(layer: str, name: str, bad: torch.Tensor, problem: str) -> None:
    """Raise ``ValueError("{layer}: {name} {problem}")`` if the 0-dim bool tensor ``bad`` is true.

    On the CPU it is read at once. On another device (CUDA) the check never waits for the
    device: ``bad`` is ORed into a flag kept per (layer, input, problem), and the flags are read
    every ``finite_check_interval`` checks and by :func:`raise_deferred_checks`. So a bad CUDA
    input raises the same error up to that many checks later, after the steps in between have
    run; call :func:`raise_deferred_checks` at the end of an epoch or of training for a final check.
    """
    global _unread_checks
    if checks_at_once(bad.device):
        if bool(bad):
            raise ValueError(f"{layer}: {name} {problem}")
        return
    key = (layer, name, problem, bad.device)
    if key in _deferred_failures:
        _deferred_failures[key].logical_or_(bad)
    else:
        _deferred_failures[key] = bad.clone()
    _unread_checks += 1
    if _unread_checks >= finite_check_interval:
        raise_deferred_checks()


def checks_at_once(device: torch.device) -> bool:
    """Whether inputs on ``device`` are checked at once (reading the answer costs no wait: the CPU)."""
    return device.type == "cpu"


def raise_deferred_checks() -> None:
    """Read the device-side flags of :func:`check_on_device` (one wait per device) and clear them.

    Raises ValueError naming every (layer, input, problem) seen since the last read.
    """
    global _unread_checks
    _unread_checks = 0
    if not _deferred_failures:
        return
    by_device: dict[torch.device, list[tuple[str, str, str, torch.device]]] = {}
    for key in _deferred_failures:
        by_device.setdefault(key[3], []).append(key)
    bad = []
    for keys in by_device.values():
        flags = torch.stack([_deferred_failures[key] for key in keys]).tolist()
        bad += [f"{layer}: {name} {problem} ({device})"
                for (layer, name, problem, device), flag in zip(keys, flags, strict=True) if flag]
    _deferred_failures.clear()
    if bad:
        raise ValueError(f"{'; '.join(bad)} (seen on the device since the last check)")


def all_finite(x: torch.Tensor) -> bool:
    """True when no element of ``x`` is NaN or Inf.

    A float32 sum is finite whenever every element is (one cheap reduction); only when it is
    not, because of a NaN/Inf or an overflow of large finite values, are the elements checked.
    """
    if x.numel() == 0:
        return True
    if bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(x).all())


def check_rows_pair(layer: str, x_pos: torch.Tensor, x_neg: torch.Tensor) -> None:
    """Positive and negative batches must have the same width; at least one row in all."""
    if x_pos.dim() != 2 or x_neg.dim() != 2 or x_pos.shape[1] != x_neg.shape[1]:
        raise ValueError(
            f"{layer}: positive and negative batches must be 2-D with the same width, "
            f"got x_pos {tuple(x_pos.shape)} and x_neg {tuple(x_neg.shape)}"
        )
    if x_pos.shape[0] + x_neg.shape[0] == 0:
        raise ValueError(f"{layer}: both x_pos and x_neg are empty; an FF step needs at least one row")


def check_label_columns(layer: str, label_columns, x_pos: torch.Tensor, x_neg: torch.Tensor) -> int | None:
    """``label_columns`` as an int (or None): pairs of rows (label in the input) must be Bp = Bn
    rows that agree past their first ``label_columns`` columns. Checked at once on the CPU,
    deferred elsewhere (see :func:`check_on_device`)."""
    if label_columns is None:
        return None
    if isinstance(label_columns, bool) or not isinstance(label_columns, int):
        raise TypeError(f"{layer}: label_columns must be an int or None, got {type(label_columns).__name__}")
    if not 0 <= label_columns <= x_pos.shape[1]:
        raise ValueError(f"{layer}: label_columns must be in [0, {x_pos.shape[1]}] (the row width), got {label_columns}")
    if x_pos.shape[0] != x_neg.shape[0]:
        raise ValueError(f"{layer}: label_columns needs as many negative rows as positive ones, "
                         f"got x_pos {describe(x_pos)} and x_neg {describe(x_neg)}")
    rest_pos, rest_neg = x_pos[:, label_columns:], x_neg[:, label_columns:]
    problem = f"must equal x_pos past the first {label_columns} columns (label_columns)"
    if checks_at_once(x_pos.device):
        if not torch.equal(rest_pos, rest_neg):
            raise ValueError(f"{layer}: x_neg {problem}")
    else:
        check_on_device(layer, "x_neg", (rest_pos != rest_neg).any(), problem)
    return label_columns


def check_mask(layer: str, mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Return ``mask`` as a bool tensor after checking its shape and that it holds only 0/1."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{layer}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{layer}: mask must have shape {tuple(shape)} (out_features, in_features), got {describe(mask)}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{layer}: mask must hold only 0 and 1, got other values ({describe(mask)})")
        mask = mask != 0
    return mask


def check_hyper(layer: str, name: str, value: float, low: float = 0.0, allow_equal: bool = True) -> float:
    """Check a finite scalar hyper-parameter ``value >= low`` (or ``> low``) and return it as float."""
    value = float(value)
    ok = value >= low if allow_equal else value > low
    if not ok or not math.isfinite(value):
        bound = ">=" if allow_equal else ">"
        raise ValueError(f"{layer}: {name} must be a finite number {bound} {low}, got {value}")
    return value


STEP_MODES = ("grad", "sgd")


def check_step_args(
    layer: str, mode: str, temperature: float, lr: float, momentum: float, weight_decay: float, buffers
) -> tuple[float, float, float]:
    """Validate the arguments of an FF training step; return ``(lr, momentum, weight_decay)`` as floats.

    ``buffers``: ``(name, buffer, parameter)`` triples. In mode "sgd" a buffer is required when
    momentum > 0 and must be contiguous and match its parameter; a buffer for an absent
    parameter is an error.
    """
    if mode not in STEP_MODES:
        raise ValueError(f"{layer}: mode must be one of {STEP_MODES}, got {mode!r}")
    check_hyper(layer, "temperature", temperature, 0.0, allow_equal=False)
    if mode != "sgd":
        return float(lr), float(momentum), float(weight_decay)
    lr = check_hyper(layer, "lr", lr)
    momentum = check_hyper(layer, "momentum", momentum)
    weight_decay = check_hyper(layer, "weight_decay", weight_decay)
    for name, buf, param in buffers:
        if param is None:
            if buf is not None:
                raise ValueError(f"{layer}: {name} given for a layer without that parameter")
            continue
        if buf is None and momentum > 0:
            raise ValueError(f"{layer}: momentum={momentum} needs {name}, got None")
        if buf is not None and (
            buf.shape != param.shape or buf.dtype != param.dtype or buf.device != param.device or not buf.is_contiguous()
        ):
            raise ValueError(f"{layer}: {name} must be contiguous and match its parameter ({describe(param)}), got {describe(buf)}")
    return lr, momentum, weight_decay
