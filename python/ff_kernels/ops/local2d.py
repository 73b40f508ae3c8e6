"""Dispatch for the FF ops of a locally connected 2-D layer: validate once, pick a backend, call it.

The layer is defined in :mod:`ff_kernels.functional.local` (a :class:`LocalSpec`, weight
(L, C_out, K), bias (L, C_out), input (B, C_in, H_in, W_in) -> output (B, C_out, H_out, W_out)).

Backends:
    "reference"  functional_local.py + autograd (any device, float32 or bfloat16): the ground truth
    "cpu"        the compiled CPU kernels (csrc/local2d_cpu.cpp), float32; for layers with many
                 units per location (>= 16, e.g. footnote 8's MNIST net) one batched GEMM per
                 step and direction instead (ops/gemm_local2d.py), which is faster there.
                 FF_KERNELS_LOCAL2D_CPU in the environment overrides the choice at every call:
                 "gemm" always, "rows" or "tiles" never (they pick the compiled kernels' algorithm)
    "cuda"       the compiled CUDA kernels (csrc/local2d_cuda.cu), float32
    "auto"       the compiled kernels of the tensors' device when they are built and the
                 dtype is float32, else "reference" (with a one-time warning)
"""

from __future__ import annotations

import os
import warnings

import torch

from .. import functional as FF
from ..functional.local import LocalSpec
from . import ext_local2d, gemm_local2d, reference_local2d, validation
from .layer_step import FFLayerStep
from .validation import FLOAT_DTYPES, check_step_args, describe

BACKENDS = ("auto", "reference", "cpu", "cuda")

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, layer: str = "FFLocal2d") -> str:
    """The concrete backend for ``backend`` on ``device`` and ``dtype`` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"{layer}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    compiled = device.type if device.type in ("cpu", "cuda") else None
    if backend == "auto":
        if compiled is not None and dtype == torch.float32 and ext_local2d.available(device):
            return compiled
        reason = f"they are float32 only (got {dtype})" if dtype != torch.float32 else _unavailable(device)
        _warn_once(f"ff_kernels local2d: no compiled kernels for these tensors ({reason}); using the slow reference")
        return "reference"
    if compiled != backend:
        raise ValueError(f"{layer}: backend {backend!r} needs {backend} tensors, got device {device}")
    if dtype != torch.float32:
        raise TypeError(f"{layer}: backend {backend!r} is float32 only, got {dtype}; use backend 'reference'")
    if not ext_local2d.available(device):
        raise RuntimeError(f"{layer}: backend {backend!r} needs the compiled kernels: {_unavailable(device)}")
    return backend


def compiled_module(spec: LocalSpec, device: torch.device):
    """The module that runs a compiled-backend op: :mod:`.gemm_local2d` or :mod:`.ext_local2d`
    (see the module docstring)."""
    if device.type != "cpu":
        return ext_local2d
    choice = os.environ.get("FF_KERNELS_LOCAL2D_CPU")
    if choice == "gemm" or (choice not in ("rows", "tiles") and gemm_local2d.pays(spec)):
        return gemm_local2d
    return ext_local2d


def step_takes_peer(spec: LocalSpec, backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`ff_local2d_step` can apply peer normalization inside the step (``peer=``):
    when the step runs as batched GEMMs (:mod:`.gemm_local2d`)."""
    resolved = resolve_backend(backend, device, dtype)
    return resolved == "cpu" and compiled_module(spec, device) is gemm_local2d


def _unavailable(device: torch.device) -> str:
    """Why the compiled kernels do not run on ``device``."""
    if ext_local2d.load_error() is not None:
        return ext_local2d.load_error()
    if device.type == "cuda":
        return "ff_kernels._C was built without CUDA (torch or nvcc had no CUDA at build time)"
    return f"no compiled kernels for device type {device.type!r}"


def _check_spec(layer: str, spec: LocalSpec) -> None:
    if not isinstance(spec, LocalSpec):
        raise TypeError(f"{layer}: spec must be a ff_kernels.functional.local.LocalSpec, got {type(spec).__name__}")


def _check_params(layer: str, spec: LocalSpec, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        got = describe(weight) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"{layer}: weight must be a float32 or bfloat16 tensor, got {got}")
    params = [("weight", weight, spec.weight_shape)] + ([("bias", bias, spec.bias_shape)] if bias is not None else [])
    for name, param, shape in params:
        if tuple(param.shape) != shape:
            raise ValueError(f"{layer}: {name} must have shape {shape} (from {spec}), got {describe(param)}")
        if param.dtype != weight.dtype or param.device != weight.device:
            raise ValueError(f"{layer}: {name} must have the weight's dtype and device, got {describe(param)}")
        if not param.is_contiguous():
            strides = param.stride()
            raise ValueError(f"{layer}: {name} must be contiguous (it is updated in place), got strides {strides}")


