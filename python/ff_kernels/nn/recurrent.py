"""FFRecurrent: hidden FF layers with bottom-up and top-down inputs, run as a recurrent net (Hinton 2022, 3.4).

Layers 0 and K + 1 are clamped: the bottom input (an image, already normalized) and the top
input (a label code). Hidden layer l (1..K) is one :class:`FFLinear` over the concatenation of
the normalized states of layer l - 1 and layer l + 1, i.e. ``W_l = [bottom-up | top-down]``; its
output ``relu(x @ W_l.T + b_l)`` is the sum of a bottom-up and a top-down linear map. Dynamics:

- t = 0: one bottom-up pass, ``h_l = relu(W_l^up n(h_{l-1}) + b_l)`` with no top-down input
  (the layer above has no state yet);
- t = 1..T: all hidden layers at once from the states at t - 1, damped:
  ``h_l = d * h_l + (1 - d) * relu(W_l [n(h_{l-1}), n(h_{l+1})] + b_l)``
  (see :mod:`ff_kernels.functional.recurrent`).

``n`` is the layers' normalization (unit mean square with ``rms_norm``). Training
(:meth:`FFRecurrent.ff_step`) runs T iterations with the weights fixed, sums each layer's local
gradients over the iterations (mean of its T FF losses), and then takes one SGD step per layer
with peer normalization, as ``FFLinear.ff_step`` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .. import functional as FF
from ..functional import recurrent as FFR
from ..ops.validation import check_matrix
from .linear import FFLinear
from .peer_norm import PeerNormalization

INITS = ("balanced", "normal")


class FFRecurrent(nn.Module):
    """A recurrent FF stack between a clamped bottom input and a clamped top input.

    Args:
        bottom_features: D_0, the width of the bottom input (784 for MNIST pixels).
        hidden: widths D_1..D_K of the hidden layers.
        top_features: D_{K+1}, the width of the top input (10 for a one-of-N label).
        damping: d, the share of the previous state in each update (the paper's 0.3).
        goodness, threshold, temperature, rms_norm: as for :class:`FFLinear` (threshold None: the
            layer's width).
        peer_norm: peer-normalization strength of every hidden layer, 0 = off.
        init: "balanced": the bottom-up block of each weight N(0, 1 / (2 D_{l-1})), the top-down
            block N(0, 1 / (2 D_{l+1})), so that with unit-mean-square inputs each neighbour adds
            variance 1/2 to the pre-activations, the 10-unit label as much as a 2000-unit layer;
            "normal": N(0, 1 / fan_in) over the whole concatenated input, which leaves the top
            layer's label a share of D_top / (D_K + D_top) (0.5% for 2000 units).

    ``layers[l - 1]`` is ``FFLinear(D_{l-1} + D_{l+1}, D_l)`` with zero bias. States are raw
    (un-normalized) damped activities, a list of K tensors (B, D_l).
    """

    def __init__(
        self,
        bottom_features: int,
        hidden: Sequence[int],
        top_features: int,
        damping: float = 0.3,
        goodness: str = "ssq",
        threshold: float | None = None,
        temperature: float = 1.0,
        rms_norm: bool = True,
        peer_norm: float = 0.0,
        init: str = "balanced",
        device=None,
    ) -> None:
        super().__init__()
        sizes = [int(bottom_features), *map(int, hidden), int(top_features)]
        if len(sizes) < 3 or min(sizes) < 1:
            raise ValueError(
                f"FFRecurrent: needs positive bottom_features, at least one hidden width and top_features, got "
                f"bottom {bottom_features}, hidden {list(hidden)}, top {top_features}"
            )
        if init not in INITS:
            raise ValueError(f"FFRecurrent: init must be one of {INITS}, got {init!r}")
        if not 0.0 <= float(damping) < 1.0:
            raise ValueError(f"FFRecurrent: damping must be in [0, 1), got {damping}")
        self.sizes = sizes
        self.damping = float(damping)
        self.layers = nn.ModuleList(
            FFLinear(below + above, width, goodness=goodness, threshold=threshold, temperature=temperature,
                     rms_norm=rms_norm, device=device,
                     peer_norm=PeerNormalization(width, strength=peer_norm, device=device) if peer_norm else None)
            for below, width, above in zip(sizes[:-2], sizes[1:-1], sizes[2:])
        )
        with torch.no_grad():
            for layer, below, above in zip(self.layers, sizes[:-2], sizes[2:]):
                if init == "normal":
                    layer.weight.normal_(0.0, 1.0 / math.sqrt(layer.in_features))
                else:
                    layer.weight[:, :below].normal_(0.0, 1.0 / math.sqrt(2 * below))
                    layer.weight[:, below:].normal_(0.0, 1.0 / math.sqrt(2 * above))
                layer.bias.zero_()

    def _check(self, bottom: torch.Tensor, top: torch.Tensor | None, states: Sequence[torch.Tensor] | None) -> None:
        """Shapes, dtype and device of the clamped inputs and of given states; all must have B rows."""
        like = self.layers[0].weight
        check_matrix("bottom", "FFRecurrent", bottom, self.sizes[0], like)
        if top is not None:
            check_matrix("top", "FFRecurrent", top, self.sizes[-1], like)
        if top is not None and top.shape[0] != bottom.shape[0]:
            raise ValueError(
                f"FFRecurrent: bottom and top must have the same rows, got {bottom.shape[0]} and {top.shape[0]}"
            )
        if states is None:
            return
        if len(states) != len(self.layers):
            raise ValueError(
                f"FFRecurrent: states must hold {len(self.layers)} tensors (one per hidden layer), got {len(states)}"
            )
        for l, (state, width) in enumerate(zip(states, self.sizes[1:-1]), start=1):
            check_matrix(f"states[{l - 1}]", "FFRecurrent", state, width, like)
            if state.shape[0] != bottom.shape[0]:
                raise ValueError(
                    f"FFRecurrent: states[{l - 1}] has {state.shape[0]} rows, bottom has {bottom.shape[0]}"
                )

    def normalize(self, state: torch.Tensor) -> torch.Tensor:
        """n(h): what a hidden layer passes to its neighbours (all layers share goodness and rms_norm)."""
        layer = self.layers[0]
        return FF.normalize(state, layer.goodness_kind, layer.rms_norm)

    @torch.no_grad()
    def initial_states(self, bottom: torch.Tensor) -> list[torch.Tensor]:
        """The states at t = 0 from one bottom-up pass of ``bottom: (B, D_0)``: K tensors (B, D_l)."""
        self._check(bottom, None, None)
        states, below = [], bottom
        for layer, d_below in zip(self.layers, self.sizes):
            states.append(FF.linear_activity(below, layer.weight[:, :d_below], layer.bias))
            below = self.normalize(states[-1])
        return states

    def layer_inputs(
        self, states: Sequence[torch.Tensor], bottom: torch.Tensor, top: torch.Tensor
    ) -> list[torch.Tensor]:
        """Each hidden layer's input ``[n(h_{l-1}), n(h_{l+1})]`` (B, D_{l-1} + D_{l+1}) from the states at t - 1."""
        neighbours = [bottom, *(self.normalize(s) for s in states), top]
        return [torch.cat([below, above], dim=1) for below, above in zip(neighbours[:-2], neighbours[2:])]

    @torch.no_grad()
    def step(self, states: Sequence[torch.Tensor], bottom: torch.Tensor, top: torch.Tensor) -> list[torch.Tensor]:
        """One synchronous damped iteration: the states at t from those at t - 1 (K tensors (B, D_l))."""
        inputs = self.layer_inputs(states, bottom, top)
        return [FFR.damped_state(x, h, layer.weight, layer.bias, self.damping)[0]
                for layer, x, h in zip(self.layers, inputs, states)]

    @torch.no_grad()
    def goodness(
        self, bottom: torch.Tensor, top: torch.Tensor, iterations: int, states: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Goodness (iterations, B, K) float32 of every hidden layer at t = 1..iterations.

        bottom: (B, D_0), top: (B, D_{K+1}); ``states`` the states at t = 0 (default: the
        bottom-up pass of ``bottom``).
        """
        self._check(bottom, top, states)
        states = self.initial_states(bottom) if states is None else list(states)
        per_iteration = []
        for _ in range(_check_iterations(iterations)):
            states = self.step(states, bottom, top)
            per_iteration.append(torch.stack([FF.goodness(s, layer.goodness_kind).float()
                                              for layer, s in zip(self.layers, states)], dim=1))
        return torch.stack(per_iteration)

    @torch.no_grad()
    def ff_step(
        self,
        bottom: torch.Tensor,
        top: torch.Tensor,
        n_pos: int,
        iterations: int,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        states: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Train on one batch: ``iterations`` damped iterations, then one SGD step per hidden layer.

        bottom: (B, D_0), top: (B, D_{K+1}); the first ``n_pos`` rows are positive, the rest
        negative. ``states``: the states at t = 0 (default: the bottom-up pass of ``bottom``).
        Each layer's loss is the mean of its FF losses at t = 1..iterations and its gradient the
        mean of the local gradients (:func:`~ff_kernels.functional.recurrent.recurrent_layer_grads`),
        all computed with the weights before the update. The step is ``torch.optim.SGD(lr,
        momentum, weight_decay)`` with the momentum buffers kept in each FFLinear, plus peer
        normalization measured on the positive rows' damped states and inputs averaged over the
        iterations. A parameter whose ``requires_grad`` is False is not updated. Returns the K
        layer losses (0-dim each).
        """
        self._check(bottom, top, states)
        if not 0 <= n_pos <= bottom.shape[0]:
            raise ValueError(f"FFRecurrent: n_pos must be in 0..{bottom.shape[0]} (the batch), got {n_pos}")
        iterations = _check_iterations(iterations)
        states = self.initial_states(bottom) if states is None else list(states)
        totals = [None] * len(self.layers)  # per layer: [loss, dW, db, mean positive state, mean positive input]
        for _ in range(iterations):
            inputs = self.layer_inputs(states, bottom, top)
            new_states = []
            for i, (layer, x, h) in enumerate(zip(self.layers, inputs, states)):
                step = FFR.recurrent_layer_grads(x, h, layer.weight, layer.bias, n_pos, self.damping, layer.goodness_kind,
                                                layer.threshold, layer.temperature)
                parts = [step.loss, step.grad_weight, step.grad_bias,
                         step.state[:n_pos].float().mean(0), x[:n_pos].float().mean(0, keepdim=True)]
                totals[i] = parts if totals[i] is None else [a + b for a, b in zip(totals[i], parts)]
                new_states.append(step.state)
            states = new_states
        losses = []
        for layer, (loss, grad_w, grad_b, activity, x_mean) in zip(self.layers, totals):
            weight_buf, bias_buf = layer.momentum_buffers(momentum)
            for param, grad, buf in ((layer.weight, grad_w, weight_buf), (layer.bias, grad_b, bias_buf)):
                if not param.requires_grad:
                    continue  # a frozen parameter: no update, no weight decay, no momentum
                FF.sgd_momentum_(param, grad / iterations, buf if buf is not None else torch.zeros_like(param), lr,
                                momentum, weight_decay)
            if layer.peer_norm is not None and n_pos > 0:
                layer.apply_peer_norm_((activity / iterations, x_mean / iterations), "sgd", lr, weight_buf, bias_buf)
            losses.append(loss / iterations)
        return losses

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, damping={self.damping:g}"


def _check_iterations(iterations: int) -> int:
    if int(iterations) < 1:
        raise ValueError(f"FFRecurrent: iterations must be >= 1, got {iterations}")
    return int(iterations)
