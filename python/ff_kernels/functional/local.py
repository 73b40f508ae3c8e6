"""Locally connected (non-weight-shared) 2-D FF layers in plain torch: the reference.

Hinton's CIFAR-10 net (section 4) and the MNIST net of footnote 8 use layers in which every
output location has its own weights looking at a small window of the input. PyTorch has no
such layer; this module defines it and is what every fast path is tested against.

The op, for a :class:`LocalSpec` with kernel k, stride s and padding p:

    x       (B, C_in, H_in, W_in)
    H_out = (H_in + 2p - k) // s + 1,  W_out likewise,  L = H_out * W_out locations,
    K = C_in * k * k entries per weight block.
    weight  (L, C_out, K)    one block per output location l = i * W_out + j; entry index
                             (c, di, dj) -> (c * k + di) * k + dj
    bias    (L, C_out)

    The window of location (i, j) covers input rows i*s - p .. i*s - p + k - 1 and columns
    j*s - p .. j*s - p + k - 1. Positions outside the input map are simply absent: windows are
    truncated at the edges (paper footnote 12), the padding only places the windows. The
    block entries of absent positions are marked False in :func:`local_valid_mask`; they are
    zero, the forward ignores them and their gradient is zero, so they stay zero.

    z[b, o, i, j] = sum_{valid (c, di, dj)} weight[l, o, (c, di, dj)] * x[b, c, i*s-p+di, j*s-p+dj]
                    + bias[l, o]
    h = relu(z)     (B, C_out, H_out, W_out)

The FF goodness of an image is taken over all C_out * H_out * W_out units of the layer, i.e.
``functional.goodness(h.flatten(1))``, and the normalized output is
``functional.normalize(h.flatten(1)).view_as(h)``. The local gradients, with
``delta = dL/dz = coef[b] * dG/dz`` (B, C_out, H_out, W_out) as in :mod:`ff_kernels.functional`:

    dW[l, o, (c, di, dj)] = sum_b delta[b, o, i, j] * x[b, c, i*s-p+di, j*s-p+dj]   (0 where not valid)
    db[l, o]              = sum_b delta[b, o, i, j]

The same connectivity as a dense (C_out*H_out*W_out, C_in*H_in*W_in) mask for
``FFLinear(mask=...)`` (paper footnote 13) is :func:`local_dense_mask`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .. import functional as FF


@dataclass(frozen=True)
class LocalSpec:
    """Geometry of a locally connected layer: input map, units per location and window placement.

    Every window must overlap the input map (``padding < kernel``) and at least one window must
    fit (``in + 2 * padding >= kernel``); anything else raises ValueError naming the shapes.
    """

    in_channels: int
    in_height: int
    in_width: int
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0

    def __post_init__(self) -> None:
        for name in ("in_channels", "in_height", "in_width", "out_channels", "kernel", "stride", "padding"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"LocalSpec: {name} must be an int, got {value!r}")
            if value < (0 if name == "padding" else 1):
                raise ValueError(f"LocalSpec: {name} must be {'>= 0' if name == 'padding' else '>= 1'}, got {value}")
        if self.padding >= self.kernel:
            raise ValueError(
                f"LocalSpec: padding {self.padding} must be smaller than the kernel {self.kernel}, "
                "or corner windows would lie entirely outside the input map"
            )
        if min(self.in_height, self.in_width) + 2 * self.padding < self.kernel:
            raise ValueError(
                f"LocalSpec: a {self.kernel}x{self.kernel} window with padding {self.padding} does not fit the "
                f"{self.in_height}x{self.in_width} input map"
            )

    @property
    def out_height(self) -> int:
        return (self.in_height + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def out_width(self) -> int:
        return (self.in_width + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def num_locations(self) -> int:
        """L = H_out * W_out."""
        return self.out_height * self.out_width

    @property
    def block_size(self) -> int:
        """K = C_in * k * k, the length of one unit's weight block."""
        return self.in_channels * self.kernel * self.kernel

    @property
    def in_features(self) -> int:
        return self.in_channels * self.in_height * self.in_width

    @property
    def out_features(self) -> int:
        return self.out_channels * self.num_locations

    @property
    def weight_shape(self) -> tuple[int, int, int]:
        return (self.num_locations, self.out_channels, self.block_size)

    @property
    def bias_shape(self) -> tuple[int, int]:
        return (self.num_locations, self.out_channels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C_in, H_in, W_in) of one image."""
        return (self.in_channels, self.in_height, self.in_width)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(C_out, H_out, W_out) of one image."""
        return (self.out_channels, self.out_height, self.out_width)


@functools.lru_cache(maxsize=64)
def _window_index(spec: LocalSpec, device: torch.device) -> torch.Tensor:
    """(L, K) int64: flat input index c * H_in * W_in + row * W_in + col of every block entry,
    or ``spec.in_features`` (one past the image) where the entry lies outside the map."""
    k, s, p = spec.kernel, spec.stride, spec.padding
    rows = (torch.arange(spec.out_height) * s - p)[:, None] + torch.arange(k)  # (H_out, k)
    cols = (torch.arange(spec.out_width) * s - p)[:, None] + torch.arange(k)  # (W_out, k)
    r = rows[:, None, None, :, None]  # (H_out, 1, 1, k, 1) over (i, j, c, di, dj)
    q = cols[None, :, None, None, :]  # (1, W_out, 1, 1, k)
    c = torch.arange(spec.in_channels)[None, None, :, None, None]
    index = (c * spec.in_height + r) * spec.in_width + q
    valid = (r >= 0) & (r < spec.in_height) & (q >= 0) & (q < spec.in_width)
    index = torch.where(valid, index, spec.in_features)
    return index.reshape(spec.num_locations, spec.block_size).to(device)


