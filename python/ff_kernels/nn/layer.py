"""FFLayer: the Forward-Forward interface shared by every FF layer, on top of two op hooks."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional as FF
from ..ops import validation
from ..ops.layer_step import FFLayerStep
from ..ops.validation import describe
from .differentiable import LayerForward, graph_needed
from .peer_norm import PeerNormalization, check_peer_norm, gradient_targets, mean_activity

# The largest goodness (sum of squared activities) a float32 or bfloat16 layer can hold: beyond
# it the goodness is inf and every output row normalizes to zeros.
GOODNESS_LIMIT = float(torch.finfo(torch.float32).max)


class GoodnessOverflowError(ValueError):
    """A layer's goodness would overflow float32 (inputs or weights far too large).

    ``layer``: the layer's name; ``largest_input``, ``largest_weight``: the largest magnitudes.
    """

    def __init__(self, message: str, layer: str = "", largest_input: float = 0.0, largest_weight: float = 0.0) -> None:
        super().__init__(message)
        self.layer, self.largest_input, self.largest_weight = layer, largest_input, largest_weight


class FFLayer(nn.Module):
    """Base class of FF layers (FFLinear, FFLocal2d).

    A subclass creates ``weight`` and ``bias`` (or None), calls :meth:`_init_ff`, and supplies:

    - ``_name()``: the layer's name for error messages;
    - ``_forward_op(x)``: (normalized output, goodness (B,) float32, or (B, k) for a block-wise
      layer, one column per block);
    - ``_reference_forward(x, weight, bias)``: the same in the reference math, differentiable
      by autograd (the backward of a forward that records a graph);
    - ``_step_op(x_pos, x_neg, **step_kwargs)``: an :class:`~ff_kernels.ops.FFLayerStep`;
    - optionally, with ``_takes_preact = True``: both ops also take ``preact=``, the layer's
      pre-activations computed by the caller (see :meth:`forward_with_goodness`);
    - optionally, ``_step_takes_peer(**step_kwargs)``: True when ``_step_op`` can apply peer
      normalization itself (``peer=``, the layer's PeerNormalization, called as a function from
      the mean positive activity to the derivative p): its gradient then joins the step's own, which saves passes over the
      weights; otherwise the layer adds it after the step;
    - ``_add_peer_gradient_(weight_target, bias_target, p, x_mean, alpha)``: add ``alpha`` times
      the rank-1 peer-normalization gradients (dW, db) for the
      per-unit derivatives ``p`` (N,) (see :mod:`ff_kernels.nn.peer_norm`); they depend on
      ``x_pos`` only through its mean over rows.

    Buffers listed in ``_lazy_buffers`` are None until first used and are created when a
    state_dict that holds them is loaded.

    Frozen parameters: a parameter whose ``requires_grad`` is False gets no ``.grad`` from
    :meth:`ff_backward` and no update (nor weight decay, nor momentum) from :meth:`ff_step`, on
    every backend; a layer with all its parameters frozen only runs forward and still returns
    its loss.
    """

    _lazy_buffers: tuple[str, ...] = ("weight_momentum", "bias_momentum")
    _backends: tuple[str, ...] = ()  # the op family's backend names, checked at construction
    _takes_preact = False

    def _init_ff(self, goodness, threshold, temperature, rms_norm, backend, num_units, peer_norm) -> None:
        """Set the FF hyper-parameters; ``threshold`` None means ``num_units``."""
        self.goodness_kind = FF.check_goodness(goodness)
        self.threshold = _finite(self._name(), "threshold", num_units if threshold is None else threshold)
        self.temperature = _finite(self._name(), "temperature", temperature)
        if not self.temperature > 0:
            raise ValueError(f"{self._name()}: temperature must be > 0, got {temperature}")
        self.rms_norm = bool(rms_norm)
        if self._backends and backend not in self._backends:
            raise ValueError(f"{self._name()}: backend must be one of {self._backends}, got {backend!r}")
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
        return {"peer": self.peer_norm}  # called as peer(mean) = update_(mean), or fused by the step

    def _preact_kwargs(self, preact: torch.Tensor | None) -> dict:
        if preact is None:
            return {}
        if not self._takes_preact:
            raise TypeError(f"{self._name()}: this layer does not take precomputed pre-activations (preact)")
        return {"preact": preact}

    def _label_columns_kwargs(self, label_columns: int | None) -> dict:
        if label_columns is None:
            return {}
        if not self._takes_preact:
            raise TypeError(f"{self._name()}: this layer does not take label_columns (rows paired by label)")
        return {"label_columns": label_columns}

    def forward_with_goodness(self, x: torch.Tensor | None, preact: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized output, goodness (B,) float32) of a batch ``x``; the goodness is (B, k) for
        a block-wise layer (FFLinear's ``blocks=k``), one column per block.

        ``preact`` (FFLinear): the pre-activations ``x @ W.T + b`` (B, out_features), computed by
        the caller, e.g. once for parts that several rows share; the layer's GEMM is skipped and
        ``x`` may be None. The goodness is checked for overflow (see :meth:`_check_goodness`).

        In grad mode, when ``x`` or a parameter requires grad, both results carry a graph with
        the reference math's gradients (:mod:`ff_kernels.nn.differentiable`), like any module's
        output; FF training itself never backpropagates through them. With ``preact`` they carry
        none.
        """
        if preact is None and isinstance(x, torch.Tensor) and graph_needed(x, self.weight, self.bias):
            output, g = LayerForward.apply(self, x, self.weight, self.bias)
        else:
            output, g = self._forward_op(x, **self._preact_kwargs(preact))
        self._check_goodness(g, x if x is not None else preact)
        return output, g

    def forward(self, x: torch.Tensor | None, preact: torch.Tensor | None = None) -> torch.Tensor:
        """The normalized ReLU activities of a batch ``x``: what the next layer receives."""
        return self.forward_with_goodness(x, preact)[0]

    def goodness(self, x: torch.Tensor | None, preact: torch.Tensor | None = None) -> torch.Tensor:
        """Goodness (B,) float32 of each row (image) of ``x``; (B, k), per block, for a block-wise layer."""
        return self.forward_with_goodness(x, preact)[1]

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """p(positive) (B,) of each row (image) of ``x``; (B, k), per block, for a block-wise layer."""
        return FF.positive_probability(self.goodness(x), self.goodness_kind, self.threshold, self.temperature)

    def ff_backward(self, x_pos: torch.Tensor, x_neg: torch.Tensor, return_step: bool = False,
                    apply_peer_norm: bool = True, preact: torch.Tensor | None = None,
                    label_columns: int | None = None):
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

        ``label_columns`` (FFLinear): each positive row and the negative row at the same index
        are one input with two labels in its first ``label_columns`` columns (the paper's
        supervised FF; Bp = Bn, the rest equal, checked): the weight gradient then reads the
        shared columns once, a GEMM of half the rows (see ``ops.ff_linear_step``).
        """
        self._check_step_inputs(x_pos, x_neg)
        extra = self._preact_kwargs(preact)
        paired = self._label_columns_kwargs(label_columns)
        frozen = self._frozen_parameters()
        if len(frozen) == len(self._parameters_to_train()):
            step = self._forward_step(x_pos, x_neg)
        else:
            peer = self._peer_kwargs(apply_peer_norm, **extra)
            with _KeepFrozen(frozen, "grad"):
                step = self._step_op(x_pos, x_neg, mode="grad", **extra, **paired, **peer)
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
        label_columns: int | None = None,
    ):
        """One fused FF update: ``ff_backward`` + ``torch.optim.SGD(lr, momentum, weight_decay).step()``.

        The gradient never reaches ``.grad``; the momentum buffers live in this module (and its
        state_dict). With ``peer_norm`` its extra gradient is part of the SGD step. ``preact``
        and ``label_columns``: as for :meth:`ff_backward`.
        """
        self._check_step_inputs(x_pos, x_neg)
        frozen = self._frozen_parameters()
        if len(frozen) == len(self._parameters_to_train()):
            step = self._forward_step(x_pos, x_neg)
            return step if return_step else step.loss
        weight_buf, bias_buf = self.momentum_buffers(momentum)
        extra = self._preact_kwargs(preact)
        paired = self._label_columns_kwargs(label_columns)
        peer = self._peer_kwargs(True, **extra)
        buffers = {"weight": weight_buf, "bias": bias_buf}
        with _KeepFrozen(frozen, "sgd", {name: buffers[name] for name in frozen}):
            step = self._step_op(
                x_pos, x_neg, mode="sgd", lr=lr, momentum=momentum, weight_decay=weight_decay,
                weight_buf=weight_buf, bias_buf=bias_buf, **extra, **paired, **peer,
            )
            if not peer:
                self._peer_norm_step(step, x_pos, "sgd", lr, weight_buf, bias_buf)
        return step if return_step else step.loss

    def _parameters_to_train(self) -> dict[str, nn.Parameter]:
        """The layer's own FF parameters by name: weight, and bias when there is one."""
        return {name: p for name, p in (("weight", self.weight), ("bias", self.bias)) if p is not None}

    def _frozen_parameters(self) -> dict[str, nn.Parameter]:
        """The FF parameters whose ``requires_grad`` is False: they get no gradient and no update."""
        return {name: p for name, p in self._parameters_to_train().items() if not p.requires_grad}

    def _forward_step(self, x_pos: torch.Tensor, x_neg: torch.Tensor) -> FFLayerStep:
        """What a step of a layer whose parameters are all frozen returns: its loss, goodness and
        output from one forward pass, with nothing updated (peer normalization's running mean
        included)."""
        for name, x in (("x_pos", x_pos), ("x_neg", x_neg)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{self._name()}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x_pos.dtype != x_neg.dtype or x_pos.device != x_neg.device or x_pos.shape[1:] != x_neg.shape[1:]:
            raise ValueError(f"{self._name()}: x_pos and x_neg must have the same row shape, dtype and device, "
                             f"got x_pos {describe(x_pos)} and x_neg {describe(x_neg)}")
        n_pos = x_pos.shape[0]
        with torch.no_grad():
            output, g = self.forward_with_goodness(torch.cat([x_pos, x_neg]))
        loss = FF.ff_loss(g[:n_pos], g[n_pos:], self.goodness_kind, self.threshold, self.temperature)
        return FFLayerStep(loss.detach(), g, output)

    def _check_step_inputs(self, x_pos: torch.Tensor, x_neg: torch.Tensor) -> None:
        """The hyper-parameters are finite, and the goodness of no row can overflow (CPU only: a
        step would write inf or NaN into the weights before its goodness could be looked at).

        The overflow test is a bound: ``|h| <= |W| |x| + |b|`` for every row (Frobenius norm of
        the weight), so the goodness ``|h|^2`` stays finite when the bound's square does; the
        weight's norm is only computed for inputs of norm above 1e13.
        """
        for name in ("threshold", "temperature"):
            value = getattr(self, name)
            if not (type(value) is float and math.isfinite(value)):  # the usual case costs no name
                _finite(self._name(), name, value)
        if not validation.checking_inputs():
            return
        x_norm = 0.0
        for x in (x_pos, x_neg):
            if (not isinstance(x, torch.Tensor) or not validation.checks_at_once(x.device) or not x.is_floating_point()
                    or x.numel() == 0):
                continue  # the op checks what it must be; off the CPU this would wait for the device
            # the whole batch's norm bounds every row's: one cheap float32 reduction, the exact
            # per-row norms (float64) only when it is large
            low = x.dtype in (torch.float16, torch.bfloat16)  # a float64 input (refused by the op) stays float64
            whole = float(torch.linalg.vector_norm(x, dtype=torch.float32 if low else None))
            if whole >= 1e13:
                whole = float(torch.linalg.vector_norm(x.flatten(1), dim=1, dtype=torch.float64).max())
            x_norm = max(x_norm, whole)
        if not math.isfinite(x_norm) or x_norm < 1e13:
            return  # NaN/Inf inputs: the op's own check names them; smaller inputs cannot overflow a sane layer
        bound = x_norm * float(torch.linalg.vector_norm(self.weight.detach(), dtype=torch.float64))
        if self.bias is not None:
            bound += float(torch.linalg.vector_norm(self.bias.detach(), dtype=torch.float64))
        if bound * bound >= GOODNESS_LIMIT:
            raise self._overflow_error(torch.cat([x_pos.flatten(1), x_neg.flatten(1)]))

    def _check_goodness(self, g: torch.Tensor, x: torch.Tensor) -> None:
        """Raise a clear error when a goodness overflowed float32 to inf (which would make the
        row's normalized output all zeros), or is NaN from non-finite weights. Where the op's
        input checks run at once only (the CPU): elsewhere reading it would wait for the device."""
        if not validation.check_finite_inputs or not validation.checks_at_once(g.device) or g.numel() == 0:
            return
        if bool(torch.isfinite(g).all()) or not bool(torch.isfinite(x).all()):
            return  # fine, or NaN/Inf inputs, which the op's own check reports
        bad = [name for name, p in self._parameters_to_train().items() if not bool(torch.isfinite(p).all())]
        if bad:
            raise ValueError(f"{self._name()}: its {' and '.join(bad)} hold NaN or Inf (did its training diverge?)")
        raise self._overflow_error(x.flatten(1))

    def _overflow_error(self, rows: torch.Tensor) -> GoodnessOverflowError:
        largest = float(rows.detach().abs().max()) if rows.numel() else 0.0
        weight = float(self.weight.detach().abs().max()) if self.weight.numel() else 0.0
        return GoodnessOverflowError(
            f"{self._name()}: the goodness (sum of squared activities) overflows float32 (max {GOODNESS_LIMIT:.3g}) "
            f"with inputs up to |x| = {largest:.3g} and weights up to |w| = {weight:.3g}: scale the inputs down "
            f"(e.g. to unit mean square), or if the weights grew that large in training, lower the learning rate",
            self._name(), largest, weight)

    def momentum_buffers(self, momentum: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The SGD momentum buffers (weight's, bias's) of a step with ``momentum``.

        None for momentum 0 (and for an absent bias); created as zeros on first use, which
        equals torch.optim.SGD's first-step ``buf = grad``.
        """
        if not momentum > 0:
            return None, None
        if self.weight_momentum is None:
            with torch.inference_mode(False):  # normal tensors even under inference mode: usable after it
                self.weight_momentum = torch.zeros_like(self.weight)
                if self.bias is not None:
                    self.bias_momentum = torch.zeros_like(self.bias)
        if not torch.is_inference_mode_enabled():
            # a buffer made or loaded under inference mode cannot be updated outside it: copy it
            for name in ("weight_momentum", "bias_momentum"):
                buf = getattr(self, name)
                if buf is not None and buf.is_inference():
                    setattr(self, name, buf.clone())
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
        train_weight = self.weight.requires_grad
        train_bias = self.bias is not None and self.bias.requires_grad
        if not (train_weight or train_bias):
            return  # a frozen layer: no gradient, no update
        p = self.peer_norm.update_(activity)
        weight_targets = _targets(self.weight, mode, lr, weight_buf)
        # the bias's targets pair with the weight's: (.grad) or (buffer if any, parameter)
        bias_targets = [None] * len(weight_targets)
        if self.bias is not None:
            bias_targets = [target for target, _ in _targets(self.bias, mode, lr, bias_buf)]
        for (weight_target, alpha), bias_target in zip(weight_targets, bias_targets, strict=True):
            self._add_peer_gradient_(weight_target, bias_target, p, x_mean, alpha)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # Buffers that are None until first used are created from the checkpoint.
        for name in self._lazy_buffers:
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                with torch.inference_mode(False):
                    setattr(self, name, torch.empty_like(state_dict[key], device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, *args)


def output_is_checked(layer: nn.Module, output: torch.Tensor, goodness: torch.Tensor | None = None) -> bool:
    """Whether ``layer``'s ``output`` may feed the next layer unchecked (``validation.trusted_inputs``).

    An FFLayer's normalized output is finite and of bounded length when its goodness is finite.
    ``goodness``: a training step's, read here; None after a forward pass, which checked its own
    goodness (:meth:`FFLayer._check_goodness`). Only on the CPU, where the checks run at once
    (elsewhere reading would wait for the device), and while the checks are on.
    """
    if not (isinstance(layer, FFLayer) and validation.check_finite_inputs
            and validation.checks_at_once(output.device)):
        return False
    # a NaN or Inf entry makes the sum NaN or Inf; a finite sum means every entry is finite
    return goodness is None or math.isfinite(float(goodness.sum()))


def _finite(layer: str, name: str, value) -> float:
    """``value`` as a float; ValueError unless it is a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{layer}: {name} must be a finite number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{layer}: {name} must be a finite number, got {value!r}")
    return number


def _targets(param: torch.Tensor, mode: str, lr: float, buf: torch.Tensor | None) -> list[tuple[torch.Tensor, float]]:
    """:func:`gradient_targets` of ``param``; for a frozen one (``requires_grad`` False) the same
    number of scratch tensors, whose contents are dropped."""
    targets = gradient_targets(param, mode, lr, buf) if param.requires_grad else \
        [(None, 1.0)] * (mode == "grad" or buf is not None) + [(None, -lr)] * (mode != "grad")
    return [(torch.zeros_like(param) if target is None else target, alpha) for target, alpha in targets]


class _KeepFrozen:
    """Around a step of a partly frozen layer: the frozen parameters, their ``.grad`` (mode
    "grad") and their momentum buffers (mode "sgd") are put back as they were afterwards, so
    that every backend honours ``requires_grad`` whatever it fuses."""

    def __init__(self, frozen: dict[str, nn.Parameter], mode: str, buffers: dict | None = None) -> None:
        self.frozen, self.mode, self.buffers = frozen, mode, buffers or {}

    def __enter__(self) -> None:
        if not self.frozen:  # the usual case: nothing to keep
            return
        with torch.no_grad():
            self.saved = {name: (p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
                          for name, p in self.frozen.items()}
            self.saved_buffers = {name: None if b is None else b.detach().clone() for name, b in self.buffers.items()}

    def __exit__(self, *exc) -> None:
        if not self.frozen:
            return
        with torch.no_grad():
            for name, p in self.frozen.items():
                value, grad = self.saved[name]
                p.copy_(value)
                p.grad = grad
            for name, b in self.buffers.items():
                if b is not None and self.saved_buffers[name] is not None:
                    b.copy_(self.saved_buffers[name])
