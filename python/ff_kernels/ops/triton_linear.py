"""The Triton backend of the FF linear ops: glue between the dispatcher and fftriton's launchers.

A training step is four launches: the forward GEMM (h and per-tile goodness partials for the
positive and negative rows together), the row statistics (goodness, loss, dL/dG, 1/norm), the
normalized output for the next layer, and the update GEMM whose epilogue accumulates the
gradient or applies the SGD step, so dL/dW is never written to memory.

fp32 GEMMs follow ``torch.set_float32_matmul_precision``: "highest" (torch's default) keeps
IEEE fp32, "high" or "medium" use TF32 tensor cores, as cuBLAS does for torch.matmul.
"""

from __future__ import annotations

import weakref

import torch

import fftriton

from .. import functional as FF
from .layer_step import FFLayerStep

# id(mask) -> {(mask version, block_n, block_k): tile map}; an entry is dropped with its mask.
_occupancy_cache: dict[int, dict] = {}


def _precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _tile_occupancy(mask: torch.Tensor, config: fftriton.BlockConfig) -> torch.Tensor:
    """The mask's tile map for ``config``, built once per mask (and per in-place change of it)."""
    per_mask = _occupancy_cache.get(id(mask))
    if per_mask is None:
        per_mask = _occupancy_cache[id(mask)] = {}
        weakref.finalize(mask, _occupancy_cache.pop, id(mask), None)
    key = (mask._version, config.block_n, config.block_k)
    if key not in per_mask:
        for stale in [old for old in per_mask if old[0] != mask._version]:
            del per_mask[stale]
        per_mask[key] = fftriton.mask_tile_occupancy(mask, config.block_n, config.block_k)
    return per_mask[key]


def _forward(x_pos, x_neg, weight, bias, goodness, mask, precision):
    n, k = weight.shape
    occupancy = None if mask is None else _tile_occupancy(mask, fftriton.block_config(weight.dtype, n, k, precision))
    return fftriton.ff_linear_forward(
        x_pos, x_neg, weight, bias, goodness=goodness, mask=mask, tile_occupancy=occupancy, precision=precision
    )


def forward(x, weight, bias, *, goodness, rms, mask):
    """Normalized output (B, D_out) and goodness (B,) float32 of ``x: (B, D_in)``."""
    h, partials = _forward(x, x[:0], weight, bias, goodness, mask, _precision())
    stats = fftriton.ff_row_stats(
        partials, x.shape[0], goodness=goodness, threshold=0.0, temperature=1.0, n_features=weight.shape[0],
        rms=rms, eps=FF.NORM_EPS,
    )
    return fftriton.scale_rows(h, stats.inv_norm), stats.goodness


def train_step(
    x_pos, x_neg, weight, bias, *, goodness, threshold, temperature, rms, mask,
    mode, lr, momentum, weight_decay, weight_buf, bias_buf,
) -> FFLayerStep:
    """One FF pass on (Bp, D_in) positives and (Bn, D_in) negatives; see ops.linear.ff_linear_step."""
    precision = _precision()
    h, partials = _forward(x_pos, x_neg, weight, bias, goodness, mask, precision)
    stats = fftriton.ff_row_stats(
        partials, x_pos.shape[0], goodness=goodness, threshold=threshold, temperature=temperature,
        n_features=weight.shape[0], rms=rms, eps=FF.NORM_EPS,
    )
    output = fftriton.scale_rows(h, stats.inv_norm)
    n, k = weight.shape
    config = fftriton.update_block_config(weight.dtype, n, k, precision)
    occupancy = None if mask is None else _tile_occupancy(mask, config)
    update = {"goodness": goodness, "mask": mask, "tile_occupancy": occupancy, "precision": precision}
    if mode == "grad":
        for param in (weight, bias):
            if param is not None and param.grad is None:
                param.grad = torch.zeros_like(param, memory_format=torch.contiguous_format)
        fftriton.ff_linear_update(
            x_pos, x_neg, h, stats.coef, weight, bias, mode="grad", weight_grad=weight.grad,
            bias_grad=None if bias is None else bias.grad, **update,
        )
    else:
        fftriton.ff_linear_update(
            x_pos, x_neg, h, stats.coef, weight, bias, mode="sgd", weight_buf=weight_buf, bias_buf=bias_buf,
            lr=lr, momentum=momentum, weight_decay=weight_decay, **update,
        )
    return FFLayerStep(stats.loss_rows.sum(), stats.goodness, output)
