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

Shared bottom-up work (``share_bottom_up``, on by default). The bottom input never changes
while the net runs, and several rows often hold the same image (an image's positive and
negative rows; its 10 labels at test time). So layer 1's bottom-up term ``W_1^up x_0 + b_1``
is computed once per image, by the bottom-up pass (:meth:`FFRecurrent.bottom_up`), and reused
at every iteration and by every row of the image; each iteration only computes the top-down
term ``W_1^down n(h_2)``. Layer 1's weight gradient splits the same way: the top-down block from
each iteration's rows, the bottom-up block once per step as ``(sum of the deltas of an image's
rows over all iterations).T @ x_0``. Rows of one image are given by tiling: ``bottom`` may have
N rows and ``top`` k * N rows, row b then holding ``bottom[b % N]`` (the layout of
``bottom.repeat(k, 1)``). ``share_bottom_up = False`` runs the plain algorithm, every row and
iteration through the whole concatenated GEMM; both agree up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .. import functional as FF
from ..functional import recurrent as FFR
from ..ops.validation import check_matrix
from .linear import FFLinear
from .peer_norm import PeerNormalization

INITS = ("balanced", "normal")


class BottomUp(NamedTuple):
    """The bottom-up pass (t = 0) of N images (:meth:`FFRecurrent.bottom_up`).

    states: K tensors (N, D_l), the states at t = 0
    up:     (N, D_1) layer 1's bottom-up pre-activation ``x_0 @ W_1^up.T + b_1``, the same at
            every iteration
    """

    states: list[torch.Tensor]
    up: torch.Tensor


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
        share_bottom_up: compute layer 1's bottom-up term once per image (module docstring).

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
        share_bottom_up: bool = True,
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
        self.share_bottom_up = bool(share_bottom_up)
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

    def _check(self, bottom: torch.Tensor, top: torch.Tensor | None, states) -> None:
        """Shapes, dtype and device of the clamped inputs and of given states.

        ``top`` has B rows, ``bottom`` B or N rows with B a multiple of N (tiled, see the module
        docstring); list states have B or N rows, a :class:`BottomUp` N rows.
        """
        like = self.layers[0].weight
        check_matrix("bottom", "FFRecurrent", bottom, self.sizes[0], like)
        if top is not None:
            check_matrix("top", "FFRecurrent", top, self.sizes[-1], like)
        n, rows = bottom.shape[0], bottom.shape[0] if top is None else top.shape[0]
        if top is not None and (n == 0 or rows % n) and rows != n:
            raise ValueError(
                f"FFRecurrent: bottom and top must have the same rows, or top a multiple of bottom's rows "
                f"(tiled images), got {n} and {rows}"
            )
        if states is None:
            return
        if isinstance(states, BottomUp):
            check_matrix("states.up", "FFRecurrent", states.up, self.sizes[1], like)
            if states.up.shape[0] != n:
                raise ValueError(f"FFRecurrent: states.up has {states.up.shape[0]} rows, bottom has {n}")
            states = states.states
        if len(states) != len(self.layers):
            raise ValueError(
                f"FFRecurrent: states must hold {len(self.layers)} tensors (one per hidden layer), got {len(states)}"
            )
        for l, (state, width) in enumerate(zip(states, self.sizes[1:-1]), start=1):
            check_matrix(f"states[{l - 1}]", "FFRecurrent", state, width, like)
            if state.shape[0] not in (n, rows):
                raise ValueError(
                    f"FFRecurrent: states[{l - 1}] has {state.shape[0]} rows, bottom has {n}"
                    + (f" and top {rows}" if rows != n else "")
                )

    def normalize(self, state: torch.Tensor) -> torch.Tensor:
        """n(h): what a hidden layer passes to its neighbours (all layers share goodness and rms_norm)."""
        layer = self.layers[0]
        return FF.normalize(state, layer.goodness_kind, layer.rms_norm)

    @torch.no_grad()
    def initial_states(self, bottom: torch.Tensor) -> list[torch.Tensor]:
        """The states at t = 0 from one bottom-up pass of ``bottom: (B, D_0)``: K tensors (B, D_l)."""
        return self.bottom_up(bottom).states

    @torch.no_grad()
    def bottom_up(self, bottom: torch.Tensor) -> BottomUp:
        """The bottom-up pass of ``bottom: (N, D_0)``: the states at t = 0 and layer 1's
        bottom-up pre-activation (:class:`BottomUp`), which :meth:`goodness` and :meth:`ff_step`
        take as ``states`` to reuse it."""
        self._check(bottom, None, None)
        states, below, up = [], bottom, None
        for layer, d_below in zip(self.layers, self.sizes):
            z = F.linear(below, layer.weight[:, :d_below], layer.bias)
            up = z if up is None else up
            states.append(torch.relu(z))
            below = self.normalize(states[-1])
        return BottomUp(states, up)

    def _start(self, bottom: torch.Tensor, rows: int, states) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The states at t = 0 tiled to ``rows`` rows, and layer 1's bottom-up pre-activation of
        the N images (None when the bottom-up term is not shared)."""
        if states is None:
            states = self.bottom_up(bottom) if self.share_bottom_up else self.initial_states(bottom)
        up = states.up if isinstance(states, BottomUp) else None
        states = list(states.states if isinstance(states, BottomUp) else states)
        if self.share_bottom_up and up is None:
            up = F.linear(bottom, self.layers[0].weight[:, :self.sizes[0]], self.layers[0].bias)
        states = [s if s.shape[0] == rows else s.repeat(rows // s.shape[0], 1) for s in states]
        return states, up if self.share_bottom_up else None

    def _tiled(self, bottom: torch.Tensor, rows: int) -> torch.Tensor:
        return bottom if bottom.shape[0] == rows else bottom.repeat(rows // bottom.shape[0], 1)

    def _first_preact(self, above: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Layer 1's pre-activation (B, D_1) from its top-down input ``above`` (B, D_above) and
        the images' shared bottom-up term ``up`` (N, D_1), B a multiple of N."""
        d_0 = self.sizes[0]
        z = torch.mm(above, self.layers[0].weight[:, d_0:].t())
        z.view(-1, *up.shape).add_(up)
        return z

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

    def _shared_step(self, states: Sequence[torch.Tensor], up: torch.Tensor, top: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`step` with layer 1's bottom-up term ``up`` (N, D_1) given (shared by tiled rows)."""
        normalized = [self.normalize(s) for s in states]
        above = [*normalized[1:], top]
        new = []
        for l, (layer, h) in enumerate(zip(self.layers, states)):
            if l == 0:
                z = self._first_preact(above[0], up)
            else:
                z = torch.addmm(layer.bias, torch.cat([normalized[l - 1], above[l]], dim=1), layer.weight.t())
            new.append(FFR.damped_from_preact(z, h, self.damping))
        return new

    @torch.no_grad()
    def goodness(
        self, bottom: torch.Tensor, top: torch.Tensor, iterations: int, states=None
    ) -> torch.Tensor:
        """Goodness (iterations, B, K) float32 of every hidden layer at t = 1..iterations.

        bottom: (B, D_0), or (N, D_0) tiled over the B rows of top: (B, D_{K+1}); ``states``
        the states at t = 0 (a list of K tensors of B or N rows, or a :class:`BottomUp`;
        default: the bottom-up pass of ``bottom``).
        """
        self._check(bottom, top, states)
        iterations = _check_iterations(iterations)
        rows = top.shape[0]
        states, up = self._start(bottom, rows, states)
        if up is None:
            bottom = self._tiled(bottom, rows)
        per_iteration = []
        for _ in range(iterations):
            states = self.step(states, bottom, top) if up is None else self._shared_step(states, up, top)
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
        states=None,
    ) -> list[torch.Tensor]:
        """Train on one batch: ``iterations`` damped iterations, then one SGD step per hidden layer.

        bottom: (B, D_0), or (N, D_0) tiled over the B rows of top: (B, D_{K+1}) (module
        docstring); the first ``n_pos`` rows are positive, the rest negative. ``states``: the
        states at t = 0, as for :meth:`goodness` (default: the bottom-up pass of ``bottom``).
        Each layer's loss is the mean of its FF losses at t = 1..iterations and its gradient the
        mean of the local gradients (:func:`~ff_kernels.functional.recurrent.recurrent_layer_grads`),
        all computed with the weights before the update. The step is ``torch.optim.SGD(lr,
        momentum, weight_decay)`` with the momentum buffers kept in each FFLinear, plus peer
        normalization measured on the positive rows' damped states and inputs averaged over the
        iterations. A parameter whose ``requires_grad`` is False is not updated. Returns the K
        layer losses (0-dim each).
        """
        self._check(bottom, top, states)
        rows = top.shape[0]
        if not 0 <= n_pos <= rows:
            raise ValueError(f"FFRecurrent: n_pos must be in 0..{rows} (the batch), got {n_pos}")
        iterations = _check_iterations(iterations)
        states, up = self._start(bottom, rows, states)
        frozen = any(not p.requires_grad for layer in self.layers for p in (layer.weight, layer.bias))
        if up is not None and not frozen:  # the shared step writes every parameter's update in place
            return self._shared_ff_step(bottom, top, n_pos, iterations, lr, momentum, weight_decay, states, up)
        bottom = self._tiled(bottom, rows)
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

    def _shared_ff_step(self, bottom, top, n_pos, iterations, lr, momentum, weight_decay, states, up):
        """:meth:`ff_step` with layer 1's bottom-up term shared (module docstring).

        The local gradients, summed over the iterations, go straight into each layer's SGD
        target: the momentum buffer (scaled by ``momentum`` first), or a gradient tensor without
        momentum; layer 1's bottom-up block and bias from the deltas summed over the iterations
        and over the rows of each image. Then weight decay, the update and peer normalization,
        as the plain algorithm does them.
        """
        n = bottom.shape[0]
        d_0 = self.sizes[0]
        targets = []  # per layer: (weight target, bias target, weight buffer, bias buffer)
        for layer in self.layers:
            weight_buf, bias_buf = layer.momentum_buffers(momentum)
            if weight_buf is not None:
                weight_buf.mul_(momentum)
                bias_buf.mul_(momentum)
                targets.append((weight_buf, bias_buf, weight_buf, bias_buf))
            else:
                targets.append((torch.zeros_like(layer.weight), torch.zeros_like(layer.bias), None, None))
        scale = 1.0 / iterations
        first_delta = up.new_zeros(up.shape)  # layer 1's deltas summed over iterations and each image's rows
        losses = [up.new_zeros(()) for _ in self.layers]
        activity = [up.new_zeros(width) for width in self.sizes[1:-1]]
        x_means = [up.new_zeros(1, layer.in_features) for layer in self.layers]
        for _ in range(iterations):
            normalized = [self.normalize(s) for s in states]
            above = [*normalized[1:], top]
            new_states = []
            for l, (layer, h) in enumerate(zip(self.layers, states)):
                weight_target, bias_target = targets[l][:2]
                if l == 0:
                    x = above[0]
                    z = self._first_preact(x, up)
                else:
                    x = torch.cat([normalized[l - 1], above[l]], dim=1)
                    z = torch.addmm(layer.bias, x, layer.weight.t())
                loss, delta, state = FFR.damped_step_delta(z, h, n_pos, self.damping, layer.goodness_kind,
                                                           layer.threshold, layer.temperature)
                losses[l] += loss
                if l == 0:
                    weight_target[:, d_0:].addmm_(delta.t(), x, alpha=scale)
                    first_delta.add_(delta.view(-1, *up.shape).sum(0))
                    x_means[0][0, d_0:] += x[:n_pos].float().mean(0)
                else:
                    weight_target.addmm_(delta.t(), x, alpha=scale)
                    bias_target.add_(delta.sum(0), alpha=scale)
                    x_means[l] += x[:n_pos].float().mean(0, keepdim=True)
                activity[l] += state[:n_pos].float().mean(0)
                new_states.append(state)
            states = new_states
        weight_target, bias_target = targets[0][:2]
        weight_target[:, :d_0].addmm_(first_delta.t(), bottom, alpha=scale)
        bias_target.add_(first_delta.sum(0), alpha=scale)
        if n_pos > 0:
            positive_images = bottom[torch.arange(n_pos, device=bottom.device) % n]
            x_means[0][0, :d_0] = positive_images.float().mean(0) * iterations
        result = []
        for layer, (weight_target, bias_target, weight_buf, bias_buf), loss, mean_h, x_mean in zip(
                self.layers, targets, losses, activity, x_means):
            for param, target, buf in ((layer.weight, weight_target, weight_buf), (layer.bias, bias_target, bias_buf)):
                if buf is not None:  # buf = momentum * buf + grad (so far) + wd * param; param -= lr * buf
                    if weight_decay:
                        buf.add_(param, alpha=weight_decay)
                    param.add_(buf, alpha=-lr)
                else:  # param -= lr * (grad + wd * param)
                    if weight_decay:
                        target.add_(param, alpha=weight_decay)
                    param.add_(target, alpha=-lr)
            if layer.peer_norm is not None and n_pos > 0:
                layer.apply_peer_norm_((mean_h / iterations, x_mean / iterations), "sgd", lr, weight_buf, bias_buf)
            result.append(loss / iterations)
        return result

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, damping={self.damping:g}"


def _check_iterations(iterations: int) -> int:
    if int(iterations) < 1:
        raise ValueError(f"FFRecurrent: iterations must be >= 1, got {iterations}")
    return int(iterations)
