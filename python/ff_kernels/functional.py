"""The Forward-Forward math in plain torch: the reference every fast path is tested against.

Notation (Hinton 2022, "The Forward-Forward Algorithm", sections 2 and 3):

    x : (B, D_in)   input rows (for a hidden layer: the previous layer's normalized output)
    z = x @ W.T + b (B, D_out) pre-activations, W: (D_out, D_in), b: (D_out,)
    h = relu(z)     (B, D_out) activities
    G = goodness(h) (B,)

Goodness functions (``GOODNESS``):

    "ssq"      G = sum_j h_j**2   positives should have HIGH goodness (section 2)
    "neg_ssq"  G = sum_j h_j**2   positives should have LOW goodness (the paper's "min ssq",
                                  section 4, better on CIFAR-10)
    "sum"      G = sum_j h_j      unsquared sum of activities, positives high (footnote 21)

With ``sign = -1`` for "neg_ssq" and ``+1`` otherwise, the probability that a row is positive
is ``sigmoid(s)`` with the logit ``s = sign * (G - theta) / T``. The layer loss for a batch of
positive rows and a batch of negative rows is

    L = mean_pos softplus(-s) + mean_neg softplus(s)

Its local gradients never leave the layer: with ``c = dL/dG`` per row and
``dG/dz = 2h`` ("ssq", "neg_ssq") or ``1[h > 0]`` ("sum"),

    delta = c[:, None] * dG/dz     (B, D_out)
    dL/dW = delta.T @ x            (D_out, D_in)
    dL/db = delta.sum(0)           (D_out,)

The output passed to the next layer is normalized so that only its orientation carries on:
divided by its length for the squared goodness functions and by its sum for "sum". With
``rms=True`` (Hinton's variant) it is scaled instead so that the mean square (mean, for
"sum") over the D_out units is 1. No mean is subtracted.

Everything here is differentiable torch code with no fused tricks; it is deliberately slow
and obvious.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GOODNESS = ("ssq", "neg_ssq", "sum")
NORM_EPS = 1e-6


def check_goodness(kind: str) -> str:
    """Return ``kind`` if it names a goodness function, else raise ValueError."""
    if kind not in GOODNESS:
        raise ValueError(f"goodness must be one of {GOODNESS}, got {kind!r}")
    return kind


def goodness_sign(kind: str) -> float:
    """+1 when positive data should have high goodness, -1 for "neg_ssq" (min ssq)."""
    return -1.0 if check_goodness(kind) == "neg_ssq" else 1.0


def goodness(h: torch.Tensor, kind: str = "ssq") -> torch.Tensor:
    """Goodness of each row of activities ``h: (B, D)`` -> ``(B,)``, summed over the last dim."""
    if check_goodness(kind) == "sum":
        return h.sum(-1)
    return h.square().sum(-1)


def goodness_activity_grad(h: torch.Tensor, kind: str = "ssq") -> torch.Tensor:
    """dG/dz for ``h = relu(z)``: ``2h`` for the squared goodness, ``1[h > 0]`` for "sum"."""
    if check_goodness(kind) == "sum":
        return (h > 0).to(h.dtype)
    return 2.0 * h


def positive_logit(g: torch.Tensor, kind: str, threshold: float, temperature: float = 1.0) -> torch.Tensor:
    """Logit of p(positive): ``sign * (g - threshold) / temperature``, shape of ``g``."""
    return goodness_sign(kind) * (g - threshold) / temperature


def positive_probability(g: torch.Tensor, kind: str, threshold: float, temperature: float = 1.0) -> torch.Tensor:
    """p(positive) = sigmoid(positive_logit(g)), shape of ``g``."""
    return torch.sigmoid(positive_logit(g, kind, threshold, temperature))


def ff_loss(
    g_pos: torch.Tensor, g_neg: torch.Tensor, kind: str, threshold: float, temperature: float = 1.0
) -> torch.Tensor:
    """FF layer loss (scalar) from the goodness of positive rows ``(Bp,)`` and negative rows ``(Bn,)``.

    ``mean(softplus(-s_pos)) + mean(softplus(s_neg))``; an empty batch contributes 0.
    """
    s_pos = positive_logit(g_pos, kind, threshold, temperature)
    s_neg = positive_logit(g_neg, kind, threshold, temperature)
    loss = g_pos.new_zeros(())
    if s_pos.numel():
        loss = loss + F.softplus(-s_pos).mean()
    if s_neg.numel():
        loss = loss + F.softplus(s_neg).mean()
    return loss


def loss_goodness_grad(
    g: torch.Tensor, n_pos: int, kind: str, threshold: float, temperature: float = 1.0
) -> torch.Tensor:
    """dL/dG for every row of ``g: (B,)`` whose first ``n_pos`` rows are positive -> ``(B,)``.

    Positive rows: ``-sigmoid(-s) * sign / (T * n_pos)``; negative rows:
    ``sigmoid(s) * sign / (T * n_neg)``.
    """
    n_neg = g.shape[0] - n_pos
    s = positive_logit(g, kind, threshold, temperature)
    is_pos = torch.arange(g.shape[0], device=g.device) < n_pos
    dl_ds = torch.where(is_pos, -torch.sigmoid(-s) / max(n_pos, 1), torch.sigmoid(s) / max(n_neg, 1))
    return dl_ds * (goodness_sign(kind) / temperature)


def normalization_scale(
    g: torch.Tensor, kind: str, n_features: int, rms: bool = False, eps: float = NORM_EPS
) -> torch.Tensor:
    """The divisor ``s`` of each row, from its goodness ``g: (B,)`` -> ``(B,)``: ``normalize(h) == h / s[:, None]``.

    Squared goodness (``g = sum h**2``): ``s = sqrt(g) + eps``, or with ``rms``:
    ``sqrt(g) / sqrt(n_features) + eps``. "sum" (``g = sum h``): ``s = g + eps``, or with ``rms``:
    ``g / n_features + eps``. ``n_features`` is D, the number of units in a row. Given a layer's
    normalized output ``y`` and its goodness, the raw activities are ``h = y * s[:, None]``.
    """
    scale = g if check_goodness(kind) == "sum" else g.sqrt()
    if rms:
        scale = scale / (n_features if kind == "sum" else n_features**0.5)
    return scale + eps


def normalize(h: torch.Tensor, kind: str = "ssq", rms: bool = False, eps: float = NORM_EPS) -> torch.Tensor:
    """Normalize each row of ``h: (B, D)`` so only its orientation passes on -> ``(B, D)``.

    Squared goodness: ``h / (||h||_2 + eps)``, or with ``rms``: ``h / (sqrt(mean(h**2)) + eps)``.
    "sum": ``h / (sum(h) + eps)``, or with ``rms``: ``h / (mean(h) + eps)`` (h >= 0 after ReLU).
    The divisor is :func:`normalization_scale` of the row's goodness.
    """
    return h / normalization_scale(goodness(h, kind), kind, h.shape[-1], rms, eps).unsqueeze(-1)


def linear_activity(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """ReLU activities ``relu(x @ (W * mask).T + b)``: x (B, D_in), W (D_out, D_in) -> (B, D_out)."""
    if mask is not None:
        weight = weight * mask.to(weight.dtype)
    return torch.relu(F.linear(x, weight, bias))


def ff_linear_loss(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kind: str = "ssq",
    threshold: float = 0.0,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FF loss (scalar, differentiable in W and b) of one linear layer for x_pos (Bp, D_in), x_neg (Bn, D_in)."""
    g_pos = goodness(linear_activity(x_pos, weight, bias, mask), kind)
    g_neg = goodness(linear_activity(x_neg, weight, bias, mask), kind)
    return ff_loss(g_pos, g_neg, kind, threshold, temperature)


