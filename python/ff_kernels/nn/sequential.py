"""FFSequential: a stack of FF layers, each learning from the normalized output of the one below."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..ops import validation
from ..ops.layer_step import FFLayerStep
from .layer import output_is_checked

FF_METHODS = ("forward_with_goodness", "ff_backward", "ff_step")  # what FFSequential calls on a layer


class FFSequential(nn.Sequential):
    """Layers with the FF interface (``forward_with_goodness``, ``ff_backward``, ``ff_step``).

    Each layer receives the previous layer's normalized output, computed with the weights
    before this step's update; no derivative crosses a layer. Training all layers at once is
    ``layers=None``; greedy layer-by-layer training passes the indices to train (for example
    ``layers=[k]`` during the k-th stage): layers below them only run forward and layers
    above the highest trained one are not run at all.

    Built as ``FFSequential(layer, layer, ...)``, from one list of layers or from an
    ``OrderedDict``. The layers are checked when the stack is built and whenever it changes
    (``append``, ``insert``, ``extend``, ``del``, item assignment): there must be at least one,
    each must have the FF interface (:data:`FF_METHODS`, as FFLinear and FFLocal2d do), and
    each layer's input must be the output of the one below (``in_features`` = the previous
    ``out_features``; ``in_shape`` = the previous ``out_shape``; a flat layer cannot follow a
    2-D map nor the reverse). A frozen layer (``requires_grad_(False)``) is run but not trained.

    Every method takes ``preact``, the first layer's pre-activations computed by the caller
    (see ``FFLinear.forward_with_goodness``): the first layer's GEMM is skipped. For a forward
    pass ``x`` may then be None; a training step still needs it for the first layer's gradient.
    """

    def __init__(self, *args) -> None:
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            args = tuple(args[0])
        super().__init__(*args)
        _check_stack(list(self._modules.items()))

    def _changed(self, change: Callable[[], object]):
        """Apply ``change`` to the stack, then check it; a stack that fails is put back as it was."""
        saved = OrderedDict(self._modules)
        result = change()
        try:
            _check_stack(list(self._modules.items()))
        except (TypeError, ValueError):
            self._modules.clear()
            self._modules.update(saved)
            raise
        return result

    def append(self, module: nn.Module) -> FFSequential:
        return self._changed(lambda: super(FFSequential, self).append(module))

    def insert(self, index: int, module: nn.Module) -> FFSequential:
        return self._changed(lambda: super(FFSequential, self).insert(index, module))

    def extend(self, sequential) -> FFSequential:
        return self._changed(lambda: super(FFSequential, self).extend(sequential))

    def __setitem__(self, idx, module: nn.Module) -> None:
        self._changed(lambda: super(FFSequential, self).__setitem__(idx, module))

    def __delitem__(self, idx) -> None:
        self._changed(lambda: super(FFSequential, self).__delitem__(idx))

    def pop(self, key):
        return self._changed(lambda: super(FFSequential, self).pop(key))

    def __iadd__(self, other):
        return self._changed(lambda: super(FFSequential, self).__iadd__(other))

    def activations(self, x: torch.Tensor | None, preact: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-layer normalized outputs for ``x: (B, D_in)``: a list of (B, D_l)."""
        outputs = []
        checked = False  # the layer below put out x with finite goodness: no need to check it again
        for i, layer in enumerate(self):
            with validation.trusted_inputs(checked):
                x = layer(x, preact) if i == 0 and preact is not None else layer(x)
            outputs.append(x)
            checked = output_is_checked(layer, x)
        return outputs

    def goodness(self, x: torch.Tensor | None, preact: torch.Tensor | None = None) -> torch.Tensor:
        """Per-layer goodness ``(B, L)`` float32 for ``x: (B, D_in)``.

        A block-wise layer's (B, k) goodness counts as the sum over its blocks (for every
        goodness function that is the goodness of the whole layer's activities); call the layer
        itself for the per-block values.
        """
        return self.outputs_and_goodness(x, preact)[1]

    def outputs_and_goodness(self, x: torch.Tensor | None, preact: torch.Tensor | None = None
                             ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One forward pass: the per-layer normalized outputs (as :meth:`activations`, through
        each layer's ``forward_with_goodness``) and the per-layer goodness ``(B, L)`` (as
        :meth:`goodness`)."""
        outputs, columns = [], []
        checked = False  # the layer below put out x with finite goodness: no need to check it again
        for i, layer in enumerate(self):
            with validation.trusted_inputs(checked):
                x, g = (layer.forward_with_goodness(x, preact) if i == 0 and preact is not None
                        else layer.forward_with_goodness(x))
            outputs.append(x)
            columns.append(g.sum(1) if g.dim() == 2 else g)
            checked = output_is_checked(layer, x)
        return outputs, torch.stack(columns, dim=1)

    def _layer_indices(self, layers: Iterable[int] | None) -> set[int]:
        if layers is None:
            return set(range(len(self)))
        chosen = {int(i) for i in layers}
        bad = sorted(i for i in chosen if not 0 <= i < len(self))
        if bad or not chosen:
            raise ValueError(f"FFSequential: layers must be a non-empty subset of 0..{len(self) - 1}, got {sorted(chosen)}")
        return chosen

    def train_steps(
        self,
        x_pos: torch.Tensor,
        x_neg: torch.Tensor,
        step_fn: Callable[..., FFLayerStep],
        layers: Iterable[int] | None = None,
        preact: torch.Tensor | None = None,
        label_columns: int | None = None,
        inputs_checked: bool = False,
    ) -> list[FFLayerStep]:
        """The loop behind :meth:`ff_backward` and :meth:`ff_step`, for callers with their own step.

        ``step_fn(layer, x_pos, x_neg)`` trains one chosen layer on its positive (Bp, ...) and
        negative (Bn, ...) inputs and returns its :class:`~ff_kernels.ops.FFLayerStep`, whose
        pre-update ``output`` (Bp + Bn, ...) feeds the next layer. Returns the chosen layers'
        steps, bottom first. With ``preact`` (Bp + Bn, D_1), the first layer's pre-activations,
        the first layer's call is ``step_fn(layer, x_pos, x_neg, preact=preact)``; likewise
        ``label_columns`` (see ``FFLinear.ff_backward``) goes to the first layer only, as only its
        inputs hold the labels. A layer's inputs that are the outputs of an FF layer whose goodness
        was finite are not checked again for NaN/Inf (``validation.trusted_inputs``, CPU).
        ``inputs_checked``: the caller knows ``x_pos`` and ``x_neg`` (and ``preact``) to be finite
        and of bounded length (rows it built from data it checked once), so the first layer skips
        their checks too. Non-finite weights still show, in that layer's goodness: the layer
        above then checks its inputs and refuses them.
        """
        chosen = self._layer_indices(layers)
        n_pos = x_pos.shape[0]
        steps = []
        checked = inputs_checked  # the inputs are known finite: the caller's, or the checked outputs of the layer below
        for i, layer in enumerate(self):
            if i > max(chosen):
                break
            first = {"preact": preact} if i == 0 and preact is not None else {}
            if i in chosen:
                paired = {"label_columns": label_columns} if i == 0 and label_columns is not None else {}
                with validation.trusted_inputs(checked):
                    step = step_fn(layer, x_pos, x_neg, **first, **paired)
                steps.append(step)
                x_pos, x_neg = step.output[:n_pos], step.output[n_pos:]
                checked = output_is_checked(layer, step.output, step.goodness)
            else:  # a layer below the chosen ones only feeds them (no graph: FF steps are local)
                with torch.no_grad(), validation.trusted_inputs(checked):
                    if first:
                        out = layer(torch.cat([x_pos, x_neg]), preact)
                        x_pos, x_neg = out[:n_pos], out[n_pos:]
                    else:
                        x_pos, x_neg = layer(x_pos), layer(x_neg)
                checked = output_is_checked(layer, x_pos)
        return steps

    def ff_backward(self, x_pos: torch.Tensor, x_neg: torch.Tensor, layers: Iterable[int] | None = None,
                    preact: torch.Tensor | None = None, label_columns: int | None = None) -> list[torch.Tensor]:
        """Accumulate every chosen layer's local gradients; returns their losses (0-dim each).

        x_pos: (Bp, D_in) positive rows, x_neg: (Bn, D_in) negative rows; ``preact`` and
        ``label_columns``: see :meth:`train_steps`.
        """
        steps = self.train_steps(
            x_pos, x_neg, lambda layer, p, n, **kw: layer.ff_backward(p, n, return_step=True, **kw), layers, preact,
            label_columns,
        )
        return [step.loss for step in steps]

    def ff_step(
        self,
        x_pos: torch.Tensor,
        x_neg: torch.Tensor,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        layers: Iterable[int] | None = None,
        preact: torch.Tensor | None = None,
        label_columns: int | None = None,
    ) -> list[torch.Tensor]:
        """Fused SGD step on every chosen layer (see ``FFLinear.ff_step``); returns their losses."""
        steps = self.train_steps(
            x_pos, x_neg,
            lambda layer, p, n, **kw: layer.ff_step(p, n, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                                    return_step=True, **kw),
            layers, preact, label_columns,
        )
        return [step.loss for step in steps]


def _io_shapes(layer: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(input row shape, output row shape) of a layer that declares them (FFLinear: (in_features,)
    and (out_features,); FFLocal2d: in_shape and out_shape), else None."""
    if hasattr(layer, "in_shape") and hasattr(layer, "out_shape"):
        return tuple(layer.in_shape), tuple(layer.out_shape)
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return (int(layer.in_features),), (int(layer.out_features),)
    return None


def _check_stack(layers: list[tuple[str, nn.Module]]) -> None:
    """Raise unless ``layers`` (name, module) is a non-empty chain of FF layers (see FFSequential)."""
    if not layers:
        raise ValueError("FFSequential: needs at least one FF layer, got none")
    below = None
    for name, layer in layers:
        missing = [m for m in FF_METHODS if not callable(getattr(layer, m, None))]
        if missing:
            raise TypeError(f"FFSequential: layer {name} must be an FF layer (FFLinear, FFLocal2d or a module with "
                            f"{', '.join(FF_METHODS)}), got {type(layer).__name__} without {', '.join(missing)}")
        shapes = _io_shapes(layer)
        if below is not None and shapes is not None and below[1][1] != shapes[0]:
            raise ValueError(f"FFSequential: layer {name} ({type(layer).__name__}) takes rows of shape {shapes[0]}, but "
                             f"layer {below[0]} below it puts out {below[1][1]}")
        below = None if shapes is None else (name, shapes)
