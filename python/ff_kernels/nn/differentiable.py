"""Autograd through an FF layer's forward, for callers that backpropagate through it.

FF training never needs it: a layer learns from its own loss (``ff_backward`` / ``ff_step``)
and no derivative crosses a layer. But a module is also used as a building block, e.g. under a
backprop-trained head with the FF features fine-tuned, so ``layer(x)`` behaves like any
``nn.Module`` in grad mode: when grad mode is on and ``x`` or a parameter requires grad, the
output and goodness carry a graph.

The forward is the layer's fast op (the same values as without a graph). The backward
recomputes the layer with the reference math under autograd (``_reference_forward``) from the
saved input and parameters and differentiates that, so every backend gets the reference
backend's gradients. A parameter changed in place between the forward and the backward (an
``ff_step``, an optimizer step) makes the backward fail with torch's in-place error, as any
saved tensor would.
"""

from __future__ import annotations

import torch


def graph_needed(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether a forward of ``x`` through these parameters must record a graph."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params))


class LayerForward(torch.autograd.Function):
    """``(output, goodness) = layer._forward_op(x)`` with the reference math's gradients.

    ``apply(layer, x, weight, bias)``; ``bias`` may be None. Shapes are the layer's: x
    (B, *in_shape) -> output (B, *out_shape), goodness (B,) or (B, k) for a block-wise layer.
    """

    @staticmethod
    def forward(ctx, layer, x, weight, bias):
        ctx.layer = layer
        ctx.save_for_backward(x, weight, bias)
        with torch.no_grad():
            output, goodness = layer._forward_op(x)
        return output, goodness

    @staticmethod
    def backward(ctx, grad_output, grad_goodness):
        x, weight, bias = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip((x, weight, bias), ctx.needs_input_grad[1:])]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        with torch.enable_grad():
            output, goodness = ctx.layer._reference_forward(*inputs)
        outs, grads = [], []
        for out, grad in ((output, grad_output), (goodness, grad_goodness)):
            if grad is not None and out.requires_grad:
                outs.append(out)
                grads.append(grad.to(out.dtype))
        got = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True) if outs else [None] * len(wanted))
        result = [next(got) if t is not None and t.requires_grad else None for t in inputs]
        return (None, *result)
