"""One hidden layer of the recurrent FF net with top-down connections (Hinton 2022, section 3.4), in plain torch.

A static image is processed like a video by a stack of hidden layers between a clamped bottom
layer (the image) and a clamped top layer (the label). At iteration t = 1, 2, ... every hidden
layer l is updated at once (synchronously) from the normalized states of its neighbours at
t - 1, and the update is damped. For one hidden layer with D units:

    x_t = [n(h_below), n(h_above)]              (B, D_below + D_above), at time t - 1
    z_t = x_t @ W.T + b                         (B, D)      W: (D, D_below + D_above)
    h_t = d * h_{t-1} + (1 - d) * relu(z_t)     (B, D)      the damped "pre-normalized state"
    G_t = goodness(h_t)                         (B,)

with ``d = damping`` (the paper's 0.3 of the previous state plus 0.7 of the computed one) and
``n`` the normalization of :func:`ff_kernels.functional.normalize`. The FF loss of ``G_t`` (first
``n_pos`` rows positive) is trained with local gradients only: ``x_t`` and ``h_{t-1}`` are
constants, so no derivative crosses a layer or a time step. With ``c = dL/dG`` per row
(:func:`~ff_kernels.functional.loss_goodness_grad`) and ``dG/dh`` from
:func:`~ff_kernels.functional.goodness_activity_grad`,

    delta = c[:, None] * (1 - d) * dG/dh(h_t) * 1[z_t > 0]     (B, D)
    dL/dW = delta.T @ x_t                                     (D, D_below + D_above)
    dL/db = delta.sum(0)                                      (D,)

("sum" goodness: ``dG/dh = 1``; ``goodness_activity_grad`` gives ``1[h_t > 0]``, which is 1
wherever ``z_t > 0``.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import functional as FF


class RecurrentLayerStep(NamedTuple):
    """One iteration of one hidden layer with its local gradients.

    loss:        () the layer's FF loss at this iteration
    grad_weight: (D, D_in) dL/dW with the inputs and the previous state held constant
    grad_bias:   (D,) dL/db
    state:       (B, D) the new damped state h_t
    """

    loss: torch.Tensor
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor
    state: torch.Tensor


def damped_state(
    x: torch.Tensor, previous: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h_t, relu(z_t))``: the new state ``d * previous + (1 - d) * relu(x @ W.T + b)`` and the
    undamped activities, each (B, D), for x (B, D_in), previous (B, D), W (D, D_in), b (D,)."""
    active = FF.linear_activity(x, weight, bias)
    return damping * previous + (1.0 - damping) * active, active


def damped_from_preact(z: torch.Tensor, previous: torch.Tensor, damping: float) -> torch.Tensor:
    """The new state ``d * previous + (1 - d) * relu(z)`` (B, D) from the pre-activations ``z`` (B, D)."""
    return torch.relu(z).mul_(1.0 - damping).add_(previous, alpha=damping)


def damped_step_delta(
    z: torch.Tensor,
    previous: torch.Tensor,
    n_pos: int,
    damping: float,
    kind: str = "ssq",
    threshold: float = 0.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, delta (B, D), new state (B, D)) of one damped update from its pre-activations ``z``.

    The same quantities as :func:`recurrent_layer_grads` (``delta`` is the one whose
    ``delta.T @ x`` is its weight gradient) for callers that form ``z`` and the weight gradient
    themselves, e.g. from parts that rows share.
    """
    state = damped_from_preact(z, previous, damping)
    g = FF.goodness(state, kind)
    loss, coef = FF.ff_loss_and_goodness_grad(g, n_pos, kind, threshold, temperature)
    coef = (coef * (1.0 - damping)).to(state.dtype)
    if kind == "sum":  # dG/dh = 1 wherever z > 0
        delta = (z > 0).to(state.dtype).mul_(coef[:, None])
    else:  # dG/dh = 2h, times 1[z > 0]
        delta = torch.where(z > 0, state, 0.0).mul_((2.0 * coef)[:, None])
    return loss, delta, state


def recurrent_layer_grads(
    x: torch.Tensor,
    previous: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    n_pos: int,
    damping: float,
    kind: str = "ssq",
    threshold: float = 0.0,
    temperature: float = 1.0,
) -> RecurrentLayerStep:
    """One damped update of a hidden layer and the local gradients of its FF loss (no autograd).

    x: (B, D_in) the normalized neighbour states at t - 1, previous: (B, D) the layer's state
    at t - 1, first ``n_pos`` rows positive. Equal to autograd on the same loss with ``x`` and
    ``previous`` detached, up to rounding.
    """
    state, active = damped_state(x, previous, weight, bias, damping)
    g = FF.goodness(state, kind)
    loss = FF.ff_loss(g[:n_pos], g[n_pos:], kind, threshold, temperature)
    dl_dg = FF.loss_goodness_grad(g, n_pos, kind, threshold, temperature)
    delta = (dl_dg * (1.0 - damping))[:, None] * FF.goodness_activity_grad(state, kind) * (active > 0).to(state.dtype)
    return RecurrentLayerStep(loss, delta.T @ x, delta.sum(0), state)
