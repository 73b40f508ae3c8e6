"""Local-layer building blocks for the CIFAR-10 nets of the paper's section 4.

A hidden unit of the recurrent CIFAR-10 net sums a locally connected input (bottom-up and
top-down windows, one :class:`~ff_kernels.functional.local.LocalSpec` over their concatenated
channels) and, in the last hidden layer, a dense per-image term from the label; the backprop
baseline with the same connectivity needs the gradient with respect to a layer's input. Four
ops serve them, each with a "reference" (functional_local.py, any device and dtype) and a compiled backend
(``torch.ops.ff_kernels.*``, float32; see :mod:`ff_kernels.ops.local2d` for how "auto" picks):

    local_linear(x, weight, bias, spec)
        z = local_linear(x, weight, bias) of functional_local      (B, C_out, H_out, W_out)

    local_relu(x, weight, bias, spec, extra)
        relu(local_linear(x, weight, bias) + extra)          (B, C_out, H_out, W_out)
        x (B, C_in, H_in, W_in), weight (L, C_out, K), bias (L, C_out) or None,
        extra (B, C_out, H_out, W_out) or None: a per-image addition to the pre-activation.

    local_delta_grad_(x, delta, spec, weight_grad, bias_grad)
        weight_grad[l, o, (c, di, dj)] += sum_b delta[b, o, i, j] * x[b, c, i*s-p+di, j*s-p+dj]
        bias_grad[l, o]                += sum_b delta[b, o, i, j]
        for any delta = dL/dz (B, C_out, H_out, W_out): the weight gradient of every part of a
        pre-activation z is that part's input against the same delta (0 outside the map).

    local_input_grad(delta, weight, spec)
        dL/dx (B, C_in, H_in, W_in) for delta = dL/dz, for "same" geometry only (stride 1,
        kernel 2 * padding + 1, so H_out = H_in): the backprop baseline needs it.

The compiled forward kernel computes ``local_linear(...) + extra``, with or without the ReLU,
in one pass; the update kernel takes ``h`` and a per-image coefficient to form its delta as
``2 * coef * h``. ``local_linear`` and ``local_relu`` are one forward call each.
``local_delta_grad_`` passes ``h = delta`` and ``coef = 0.5``, and ``2 * 0.5 * delta`` is
``delta`` exactly. ``local_input_grad`` is itself a local op of the same
geometry on the delta map: with k = 2p + 1, input position (r, q) is seen by the outputs
(r - p + a, q - p + b), a, b in 0..k-1, through their weight entry (c, k-1-a, k-1-b), so

    dx = local_linear(delta, W_T, None),  W_T[l(r, q), c, (o, a, b)] = W[l(r-p+a, q-p+b), o, (c, k-1-a, k-1-b)]

(0 where that output lies outside the map); W_T is gathered from W (:func:`transposed_weight`).
"""

from __future__ import annotations

import functools

import torch

from ..functional import local as FFL
from ..functional.local import LocalSpec
from . import ext_local2d
from .local2d import resolve_backend
from .validation import describe


def _check(name: str, t: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if t is None:
        return
    if tuple(t.shape) != shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name} must have shape {shape}, dtype {like.dtype} and device {like.device}, got {describe(t)}")


def local_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: LocalSpec, backend: str = "auto"
) -> torch.Tensor:
    """Pre-activations ``z`` (B, C_out, H_out, W_out) of x (B, C_in, H_in, W_in); see the module docstring."""
    _check("x", x, (x.shape[0], *spec.input_shape), weight)
    _check("weight", weight, spec.weight_shape, weight)
    _check("bias", bias, spec.bias_shape, weight)
    if resolve_backend(backend, weight.device, weight.dtype, "local_linear") == "reference":
        return FFL.local_linear(x, weight, bias, spec)
    return ext_local2d.activities(x.contiguous(), weight, bias, spec, relu=False)


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
        z = FFL.local_linear(x, weight, bias, spec)
        return torch.relu(z if extra is None else z + extra)
    return ext_local2d.activities(x.contiguous(), weight, bias, spec, None if extra is None else extra.contiguous())


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
        weight_grad.add_(torch.einsum("bol,blk->lok", flat, FFL.local_patches(x, spec)))
        if bias_grad is not None:
            bias_grad.add_(flat.sum(0).t())
        return
    half = torch.full((batch,), 0.5, dtype=delta.dtype, device=delta.device)
    torch.ops.ff_kernels.local2d_grad_(x.contiguous(), delta.contiguous(), half, "ssq", spec.kernel, spec.stride,
                                       spec.padding, weight_grad, bias_grad)


def transposed_spec(spec: LocalSpec) -> LocalSpec:
    """The geometry of :func:`local_input_grad`'s op: C_out -> C_in channels on the same map.

    Only for "same" layers (stride 1, kernel 2 * padding + 1); others raise ValueError.
    """
    if spec.stride != 1 or spec.kernel != 2 * spec.padding + 1:
        raise ValueError(f"local_input_grad needs stride 1 and kernel = 2 * padding + 1 (output map = input map), "
                         f"got {spec}")
    return LocalSpec(spec.out_channels, spec.in_height, spec.in_width, spec.in_channels, spec.kernel, 1, spec.padding)


@functools.lru_cache(maxsize=16)
def _transposed_index(spec: LocalSpec, device: torch.device) -> torch.Tensor:
    """(L, C_in, C_out * k * k) int64: the flat index into ``weight`` of every W_T entry, or
    ``weight.numel()`` (one past the end: a zero) where the source output lies outside the map."""
    k, p, height, width = spec.kernel, spec.padding, spec.in_height, spec.in_width
    c_in, c_out, block = spec.in_channels, spec.out_channels, spec.block_size
    r = torch.arange(height).view(height, 1, 1, 1, 1, 1)
    q = torch.arange(width).view(1, width, 1, 1, 1, 1)
    c = torch.arange(c_in).view(1, 1, c_in, 1, 1, 1)
    o = torch.arange(c_out).view(1, 1, 1, c_out, 1, 1)
    a = torch.arange(k).view(1, 1, 1, 1, k, 1)
    b = torch.arange(k).view(1, 1, 1, 1, 1, k)
    i, j = r - p + a, q - p + b  # the output position that sees (r, q) through entry (c, k-1-a, k-1-b)
    source = ((i * width + j) * c_out + o) * block + (c * k + (k - 1 - a)) * k + (k - 1 - b)
    inside = (i >= 0) & (i < height) & (j >= 0) & (j < width)
    index = torch.where(inside, source, spec.num_locations * c_out * block)
    return index.reshape(spec.num_locations, c_in, c_out * k * k).to(device)


def transposed_weight(weight: torch.Tensor, spec: LocalSpec) -> torch.Tensor:
    """W_T (L, C_in, C_out * k * k) of :func:`local_input_grad` from ``weight`` (L, C_out, C_in * k * k)."""
    flat = torch.cat([weight.reshape(-1), weight.new_zeros(1)])
    return flat[_transposed_index(spec, weight.device)]


def local_input_grad(delta: torch.Tensor, weight: torch.Tensor, spec: LocalSpec, backend: str = "auto") -> torch.Tensor:
    """dL/dx (B, C_in, H, W) of ``z = local_linear(x, weight, bias)`` for ``delta = dL/dz`` (B, C_out, H, W).

    "Same" layers only (see :func:`transposed_spec`).
    """
    spec_t = transposed_spec(spec)
    _check("delta", delta, (delta.shape[0], *spec.output_shape), weight)
    _check("weight", weight, spec.weight_shape, weight)
    return local_linear(delta, transposed_weight(weight, spec), None, spec_t, backend)
