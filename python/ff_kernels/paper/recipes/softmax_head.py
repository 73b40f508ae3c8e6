"""The softmax read-out trained beside the FF layers: its logits and its cross-entropy gradient
without an autograd graph.

The head is a linear layer over features that carry no gradient (the FF layers' detached
outputs), so the gradient of the batch's mean cross-entropy has a closed form: for logits
``z = F @ W.T + b`` (B, classes), ``dL/dz = (softmax(z) - onehot(labels)) / B``,
``dL/dW = dL/dz.T @ F`` and ``dL/db`` = the column sums of dL/dz. :func:`cross_entropy_grad_`
adds them to the parameters' ``.grad`` as ``cross_entropy(head(features), labels).backward()``
would, without recording the graph.

The features may come in blocks, each a block of rows (B, F_i) with the head input index of
each of its columns (a layer's output in its own memory order: a channels-last map's rows are
(H, W, C) while the head reads ``.flatten(1)``'s (C, H, W)): the logits are the sum of the
blocks' GEMMs against the weight's matching columns, and each block's gradient goes back to
those columns, so the features are never copied into one (B, F) tensor. On float32 CPU
tensors the step runs in compiled ops (csrc/head_cpu.cpp: BLAS is slow with 10 output rows or
columns, and each of a dozen small torch ops costs more than the arithmetic), elsewhere in torch
ops (:func:`_torch_step`, also the reference the tests hold the compiled step to).
"""

from __future__ import annotations

import torch
from torch import nn

from ...ops.ext_local2d import cpu_ops_take


def cross_entropy_grad_(head: nn.Linear, features: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]],
                        labels: torch.Tensor) -> torch.Tensor:
    """Logits (B, classes) of ``head`` on the features, with the gradient of
    ``cross_entropy(logits, labels)`` (mean over the batch) added to ``head.weight.grad`` (and
    ``head.bias.grad``); returns the logits, detached.

    ``features``: (B, in_features), or blocks ``[(rows (B, F_i), columns (F_i,) int64), ...]``
    whose columns together cover the head's inputs once. They must not require grad (the closed
    form has no gradient for them). ``labels``: int64 (B,) in [0, classes).
    """
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(f"cross_entropy_grad_: labels must be int64 (B,), got shape {tuple(labels.shape)}, "
                         f"dtype {labels.dtype}")
    blocks = [(features, None)] if isinstance(features, torch.Tensor) else list(features)
    batch = labels.shape[0]
    for rows, columns in blocks:
        if rows.requires_grad:
            raise ValueError("cross_entropy_grad_: features must not require grad (detach them; the head's "
                             "closed-form gradient does not reach them)")
        width = head.in_features if columns is None else columns.shape[0]
        if rows.dim() != 2 or rows.shape != (batch, width):
            raise ValueError(f"cross_entropy_grad_: features must be ({batch}, {width}) (labels give B = {batch}), "
                             f"got {tuple(rows.shape)}")
    if sum(rows.shape[1] for rows, _ in blocks) != head.in_features:
        raise ValueError(f"cross_entropy_grad_: the blocks have {sum(r.shape[1] for r, _ in blocks)} columns, "
                         f"the head {head.in_features} inputs")
    with torch.no_grad():
        weight = head.weight.detach()
        if head.weight.grad is None:
            head.weight.grad = torch.zeros_like(weight)
        compiled = _compiled(weight, head.weight.grad, *(rows for rows, _ in blocks)) and labels.device.type == "cpu"
        logits, dz = (_compiled_step if compiled else _torch_step)(head, blocks, labels)
        if head.bias is not None:
            bias_grad = dz.sum(0)
            head.bias.grad = bias_grad if head.bias.grad is None else head.bias.grad.add_(bias_grad)
    return logits


def _compiled(*tensors: torch.Tensor) -> bool:
    return cpu_ops_take(*tensors) and all(t.is_contiguous() for t in tensors)


def _torch_step(head: nn.Linear, blocks, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (B, K) and dL/dz (B, K) in torch ops, the weight gradient added to
    ``head.weight.grad``; the reference of :func:`_compiled_step`."""
    weight, batch = head.weight.detach(), labels.shape[0]
    weights = [weight if columns is None else weight.index_select(1, columns) for _, columns in blocks]
    logits = weight.new_zeros(batch, head.out_features)
    for (rows, _), w in zip(blocks, weights, strict=True):
        logits += torch.mm(w, rows.t().to(w.dtype)).t()
    if head.bias is not None:
        logits += head.bias.detach()
    dz = torch.softmax(logits, dim=1)
    dz[torch.arange(batch, device=labels.device), labels] -= 1.0
    dz.div_(batch)
    for rows, columns in blocks:
        grad = torch.mm(dz.t(), rows.to(dz.dtype))
        if columns is None:
            head.weight.grad += grad
        else:
            head.weight.grad.index_add_(1, columns, grad)
    return logits, dz


def _compiled_step(head: nn.Linear, blocks, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_torch_step` in the compiled CPU ops (float32, contiguous): each block's weight
    columns gathered (``gather_columns``), the logits of 10 classes in small-K kernels, dL/dz in
    one pass, and each block's gradient added straight into its columns of ``.grad``."""
    weight, grad = head.weight.detach(), head.weight.grad
    logits = weight.new_zeros(labels.shape[0], head.out_features)
    for rows, columns in blocks:
        w = weight
        if columns is not None:
            w = weight.new_empty(weight.shape[0], columns.shape[0])
            torch.ops.ff_kernels.gather_columns(weight, columns, w)
        torch.ops.ff_kernels.head_logits_add_(rows, w, logits)
    if head.bias is not None:
        logits += head.bias.detach()
    dz = torch.ops.ff_kernels.cross_entropy_logit_grad(logits, labels)
    for rows, columns in blocks:
        torch.ops.ff_kernels.head_weight_grad_add_(dz, rows, columns, grad)
    return logits, dz