def _check_input(name: str, layer: str, x: torch.Tensor, spec: LocalSpec, like: torch.Tensor) -> None:
    """``x`` must be (B, C_in, H_in, W_in) with the layer's dtype and device, and finite."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or tuple(x.shape[1:]) != spec.input_shape:
        expected = ", ".join(map(str, spec.input_shape))
        raise ValueError(f"{layer}: {name} must have shape (batch, {expected}), got {describe(x)}")
    if x.dtype != like.dtype:
        raise TypeError(f"{layer}: {name} must have dtype {like.dtype} (the layer's), got {describe(x)}")
    if x.device != like.device:
        raise ValueError(f"{layer}: {name} must be on {like.device} (the layer's device), got {describe(x)}")
    validation.check_finite(layer, name, x)


def ff_local2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: LocalSpec,
    *,
    goodness: str = "ssq",
    rms: bool = False,
    backend: str = "auto",
    layer: str = "FFLocal2d",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized ReLU activities and goodness of one FF local layer (no gradients).

    x: (B, C_in, H_in, W_in), weight: (L, C_out, K), bias: (L, C_out) or None, all float32 or
    all bfloat16 -> (output (B, C_out, H_out, W_out) in x's dtype, goodness (B,) float32). The
    goodness is taken over all C_out * H_out * W_out units of an image, and so is the normalization.
    """
    FF.check_goodness(goodness)
    _check_spec(layer, spec)
    _check_params(layer, spec, weight, bias)
    _check_input("x", layer, x, spec, weight)
    backend = resolve_backend(backend, weight.device, weight.dtype, layer)
    with torch.no_grad():
        if backend == "reference":
            return reference_local2d.forward(x, weight, bias, spec, goodness=goodness, rms=rms)
        return compiled_module(spec, weight.device).forward(x, weight, bias, spec, goodness=goodness, rms=rms)


def ff_local2d_step(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: LocalSpec,
    *,
    goodness: str = "ssq",
    threshold: float = 0.0,
    temperature: float = 1.0,
    rms: bool = False,
    mode: str = "grad",
    lr: float = 0.0,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    weight_buf: torch.Tensor | None = None,
    bias_buf: torch.Tensor | None = None,
    backend: str = "auto",
    layer: str = "FFLocal2d",
    peer=None,
) -> FFLayerStep:
    """One FF training pass of a locally connected layer on a positive and a negative batch.

    x_pos: (Bp, C_in, H_in, W_in), x_neg: (Bn, C_in, H_in, W_in) in the weight's dtype;
    weight (L, C_out, K) whose entries outside the input map are zero; bias (L, C_out) or None.

    mode "grad": add the local gradients dL/dW, dL/db into ``weight.grad`` / ``bias.grad``
    exactly as ``loss.backward()`` on :func:`functional_local.ff_local_loss` would.
    mode "sgd": apply ``torch.optim.SGD(lr, momentum, weight_decay)`` to the parameters in
    place with momentum buffers ``weight_buf`` / ``bias_buf`` (required when momentum > 0);
    the compiled backends never write dL/dW to memory. Entries outside the input map stay zero.

    ``peer``: peer normalization inside the step, where :func:`step_takes_peer` says it can be:
    a function from the mean raw activity (C_out * L,) of the positive images (ordered like
    ``output.flatten(1)``) to the derivative p, or a ``PeerNormalization`` (called, it is its
    ``update_``; on a float32 CPU its update runs as one compiled loop), whose gradient
    (each location's window of the mean positive image times p, and p for the bias) is then
    part of this step's.

    Returns :class:`FFLayerStep` (loss, goodness (Bp + Bn,), normalized output
    (Bp + Bn, C_out, H_out, W_out)) computed with the weights as they were before this step.
    """
    FF.check_goodness(goodness)
    _check_spec(layer, spec)
    _check_params(layer, spec, weight, bias)
    _check_input("x_pos", layer, x_pos, spec, weight)
    _check_input("x_neg", layer, x_neg, spec, weight)
    if x_pos.shape[0] + x_neg.shape[0] == 0:
        raise ValueError(f"{layer}: both x_pos and x_neg are empty; an FF step needs at least one image")
    lr, momentum, weight_decay = check_step_args(
        layer, mode, temperature, lr, momentum, weight_decay,
        (("weight_buf", weight_buf, weight), ("bias_buf", bias_buf, bias)),
    )
    backend = resolve_backend(backend, weight.device, weight.dtype, layer)
    kwargs = {
        "goodness": goodness, "threshold": float(threshold), "temperature": float(temperature), "rms": rms, "mode": mode,
        "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "weight_buf": weight_buf, "bias_buf": bias_buf,
    }
    module = None if backend == "reference" else compiled_module(spec, weight.device)
    if peer is not None:
        if module is not gemm_local2d:
            raise ValueError(f"{layer}: peer normalization inside the step needs the batched-GEMM form "
                             f"(ops/gemm_local2d.py), not backend {backend!r} for this shape")
        kwargs["peer"] = peer
    if backend == "reference":
        return reference_local2d.train_step(x_pos, x_neg, weight, bias, spec, **kwargs)
    with torch.no_grad():
        return module.train_step(x_pos, x_neg, weight, bias, spec, **kwargs)
