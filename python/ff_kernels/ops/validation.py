"""Input checks shared by the op dispatchers: each error names the layer, the expected and the received."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16)

# Checking for NaN/Inf reads every input once and, on CUDA, waits for the device. It is on by
# default; training loops that have already validated their data may turn it off.
check_finite_inputs = True


def describe(t: torch.Tensor) -> str:
    """A short description of a tensor for error messages: shape, dtype and device."""
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


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
    if finite and check_finite_inputs and not all_finite(x):
        raise ValueError(f"{layer}: {name} contains NaN or Inf ({describe(x)})")


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
