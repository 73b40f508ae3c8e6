"""FFLayer: the Forward-Forward interface shared by every FF layer, on top of two op hooks."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as FF
from ..ops.layer_step import FFLayerStep
from .peer_norm import PeerNormalization, check_peer_norm, gradient_targets, mean_activity


class FFLayer(nn.Module):
    """Base class of FF layers (FFLinear, FFLocal2d).

    A subclass creates ``weight`` and ``bias`` (or None), calls :meth:`_init_ff`, and supplies:

    - ``_name()``: the layer's name for error messages;
    - ``_forward_op(x)``: (normalized output, goodness (B,) float32);
    - ``_step_op(x_pos, x_neg, **step_kwargs)``: an :class:`~ff_kernels.ops.FFLayerStep`;
    - optionally, with ``_takes_preact = True``: both ops also take ``preact=``, the layer's
      pre-activations computed by the caller (see :meth:`forward_with_goodness`);
    - optionally, ``_step_takes_peer(**step_kwargs)``: True when ``_step_op`` can apply peer
      normalization itself (``peer=``, a function from the mean positive activity to the
      derivative p): its gradient then joins the step's own, which saves passes over the
      weights; otherwise the layer adds it after the step;
    - ``_add_peer_gradient_(weight_target, bias_target, p, x_mean, alpha)``: add ``alpha`` times
      the rank-1 peer-normalization gradients (dW, db) for the
      per-unit derivatives ``p`` (N,) (see :mod:`ff_kernels.nn.peer_norm`); they depend on
      ``x_pos`` only through its mean over rows.

    Buffers listed in ``_lazy_buffers`` are None until first used and are created when a
    state_dict that holds them is loaded.
    """

    _lazy_buffers: tuple[str, ...] = ("weight_momentum", "bias_momentum")
    _takes_preact = False

    def _init_ff(self, goodness, threshold, temperature, rms_norm, backend, num_units, peer_norm) -> None:
        """Set the FF hyper-parameters; ``threshold`` None means ``num_units``."""
        self.goodness_kind = FF.check_goodness(goodness)
        self.threshold = float(num_units if threshold is None else threshold)
        if not float(temperature) > 0:
            raise ValueError(f"{self._name()}: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.rms_norm = bool(rms_norm)
        self.backend = backend
        self.register_buffer("weight_momentum", None)
        self.register_buffer("bias_momentum", None)
        self.peer_norm: PeerNormalization | None = check_peer_norm(self._name(), peer_norm, num_units, self.weight.device)

    def _step_takes_peer(self, **step_kwargs) -> bool:
        return False

    def _peer_kwargs(self, apply_peer_norm: bool, **step_kwargs) -> dict:
        """``{"peer": ...}`` when the step applies peer normalization itself, else {}."""
        if not apply_peer_norm or self.peer_norm is None or not self._step_takes_peer(**step_kwargs):
            return {}
        return {"peer": self.peer_norm.update_}

    def _preact_kwargs(self, preact: torch.Tensor | None) -> dict:
        if preact is None:
            return {}
        if not self._takes_preact:
            raise TypeError(f"{self._name()}: this layer does not take precomputed pre-activations (preact)")
        return {"preact": preact}

    def forward_with_goodness(self, x: torch.Tensor | None, preact: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized output, goodness (B,) float32) of a batch ``x``.

        ``preact`` (FFLinear): the pre-activations ``x @ W.T + b`` (B, out_features), computed by
        the caller, e.g. once for parts that several rows share; the layer's GEMM is skipped and
        ``x`` may be None.
        """
        return self._forward_op(x, **self._preact_kwargs(preact))

    def forward(self, x: torch.Tensor | None, preact: torch.Tensor | None = None) -> torch.Tensor:
        """The normalized ReLU activities of a batch ``x``: what the next layer receives."""
        return self.forward_with_goodness(x, preact)[0]

    def goodness(self, x: torch.Tensor | None, preact: torch.Tensor | None = None) -> torch.Tensor:
        """Goodness (B,) float32 of each row (image) of ``x``."""
        return self.forward_with_goodness(x, preact)[1]

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """p(positive) (B,) of each row (image) of ``x``."""
        return FF.positive_probability(self.goodness(x), self.goodness_kind, self.threshold, self.temperature)

    def ff_backward(self, x_pos: torch.Tensor, x_neg: torch.Tensor, return_step: bool = False,
                    apply_peer_norm: bool = True, preact: torch.Tensor | None = None):
        """Accumulate the local FF gradients into ``.weight.grad`` / ``.bias.grad``.

        x_pos: positive rows (Bp, ...), x_neg: negative rows (Bn, ...). The gradients equal those
        of ``loss.backward()`` on the layer's FF loss (plus the peer-normalization gradient with
        ``peer_norm``), so any torch optimizer applies them. Returns the loss (0-dim float32),
        or the whole :class:`~ff_kernels.ops.FFLayerStep` with ``return_step=True``.

        ``apply_peer_norm=False`` leaves peer normalization to the caller, who passes
        :meth:`peer_norm_statistics` (possibly averaged over data-parallel ranks) to
        :meth:`apply_peer_norm_`.

        ``preact`` (FFLinear): the pre-activations of ``cat([x_pos, x_neg])`` (Bp + Bn, out_features)
        computed by the caller; the forward GEMM is skipped (the gradient still reads the inputs).
        """
        extra = self._preact_kwargs(preact)
        peer = self._peer_kwargs(apply_peer_norm, **extra)
        step = self._step_op(x_pos, x_neg, mode="grad", **extra, **peer)
        if apply_peer_norm and not peer:
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
        preact: torch.Tensor | None = None,
    ):
        """One fused FF update: ``ff_backward`` + ``torch.optim.SGD(lr, momentum, weight_decay).step()``.

        The gradient never reaches ``.grad``; the momentum buffers live in this module (and its
        state_dict). With ``peer_norm`` its extra gradient is part of the SGD step. ``preact``:
        as for :meth:`ff_backward`.
        """
        weight_buf, bias_buf = self.momentum_buffers(momentum)
        extra = self._preact_kwargs(preact)
        peer = self._peer_kwargs(True, **extra)
        step = self._step_op(
            x_pos, x_neg, mode="sgd", lr=lr, momentum=momentum, weight_decay=weight_decay,
            weight_buf=weight_buf, bias_buf=bias_buf, **extra, **peer,
        )
        if not peer:
            self._peer_norm_step(step, x_pos, "sgd", lr, weight_buf, bias_buf)
        return step if return_step else step.loss

    def momentum_buffers(self, momentum: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The SGD momentum buffers (weight's, bias's) of a step with ``momentum``.

        None for momentum 0 (and for an absent bias); created as zeros on first use, which
        equals torch.optim.SGD's first-step ``buf = grad``.
        """
        if not momentum > 0:
            return None, None
        if self.weight_momentum is None:
            self.weight_momentum = torch.zeros_like(self.weight)
            if self.bias is not None:
                self.bias_momentum = torch.zeros_like(self.bias)
        return self.weight_momentum, self.bias_momentum

    def _peer_norm_step(self, step: FFLayerStep, x_pos: torch.Tensor, mode: str, lr: float = 0.0,
                        weight_buf: torch.Tensor | None = None, bias_buf: torch.Tensor | None = None) -> None:
        """Add the peer-normalization gradient after a step (see :mod:`ff_kernels.nn.peer_norm`)."""
        statistics = self.peer_norm_statistics(step, x_pos)
        if statistics is not None:
            self.apply_peer_norm_(statistics, mode, lr, weight_buf, bias_buf)

    @torch.no_grad()
    def peer_norm_statistics(self, step: FFLayerStep, x_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What peer normalization takes from a step's positive rows x_pos (Bp, ...).

        Returns (mean raw activity (N,) float32, mean positive input (1, ...) float32), or None
        without ``peer_norm`` or without positive rows. Both are means over the positive rows,
        so the statistics of equal-size shards of a batch average to those of the whole batch.
        """
        n_pos = x_pos.shape[0]
        if self.peer_norm is None or n_pos == 0:
            return None
        activity = mean_activity(step.output[:n_pos], step.goodness[:n_pos], self.goodness_kind, self.rms_norm)
        return activity, x_pos.float().mean(0, keepdim=True)

    @torch.no_grad()
    def apply_peer_norm_(self, statistics: tuple[torch.Tensor, torch.Tensor], mode: str = "grad", lr: float = 0.0,
                         weight_buf: torch.Tensor | None = None, bias_buf: torch.Tensor | None = None) -> None:
        """Fold :meth:`peer_norm_statistics` into the running mean and add the peer gradient.

        ``mode`` "grad" adds it to ``.grad``; "sgd" to a step that has already been applied with
        learning rate ``lr`` and momentum buffers ``weight_buf`` / ``bias_buf`` (see
        :func:`~ff_kernels.nn.peer_norm.gradient_targets`). The rank-1 gradient is added in
        place, never materialized.
        """
        activity, x_mean = statistics
        p = self.peer_norm.update_(activity)
        weight_targets = gradient_targets(self.weight, mode, lr, weight_buf)
        # the bias's targets pair with the weight's: (.grad) or (buffer if any, parameter)
        bias_targets = [None] * len(weight_targets)
        if self.bias is not None:
            bias_targets = [target for target, _ in gradient_targets(self.bias, mode, lr, bias_buf)]
        for (weight_target, alpha), bias_target in zip(weight_targets, bias_targets, strict=True):
            self._add_peer_gradient_(weight_target, bias_target, p, x_mean, alpha)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # Buffers that are None until first used are created from the checkpoint.
        for name in self._lazy_buffers:
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, *args)
