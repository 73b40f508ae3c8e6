"""CPU fast path for an FF linear layer: explicit local gradients with torch ops, no autograd.

Per step it runs one GEMM for the positive and negative rows together (the bias added in the
first pass after it, or by ``addmm`` where that pass is torch ops), the passes over the
(B, D_out) activities of :mod:`.step_epilogue` (two compiled passes and a compiled loss for
float32 on the CPU, torch ops otherwise and for block-wise layers), and one weight-gradient
GEMM that
accumulates straight into ``weight.grad`` or into the momentum buffer (``addmm_`` with the
momentum as beta; weight decay and the update then take one compiled pass over the weight and
its buffer), so dW is never a separate tensor unless a mask, a dtype change or, off the CPU,
weight decay (then torch's fused SGD pass, see :func:`sgd_update`) needs one. With
``compute_dtype=torch.bfloat16`` both GEMMs run in bf16 (AMX/AVX512-BF16 where the CPU has
them) while parameters, goodness and the optimizer stay in the parameters' dtype.

Block-wise layers (``blocks=k``, see :mod:`ff_kernels.functional`): the goodness, its dL/dG
and the normalization divisor are per block, (B, k), and each is applied to its block's D_out/k
units; the GEMMs are the same.
"""

from __future__ import annotations

import torch

from .. import functional as FF
from . import step_epilogue
from .cpu_features import warn_if_bf16_emulated
from .layer_step import FFLayerStep
from .workspace import workspace

FUSED_SGD_MIN = 1 << 16  # parameter size from which torch's fused SGD pass replaces the two passes below


