"""FFLocal2d: a locally connected (non-weight-shared) 2-D layer trained by its own FF objective."""

from __future__ import annotations

import torch
from torch import nn

from ..functional import local as FFL
from ..functional.local import LocalSpec
from ..ops import reference_local2d
from ..ops.layer_step import FFLayerStep
from ..ops.local2d import BACKENDS, ff_local2d_forward, ff_local2d_step, step_takes_peer
from ..ops.validation import describe
from .layer import FFLayer
from .linear import FFLinear
from .peer_norm import PeerNormalization


def _pair(in_size) -> tuple[int, int]:
    if isinstance(in_size, int) and not isinstance(in_size, bool):
        return in_size, in_size
    if isinstance(in_size, (tuple, list)) and len(in_size) == 2:
        return tuple(in_size)
    raise TypeError(f"FFLocal2d: in_size must be an int or a pair (H, W), got {in_size!r}")


class FFLocal2d(FFLayer):
    """A locally connected layer + ReLU with a local FF loss (Hinton 2022, section 4, footnote 8).

    Every output location has its own weights over a ``kernel x kernel`` window of the input;
    windows are truncated at the edges (footnote 12). The geometry is ``.spec``, a
    :class:`~ff_kernels.functional.local.LocalSpec`; the math is in
    :mod:`ff_kernels.functional.local`, the ops in :mod:`ff_kernels.ops.local2d`. The goodness
    and the normalization cover all ``C_out * H_out * W_out`` units of an image.

    Args:
        in_channels, in_size: C_in and the input map, an int or (H_in, W_in).
        out_channels: C_out, units per location.
        kernel, stride, padding: window placement (padding only places the windows).
        bias: learn a bias per unit (L, C_out).
        goodness: "ssq" | "neg_ssq" | "sum" (see :mod:`ff_kernels.functional`).
        threshold: theta; default ``C_out * H_out * W_out`` (the number of units).
        temperature: T.
        rms_norm: normalize the output to unit mean square instead of unit length.
        backend: "auto" | "reference" | "cpu" | "cuda" (see :mod:`ff_kernels.ops.local2d`).
        peer_norm: optional :class:`~ff_kernels.nn.PeerNormalization` over the
            ``C_out * H_out * W_out`` units, ordered like ``output.flatten(1)`` (footnote 9).

    Parameters: ``weight`` (L, C_out, C_in * k * k) with L = H_out * W_out, entries whose window
    position lies outside the map zero (:func:`~ff_kernels.functional.local.local_valid_mask`)
    and kept exactly zero by every update; ``bias`` (L, C_out).

    Shapes: ``x: (B, C_in, H_in, W_in)`` in the layer's dtype -> ``(B, C_out, H_out, W_out)``.
    Inputs may be contiguous or ``torch.channels_last``. On the CPU, where the layer runs as one
    GEMM per location (:mod:`ff_kernels.ops.gemm_local2d`), outputs are channels-last views (the
    values and shape are the same; use ``.reshape``/``.flatten``, not ``.view``, to flatten them).
    Flat ``(B, C_in * H_in * W_in)`` rows are rejected, not reshaped. :class:`FFSequential`
    stacks FFLocal2d layers whose maps chain; it does not flatten, so it cannot put an FFLinear
    after them (use :meth:`to_dense` for an all-dense equivalent).
    """

    _backends = BACKENDS

    def __init__(
        self,
        in_channels: int,
        in_size,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        goodness: str = "ssq",
        threshold: float | None = None,
        temperature: float = 1.0,
        rms_norm: bool = False,
        backend: str = "auto",
        peer_norm: PeerNormalization | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        height, width = _pair(in_size)
        self.spec = LocalSpec(in_channels, height, width, out_channels, kernel, stride, padding)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.spec.weight_shape, **factory))
        self.bias = nn.Parameter(torch.empty(self.spec.bias_shape, **factory)) if bias else None
        self._init_ff(goodness, threshold, temperature, rms_norm, backend, self.spec.out_features, peer_norm)
        self.reset_parameters()

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """(C_in, H_in, W_in) of one image."""
        return self.spec.input_shape

    @property
    def out_shape(self) -> tuple[int, int, int]:
        """(C_out, H_out, W_out) of one image."""
        return self.spec.output_shape

    def _name(self) -> str:
        s = self.spec
        return (f"FFLocal2d({s.in_channels}, {s.in_height}x{s.in_width}, {s.out_channels}, "
                f"kernel={s.kernel}, stride={s.stride}, padding={s.padding})")

    def valid_mask(self) -> torch.Tensor:
        """(L, 1, K) bool: True where a weight entry's window position lies inside the map."""
        return FFL.local_valid_mask(self.spec, self.weight.device)[:, None, :]

    def reset_parameters(self) -> None:
        """Per location l: weight and bias uniform(-1/sqrt(fan_in_l), +), fan_in_l the valid inputs of l.

        Then the entries outside the map are set to zero.
        """
        fan_in = self.valid_mask().sum(2, keepdim=True).clamp_min(1)  # (L, 1, 1)
        bound = fan_in.to(self.weight.dtype).rsqrt()
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0).mul_(bound)
            if self.bias is not None:
                self.bias.uniform_(-1.0, 1.0).mul_(bound[:, :, 0])
        self.zero_invalid_()

    @torch.no_grad()
    def zero_invalid_(self) -> None:
        """Zero the weights (and momentum) whose window position lies outside the input map."""
        valid = self.valid_mask()
        self.weight.mul_(valid)
        if self.weight_momentum is not None:
            self.weight_momentum.mul_(valid)

    def _check_input(self, name: str, x: torch.Tensor) -> None:
        """Reject flat rows with a hint; every other check is the op's (ops/local2d.py)."""
        if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] == self.spec.in_features:
            raise ValueError(
                f"{self._name()}: {name} must have shape (batch, {', '.join(map(str, self.in_shape))}), got flat rows "
                f"({describe(x)}); reshape them with {name}.view(-1, {', '.join(map(str, self.in_shape))})"
            )

    def _op_kwargs(self) -> dict:
        return {"goodness": self.goodness_kind, "rms": self.rms_norm, "backend": self.backend, "layer": self._name()}

    def _forward_op(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C_in, H_in, W_in) -> (normalized output (B, C_out, H_out, W_out), goodness (B,) float32)."""
        self._check_input("x", x)
        return ff_local2d_forward(x, self.weight, self.bias, self.spec, **self._op_kwargs())

    def _reference_forward(self, x, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_forward_op` in the reference math, differentiable by autograd."""
        return reference_local2d.forward(x, weight, bias, self.spec, goodness=self.goodness_kind, rms=self.rms_norm)

    def _step_takes_peer(self) -> bool:
        return step_takes_peer(self.spec, self.backend, self.weight.device, self.weight.dtype)

    def _step_op(self, x_pos, x_neg, **kwargs) -> FFLayerStep:
        self._check_input("x_pos", x_pos)
        self._check_input("x_neg", x_neg)
        return ff_local2d_step(
            x_pos, x_neg, self.weight, self.bias, self.spec, threshold=self.threshold,
            temperature=self.temperature, **self._op_kwargs(), **kwargs,
        )

    def _add_peer_gradient_(self, weight_target, bias_target, p, x_mean, alpha: float) -> None:
        """``weight_target[l, o] += alpha * p[o, l] * window_l(x_mean)``, ``bias_target[l, o] += alpha * p[o, l]``.

        p: (C_out * L,) float32 ordered like ``output.flatten(1)``; x_mean: (1, C_in, H, W) the
        mean positive image. One batched rank-1 update per location (``baddbmm_``).
        """
        p = p.view(self.spec.out_channels, self.spec.num_locations).t()  # (L, C_out), like the bias
        patch = FFL.local_patches(x_mean, self.spec)[0]  # (L, K), 0 outside the map
        dtype = weight_target.dtype
        weight_target.baddbmm_(p.to(dtype)[:, :, None], patch.to(dtype)[:, None, :], alpha=alpha)
        if bias_target is not None:
            bias_target.add_(p.to(bias_target.dtype), alpha=alpha)

    @torch.no_grad()
    def to_dense(self) -> FFLinear:
        """The equivalent masked dense layer (paper footnote 13) on flattened images.

        ``FFLinear(C_in*H_in*W_in, C_out*H_out*W_out, mask=local_dense_mask(spec))`` with the same
        weights, bias, momentum buffers, hyper-parameters and a copy of ``peer_norm``; its
        output, goodness and gradients on ``x.flatten(1)`` are this layer's, flattened
        (:func:`~ff_kernels.functional.local.local_weight_to_dense` gives the layout).
        """
        spec = self.spec
        peer = None
        if self.peer_norm is not None:
            peer = PeerNormalization(spec.out_features, self.peer_norm.strength, self.peer_norm.momentum,
                                     device=self.weight.device)
            peer.running_mean.copy_(self.peer_norm.running_mean)
        dense = FFLinear(
            spec.in_features, spec.out_features, bias=self.bias is not None, goodness=self.goodness_kind,
            threshold=self.threshold, temperature=self.temperature, mask=FFL.local_dense_mask(spec, self.weight.device),
            rms_norm=self.rms_norm, backend="reference" if self.backend == "reference" else "auto",
            device=self.weight.device, dtype=self.weight.dtype, peer_norm=peer,
        )
        dense.weight.copy_(FFL.local_weight_to_dense(self.weight, spec))
        if self.bias is not None:
            dense.bias.copy_(self.bias.t().reshape(-1))
        if self.weight_momentum is not None:
            dense.weight_momentum = FFL.local_weight_to_dense(self.weight_momentum, spec).contiguous()
        if self.bias_momentum is not None:
            dense.bias_momentum = self.bias_momentum.t().reshape(-1).clone()
        return dense

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"{s.in_channels}, {s.in_height}x{s.in_width} -> {s.out_channels}x{s.out_height}x{s.out_width}, "
            f"kernel={s.kernel}, stride={s.stride}, padding={s.padding}, bias={self.bias is not None}, "
            f"goodness={self.goodness_kind!r}, threshold={self.threshold:g}, temperature={self.temperature:g}"
        )
