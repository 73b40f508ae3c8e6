"""The reference backend of the local 2-D ops: functional_local.py and autograd.

This is how one would write an FF step of a locally connected layer in plain PyTorch. Every
fast backend must agree with it.
"""

from __future__ import annotations

import torch

from .. import functional as FF
from ..functional import local as FFL
from .layer_step import FFLayerStep


def forward(x, weight, bias, spec, *, goodness, rms):
    """Normalized output (B, C_out, H_out, W_out) and goodness (B,) float32 of ``x: (B, C_in, H_in, W_in)``."""
    h = FFL.local_activity(x, weight, bias, spec).flatten(1)
    return FF.normalize(h, goodness, rms).view(-1, *spec.output_shape), FF.goodness(h.float(), goodness)


def train_step(
    x_pos, x_neg, weight, bias, spec, *, goodness, threshold, temperature, rms,
    mode, lr, momentum, weight_decay, weight_buf, bias_buf,
) -> FFLayerStep:
    """Autograd on :func:`functional_local.ff_local_loss`, then grad accumulation or an SGD step.

    The SGD step leaves the block entries outside the input map (``local_valid_mask``) untouched.
    """
    w = weight.detach().requires_grad_(True)
    b = bias.detach().requires_grad_(True) if bias is not None else None
    with torch.enable_grad():
        h_pos = FFL.local_activity(x_pos, w, b, spec).flatten(1)
        h_neg = FFL.local_activity(x_neg, w, b, spec).flatten(1)
        g_pos, g_neg = FF.goodness(h_pos.float(), goodness), FF.goodness(h_neg.float(), goodness)
        loss = FF.ff_loss(g_pos, g_neg, goodness, threshold, temperature)
        loss.backward()
    output = FF.normalize(torch.cat([h_pos, h_neg]).detach(), goodness, rms).view(-1, *spec.output_shape)
    with torch.no_grad():
        valid = FFL.local_valid_mask(spec, weight.device)[:, None, :]  # broadcasts over C_out
        pairs = [(weight, w.grad, weight_buf, valid)] + ([(bias, b.grad, bias_buf, None)] if bias is not None else [])
        for param, grad, buf, mask in pairs:
            if mode == "grad":
                param.grad = grad if param.grad is None else param.grad.add_(grad)
            else:
                buf = torch.zeros_like(param) if buf is None else buf
                FF.sgd_momentum_(param, grad, buf, lr, momentum, weight_decay, mask)
    return FFLayerStep(loss.detach(), torch.cat([g_pos, g_neg]).detach(), output)
