"""FFRecurrentLocal: the recurrent, locally connected FF net of the paper's CIFAR-10 experiments (section 4).

Hidden layers 0..K-1 are topographic maps (C, H, W) (the paper: 32x32 with C = 3 units per
location). Unit (o, i, j) of layer l sees a ``k x k`` window around (i, j) (padding k // 2,
truncated at the edges) of the map below (the image for l = 0) and, for l < K - 1, the same
window of the map above; the last hidden layer gets the label instead, through a dense
``num_labels -> C * H * W`` map. Both windows are one locally connected op over the
concatenated channels ``[below, above]``, so a layer has

    weight       (L, C, (C_below + C_above) * k * k)   L = H * W; entry (c, di, dj) with c < C_below
                                                       bottom-up, c >= C_below top-down
    bias         (L, C)
    label_weight (C * H * W, num_labels)               last layer only, rows ordered like h.flatten(1)

Dynamics (as :class:`~ff_kernels.nn.FFRecurrent` of section 3.4, with ``n`` the
normalization of :func:`ff_kernels.functional.normalize`, d = ``damping``):

    z_l(t) = local([n(h_{l-1}(t-1)), n(h_{l+1}(t-1))]) + [l = K-1] label @ label_weight.T
    h_l(t) = d * h_l(t-1) + (1 - d) * relu(z_l(t))                  t = 1, 2, ...
    G_l(t) = goodness(h_l(t))  over all C * H * W units

with h_{-1} the image (passed as is, not normalized). t = 0 is one bottom-up pass: each layer
from the layer below at t = 0 and no top-down input (zeros in the top-down channels: the layer
above has no state yet); the label is a clamped input and enters the last layer already at
t = 0, so the bottom-up pass with a neutral label is the paper's "one-pass" net.

Training (:meth:`FFRecurrentLocal.ff_backward`) runs ``iterations`` synchronous iterations with the
weights fixed and adds to ``.grad`` the gradient of each layer's FF loss averaged over
t = first..iterations (default first = 1), with the neighbours' states and the layer's own previous state held constant
(no derivative crosses a layer or a time step). With ``c = dL/dG`` per image,

    delta_l(t) = c * (1 - d) * dG/dh(h_l(t)) * 1[z_l(t) > 0]     (B, C, H, W)

and every part of z takes its gradient against the same delta: the local weights and the bias
from the concatenated input (:func:`~ff_kernels.ops.local2d_primitives.local_delta_grad_`, one call
per layer over all iterations), the label weights as ``delta.flatten(1).T @ label``.

Shared label-independent work (``share_bottom_up``, on by default). The label enters only the
last layer, and several rows often hold the same image (an image's positive and negative rows,
the neutral-label pass of the softmax, the 10 labels of the test). So the bottom-up pass is
computed once per image without the label (:meth:`FFRecurrentLocal.bottom_up`: each layer's
pre-activation from the layer below only, through the bottom-up block of its weights, which
also skips the top-down channels that are zero at t = 0), and each row only adds its label's
drive to the last layer. Layer 0's bottom-up term, ``local(image)`` + bias, never changes: it is
that pass's layer-0 pre-activation, added to every iteration's top-down term of every row of
the image; layer 0's bottom-up weight block and bias take their gradient once per step from the
deltas summed over the iterations and over the rows of each image. Rows of one image are given
by tiling: ``images`` may have N rows and ``labels`` k * N, row b then holding ``images[b % N]``.
``share_bottom_up = False`` runs the plain algorithm; both agree up to float rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ... import functional as FF
from ...functional import local as FFL
from ...functional.local import LocalSpec
from ...ops.local2d_primitives import local_delta_grad_, local_linear, local_relu
from ...ops.validation import describe

LOSSES = ("threshold", "pairwise")


class LocalBottomUp(NamedTuple):
    """The label-independent bottom-up pass of N images (:meth:`FFRecurrentLocal.bottom_up`).

    preacts: K maps (N, C, H, W), each layer's pre-activation at t = 0 from the layer below (bias
             included, the label's drive not); ``preacts[0]`` is also layer 0's bottom-up term at
             every iteration
    """

    preacts: list[torch.Tensor]


class RecurrentLocalLayer(nn.Module):
    """The parameters of one hidden layer: ``weight`` (L, C, K) over ``[below, above]`` and ``bias`` (L, C).

    Weights N(0, 1 / fan_in) per location, fan_in the valid window entries; entries outside the
    map are zero and stay zero (their gradient is zero). Biases 0.
    """

    def __init__(self, spec: LocalSpec, below_channels: int, device=None, dtype=None) -> None:
        super().__init__()
        self.spec = spec
        self.below_channels = below_channels
        self.weight = nn.Parameter(torch.empty(spec.weight_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(spec.bias_shape, device=device, dtype=dtype))
        valid = FFL.local_valid_mask(spec, self.weight.device)[:, None, :]  # (L, 1, K)
        with torch.no_grad():
            fan_in = valid.sum(2, keepdim=True).clamp_min(1).to(self.weight.dtype)
            self.weight.normal_().mul_(fan_in.rsqrt()).mul_(valid)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"below {self.below_channels} + above {s.in_channels - self.below_channels} channels, "
                f"{s.in_height}x{s.in_width} -> {s.out_channels}x{s.out_height}x{s.out_width}, kernel={s.kernel}")


class FFRecurrentLocal(nn.Module):
    """The recurrent locally connected FF net (see the module docstring).

    Args:
        image_shape: (C_0, H, W) of the clamped bottom input (CIFAR-10: (3, 32, 32)).
        channels: C, units per location of every hidden layer (the paper: 3).
        depth: K, the number of hidden layers (the paper: 2 or 3).
        kernel: k, the receptive field (odd, so that every map stays H x W; the paper: 11).
        num_labels: the label width (10).
        damping: d, the share of the previous state in each update (the paper's 0.3).
        goodness, threshold, temperature, rms_norm: as for the FF layers; threshold None means
            C * H * W, the number of units of a layer.
        backend: the local ops' backend (see :mod:`ff_kernels.ops.local2d_primitives`).
        loss: "threshold" (the paper's: each row against the threshold, :func:`~ff_kernels.functional.ff_loss`)
            or "pairwise" (each positive row against its paired negative row,
            :func:`~ff_kernels.functional.pairwise_loss`; the threshold is then unused in training).
        share_bottom_up: compute the label-independent work once per image (module docstring).

    States are lists of K raw damped activity maps (B, C, H, W). Inputs: images (B, C_0, H, W)
    and labels (B, num_labels) float (one-hot, or a neutral label of 1 / num_labels each).
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        channels: int = 3,
        depth: int = 2,
        kernel: int = 11,
        num_labels: int = 10,
        damping: float = 0.3,
        goodness: str = "ssq",
        threshold: float | None = None,
        temperature: float = 1.0,
        rms_norm: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
        *,
        loss: str = "threshold",
        share_bottom_up: bool = True,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"FFRecurrentLocal: loss must be one of {LOSSES}, got {loss!r}")
        c0, height, width = (int(v) for v in image_shape)
        for name, value in (("channels", channels), ("depth", depth), ("num_labels", num_labels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FFRecurrentLocal: {name} must be an int >= 1, got {value!r}")
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"FFRecurrentLocal: kernel must be an odd int >= 1 (maps keep their size), got {kernel!r}")
        if not 0.0 <= float(damping) < 1.0:
            raise ValueError(f"FFRecurrentLocal: damping must be in [0, 1), got {damping}")
        if not float(temperature) > 0:
            raise ValueError(f"FFRecurrentLocal: temperature must be > 0, got {temperature}")
        self.image_shape = (c0, height, width)
        self.map_shape = (channels, height, width)
        self.num_labels = num_labels
        self.damping = float(damping)
        self.goodness_kind = FF.check_goodness(goodness)
        self.units = channels * height * width
        self.threshold = float(self.units if threshold is None else threshold)
        self.temperature = float(temperature)
        self.rms_norm = bool(rms_norm)
        self.backend = backend
        self.loss = loss
        self.share_bottom_up = bool(share_bottom_up)
        layers = []
        for l in range(depth):
            below = c0 if l == 0 else channels
            above = channels if l < depth - 1 else 0
            spec = LocalSpec(below + above, height, width, channels, kernel, 1, kernel // 2)
            layers.append(RecurrentLocalLayer(spec, below, device=device, dtype=dtype))
        self.layers = nn.ModuleList(layers)
        self.label_weight = nn.Parameter(torch.empty(self.units, num_labels, device=device, dtype=dtype))
        with torch.no_grad():
            self.label_weight.normal_(0.0, 1.0 / math.sqrt(num_labels))

    # ------------------------------------------------------------ pieces of the dynamics

    def _check(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        """images (N, C_0, H, W); labels (B, num_labels) float with B = N, or a multiple of N (tiled images)."""
        like = self.label_weight
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            got = describe(images) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"FFRecurrentLocal: images must have shape (B, {', '.join(map(str, self.image_shape))}), "
                             f"got {got}")
        n = images.shape[0]
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.dim() != 2
                                   or labels.shape[1] != self.num_labels
                                   or not (labels.shape[0] == n or (n > 0 and labels.shape[0] % n == 0))):
            got = describe(labels) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"FFRecurrentLocal: labels must be float ({n}, {self.num_labels}) "
                             f"(one row per image, or per tiled copy of the images), got {got}")
        for name, t in (("images", images), ("labels", labels)):
            if t is not None and (t.dtype != like.dtype or t.device != like.device):
                raise ValueError(f"FFRecurrentLocal: {name} must have dtype {like.dtype} and device {like.device} "
                                 f"(the parameters'), got {describe(t)}")

    def normalize(self, state: torch.Tensor) -> torch.Tensor:
        """n(h): what a layer passes to its neighbours, over all C * H * W units of each map."""
        return FF.normalize(state.flatten(1), self.goodness_kind, self.rms_norm).view_as(state)

    def goodness_of(self, state: torch.Tensor) -> torch.Tensor:
        """G (B,) of maps (B, C, H, W)."""
        return FF.goodness(state.flatten(1), self.goodness_kind)

    def label_drive(self, labels: torch.Tensor) -> torch.Tensor:
        """The label's part of the last layer's pre-activation: (B, num_labels) -> (B, C, H, W)."""
        return (labels @ self.label_weight.t()).view(-1, *self.map_shape)

    def _activities(self, l: int, x: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
        """relu(z_l) (B, C, H, W) for layer ``l``'s concatenated input ``x``; ``drive``: the label's part."""
        layer = self.layers[l]
        extra = drive if l == len(self.layers) - 1 else None
        return local_relu(x, layer.weight, layer.bias, layer.spec, extra, self.backend)

    def layer_inputs(self, states: list[torch.Tensor], images: torch.Tensor,
                     out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Each layer's input ``[below, n(above)]`` (B, C_below + C_above, H, W) from the states at t - 1.

        ``out``: one contiguous tensor of that shape per layer to write the inputs into (and return).
        """
        normalized = [self.normalize(s) for s in states]
        below, above = [images] + normalized[:-1], normalized[1:] + [None]
        if out is None:
            return [b if a is None else torch.cat([b, a], dim=1) for b, a in zip(below, above)]
        for b, a, o in zip(below, above, out):
            if a is None:
                o.copy_(b)
            else:
                torch.cat([b, a], dim=1, out=o)
        return out

    @torch.no_grad()
    def initial_states(self, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        """The states at t = 0: one bottom-up pass (no top-down input; the label enters the last layer)."""
        self._check(images, labels)
        drive = self.label_drive(labels)
        states, below = [], images
        for l, layer in enumerate(self.layers):
            above = layer.spec.in_channels - layer.below_channels
            x = below if above == 0 else torch.cat([below, below.new_zeros(below.shape[0], above, *below.shape[2:])], 1)
            states.append(self._activities(l, x, drive))
            below = self.normalize(states[-1])
        return states

    # ------------------------------------------------------------ the shared label-independent work

    def _blocks(self, l: int) -> tuple[tuple[LocalSpec, torch.Tensor], tuple[LocalSpec, torch.Tensor] | None]:
        """Layer ``l``'s bottom-up and top-down blocks: (spec, contiguous weight) each, the
        top-down one None for the last layer."""
        layer = self.layers[l]
        spec, below = layer.spec, layer.below_channels
        above = spec.in_channels - below
        if above == 0:
            return (spec, layer.weight), None
        entries = below * spec.kernel * spec.kernel
        part = lambda channels: LocalSpec(channels, spec.in_height, spec.in_width, spec.out_channels,
                                          spec.kernel, spec.stride, spec.padding)
        return ((part(below), layer.weight[:, :, :entries].contiguous()),
                (part(above), layer.weight[:, :, entries:].contiguous()))

    @torch.no_grad()
    def bottom_up(self, images: torch.Tensor) -> LocalBottomUp:
        """The label-independent bottom-up pass of ``images`` (N, C_0, H, W): :class:`LocalBottomUp`."""
        self._check(images, None)
        preacts, below = [], images
        for l, layer in enumerate(self.layers):
            spec, weight = self._blocks(l)[0]
            z = local_linear(below, weight, layer.bias, spec, self.backend)
            preacts.append(z)
            if l < len(self.layers) - 1:
                below = self.normalize(torch.relu(z))
        return LocalBottomUp(preacts)

    def states_from(self, start: LocalBottomUp, labels: torch.Tensor) -> list[torch.Tensor]:
        """The states at t = 0 of the rows with ``labels`` (B, num_labels), B a multiple of the
        N images of ``start``: its pre-activations tiled, the label's drive added to the last."""
        rows = labels.shape[0]
        states = [_tile(z, rows) for z in start.preacts]
        states[-1] = states[-1] + self.label_drive(labels)
        return [torch.relu(s) for s in states]

    def _shared_start(self, images: torch.Tensor, labels: torch.Tensor, start: LocalBottomUp | None):
        """(states at t = 0 (B rows), layer 0's bottom-up term tiled (B rows), the top-down block of layer 0)."""
        start = self.bottom_up(images) if start is None else start
        if start.preacts[0].shape[0] != images.shape[0]:
            raise ValueError(f"FFRecurrentLocal: start holds {start.preacts[0].shape[0]} images, images has "
                             f"{images.shape[0]}")
        return self.states_from(start, labels), _tile(start.preacts[0], labels.shape[0]), self._blocks(0)[1]

    def _shared_activities(self, l: int, normalized: list[torch.Tensor], image_term: torch.Tensor,
                           top_down, drive: torch.Tensor, out: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(relu(z_l), layer l's local input) from the normalized states at t - 1: layer 0 adds its
        fixed bottom-up term to its top-down term (its local input is the top-down part only);
        ``out``: where to write the local input (as :meth:`layer_inputs`)."""
        if l == 0:
            if top_down is None:  # one hidden layer: z = bottom-up term + label drive, the same at every t
                return torch.relu(image_term + drive), None
            x = normalized[1] if out is None else out.copy_(normalized[1])
            spec, weight = top_down  # layer 0 is not the last one: no label drive
            return local_relu(x, weight, None, spec, image_term, self.backend), x
        below = normalized[l - 1]
        above = normalized[l + 1] if l + 1 < len(self.layers) else None
        if out is None:
            x = below if above is None else torch.cat([below, above], dim=1)
        elif above is None:
            x = out.copy_(below)
        else:
            x = torch.cat([below, above], dim=1, out=out)
        return self._activities(l, x, drive), x

    @torch.no_grad()
    def step(self, states: list[torch.Tensor], images: torch.Tensor, drive: torch.Tensor) -> list[torch.Tensor]:
        """One synchronous damped iteration: the states at t from those at t - 1; ``drive`` = :meth:`label_drive`."""
        inputs = self.layer_inputs(states, images)
        d = self.damping
        return [d * h + (1.0 - d) * self._activities(l, x, drive) for l, (x, h) in enumerate(zip(inputs, states))]

    @torch.no_grad()
    def run(self, images: torch.Tensor, labels: torch.Tensor, iterations: int) -> list[list[torch.Tensor]]:
        """The states at t = 0..iterations: a list of ``iterations + 1`` lists of K maps (B, C, H, W)."""
        states = [self.initial_states(images, labels)]
        drive = self.label_drive(labels)
        for _ in range(_check_iterations(iterations)):
            states.append(self.step(states[-1], images, drive))
        return states

    @torch.no_grad()
    def goodness(self, images: torch.Tensor, labels: torch.Tensor, iterations: int,
                 start: LocalBottomUp | None = None) -> torch.Tensor:
        """Goodness (iterations, B, K) float32 of every hidden layer at t = 1..iterations (keeps no old states).

        images (N, C_0, H, W) tiled over the B rows of labels (B, num_labels) (module docstring);
        ``start``: the images' :meth:`bottom_up`, if already computed (shared path only).
        """
        self._check(images, labels)
        if self.share_bottom_up:
            states, image_term, top_down = self._shared_start(images, labels, start)
            drive = self.label_drive(labels)
            d, rows = self.damping, []
            for _ in range(_check_iterations(iterations)):
                normalized = [self.normalize(s) for s in states]
                states = [d * h + (1.0 - d) * self._shared_activities(l, normalized, image_term, top_down, drive)[0]
                          for l, h in enumerate(states)]
                rows.append(torch.stack([self.goodness_of(s).float() for s in states], 1))
            return torch.stack(rows)
        images = _tile(images, labels.shape[0])
        states = self.initial_states(images, labels)
        drive = self.label_drive(labels)
        rows = []
        for _ in range(_check_iterations(iterations)):
            states = self.step(states, images, drive)
            rows.append(torch.stack([self.goodness_of(s).float() for s in states], 1))
        return torch.stack(rows)

    # ------------------------------------------------------------ training

    @torch.no_grad()
    def ff_backward(self, images: torch.Tensor, labels: torch.Tensor, n_pos: int, iterations: int,
                    first: int = 1, start: LocalBottomUp | None = None) -> list[torch.Tensor]:
        """Add the local FF gradients of one batch to ``.grad``; return each layer's loss (0-dim).

        images (N, C_0, H, W) tiled over the B rows of labels (B, num_labels) (B = N: one image
        per row; module docstring); the first ``n_pos`` rows are positive, the rest negative
        (for the "pairwise" loss B = 2 * n_pos and row i pairs with row n_pos + i). The net runs
        ``iterations`` iterations; each layer's loss is the mean of its FF losses at
        t = ``first``..``iterations`` and its gradient that mean's (see the module docstring), all
        with the current weights. ``start``: the images' :meth:`bottom_up` if already computed.
        A parameter whose ``requires_grad`` is False gets no gradient.
        """
        self._check(images, labels)
        rows = labels.shape[0]
        if not 0 <= n_pos <= rows:
            raise ValueError(f"FFRecurrentLocal: n_pos must be in 0..{rows} (the batch), got {n_pos}")
        if self.loss == "pairwise" and rows != 2 * n_pos:
            raise ValueError(f"FFRecurrentLocal: the pairwise loss needs one negative row per positive row "
                             f"(B = 2 * n_pos = {2 * n_pos}), got B = {rows}")
        iterations = _check_iterations(iterations)
        if isinstance(first, bool) or not isinstance(first, int) or not 1 <= first <= iterations:
            raise ValueError(f"FFRecurrentLocal: first must be an int in 1..iterations ({iterations}), got {first!r}")
        if self.share_bottom_up:
            return self._shared_ff_backward(images, labels, n_pos, iterations, first, start)
        images = _tile(images, rows)
        trained = iterations - first + 1
        drive = self.label_drive(labels)
        states = self.initial_states(images, labels)
        d, batch = self.damping, images.shape[0]
        # the trained iterations' inputs and deltas, written in place: (trained * B, ...) per layer
        inputs_seen = [images.new_empty(trained * batch, *layer.spec.input_shape) for layer in self.layers]
        deltas = [images.new_empty(trained * batch, *self.map_shape) for _ in self.layers]
        losses = [torch.zeros((), device=images.device) for _ in self.layers]
        for t in range(1, iterations + 1):
            if t < first:
                states = self.step(states, images, drive)
                continue
            rows = slice((t - first) * batch, (t - first + 1) * batch)
            inputs = self.layer_inputs(states, images, [seen[rows] for seen in inputs_seen])
            new_states = []
            for l, (x, h) in enumerate(zip(inputs, states)):
                active = self._activities(l, x, drive)
                state = d * h + (1.0 - d) * active
                g = self.goodness_of(state)
                loss, coef = self._loss_and_grad(g, n_pos)
                losses[l] = losses[l] + loss.float()
                scale = (coef * ((1.0 - d) / trained)).view(-1, 1, 1, 1)
                torch.mul(scale * FF.goodness_activity_grad(state, self.goodness_kind), active > 0, out=deltas[l][rows])
                new_states.append(state)
            states = new_states
        for l, layer in enumerate(self.layers):
            if not (layer.weight.requires_grad or layer.bias.requires_grad):
                continue  # a frozen layer gets no gradient
            targets = []
            for param in (layer.weight, layer.bias):
                if param.requires_grad and param.grad is None:
                    param.grad = torch.zeros_like(param)
                targets.append(param.grad if param.requires_grad else torch.zeros_like(param))  # frozen: dropped
            local_delta_grad_(inputs_seen[l], deltas[l], layer.spec, *targets, self.backend)
        if self.label_weight.requires_grad:
            if self.label_weight.grad is None:
                self.label_weight.grad = torch.zeros_like(self.label_weight)
            self.label_weight.grad.addmm_(deltas[-1].flatten(1).t(), labels.repeat(trained, 1))
        return [loss / trained for loss in losses]

    def _shared_ff_backward(self, images, labels, n_pos, iterations, first, start) -> list[torch.Tensor]:
        """:meth:`ff_backward` with the label-independent work shared (module docstring)."""
        trained = iterations - first + 1
        drive = self.label_drive(labels)
        states, image_term, top_down = self._shared_start(images, labels, start)
        d, batch = self.damping, labels.shape[0]
        # the trained iterations' local inputs (layer 0: its top-down part only) and deltas
        shapes = [(top_down[0].input_shape if top_down is not None else None) if l == 0 else layer.spec.input_shape
                  for l, layer in enumerate(self.layers)]
        inputs_seen = [None if shape is None else images.new_empty(trained * batch, *shape) for shape in shapes]
        deltas = [images.new_empty(trained * batch, *self.map_shape) for _ in self.layers]
        losses = [torch.zeros((), device=images.device) for _ in self.layers]
        for t in range(1, iterations + 1):
            normalized = [self.normalize(s) for s in states]
            if t < first:
                states = [d * h + (1.0 - d) * self._shared_activities(l, normalized, image_term, top_down, drive)[0]
                          for l, h in enumerate(states)]
                continue
            rows = slice((t - first) * batch, (t - first + 1) * batch)
            new_states = []
            for l, h in enumerate(states):
                out = None if inputs_seen[l] is None else inputs_seen[l][rows]
                active, _ = self._shared_activities(l, normalized, image_term, top_down, drive, out)
                state = d * h + (1.0 - d) * active
                loss, coef = self._loss_and_grad(self.goodness_of(state), n_pos)
                losses[l] = losses[l] + loss.float()
                scale = (coef * ((1.0 - d) / trained)).view(-1, 1, 1, 1)
                torch.mul(scale * FF.goodness_activity_grad(state, self.goodness_kind), active > 0, out=deltas[l][rows])
                new_states.append(state)
            states = new_states
        # layer 0: the bottom-up block and the bias from the deltas summed over iterations and rows of an image
        first_layer = self.layers[0]
        weight0_grad, bias0_grad = _grad_target(first_layer.weight), _grad_target(first_layer.bias)
        n = images.shape[0]
        spec, weight = self._blocks(0)[0]
        delta_sum = deltas[0].view(-1, n, *self.map_shape).sum(0)
        grad = torch.zeros_like(weight) if top_down is not None else weight0_grad
        local_delta_grad_(images, delta_sum, spec, grad, bias0_grad, self.backend)
        if top_down is not None:
            entries = spec.block_size  # the bottom-up block's entries come first
            weight0_grad[:, :, :entries] += grad
            above_spec, above_weight = top_down
            above_grad = torch.zeros_like(above_weight)
            local_delta_grad_(inputs_seen[0], deltas[0], above_spec, above_grad, None, self.backend)
            weight0_grad[:, :, entries:] += above_grad
        for l, layer in enumerate(self.layers):
            if l > 0 and (layer.weight.requires_grad or layer.bias.requires_grad):
                local_delta_grad_(inputs_seen[l], deltas[l], layer.spec, _grad_target(layer.weight),
                                  _grad_target(layer.bias), self.backend)
        if self.label_weight.requires_grad:
            _grad_target(self.label_weight).addmm_(deltas[-1].flatten(1).t(), labels.repeat(trained, 1))
        return [loss / trained for loss in losses]

    def _loss_and_grad(self, g: torch.Tensor, n_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's FF loss (0-dim) and dL/dG (B,) from its goodness ``g`` (B,) at one iteration."""
        kind, temperature = self.goodness_kind, self.temperature
        if self.loss == "pairwise":
            return (FF.pairwise_loss(g[:n_pos], g[n_pos:], kind, temperature),
                    FF.pairwise_loss_goodness_grad(g, n_pos, kind, temperature))
        return (FF.ff_loss(g[:n_pos], g[n_pos:], kind, self.threshold, temperature),
                FF.loss_goodness_grad(g, n_pos, kind, self.threshold, temperature))

    def extra_repr(self) -> str:
        return (f"image {self.image_shape}, maps {self.map_shape} x {len(self.layers)}, labels {self.num_labels}, "
                f"damping={self.damping:g}, goodness={self.goodness_kind!r}, threshold={self.threshold:g}, "
                f"temperature={self.temperature:g}, loss={self.loss!r}")


def _tile(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` (N, ...) repeated to ``rows`` rows (a multiple of N): row b holds ``t[b % N]``."""
    return t if t.shape[0] == rows else t.repeat(rows // t.shape[0], *([1] * (t.dim() - 1)))


def _check_iterations(iterations: int) -> int:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"FFRecurrentLocal: iterations must be an int >= 1, got {iterations!r}")
    return iterations


def _grad_target(param: nn.Parameter) -> torch.Tensor:
    """Where a step adds ``param``'s gradient: its ``.grad`` (made zeros if None), or a scratch
    tensor that is dropped when the parameter is frozen (``requires_grad`` False)."""
    if not param.requires_grad:
        return torch.zeros_like(param)
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad
