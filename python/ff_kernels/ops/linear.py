"""Dispatch for the FF linear-layer ops: validate once, pick a backend, call it.

Backends:
    "reference"  functional.py + autograd (any device): the ground truth for tests
    "cpu"        explicit local gradients with torch ops (ops/cpu_linear.py)
    "triton"     fused Triton kernels (fftriton/); CUDA tensors, or CPU tensors when
                 TRITON_INTERPRET=1 (the test mode)
    "auto"       "triton" for CUDA tensors, "cpu" for CPU tensors

Block-wise layers (``blocks=k``: goodness, loss and normalization per block of D_out/k units,
see :mod:`ff_kernels.functional`) run on "reference" and "cpu". The fused Triton kernels reduce
the goodness over whole rows only, so backend "triton" refuses ``blocks``, and "auto" runs a
block-wise layer on CUDA tensors in the "cpu" backend's torch ops (which run on any device: a
cuBLAS GEMM and a few elementwise passes instead of the fused kernels).
"""

from __future__ import annotations

import os

import torch

from .. import functional as FF
from . import cpu_linear, reference_linear, validation
from .layer_step import FFLayerStep
from .validation import (
    FLOAT_DTYPES,
    all_finite,
    check_blocks,
    check_finite,
    check_label_columns,
    check_matrix,
    check_rows_pair,
    check_step_args,
    describe,
)

BACKENDS = ("auto", "reference", "cpu", "triton")


def resolve_backend(backend: str, device: torch.device, layer: str = "FFLinear") -> str:
    """The concrete backend for ``backend`` on ``device`` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"{layer}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{layer}: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"{layer}: backend 'cpu' needs CPU tensors, got device {device}")
    return backend


def _check_params(layer: str, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None) -> None:
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{layer}: weight must be float32 or bfloat16, got {describe(weight)}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype or bias.device != weight.device):
        raise ValueError(f"{layer}: bias must have shape ({weight.shape[0]},) and the weight's dtype and device, got {describe(bias)}")
    if mask is not None and (mask.shape != weight.shape or mask.device != weight.device):
        raise ValueError(f"{layer}: mask must have shape {tuple(weight.shape)} on {weight.device}, got {describe(mask)}")


def _check_compute_dtype(layer: str, compute_dtype: torch.dtype | None, backend: str) -> None:
    if compute_dtype is None:
        return
    if compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{layer}: compute_dtype must be None, torch.float32 or torch.bfloat16, got {compute_dtype}")
    if backend != "cpu" and compute_dtype != torch.float32:
        raise ValueError(f"{layer}: compute_dtype={compute_dtype} is a mode of the 'cpu' backend; got backend {backend!r}")


def check_blocks_backend(layer: str, blocks: int | None, backend: str) -> None:
    """Refuse ``blocks`` with the backend the caller named (before "auto" is resolved): the
    fused Triton kernels have no per-block reductions (module docstring)."""
    if blocks is not None and backend == "triton":
        raise ValueError(f"{layer}: blocks= is supported on the 'reference' and 'cpu' backends and on 'auto' (CUDA "
                         f"tensors then run in torch ops); the fused 'triton' kernels compute whole-row goodness only")


def _torch_ops_step(backend: str, preact, blocks: int | None = None) -> bool:
    """Whether a step on the resolved ``backend`` runs in ops/cpu_linear.py's torch ops: on "cpu",
    and on any but the reference with ``preact`` or ``blocks``."""
    return backend == "cpu" or ((preact is not None or blocks is not None) and backend != "reference")


def step_takes_peer(backend: str, device: torch.device, preact=None, blocks: int | None = None) -> bool:
    """Whether :func:`ff_linear_step` can apply peer normalization inside the step (``peer=``)
    for the layer's ``backend`` on ``device``: when the step runs in torch ops (the "cpu"
    backend, or any but the reference with ``preact`` or ``blocks``)."""
    return _torch_ops_step(resolve_backend(backend, device), preact, blocks)


def _check_preact(layer: str, preact: torch.Tensor, rows: int | None, weight: torch.Tensor) -> None:
    """``preact`` must be a finite (rows, D_out) matrix with the weight's dtype and device."""
    check_matrix("preact", layer, preact, weight.shape[0], weight)
    if rows is not None and preact.shape[0] != rows:
        raise ValueError(f"{layer}: preact must have one row per input row ({rows}), got {describe(preact)}")


