"""FFLinear: a fully connected layer trained by its own Forward-Forward objective."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional as F
from ..ops import ff_linear_forward, ff_linear_step
from ..ops.results import FFLayerStep
from ..ops.validation import check_mask
from .peer_norm import PeerNormalization, add_gradient_, check_peer_norm


class FFLinear(nn.Module):
    """A linear + ReLU layer with a local FF loss (Hinton 2022, section 2).

    Args:
        in_features, out_features: D_in and D_out.
        bias: learn an additive bias.
        goodness: "ssq" (positives high), "neg_ssq" (the paper's "min ssq": positives low)
            or "sum" (unsquared sum of activities), see :mod:`ff_kernels.functional`.
        threshold: theta in p(positive) = sigmoid(sign * (G - theta) / T); default
            ``out_features``, i.e. a mean squared (for "sum": mean) activity of 1.
        temperature: T.
        mask: optional fixed 0/1 connectivity (out_features, in_features) (footnote 13).
            Masked weights are zero at init and stay exactly zero through every update.
        rms_norm: normalize the output to unit mean square instead of unit length.
        backend: "auto" | "reference" | "cpu" | "triton" (see :mod:`ff_kernels.ops.linear`).
        compute_dtype: ``torch.bfloat16`` runs the CPU backend's GEMMs in bf16 while the
            parameters stay in their dtype.
        peer_norm: optional :class:`~ff_kernels.nn.PeerNormalization` (out_features units,
            footnote 9), a submodule moved to the layer's device; each training step adds its
            extra gradient (see :mod:`ff_kernels.nn.peer_norm`).

    Shapes: ``x: (B, in_features)`` in the layer's dtype -> ``(B, out_features)``.
    """

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
    ) -> None:
        super().__init__()
        if int(in_features) <= 0 or int(out_features) <= 0:
            raise ValueError(f"FFLinear: in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.goodness_fn = F.check_goodness(goodness)
        self.threshold = float(out_features if threshold is None else threshold)
        if not float(temperature) > 0:
            raise ValueError(f"FFLinear: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.rms_norm = bool(rms_norm)
        self.backend = backend
        self.compute_dtype = compute_dtype
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        if mask is not None:
            mask = check_mask(self._name(), mask, (out_features, in_features)).to(device=self.weight.device)
        self.register_buffer("mask", mask)
        self.register_buffer("weight_momentum", None)
        self.register_buffer("bias_momentum", None)
        self.peer_norm = check_peer_norm(self._name(), peer_norm, self.out_features, self.weight.device)
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
        return dict(
            goodness=self.goodness_fn, rms=self.rms_norm, mask=self.mask, backend=self.backend,
            compute_dtype=self.compute_dtype, layer=self._name(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized ReLU activities ``(B, out_features)`` of ``x: (B, in_features)``."""
        return ff_linear_forward(x, self.weight, self.bias, **self._op_kwargs())[0]

    def goodness(self, x: torch.Tensor) -> torch.Tensor:
        """Goodness ``(B,)`` float32 of ``x: (B, in_features)``."""
        return ff_linear_forward(x, self.weight, self.bias, **self._op_kwargs())[1]

    def forward_with_goodness(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both at once: (normalized output (B, out_features), goodness (B,) float32)."""
        return ff_linear_forward(x, self.weight, self.bias, **self._op_kwargs())

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """p(positive) ``(B,)`` of each row of ``x``."""
        return F.positive_probability(self.goodness(x), self.goodness_fn, self.threshold, self.temperature)

    def _step(self, x_pos, x_neg, **kwargs) -> FFLayerStep:
        return ff_linear_step(
            x_pos, x_neg, self.weight, self.bias, threshold=self.threshold, temperature=self.temperature,
            **self._op_kwargs(), **kwargs,
        )

    def ff_backward(self, x_pos: torch.Tensor, x_neg: torch.Tensor, return_step: bool = False):
        """Accumulate the local FF gradients into ``.weight.grad`` / ``.bias.grad``.

        x_pos: (Bp, in_features) positive rows, x_neg: (Bn, in_features) negative rows. The
        gradients equal those of ``loss.backward()`` on the layer's FF loss, so any torch
        optimizer applies them. Returns the loss (0-dim float32), or the whole
        :class:`~ff_kernels.ops.FFLayerStep` with ``return_step=True``.
        """
        step = self._step(x_pos, x_neg, mode="grad")
        self._peer_norm_step(step, x_pos, "grad")
        return step if return_step else step.loss

    def ff_step(
        self,
        x_pos: torch.Tensor,
        x_neg: torch.Tensor,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        return_step: bool = False,
    ):
        """One fused FF update: the gradient never reaches ``.grad`` and SGD is applied in place.

        Same semantics as ``ff_backward`` followed by ``torch.optim.SGD(lr, momentum,
        weight_decay).step()``; the momentum buffers live in this module (and its state_dict).
        With ``peer_norm`` its extra gradient is part of the SGD step.
        """
        if momentum > 0 and self.weight_momentum is None:
            self.weight_momentum = torch.zeros_like(self.weight)
            if self.bias is not None:
                self.bias_momentum = torch.zeros_like(self.bias)
        step = self._step(
            x_pos, x_neg, mode="sgd", lr=lr, momentum=momentum, weight_decay=weight_decay,
            weight_buf=self.weight_momentum if momentum > 0 else None,
            bias_buf=self.bias_momentum if momentum > 0 else None,
        )
        self._peer_norm_step(
            step, x_pos, "sgd", lr, self.weight_momentum if momentum > 0 else None,
            self.bias_momentum if momentum > 0 else None,
        )
        return step if return_step else step.loss

    @torch.no_grad()
    def _peer_norm_step(self, step: FFLayerStep, x_pos: torch.Tensor, mode: str, lr: float = 0.0,
                        weight_buf: torch.Tensor | None = None, bias_buf: torch.Tensor | None = None) -> None:
        """Peer normalization after a step: dW += outer(p, mean x_pos) * mask, db += p."""
        if self.peer_norm is None:
            return
        n_pos = x_pos.shape[0]
        p = self.peer_norm.observe_(step.output[:n_pos], step.goodness[:n_pos], self.goodness_fn, self.rms_norm)
        if p is None:
            return
        grad_w = torch.outer(p, x_pos.float().mean(0))
        if self.mask is not None:
            grad_w.mul_(self.mask)
        add_gradient_(self.weight, grad_w, mode, lr, weight_buf)
        if self.bias is not None:
            add_gradient_(self.bias, p, mode, lr, bias_buf)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Buffers that are None until first used (mask, momentum) are created from the checkpoint.
        for name in ("mask", "weight_momentum", "bias_momentum"):
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        masked = "" if self.mask is None else f", mask={int(self.mask.sum())}/{self.mask.numel()}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"goodness={self.goodness_fn!r}, threshold={self.threshold:g}, temperature={self.temperature:g}{masked}"
        )