def ff_linear_grads(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kind: str = "ssq",
    threshold: float = 0.0,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The layer's loss and its local gradients written out explicitly (no autograd).

    Returns ``(loss, dW (D_out, D_in), db (D_out,) or None)``; equal to autograd on
    :func:`ff_linear_loss` up to rounding. With a mask, ``dW`` is zero where the mask is.
    """
    x = torch.cat([x_pos, x_neg])
    h = linear_activity(x, weight, bias, mask)
    g = goodness(h, kind)
    n_pos = x_pos.shape[0]
    loss = ff_loss(g[:n_pos], g[n_pos:], kind, threshold, temperature)
    delta = loss_goodness_grad(g, n_pos, kind, threshold, temperature)[:, None] * goodness_activity_grad(h, kind)
    grad_w = delta.T @ x
    if mask is not None:
        grad_w = grad_w * mask.to(grad_w.dtype)
    grad_b = delta.sum(0) if bias is not None else None
    return loss, grad_w, grad_b


def sgd_momentum_(
    param: torch.Tensor,
    grad: torch.Tensor,
    buf: torch.Tensor,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    mask: torch.Tensor | None = None,
) -> None:
    """In-place SGD step with the semantics of ``torch.optim.SGD`` (dampening 0, no Nesterov).

    ``d = grad + wd * param; buf = momentum * buf + d; param -= lr * buf``, with ``buf``
    starting at zero (which equals torch's first-step ``buf = d``). Where ``mask`` is 0 the
    update is zeroed so absent connections stay exactly zero.
    """
    d = grad + weight_decay * param
    if mask is not None:
        d = d * mask.to(d.dtype)
    buf.mul_(momentum).add_(d)
    param.sub_(lr * buf)