def ff_linear_forward(
    x: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    goodness: str = "ssq",
    rms: bool = False,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    compute_dtype: torch.dtype | None = None,
    layer: str = "FFLinear",
    preact: torch.Tensor | None = None,
    blocks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized ReLU activities and goodness of one FF linear layer (no gradients).

    x: (B, D_in) float32|bfloat16, weight: (D_out, D_in), bias: (D_out,) or None,
    mask: (D_out, D_in) bool or None -> (output (B, D_out) in x's dtype, goodness (B,) float32).
    ``blocks=k`` (dividing D_out): goodness (B, k) of the k blocks of D_out/k units, each block
    of the output normalized on its own (module docstring for the backends).

    ``preact``: the pre-activations ``x @ (W * mask).T + b`` (B, D_out) in the weight's dtype,
    computed by the caller (for example from parts that many rows share); the layer then skips
    its GEMM on every backend, and ``x`` may be None (the output then has the weight's dtype).
    """
    FF.check_goodness(goodness)
    _check_params(layer, weight, bias, mask)
    blocks = check_blocks(layer, blocks, weight.shape[0])
    check_blocks_backend(layer, blocks, backend)
    if x is not None:
        check_matrix("x", layer, x, weight.shape[1], weight)
    elif preact is None:
        raise TypeError(f"{layer}: x may be None only when preact is given")
    backend = resolve_backend(backend, weight.device, layer)
    _check_compute_dtype(layer, compute_dtype, backend)
    if preact is not None:
        _check_preact(layer, preact, None if x is None else x.shape[0], weight)
        with torch.no_grad():
            return cpu_linear.forward_from_preact(preact, goodness=goodness, rms=rms,
                                                  dtype=weight.dtype if x is None else x.dtype, blocks=blocks)
    with torch.no_grad():
        if backend == "reference":
            return reference_linear.forward(x, weight, bias, goodness=goodness, rms=rms, mask=mask, blocks=blocks)
        if _torch_ops_step(backend, None, blocks):
            return cpu_linear.forward(x, weight, bias, goodness=goodness, rms=rms, mask=mask, compute_dtype=compute_dtype,
                                      blocks=blocks)
        from . import triton_linear

        return triton_linear.forward(x, weight, bias, goodness=goodness, rms=rms, mask=mask)


def ff_linear_step(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    goodness: str = "ssq",
    threshold: float = 0.0,
    temperature: float = 1.0,
    rms: bool = False,
    mask: torch.Tensor | None = None,
    mode: str = "grad",
    lr: float = 0.0,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    weight_buf: torch.Tensor | None = None,
    bias_buf: torch.Tensor | None = None,
    backend: str = "auto",
    compute_dtype: torch.dtype | None = None,
    layer: str = "FFLinear",
    preact: torch.Tensor | None = None,
    peer=None,
    blocks: int | None = None,
    label_columns: int | None = None,
) -> FFLayerStep:
    """One FF training pass of a linear layer on a positive and a negative batch.

    x_pos: (Bp, D_in), x_neg: (Bn, D_in) in the weight's dtype; weight (D_out, D_in);
    bias (D_out,) or None; mask (D_out, D_in) bool or None (masked weights must be zero).

    mode "grad": add the local gradients dL/dW, dL/db into ``weight.grad`` / ``bias.grad``
    exactly as ``loss.backward()`` on :func:`functional.ff_linear_loss` would.
    mode "sgd": apply ``torch.optim.SGD(lr, momentum, weight_decay)`` to the parameters in
    place with momentum buffers ``weight_buf`` / ``bias_buf`` (required when momentum > 0),
    without writing dL/dW to memory on the fused backends.

    ``preact``: the pre-activations of ``cat([x_pos, x_neg])`` (Bp + Bn, D_out), as for
    :func:`ff_linear_forward`: the forward GEMM is skipped (the weight gradient still reads the
    inputs). The fast backends use it (the Triton backend then runs the step in torch ops); the
    reference backend recomputes the pre-activations from the inputs.

    ``peer``: peer normalization inside the step, where :func:`step_takes_peer` says the step
    can: a function from the mean raw activity (D_out,) of the positive rows (computed with the
    weights before the step) to the derivative p (D_out,), or a ``PeerNormalization`` (called, it is
    its ``update_``; on a float32 CPU its update runs as one compiled loop). The
    gradient ``outer(p, mean positive row) * mask`` (and p for the bias) is then part of this
    step's gradient, as if added to ``.grad`` or to the SGD step afterwards; a step without
    positive rows calls nothing.

    ``blocks=k`` (dividing D_out): a block-wise layer, whose loss is the sum of its k blocks'
    FF losses, each block of D_out/k units with its own goodness against ``threshold`` (so the
    threshold is per block) and its own normalization (module docstring for the backends).

    ``label_columns``: the positive and negative rows come in pairs, the same input with
    another label in its first ``label_columns`` columns (the paper's supervised FF): Bp = Bn
    and ``x_pos[:, label_columns:]`` equals ``x_neg[:, label_columns:]`` (checked). The torch-ops
    step then computes the weight gradient from the shared columns once, a GEMM of Bp rows
    instead of Bp + Bn; the other backends ignore it (their result is the same).

    Returns :class:`FFLayerStep` (loss, goodness (Bp + Bn,), or (Bp + Bn, k) with ``blocks``,
    normalized output) computed with the weights as they were before this step.
    """
    FF.check_goodness(goodness)
    _check_params(layer, weight, bias, mask)
    blocks = check_blocks(layer, blocks, weight.shape[0])
    check_blocks_backend(layer, blocks, backend)
    check_rows_pair(layer, x_pos, x_neg)
    label_columns = check_label_columns(layer, label_columns, x_pos, x_neg)
    joined = cpu_linear.adjacent_rows(x_pos, x_neg)  # adjacent halves: one finite check for both
    check_matrix("x_pos", layer, x_pos, weight.shape[1], weight, finite=joined is None)
    check_matrix("x_neg", layer, x_neg, weight.shape[1], weight, finite=joined is None)
    if joined is not None and validation.checking_inputs():
        if not validation.checks_at_once(joined.device):
            check_finite(layer, "x_pos or x_neg", joined)  # deferred: reading it would wait for the device
        elif not all_finite(joined):
            for name, x in (("x_pos", x_pos), ("x_neg", x_neg)):
                check_matrix(name, layer, x, weight.shape[1], weight)  # names the bad one
    lr, momentum, weight_decay = check_step_args(
        layer, mode, temperature, lr, momentum, weight_decay,
        (("weight_buf", weight_buf, weight), ("bias_buf", bias_buf, bias)),
    )
    threshold = float(threshold)
    backend = resolve_backend(backend, weight.device, layer)
    _check_compute_dtype(layer, compute_dtype, backend)
    kwargs = {
        "goodness": goodness, "threshold": threshold, "temperature": float(temperature), "rms": rms, "mask": mask, "mode": mode,
        "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "weight_buf": weight_buf, "bias_buf": bias_buf,
    }
    torch_ops = _torch_ops_step(backend, preact, blocks)
    if preact is not None:
        _check_preact(layer, preact, x_pos.shape[0] + x_neg.shape[0], weight)
    if peer is not None and not torch_ops:
        raise ValueError(f"{layer}: peer normalization inside the step needs the 'cpu' backend, preact or blocks, "
                         f"got backend {backend!r}")
    if backend == "reference":
        return reference_linear.train_step(x_pos, x_neg, weight, bias, blocks=blocks, **kwargs)
    with torch.no_grad():
        if torch_ops:
            return cpu_linear.train_step(x_pos, x_neg, weight, bias, compute_dtype=compute_dtype, preact=preact,
                                         peer=peer, blocks=blocks, label_columns=label_columns, **kwargs)
        from . import triton_linear

        return triton_linear.train_step(x_pos, x_neg, weight, bias, **kwargs)
