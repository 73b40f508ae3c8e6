"""BackpropLocal2d: a locally connected layer + ReLU trained by autograd (the paper's BP baseline, section 4).

The same connectivity as :class:`~ff_kernels.nn.FFLocal2d` ("same" geometry: stride 1, an odd
kernel k with padding k // 2, so the map keeps its size), but a plain differentiable module:
``h = relu(local_linear(x, weight, bias))``. Its forward and backward run on the ops of
:mod:`ff_kernels.ops.local2d_primitives` (the compiled kernels for float32 CPU/CUDA tensors, else the
reference):

    delta  = dL/dh * 1[h > 0]                  (B, C_out, H, W)
    dL/dW, dL/db = local_delta_grad_(x, delta)
    dL/dx  = local_input_grad(delta, weight)   (B, C_in, H, W)
"""

from __future__ import annotations

import torch
from torch import nn

from ...functional import local as FFL
from ...functional.local import LocalSpec
from ...ops.local2d_primitives import local_delta_grad_, local_input_grad, local_relu, transposed_spec


class _LocalReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec, backend):
        h = local_relu(x, weight, bias, spec, None, backend)
        ctx.save_for_backward(x, weight, h)
        ctx.spec, ctx.backend, ctx.has_bias = spec, backend, bias is not None
        return h

    @staticmethod
    def backward(ctx, grad_h):
        x, weight, h = ctx.saved_tensors
        spec, backend = ctx.spec, ctx.backend
        delta = (grad_h * (h > 0)).contiguous()
        grad_x = local_input_grad(delta, weight, spec, backend) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight)
        grad_b = weight.new_zeros(spec.bias_shape) if ctx.has_bias else None
        local_delta_grad_(x, delta, spec, grad_w, grad_b, backend)
        return grad_x, grad_w, grad_b, None, None


class BackpropLocal2d(nn.Module):
    """relu(local_linear(x)) with autograd support: x (B, C_in, H, W) -> (B, C_out, H, W).

    Parameters ``weight`` (H * W, C_out, C_in * k * k), uniform(-1/sqrt(fan_in), +) per
    location with fan_in its valid window entries, zero outside the map (their gradient is zero,
    so plain optimizers keep them zero unless they add decoupled terms to every entry; L2 weight
    decay on a zero stays zero); ``bias`` (H * W, C_out), same init.
    """

    def __init__(self, in_channels: int, size: int, out_channels: int, kernel: int, bias: bool = True,
                 backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"BackpropLocal2d: kernel must be an odd int >= 1 (the map keeps its size), got {kernel!r}")
        self.spec = LocalSpec(in_channels, size, size, out_channels, kernel, 1, kernel // 2)
        transposed_spec(self.spec)  # the backward's geometry check, at construction
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(self.spec.weight_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self.spec.bias_shape, device=device, dtype=dtype)) if bias else None
        valid = FFL.local_valid_mask(self.spec, self.weight.device)[:, None, :]
        bound = valid.sum(2, keepdim=True).clamp_min(1).to(self.weight.dtype).rsqrt()
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0).mul_(bound).mul_(valid)
            if self.bias is not None:
                self.bias.uniform_(-1.0, 1.0).mul_(bound[:, :, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LocalReLU.apply(x, self.weight, self.bias, self.spec, self.backend)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{s.in_channels}, {s.in_height}x{s.in_width} -> {s.out_channels}x{s.out_height}x{s.out_width}, "
                f"kernel={s.kernel}, bias={self.bias is not None}")