def local_valid_mask(spec: LocalSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """(L, K) bool: True where a weight-block entry sees a position inside the input map."""
    return _window_index(spec, torch.device(device or "cpu")) < spec.in_features


def local_patches(x: torch.Tensor, spec: LocalSpec) -> torch.Tensor:
    """Every location's window of ``x: (B, C_in, H_in, W_in)`` -> (B, L, K), zeros where not valid."""
    flat = torch.cat([x.flatten(1), x.new_zeros(x.shape[0], 1)], dim=1)  # one zero column past the image
    return flat[:, _window_index(spec, x.device)]


def local_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: LocalSpec) -> torch.Tensor:
    """Pre-activations z (B, C_out, H_out, W_out) of x (B, C_in, H_in, W_in); weight (L, C_out, K), bias (L, C_out)."""
    z = torch.einsum("blk,lok->bol", local_patches(x, spec), weight)
    if bias is not None:
        z = z + bias.t()
    return z.reshape(x.shape[0], *spec.output_shape)


def local_activity(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: LocalSpec) -> torch.Tensor:
    """ReLU activities h = relu(z) (B, C_out, H_out, W_out)."""
    return torch.relu(local_linear(x, weight, bias, spec))


def local_dense_mask(spec: LocalSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """The layer's connectivity as a dense (C_out*H_out*W_out, C_in*H_in*W_in) bool mask.

    Both sides are flattened channel-major like ``.flatten(1)`` of an NCHW tensor: output unit
    ``o * L + l`` (l = i * W_out + j), input ``c * H_in * W_in + row * W_in + col``, so
    ``FFLinear(spec.in_features, spec.out_features, mask=local_dense_mask(spec))`` applied to
    ``x.flatten(1)`` computes ``h.flatten(1)`` (paper footnote 13).
    """
    index = _window_index(spec, torch.device(device or "cpu"))
    shape = (spec.out_channels, spec.num_locations, spec.in_features + 1)
    dense = torch.zeros(shape, dtype=torch.bool, device=index.device)
    dense.scatter_(2, index.expand(spec.out_channels, -1, -1), True)
    return dense[:, :, : spec.in_features].reshape(spec.out_features, spec.in_features)


def local_weight_to_dense(weight: torch.Tensor, spec: LocalSpec) -> torch.Tensor:
    """The dense (C_out*H_out*W_out, C_in*H_in*W_in) weight equal to ``weight: (L, C_out, K)``.

    Same flattening as :func:`local_dense_mask`; entries outside the mask are zero. Differentiable.
    """
    index = _window_index(spec, weight.device)
    dense = weight.new_zeros(spec.out_channels, spec.num_locations, spec.in_features + 1)
    dense = dense.scatter(2, index.expand(spec.out_channels, -1, -1), weight.transpose(0, 1))
    return dense[:, :, : spec.in_features].reshape(spec.out_features, spec.in_features)


def _goodness_and_activities(x, weight, bias, spec, kind):
    h = local_activity(x, weight, bias, spec)
    return FF.goodness(h.flatten(1), kind), h


def ff_local_loss(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: LocalSpec,
    kind: str = "ssq",
    threshold: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """FF loss (scalar, differentiable in weight and bias) of a local layer.

    x_pos: (Bp, C_in, H_in, W_in) positive images, x_neg: (Bn, C_in, H_in, W_in) negative images.
    """
    g_pos, _ = _goodness_and_activities(x_pos, weight, bias, spec, kind)
    g_neg, _ = _goodness_and_activities(x_neg, weight, bias, spec, kind)
    return FF.ff_loss(g_pos, g_neg, kind, threshold, temperature)


def ff_local_grads(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: LocalSpec,
    kind: str = "ssq",
    threshold: float = 0.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The loss and local gradients written out explicitly (no autograd).

    Returns ``(loss, dW (L, C_out, K), db (L, C_out) or None)``; equal to autograd on
    :func:`ff_local_loss` up to rounding, dW zero where :func:`local_valid_mask` is False.
    """
    x = torch.cat([x_pos, x_neg])
    n_pos = x_pos.shape[0]
    g, h = _goodness_and_activities(x, weight, bias, spec, kind)
    loss = FF.ff_loss(g[:n_pos], g[n_pos:], kind, threshold, temperature)
    coef = FF.loss_goodness_grad(g, n_pos, kind, threshold, temperature)
    delta = (coef[:, None, None, None] * FF.goodness_activity_grad(h, kind)).flatten(2)  # (B, C_out, L)
    grad_w = torch.einsum("bol,blk->lok", delta, local_patches(x, spec))
    grad_b = delta.sum(0).t() if bias is not None else None
    return loss, grad_w, grad_b
