"""FFLinear: a fully connected layer trained by its own Forward-Forward objective."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import BACKENDS, ff_linear_forward, ff_linear_step, reference_linear, step_takes_peer
from ..ops.layer_step import FFLayerStep
from ..ops.linear import check_blocks_backend
from ..ops.validation import check_blocks, check_mask
from .layer import FFLayer
from .peer_norm import PeerNormalization


class FFLinear(FFLayer):
    """A linear + ReLU layer with a local FF loss (Hinton 2022, section 2).

    Args:
        in_features, out_features: D_in and D_out.
        bias: learn an additive bias.
        goodness: "ssq" (positives high), "neg_ssq" (the paper's "min ssq": positives low)
            or "sum" (unsquared sum of activities), see :mod:`ff_kernels.functional`.
        threshold: theta in p(positive) = sigmoid(sign * (G - theta) / T); default
            ``out_features``, i.e. a mean squared (for "sum": mean) activity of 1. With
            ``blocks=k`` it is each block's threshold, default ``out_features // k`` (the same
            mean squared activity of 1 per unit).
        temperature: T.
        mask: optional fixed 0/1 connectivity (out_features, in_features) (footnote 13).
            Masked weights are zero at init and stay exactly zero through every update.
        rms_norm: normalize the output to unit mean square instead of unit length.
        backend: "auto" | "reference" | "cpu" | "triton" (see :mod:`ff_kernels.ops.linear`).
        compute_dtype: ``torch.bfloat16`` runs the CPU backend's GEMMs in bf16 while the
            parameters stay in their dtype.
        peer_norm: optional :class:`~ff_kernels.nn.PeerNormalization` (out_features units,
            footnote 9), a submodule moved to the layer's device; each training step adds its
            extra gradient (see :mod:`ff_kernels.nn.peer_norm`); it works on the layer's units
            whether or not they are in blocks.
        blocks: None, or k dividing ``out_features``: a block-wise layer (section 5.3). Its
            units form k contiguous blocks of ``out_features // k``; each block decides
            positive vs negative by its own goodness, the loss is the sum of the k blocks' FF
            losses, and each block of the output is normalized on its own, so no block's
            goodness passes on. ``blocks=1`` is the plain layer with goodness of shape (B, 1).
            Backends "reference", "cpu" and "auto" ("triton" refuses it; "auto" runs it in
            torch ops on CUDA, see :mod:`ff_kernels.ops.linear`).

    Shapes: ``x: (B, in_features)`` in the layer's dtype -> ``(B, out_features)``; goodness
    ``(B,)``, or ``(B, k)`` with ``blocks=k`` (``goodness``, ``probability``, and a step's
    ``FFLayerStep.goodness``). The FF methods (``forward``, ``goodness``, ``ff_backward``,
    ``ff_step``, ...) are :class:`FFLayer`'s.
    """

    _lazy_buffers = ("mask", "weight_momentum", "bias_momentum")
    _backends = BACKENDS
    _takes_preact = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        goodness: str = "ssq",
        threshold: float | None = None,
        temperature: float = 1.0,
        mask: torch.Tensor | None = None,
        rms_norm: bool = False,
        backend: str = "auto",
        compute_dtype: torch.dtype | None = None,
        device=None,
        dtype=None,
        peer_norm: PeerNormalization | None = None,
        blocks: int | None = None,
    ) -> None:
        super().__init__()
        if int(in_features) <= 0 or int(out_features) <= 0:
            raise ValueError(f"FFLinear: in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.blocks = check_blocks(self._name(), blocks, self.out_features)
        check_blocks_backend(self._name(), self.blocks, backend)
        if threshold is None and self.blocks is not None:
            threshold = self.out_features // self.blocks
        self.compute_dtype = compute_dtype
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        if mask is not None:
            mask = check_mask(self._name(), mask, (out_features, in_features)).to(device=self.weight.device)
        self.register_buffer("mask", mask)
        self._init_ff(goodness, threshold, temperature, rms_norm, backend, self.out_features, peer_norm)
        self.reset_parameters()

    def _name(self) -> str:
        return f"FFLinear({self.in_features}, {self.out_features})"

    def reset_parameters(self) -> None:
        """nn.Linear's initialization (uniform, fan-in scaled), then masked weights set to zero.

        With a mask the fan-in is the mean number of connections per unit.
        """
        fan_in = self.in_features if self.mask is None else max(1.0, float(self.mask.sum()) / self.out_features)
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)
        self.apply_mask_()

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero the weights (and momentum) where the connectivity mask is 0."""
        if self.mask is None:
            return
        self.weight.mul_(self.mask)
        if self.weight_momentum is not None:
            self.weight_momentum.mul_(self.mask)

    def _op_kwargs(self) -> dict:
        return {
            "goodness": self.goodness_kind, "rms": self.rms_norm, "mask": self.mask, "backend": self.backend,
            "compute_dtype": self.compute_dtype, "layer": self._name(), "blocks": self.blocks,
        }

    def _forward_op(self, x: torch.Tensor | None, preact: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, in_features) -> (normalized output (B, out_features), goodness (B,) or (B, blocks) float32)."""
        return ff_linear_forward(x, self.weight, self.bias, **self._op_kwargs(), preact=preact)

    def _reference_forward(self, x, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_forward_op` in the reference math, differentiable by autograd."""
        return reference_linear.forward(x, weight, bias, goodness=self.goodness_kind, rms=self.rms_norm,
                                        mask=self.mask, blocks=self.blocks)

    def _step_takes_peer(self, preact=None) -> bool:
        return step_takes_peer(self.backend, self.weight.device, preact, self.blocks)

    def _step_op(self, x_pos, x_neg, **kwargs) -> FFLayerStep:
        return ff_linear_step(
            x_pos, x_neg, self.weight, self.bias, threshold=self.threshold, temperature=self.temperature,
            **self._op_kwargs(), **kwargs,
        )

    def _add_peer_gradient_(self, weight_target, bias_target, p, x_mean, alpha: float) -> None:
        """``weight_target += alpha * outer(p, x_mean) * mask``, ``bias_target += alpha * p``.

        p: (out,) float32, x_mean: (1, in) the mean positive input. One in-place rank-1 update
        (``addr_``) without a mask; with one, the outer product is masked first.
        """
        x_mean = x_mean[0].to(weight_target.dtype)
        p_w = p.to(weight_target.dtype)
        if self.mask is None:
            weight_target.addr_(p_w, x_mean, alpha=alpha)
        else:
            weight_target.add_(torch.outer(p_w, x_mean).mul_(self.mask), alpha=alpha)
        if bias_target is not None:
            bias_target.add_(p.to(bias_target.dtype), alpha=alpha)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A loaded mask must be one this layer accepts at construction: 0/1 values of its shape.
        key = prefix + "mask"
        if key in state_dict and state_dict[key] is not None:
            try:
                check_mask(self._name(), state_dict[key], (self.out_features, self.in_features))
            except (TypeError, ValueError) as err:
                error_msgs.append(f"{key}: {err}")
                return
            if self.mask is None:
                with torch.inference_mode(False):
                    self.mask = torch.empty(self.weight.shape, dtype=torch.bool, device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        masked = "" if self.mask is None else f", mask={int(self.mask.sum())}/{self.mask.numel()}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"goodness={self.goodness_kind!r}, threshold={self.threshold:g}, temperature={self.temperature:g}"
            f"{'' if self.blocks is None else f', blocks={self.blocks}'}{masked}"
        )
