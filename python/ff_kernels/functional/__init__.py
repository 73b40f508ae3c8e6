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

Block-wise layers: with ``blocks=k`` the D units of a layer are split into k contiguous
blocks of D/k units and each block decides positive vs negative by its own goodness, so
``goodness`` returns ``(B, k)`` and every function of the goodness above works per block (its
logit, its probability, its normalization). The loss of a block-wise layer is the sum over blocks
of each block's FF loss, which makes it exactly k independent layers of D/k units sharing the
input (each block's threshold is the caller's, typically D/k for a mean square activity of 1).

One update per input (the paper's "learning fast and slow" argument and its equation 4):
:func:`target_goodness_epsilon` and :func:`target_goodness_lr` give the SGD learning rate with
which one FF step on a single row brings that row's goodness to a chosen value exactly.

Everything here is differentiable torch code with no fused tricks; it is deliberately slow
and obvious.
"""

from __future__ import annotations

import functools

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


def split_blocks(h: torch.Tensor, blocks: int) -> torch.Tensor:
    """View ``h: (..., D)`` as ``(..., blocks, D // blocks)``: contiguous blocks of units.

    Block i holds units ``i * D/k .. (i + 1) * D/k - 1``. ``blocks`` must divide D.
    """
    n = h.shape[-1]
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1 or n % blocks:
        raise ValueError(f"blocks must be a positive integer that divides the {n} units of a row, got {blocks!r}")
    return h.unflatten(-1, (blocks, n // blocks))


def goodness(h: torch.Tensor, kind: str = "ssq", blocks: int | None = None) -> torch.Tensor:
    """Goodness of each row of activities ``h: (B, D)`` -> ``(B,)``, summed over the last dim.

    With ``blocks=k``: the goodness of each of k contiguous blocks of D/k units -> ``(B, k)``
    (see :func:`split_blocks`); ``blocks=1`` gives ``(B, 1)``.
    """
    check_goodness(kind)
    if blocks is not None:
        h = split_blocks(h, blocks)
    if kind == "sum":
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

    ``mean(softplus(-s_pos)) + mean(softplus(s_neg))``; an empty batch contributes 0. Per-block
    goodness ``(Bp, k)``, ``(Bn, k)`` gives the sum over blocks of each block's loss (means over
    rows, sum over blocks).
    """
    s_pos = positive_logit(g_pos, kind, threshold, temperature)
    s_neg = positive_logit(g_neg, kind, threshold, temperature)
    loss = g_pos.new_zeros(())
    if s_pos.shape[0]:
        loss = loss + F.softplus(-s_pos).mean(0).sum()
    if s_neg.shape[0]:
        loss = loss + F.softplus(s_neg).mean(0).sum()
    return loss


def loss_goodness_grad(
    g: torch.Tensor, n_pos: int, kind: str, threshold: float, temperature: float = 1.0
) -> torch.Tensor:
    """dL/dG for every row of ``g: (B,)`` whose first ``n_pos`` rows are positive -> ``(B,)``.

    Positive rows: ``-sigmoid(-s) * sign / (T * n_pos)``; negative rows:
    ``sigmoid(s) * sign / (T * n_neg)``. Per-block goodness ``(B, k)`` gives ``(B, k)``.
    """
    n_neg = g.shape[0] - n_pos
    s = positive_logit(g, kind, threshold, temperature)
    is_pos = (torch.arange(g.shape[0], device=g.device) < n_pos).view(-1, *([1] * (g.dim() - 1)))
    dl_ds = torch.where(is_pos, -torch.sigmoid(-s) / max(n_pos, 1), torch.sigmoid(s) / max(n_neg, 1))
    return dl_ds * (goodness_sign(kind) / temperature)


def ff_loss_and_goodness_grad(
    g: torch.Tensor, n_pos: int, kind: str, threshold: float, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ff_loss(g[:n_pos], g[n_pos:]), loss_goodness_grad(g, n_pos))`` for ``g: (B,)`` in one go.

    The same values from fewer tensor ops (the fast paths call this once per layer and step):
    with ``t = -s`` for positive rows and ``t = s`` for negative ones (s the logit), the loss is
    ``mean_pos softplus(t) + mean_neg softplus(t)`` and dL/dG is
    ``sigmoid(t) * sign / T * (-1 / n_pos or 1 / n_neg)``, both from per-row constants kept
    per batch split (:func:`_row_weights`). Per-block goodness ``g: (B, k)``
    gives the loss summed over blocks and dL/dG ``(B, k)``, as :func:`ff_loss` and
    :func:`loss_goodness_grad` do.
    """
    sign = goodness_sign(kind)
    logit_scale, mean_weight = _row_weights(g.shape[0], n_pos, sign / temperature, g.dtype, g.device)
    if g.dim() == 2:  # per-block goodness: the row's weights for each of its blocks
        logit_scale, mean_weight = logit_scale[:, None], mean_weight[:, None]
    t = torch.sub(g, threshold).mul_(logit_scale)  # -s for positive rows, s for negative ones
    loss = F.softplus(t).mul_(mean_weight).sum()
    coef = torch.sigmoid(t).mul_(logit_scale).mul_(mean_weight)
    return loss, coef


@functools.lru_cache(maxsize=64)
def _row_weights(rows: int, n_pos: int, signed_inverse_temperature: float, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row constants of :func:`ff_loss_and_goodness_grad` (both (rows,)): the logit's factor,
    ``-sign / T`` for the ``n_pos`` positive rows and ``sign / T`` for the negative ones, and the
    means' weights, ``1 / n_pos`` and ``1 / n_neg``."""
    n_neg = rows - n_pos
    with torch.inference_mode(False):  # normal tensors, usable in and out of inference mode
        logit_scale = torch.full((rows,), signed_inverse_temperature, dtype=dtype, device=device)
        logit_scale[:n_pos] = -signed_inverse_temperature
        mean_weight = torch.empty(rows, dtype=dtype, device=device)
        mean_weight[:n_pos] = 1.0 / max(n_pos, 1)
        mean_weight[n_pos:] = 1.0 / max(n_neg, 1)
    return logit_scale, mean_weight


def pairwise_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, kind: str, temperature: float = 1.0) -> torch.Tensor:
    """Paired FF loss (scalar): ``mean_i softplus(-sign * (g_pos[i] - g_neg[i]) / T)``.

    Row i of ``g_pos`` and ``g_neg`` (both ``(P,)``) are the same input with its true and a wrong
    label; the loss asks only that the positive row have the better goodness of the two, so it
    ignores how an input's goodness level sits against a threshold (not in the paper: a ranking
    form of its loss for label-conditioned nets). An empty batch gives 0.
    """
    if g_pos.shape != g_neg.shape or g_pos.dim() != 1:
        raise ValueError(f"pairwise_loss: g_pos and g_neg must both be (P,), got {tuple(g_pos.shape)} and "
                         f"{tuple(g_neg.shape)}")
    if not g_pos.shape[0]:
        return g_pos.new_zeros(())
    return F.softplus(-goodness_sign(kind) * (g_pos - g_neg) / temperature).mean()


def pairwise_loss_goodness_grad(g: torch.Tensor, n_pos: int, kind: str, temperature: float = 1.0) -> torch.Tensor:
    """dL/dG of :func:`pairwise_loss` for ``g: (2P,)`` whose row i (< P = ``n_pos``) pairs with row P + i -> ``(2P,)``.

    With ``c_i = -sign * sigmoid(-sign * (g_i - g_{P+i}) / T) / (T * P)``: ``c_i`` for row i and
    ``-c_i`` for row P + i.
    """
    if g.dim() != 1 or g.shape[0] != 2 * n_pos:
        raise ValueError(f"pairwise_loss_goodness_grad: g must be (2 * n_pos,) = ({2 * n_pos},) (each positive row "
                         f"paired with one negative row), got {tuple(g.shape)}")
    sign = goodness_sign(kind)
    c = -sign * torch.sigmoid(-sign * (g[:n_pos] - g[n_pos:]) / temperature) / (temperature * max(n_pos, 1))
    return torch.cat([c, -c])


def target_goodness_epsilon(g: torch.Tensor, target, kind: str = "ssq") -> torch.Tensor:
    """The paper's equation 4: ``eps = sqrt(target / g) - 1`` for goodness ``g`` (any shape).

    Scaling every activity of a row by ``1 + eps`` turns its squared goodness ``g = sum_j y_j**2``
    into ``(1 + eps)**2 * g = target``. Squared goodness only ("ssq", "neg_ssq"); ``target`` > 0.
    """
    if check_goodness(kind) == "sum":
        raise ValueError("target_goodness_epsilon needs a squared goodness ('ssq' or 'neg_ssq'), got 'sum'")
    return torch.sqrt(target / g) - 1.0


def target_goodness_lr(
    g: torch.Tensor,
    target,
    x_sqnorm: torch.Tensor,
    kind: str = "ssq",
    threshold: float = 0.0,
    temperature: float = 1.0,
    positive: bool = True,
    bias: bool = True,
) -> torch.Tensor:
    """SGD learning rate with which one FF step on the single row x brings its goodness from g to target.

    g: the row's goodness before the step; x_sqnorm: ``||x||**2`` of the layer's input row
    (1 for a length-normalized input); ``positive``: whether x is passed as the step's one
    positive row (``x_neg`` empty) or its one negative row (``x_pos`` empty); ``bias``: whether
    the layer has one. Tensors of any (broadcastable) shape, one value per row -> same shape.

    Derivation (the paper's equation 4 and the update before it). With ``y = relu(W x + b)``,
    ``G = sum_j y_j**2`` and ``c = dL/dG`` of the one-row loss (``-sigmoid(-s) * sign / T`` for a positive row,
    ``sigmoid(s) * sign / T`` for a negative one, s the logit), a plain SGD step at rate ``lr``
    changes unit j's incoming weights and bias by ``-lr * c * 2 y_j * (x, 1)``, so its
    pre-activation by ``dz_j = -2 lr c (||x||**2 + [bias]) * y_j``: proportional to ``y_j``.
    An active unit (``y_j = z_j > 0``) becomes ``(1 + eps) y_j`` with
    ``eps = -2 lr c (||x||**2 + [bias])``; a silent one (``y_j = 0``) does not move and stays
    silent. So for ``eps > -1`` the step scales the whole activity vector by ``1 + eps`` and the
    goodness by ``(1 + eps)**2``; eps from :func:`target_goodness_epsilon` makes it ``target``:

        lr = -eps / (2 c (||x||**2 + [bias]))

    (The paper's update ``dw_j = 2 lr * dlog(p)/dG * y_j * x`` is this step: for a
    positive row ``-c = dlog(p)/dG``.) It holds for full connectivity only (a mask gives unit j
    ``||x * m_j||**2`` instead of ``||x||**2``), for squared goodness only ("sum"'s gradient adds
    the same amount to every active unit instead of scaling them), and for plain SGD: no weight
    decay, no momentum history, no peer normalization.

    The result is positive exactly when the row's loss pushes its goodness towards ``target``:
    for "ssq", a positive row below ``target`` or a negative row above it ("neg_ssq": the
    reverse). FF steps take ``lr >= 0``; a negative value means the row belongs on the other
    side. A row without active units (g = 0) cannot be moved: inf or nan.
    """
    eps = target_goodness_epsilon(g, target, kind)
    s = positive_logit(g, kind, threshold, temperature)
    dl_ds = -torch.sigmoid(-s) if positive else torch.sigmoid(s)
    c = dl_ds * (goodness_sign(kind) / temperature)
    return -eps / (2.0 * c * (x_sqnorm + (1.0 if bias else 0.0)))


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


def normalize(
    h: torch.Tensor, kind: str = "ssq", rms: bool = False, eps: float = NORM_EPS, blocks: int | None = None
) -> torch.Tensor:
    """Normalize each row of ``h: (B, D)`` so only its orientation passes on -> ``(B, D)``.

    Squared goodness: ``h / (||h||_2 + eps)``, or with ``rms``: ``h / (sqrt(mean(h**2)) + eps)``.
    "sum": ``h / (sum(h) + eps)``, or with ``rms``: ``h / (mean(h) + eps)`` (h >= 0 after ReLU).
    The divisor is :func:`normalization_scale` of the row's goodness. With ``blocks=k`` each
    block of D/k units is normalized on its own, so no block's goodness passes on either.
    """
    if blocks is not None:
        return normalize(split_blocks(h, blocks), kind, rms, eps).flatten(-2)
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
    blocks: int | None = None,
) -> torch.Tensor:
    """FF loss (scalar, differentiable in W and b) of one linear layer for x_pos (Bp, D_in), x_neg (Bn, D_in).

    ``blocks=k``: a block-wise layer, the sum of the k blocks' losses (``threshold`` is per block).
    """
    g_pos = goodness(linear_activity(x_pos, weight, bias, mask), kind, blocks)
    g_neg = goodness(linear_activity(x_neg, weight, bias, mask), kind, blocks)
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
    blocks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The layer's loss and its local gradients written out explicitly (no autograd).

    Returns ``(loss, dW (D_out, D_in), db (D_out,) or None)``; equal to autograd on
    :func:`ff_linear_loss` up to rounding. With a mask, ``dW`` is zero where the mask is.
    With ``blocks=k`` each unit's dL/dG is its block's.
    """
    x = torch.cat([x_pos, x_neg])
    h = linear_activity(x, weight, bias, mask)
    g = goodness(h, kind, blocks)
    n_pos = x_pos.shape[0]
    loss = ff_loss(g[:n_pos], g[n_pos:], kind, threshold, temperature)
    coef = loss_goodness_grad(g, n_pos, kind, threshold, temperature)
    coef = coef[:, None] if blocks is None else coef.repeat_interleave(h.shape[-1] // blocks, dim=-1)
    delta = coef * goodness_activity_grad(h, kind)
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