def _preactivations(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T + b in x's dtype: x (B, D_in), W (D_out, D_in) -> (B, D_out) (into ``out`` if given)."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias.to(x.dtype), x, weight.t(), out=out)


def _activities(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """relu(x @ W.T + b) in x's dtype: x (B, D_in), W (D_out, D_in) -> (B, D_out) (into ``out`` if given)."""
    return _preactivations(x, weight, bias, out).relu_()


def _units(h: torch.Tensor, blocks: int | None) -> torch.Tensor:
    """``h: (B, D)`` as the units each goodness covers: ``(B, D)``, or a view ``(B, k, D/k)`` for ``blocks=k``."""
    return h if blocks is None else h.unflatten(1, (blocks, h.shape[1] // blocks))


def _row_scale(h: torch.Tensor, goodness: str, blocks: int | None = None) -> torch.Tensor:
    """Per-row sum (``"sum"``) or length (squared goodness) of ``h: (B, D)``, float32 (B,);
    per block (B, k) for ``blocks=k``."""
    units = _units(h, blocks)
    if goodness == "sum":
        return units.sum(-1, dtype=torch.float32)
    return torch.linalg.vector_norm(units, dim=-1, dtype=torch.float32)


def _normalized(h: torch.Tensor, scale: torch.Tensor, goodness: str, rms: bool, blocks: int | None = None
                ) -> torch.Tensor:
    """``h / (scale + eps)`` (B, D) with the rms rescaling of :func:`functional.normalize`; ``scale``
    is :func:`_row_scale`'s (B,), or (B, k) dividing each block of D/k units for ``blocks=k``."""
    units = _units(h, blocks)
    if rms:
        d = units.shape[-1]
        scale = scale / (d if goodness == "sum" else d**0.5)
    return (units * (1.0 / (scale + FF.NORM_EPS)).to(h.dtype)[..., None]).flatten(1)


def _cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or x.dtype == dtype:
        return x
    if dtype == torch.bfloat16:
        warn_if_bf16_emulated()
    return x.to(dtype)


def _normalize_into(h: torch.Tensor, goodness: str, rms: bool, bias: torch.Tensor | None = None,
                    source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalized output, goodness (B,) float32) in place of ``h`` (B, D), float32 on the CPU,
    from the pre-activations ``source + bias`` (``source`` None: h's own values): the bias, the
    ReLU and the goodness in one compiled pass, then each row times its
    :func:`step_epilogue.inverse_scale` (the same product as a training step's output)."""
    g, _ = step_epilogue.relu_goodness_(h.unsqueeze(0), None if bias is None else bias.unsqueeze(0), goodness,
                                        source=None if source is None else source.unsqueeze(0))
    return h.mul_(step_epilogue.inverse_scale(g, goodness, h.shape[1], rms).unsqueeze(1)), g


def _passes_take(h: torch.Tensor, blocks: int | None) -> bool:
    """Whether :func:`_normalize_into` takes ``h``: no blocks, a contiguous float32 CPU matrix, the compiled ops loaded."""
    return blocks is None and h.dim() == 2 and h.is_contiguous() and step_epilogue.cpu_ops_take(h)


def forward(x, weight, bias, *, goodness, rms, mask, compute_dtype=None, blocks=None):
    """Normalized output (B, D_out) in x's dtype and goodness (B,) float32 of ``x: (B, D_in)``;
    with ``blocks=k`` the goodness is per block, (B, k), and each block is normalized on its own.

    Relies on the layer invariant that masked weights are exactly zero, so the mask costs nothing.
    """
    x_c, w_c = _cast(x, compute_dtype), _cast(weight, compute_dtype)
    if _passes_take(x_c, blocks) and w_c.dtype == x_c.dtype and (bias is None or bias.dtype == x_c.dtype):
        return _normalize_into(torch.mm(x_c, w_c.t()), goodness, rms, bias)  # the bias in the ReLU's pass
    h = _activities(x_c, w_c, bias)
    scale = _row_scale(h, goodness, blocks)
    g = scale if goodness == "sum" else scale.square()
    return _normalized(h, scale, goodness, rms, blocks).to(x.dtype), g


def forward_from_preact(preact, *, goodness, rms, dtype, blocks=None):
    """:func:`forward` from the pre-activations ``preact`` (B, D_out): output in ``dtype``, goodness
    float32 (B,), or (B, k) for ``blocks=k``."""
    if _passes_take(preact, blocks) and dtype == preact.dtype:
        return _normalize_into(torch.empty_like(preact), goodness, rms, source=preact)
    h = preact.relu()
    scale = _row_scale(h, goodness, blocks)
    g = scale if goodness == "sum" else scale.square()
    return _normalized(h, scale, goodness, rms, blocks).to(dtype), g


def adjacent_rows(x_pos: torch.Tensor, x_neg: torch.Tensor) -> torch.Tensor | None:
    """``torch.cat([x_pos, x_neg])`` as a view when ``x_neg``'s rows directly follow ``x_pos``'s
    in memory (the two halves of one tensor, as FFSequential passes them on), else None."""
    if (x_pos.dim() == 2 and x_pos.dtype == x_neg.dtype and x_pos.device == x_neg.device
            and x_pos.shape[1] == x_neg.shape[1] and x_pos.is_contiguous() and x_neg.is_contiguous()
            and x_pos.shape[0] > 0 and x_neg.shape[0] > 0
            and x_neg.untyped_storage().data_ptr() == x_pos.untyped_storage().data_ptr()
            and x_neg.storage_offset() == x_pos.storage_offset() + x_pos.numel()):
        return x_pos.as_strided((x_pos.shape[0] + x_neg.shape[0], x_pos.shape[1]), (x_pos.shape[1], 1))
    return None


def rows_together(x_pos: torch.Tensor, x_neg: torch.Tensor) -> torch.Tensor:
    """``torch.cat([x_pos, x_neg])``, without a copy when the rows are adjacent (:func:`adjacent_rows`)."""
    joined = adjacent_rows(x_pos, x_neg)
    return torch.cat([x_pos, x_neg]) if joined is None else joined


def _add_weight_grad(target, delta, x, mask, alpha: float = 1.0, beta: float = 1.0) -> None:
    """``target = beta * target + alpha * (delta.T @ x) * mask``: (D_out, B) @ (B, D_in).

    One GEMM writing into ``target`` when there is no mask and no dtype change. Beta 0
    overwrites ``target`` whatever it holds (NaN included).
    """
    if mask is None and delta.dtype == target.dtype:
        target.addmm_(delta.t(), x, beta=beta, alpha=alpha)
        return
    grad = torch.mm(delta.t(), x)
    if mask is not None:
        grad.mul_(mask)
    scaled_add_(target, grad, alpha, beta)


def scaled_add_(target: torch.Tensor, value: torch.Tensor, alpha: float = 1.0, beta: float = 1.0) -> None:
    """``target = beta * target + alpha * value`` in place; beta 0 overwrites ``target`` whatever
    it holds (NaN included), as BLAS's beta does."""
    if beta == 0.0:
        torch.mul(value, alpha, out=target)
        return
    if beta != 1.0:
        target.mul_(beta)
    target.add_(value, alpha=alpha)


def _accumulate_grad(param: torch.Tensor, add) -> None:
    """``param.grad += grad`` where ``add(target, alpha, beta)`` adds the gradient into ``target``."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    add(param.grad, 1.0, 1.0)


def decay_apply_takes(param: torch.Tensor, buf: torch.Tensor) -> bool:
    """Whether the compiled one-pass decay and update (``ff_sgd_decay_apply_``) takes ``param``
    and its momentum buffer: contiguous float32 CPU tensors, the compiled ops loaded."""
    return step_epilogue.cpu_ops_take(param, buf) and param.is_contiguous() and buf.is_contiguous()


def sgd_update(param: torch.Tensor, buf: torch.Tensor | None, add, lr: float, momentum: float,
               weight_decay: float) -> None:
    """torch.optim.SGD step (dampening 0) with the gradient added by ``add(target, alpha, beta)``
    (``target = beta * target + alpha * grad``; beta 0 overwrites ``target`` whatever it holds).

    Without a buffer (momentum 0): ``param = (1 - lr * wd) * param - lr * grad``, the gradient
    GEMM writing into the parameter. With one: ``buf = momentum * buf + grad + wd * param;
    param -= lr * buf``; the momentum decay rides on the gradient GEMM as its beta (the GEMM
    writes ``momentum * buf + grad`` into buf), then one pass updates param: without weight
    decay ``param.add_``, with it, for contiguous float32 CPU tensors, the compiled
    ``ff_sgd_decay_apply_`` (``buf += wd * param; param -= lr * buf`` in one pass over param
    and buf). Elsewhere (CUDA) a float32 parameter of at least ``FUSED_SGD_MIN`` entries gets
    its gradient in a workspace and torch's fused SGD kernel does the decay, the momentum and
    the update in one pass over param, grad and buf (instead of the GEMM into buf and two
    passes over param and buf).
    """
    if buf is None:
        add(param, -lr, 1.0 - lr * weight_decay)
        return
    if weight_decay and decay_apply_takes(param, buf):
        add(buf, 1.0, momentum)
        torch.ops.ff_kernels.ff_sgd_decay_apply_(param, buf, lr, weight_decay)
        return
    if weight_decay and param.dtype == torch.float32 and param.numel() >= FUSED_SGD_MIN:
        grad = workspace("sgd_grad", param.shape, param)
        add(grad, 1.0, 0.0)
        torch._fused_sgd_([param], [grad], [buf], weight_decay=weight_decay, momentum=momentum, lr=lr,
                          dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
        return
    add(buf, 1.0, momentum)
    if weight_decay:
        buf.add_(param, alpha=weight_decay)
    param.add_(buf, alpha=-lr)


def sgd_update_with(param: torch.Tensor, buf: torch.Tensor | None, grad: torch.Tensor, lr: float, momentum: float,
                    weight_decay: float) -> None:
    """:func:`sgd_update` with the gradient at hand as a tensor of param's shape (a bias's row
    sum): one call of torch's fused SGD kernel for a float32 parameter with a momentum buffer,
    else :func:`sgd_update` adding ``grad``."""
    if buf is not None and param.dtype == torch.float32 and grad.dtype == torch.float32:
        torch._fused_sgd_([param], [grad], [buf], weight_decay=weight_decay, momentum=momentum, lr=lr,
                          dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
        return
    sgd_update(param, buf, lambda target, alpha, beta: scaled_add_(target, grad, alpha, beta), lr, momentum, weight_decay)


def _add_paired_weight_grad(target, delta, x, n_pos, label_columns, mask, alpha: float, beta: float) -> None:
    """:func:`_add_weight_grad` for Bp = Bn rows x (2Bp, D_in) whose positive and negative rows
    agree past their first ``label_columns`` columns: ``delta.T @ x`` as
    ``(delta_pos + delta_neg).T @ x_pos`` (a GEMM of half the rows) plus
    ``delta_neg.T @ (x_neg - x_pos)`` on the first ``label_columns`` columns."""
    _add_weight_grad(target, delta[:n_pos] + delta[n_pos:], x[:n_pos], mask, alpha, beta)
    if label_columns:
        labels = slice(0, label_columns)
        _add_weight_grad(target[:, labels], delta[n_pos:], x[n_pos:, labels] - x[:n_pos, labels],
                         None if mask is None else mask[:, labels], alpha)


def _passes_step(x, h, weight, bias, n_pos, goodness, threshold, temperature, rms, preact, peer):
    """The step of a layer without blocks from its forward GEMM to its delta, with the two passes
    of :mod:`.step_epilogue` over ``h`` (B, D_out) viewed as (1, B, D_out): the GEMM writes z
    without the bias, which the first pass adds with the ReLU (as :func:`forward` does), into h;
    or the first pass reads the callers' ``preact`` (bias included) and writes h.

    Returns (loss, goodness (B,), normalized output (B, D_out) in h's dtype, delta (h itself),
    the peer derivative p (D_out,) float32 or None, the bias gradient (D_out,) float32 or None):
    when delta is in weight's dtype, p / Bp is already on the positive rows' delta (and in the
    bias gradient); the bias gradient is None when there is no bias or when p stays apart.
    """
    pass_bias = source = None
    if preact is not None and preact.is_contiguous():
        source = preact.unsqueeze(0)
    elif preact is not None:
        h.copy_(preact)
    elif bias is not None and bias.dtype == h.dtype:
        torch.mm(x, weight.to(x.dtype).t(), out=h)
        pass_bias = bias.unsqueeze(0)
    else:
        _preactivations(x, weight.to(x.dtype), bias, out=h)
    units = h.unsqueeze(0)
    with_peer = peer is not None and n_pos > 0
    g, positive_sum = step_epilogue.relu_goodness_(units, pass_bias, goodness, n_pos if with_peer else 0, source)
    fold = with_peer and h.dtype == weight.dtype
    output = torch.empty_like(h)
    loss, p, bias_sum = step_epilogue.loss_output_delta_(
        units, g, positive_sum, output, n_pos, goodness, threshold, temperature, h.shape[1], rms,
        peer if with_peer else None, fold=fold, bias_sum=bias is not None and (not with_peer or fold))
    if bias_sum is not None:
        bias_sum = bias_sum[0]
    return loss, g, output, h, p, bias_sum


def train_step(
    x_pos, x_neg, weight, bias, *, goodness, threshold, temperature, rms, mask,
    mode, lr, momentum, weight_decay, weight_buf, bias_buf, compute_dtype=None, preact=None, peer=None, blocks=None,
    label_columns=None,
) -> FFLayerStep:
    """One FF pass on (Bp, D_in) positives and (Bn, D_in) negatives; see ops.linear.ff_linear_step.

    ``blocks=k``: a block-wise layer; the step's goodness is (Bp + Bn, k) and unit j's
    ``delta = dG/dz_j * dL/dG`` of its block.

    ``preact`` (Bp + Bn, D_out): the caller's pre-activations, used instead of the forward GEMM.
    ``peer``: peer normalization inside the step (see ``ff_linear_step``): called with the mean
    raw activity of the positive rows, it returns the per-unit derivative p (D_out,), whose
    rank-1 gradient ``outer(p, mean positive row)`` (and p for the bias) joins the step's
    gradient: as p / Bp added to every positive row of delta, so the weight-gradient GEMM and
    the bias sum carry it, or, when delta is in a lower compute dtype, added in float32 to the
    gradient target before the parameters move. Plain torch ops: runs on any device.

    ``label_columns`` (validated by the caller): Bp = Bn and each positive row equals its
    negative row past its first ``label_columns`` columns; the weight gradient then reads the
    shared columns once (:func:`_add_paired_weight_grad`).
    """
    n_pos = x_pos.shape[0]
    x = _cast(rows_together(x_pos, x_neg), compute_dtype)
    h = x.new_empty(x.shape[0], weight.shape[0])
    if blocks is None:  # the two passes of step_epilogue (compiled for float32 on the CPU)
        loss, g, output, delta, p, bias_sum = _passes_step(x, h, weight, bias, n_pos, goodness, threshold, temperature,
                                                          rms, preact, peer)
        output, folded = output.to(x_pos.dtype), True
    else:
        if preact is None:
            _activities(x, _cast(weight, compute_dtype), bias, out=h)
        elif preact.dtype == h.dtype:
            torch.clamp_min(preact, 0, out=h)
        else:  # bf16 compute: the caller's float32 pre-activations rounded once
            h.copy_(preact).relu_()
        scale = _row_scale(h, goodness, blocks)
        g = scale if goodness == "sum" else scale.square()
        loss, coef = FF.ff_loss_and_goodness_grad(g, n_pos, goodness, threshold, temperature)
        output = _normalized(h, scale, goodness, rms, blocks).to(x_pos.dtype)
        p = peer(h[:n_pos].mean(0, dtype=torch.float32)) if peer is not None and n_pos > 0 else None
        # delta = dG/dz * dL/dG in place of h: the block's dL/dG over its units
        factor = (coef if goodness == "sum" else 2.0 * coef).to(h.dtype)[..., None]
        delta = h.sign_() if goodness == "sum" else h  # h >= 0, so sign(h) = 1[h > 0]
        _units(delta, blocks).mul_(factor)
        bias_sum, folded = None, False
    # outer(p, mean positive row) = sum over positive rows of outer(p / Bp, row): the peer
    # gradient rides on the gradient GEMM (and the bias sum) as p / Bp on each positive delta
    # row, unless delta is in a lower compute dtype than p (then it is added in float32)
    fold = p is not None and delta.dtype == weight.dtype
    if fold and not folded:
        delta[:n_pos].add_(p.to(delta.dtype), alpha=1.0 / n_pos)
    x_mean = x[:n_pos].mean(0, dtype=torch.float32) if p is not None and not fold else None
    mask_w = None if mask is None else mask.to(weight.dtype)

    def add_w(target, alpha, beta):
        if label_columns is None:
            _add_weight_grad(target, delta, x, mask_w, alpha, beta)
        else:
            _add_paired_weight_grad(target, delta, x, n_pos, label_columns, mask_w, alpha, beta)
        if x_mean is not None:
            if mask_w is None:
                target.addr_(p.to(target.dtype), x_mean.to(target.dtype), alpha=alpha)
            else:
                target.add_(torch.outer(p, x_mean).to(target.dtype).mul_(mask_w), alpha=alpha)

    def bias_grad() -> torch.Tensor:  # (D_out,) float32
        grad = delta.sum(0, dtype=torch.float32) if bias_sum is None else bias_sum
        return grad if x_mean is None else grad.add_(p)

    with torch.no_grad():
        if mode == "grad":
            _accumulate_grad(weight, add_w)
            if bias is not None:
                _accumulate_grad(bias, lambda target, alpha, beta: scaled_add_(target, bias_grad(), alpha, beta))
        else:
            sgd_update(weight, weight_buf, add_w, lr, momentum, weight_decay)
            if bias is not None:
                sgd_update_with(bias, bias_buf, bias_grad(), lr, momentum, weight_decay)
    return FFLayerStep(loss, g, output)
