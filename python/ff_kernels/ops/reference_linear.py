"""The reference backend: FF on a linear layer written with functional.py and autograd.

This is how one would write an FF step in plain PyTorch. Every fast backend must agree with it.
"""

from __future__ import annotations

import torch

from .. import functional as FF
from .layer_step import FFLayerStep


def forward(x, weight, bias, *, goodness, rms, mask, blocks=None):
    """Normalized output (B, D_out) and goodness (B,) float32 of ``x: (B, D_in)``; (B, k) per
    block for ``blocks=k``, each block normalized on its own."""
    h = FF.linear_activity(x, weight, bias, mask)
    return FF.normalize(h, goodness, rms, blocks=blocks), FF.goodness(h.float(), goodness, blocks)


def train_step(
    x_pos, x_neg, weight, bias, *, goodness, threshold, temperature, rms, mask,
    mode, lr, momentum, weight_decay, weight_buf, bias_buf, blocks=None,
) -> FFLayerStep:
    """Autograd on :func:`functional.ff_linear_loss` (block-wise with ``blocks=k``), then grad
    accumulation or an SGD step."""
    w = weight.detach().requires_grad_(True)
    b = bias.detach().requires_grad_(True) if bias is not None else None
    with torch.enable_grad():
        h_pos = FF.linear_activity(x_pos, w, b, mask)
        h_neg = FF.linear_activity(x_neg, w, b, mask)
        g_pos, g_neg = FF.goodness(h_pos.float(), goodness, blocks), FF.goodness(h_neg.float(), goodness, blocks)
        loss = FF.ff_loss(g_pos, g_neg, goodness, threshold, temperature)
        loss.backward()
    output = FF.normalize(torch.cat([h_pos, h_neg]).detach(), goodness, rms, blocks=blocks)
    with torch.no_grad():
        pairs = [(weight, w.grad, weight_buf, mask)] + ([(bias, b.grad, bias_buf, None)] if bias is not None else [])
        for param, grad, buf, param_mask in pairs:
            if mode == "grad":
                param.grad = grad if param.grad is None else param.grad.add_(grad)
            else:
                if buf is None:
                    buf = torch.zeros_like(param)
                FF.sgd_momentum_(param, grad, buf, lr, momentum, weight_decay, param_mask)
    return FFLayerStep(loss.detach(), torch.cat([g_pos, g_neg]).detach(), output)
