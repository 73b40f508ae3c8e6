"""Local-layer building blocks for nets whose pre-activation has several parts (paper section 4).

A hidden unit of the recurrent CIFAR-10 net sums a locally connected input (bottom-up and
top-down windows, one :class:`~ff_kernels.functional_local.LocalSpec` over their concatenated
channels) and, in the last hidden layer, a dense per-image term from the label. Two ops serve it,
each with a "reference" (functional_local.py, any device and dtype) and a compiled backend
(``torch.ops.ff_kernels.*``, float32; see :mod:`ff_kernels.ops.local2d` for how "auto" picks):

    local_relu(x, weight, bias, spec, extra)
        relu(local_linear(x, weight, bias) + extra)          (B, C_out, H_out, W_out)
        x (B, C_in, H_in, W_in), weight (L, C_out, K), bias (L, C_out) or None,
        extra (B, C_out, H_out, W_out) or None: a per-image addition to the pre-activation.

    local_delta_grad_(x, delta, spec, weight_grad, bias_grad)
        weight_grad[l, o, (c, di, dj)] += sum_b delta[b, o, i, j] * x[b, c, i*s-p+di, j*s-p+dj]
        bias_grad[l, o]                += sum_b delta[b, o, i, j]
        for any delta = dL/dz (B, C_out, H_out, W_out): the weight gradient of every part of a
        pre-activation z is that part's input against the same delta (0 outside the map).

The compiled kernels only compute ``relu(local_linear(...))`` and take ``h`` and a per-image
coefficient to form their delta as ``2 * coef * h``; these ops use them as follows.
``local_relu`` with ``extra`` equal for every image folds it into the bias (one call); with
differing rows it recovers the pre-activation exactly as ``relu(z) - relu(-z)``, the second
call with negated weight and bias (negation commutes with every rounding), then adds ``extra``.
``local_delta_grad_`` passes ``h = delta`` and ``coef = 0.5``, and ``2 * 0.5 * delta`` is
``delta`` exactly.
"""

from __future__ import annotations

import torch

from .. import functional_local as FL
from ..functional_local import LocalSpec
from . import ext_local2d
from .local2d import resolve_backend
from .validation import describe


def _check(name: str, t: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if t is None:
        return
    if tuple(t.shape) != shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name} must have shape {shape}, dtype {like.dtype} and device {like.device}, got {describe(t)}")


def local_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: LocalSpec,
    extra: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``relu(local_linear(x, weight, bias) + extra)`` (B, C_out, H_out, W_out); see the module docstring."""
    batch = x.shape[0]
    _check("x", x, (batch, *spec.input_shape), weight)
    _check("weight", weight, spec.weight_shape, weight)
    _check("bias", bias, spec.bias_shape, weight)
    _check("extra", extra, (batch, *spec.output_shape), weight)
    if resolve_backend(backend, weight.device, weight.dtype, "local_relu") == "reference":
        z = FL.local_linear(x, weight, bias, spec)
        return torch.relu(z if extra is None else z + extra)
    x = x.contiguous()
    if extra is None:
        return ext_local2d.activities(x, weight, bias, spec)
    if batch and bool((extra == extra[:1]).all()):
        shared = extra[0].reshape(spec.out_channels, spec.num_locations).t()  # (L, C_out), like the bias
        return ext_local2d.activities(x, weight, (shared if bias is None else bias + shared).contiguous(), spec)
    negated = None if bias is None else -bias
    z = ext_local2d.activities(x, weight, bias, spec) - ext_local2d.activities(x, -weight, negated, spec)
    return torch.relu(z + extra)


def local_delta_grad_(
    x: torch.Tensor,
    delta: torch.Tensor,
    spec: LocalSpec,
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """Add the local weight (and bias) gradient of ``delta = dL/dz`` into ``weight_grad`` / ``bias_grad``.

    x: (B, C_in, H_in, W_in), delta: (B, C_out, H_out, W_out), weight_grad (L, C_out, K),
    bias_grad (L, C_out) or None, all of one dtype and device.
    """
    batch = x.shape[0]
    _check("x", x, (batch, *spec.input_shape), weight_grad)
    _check("delta", delta, (batch, *spec.output_shape), weight_grad)
    _check("weight_grad", weight_grad, spec.weight_shape, weight_grad)
    _check("bias_grad", bias_grad, spec.bias_shape, weight_grad)
    if resolve_backend(backend, weight_grad.device, weight_grad.dtype, "local_delta_grad_") == "reference":
        flat = delta.flatten(2)  # (B, C_out, L)
        weight_grad.add_(torch.einsum("bol,blk->lok", flat, FL.local_patches(x, spec)))
        if bias_grad is not None:
            bias_grad.add_(flat.sum(0).t())
        return
    half = torch.full((batch,), 0.5, dtype=delta.dtype, device=delta.device)
    torch.ops.ff_kernels.local2d_grad_(x.contiguous(), delta.contiguous(), half, "ssq", spec.kernel, spec.stride,
                                       spec.padding, weight_grad, bias_grad)
