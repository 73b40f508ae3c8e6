"""The compiled backend of the local 2-D ops: ``torch.ops.ff_kernels.*`` from csrc/ (``ff_kernels._C``).

One kernel computes the activities ``h = relu(z)`` (B, C_out, H_out, W_out) (optionally with a
per-element term added to z, or without the ReLU); goodness, loss and
the normalized output are a few torch ops over ``h.flatten(1)`` (functional.py); a second kernel
forms ``delta = coef * dG/dz`` from ``h`` on the fly and applies the weight and bias gradients,
either added into ``.grad`` ("grad") or as an in-place SGD step ("sgd"), so dW never exists as
a tensor. float32 only.
"""

from __future__ import annotations

import functools

import torch

from .. import functional as FF
from .layer_step import FFLayerStep


@functools.cache
def load_error() -> str | None:
    """None once ``ff_kernels._C`` is loaded (its ops registered), else why it cannot be."""
    try:
        from .. import _C  # noqa: F401  (importing registers torch.ops.ff_kernels.*)
    except ImportError as error:
        return f"{error} (build it with `pip install --no-build-isolation -e .` or scripts/setup.sh)"
    return None


def available(device: torch.device) -> bool:
    """Whether the compiled kernels run on ``device`` (CPU always when built; CUDA when built with nvcc)."""
    if load_error() is not None:
        return False
    if device.type == "cuda":
        return bool(torch.ops.ff_kernels.built_with_cuda())
    return device.type == "cpu"


def cpu_ops_take(*tensors: torch.Tensor | None) -> bool:
    """Whether the compiled CPU-only ops (the step passes, ``gather_columns``) take ``tensors``:
    the library is loaded and every given tensor is float32 on the CPU (None entries are skipped)."""
    if load_error() is not None:
        return False
    for t in tensors:  # a plain loop: called a dozen times per layer step
        if t is not None and (not t.is_cpu or t.dtype != torch.float32):
            return False
    return True


def activities(x, weight, bias, spec, extra=None, relu=True) -> torch.Tensor:
    """h = relu(z + extra) (B, C_out, H_out, W_out) of contiguous float32 ``x: (B, C_in, H_in, W_in)``.

    ``extra``: None or a contiguous (B, C_out, H_out, W_out) term added to the pre-activation z;
    ``relu=False`` returns ``z + extra`` itself.
    """
    return torch.ops.ff_kernels.local2d_forward(x, weight, bias, spec.kernel, spec.stride, spec.padding, extra, relu)


def forward(x, weight, bias, spec, *, goodness, rms):
    """Normalized output (B, C_out, H_out, W_out) and goodness (B,) float32."""
    h = activities(x.contiguous(), weight, bias, spec)
    flat = h.flatten(1)
    return FF.normalize(flat, goodness, rms).view_as(h), FF.goodness(flat, goodness)


def train_step(
    x_pos, x_neg, weight, bias, spec, *, goodness, threshold, temperature, rms,
    mode, lr, momentum, weight_decay, weight_buf, bias_buf,
) -> FFLayerStep:
    """One FF pass on (Bp, C_in, H_in, W_in) positives and (Bn, ...) negatives; see ops.local2d.ff_local2d_step."""
    n_pos = x_pos.shape[0]
    x = torch.cat([x_pos, x_neg]).contiguous()
    h = activities(x, weight, bias, spec)
    flat = h.flatten(1)
    g = FF.goodness(flat, goodness)
    loss = FF.ff_loss(g[:n_pos], g[n_pos:], goodness, threshold, temperature)
    output = FF.normalize(flat, goodness, rms).view_as(h)
    coef = FF.loss_goodness_grad(g, n_pos, goodness, threshold, temperature).contiguous()
    window = (spec.kernel, spec.stride, spec.padding)
    if mode == "grad":
        for param in (weight, bias):
            if param is not None and param.grad is None:
                param.grad = torch.zeros_like(param)
        bias_grad = bias.grad if bias is not None else None
        torch.ops.ff_kernels.local2d_grad_(x, h, coef, goodness, *window, weight.grad, bias_grad)
    else:
        torch.ops.ff_kernels.local2d_sgd_(
            x, h, coef, goodness, *window, weight, bias, weight_buf, bias_buf, lr, momentum, weight_decay,
        )
    return FFLayerStep(loss, g, output)
