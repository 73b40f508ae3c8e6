"""The local 2-D FF ops as one GEMM per location (batched), in torch ops and two fused passes.

A locally connected layer is L independent dense layers, one per output location, each over
its window: ``z[:, :, l] = W[l] @ window_l(x) + b[l]`` with W[l] (C_out, K). When the grid is
small and every location has many units, as in the MNIST net of footnote 8 (4x4, 3x3 and 2x2
grids of 128 to 512 units), that is a batch of L well-shaped GEMMs, and BLAS's batched GEMM
runs them near the speed of one dense GEMM with as many multiply-adds; the compiled kernels
(csrc/), made for wide maps of few units per location (CIFAR-10's 32x32x3), are slower there.

Layout: the windows of a batch are gathered once per step, image by image, as P (B, L, K)
(zero where a window leaves the map), and the activities are location-major, h (L, B, C_out):

    h[l]     = P[:, l] @ W[l].T                 (L, B, C_out)    one batched GEMM, contiguous output
    h        = relu(h + b), goodness            one pass (:func:`step_epilogue.relu_goodness_`)
    output, h' = the delta, bias gradient       one pass (:func:`step_epilogue.output_and_delta_`)
    dW       = h'[l].T @ P[:, l]                (L, C_out, K)    one batched GEMM, into .grad or the SGD target

(h' the delta, written over h; the two passes are compiled on a float32 CPU, torch ops elsewhere). Each location's GEMM writes its own contiguous block, which
BLAS runs as a true batched GEMM; rows (B, L * C_out) would make it one strided GEMM per
location, slower on more than one thread. The normalized output is written once as rows
(B, L * C_out) in (H_out, W_out, C_out) order, so the output (B, C_out, H_out, W_out) is a
channels-last view of them (same shape and values as a contiguous one; ``.contiguous()`` gives
the other order). Inputs may be contiguous or channels-last (read
without a copy either way: the gather index follows the layout), or any other strides (copied
once). Entries of W outside the map meet zeros of P, so they do not change z, and their gradient
is exactly zero (the layers keep those weights zero). The step's large temporaries (the windows
and h, which becomes the delta) live in buffers kept from call to call (per thread, shape and
dtype): a fresh multi-megabyte tensor each step costs the page faults of new memory, which here
cost more than the gather itself. float32 or bfloat16, any device. Same arguments and results
(shapes and values) as
:mod:`ff_kernels.ops.ext_local2d` (see :mod:`ff_kernels.ops.local2d` for when it is used).
"""

from __future__ import annotations

import functools
import math

import torch

from ..functional.local import LocalSpec, _window_index
from . import step_epilogue
from .cpu_linear import rows_together, sgd_update, sgd_update_with
from .ext_local2d import cpu_ops_take
from .layer_step import FFLayerStep
from .workspace import workspace

MIN_OUT_CHANNELS = 16  # units per location from which the batched GEMMs beat the compiled CPU kernels


def pays(spec: LocalSpec) -> bool:
    """Whether this form is the faster one on the CPU: enough units per location for a GEMM
    (the footnote-8 net's layers, not CIFAR-10's 3 per location)."""
    return spec.out_channels >= MIN_OUT_CHANNELS


def channels_last(x: torch.Tensor) -> bool:
    """Whether ``x: (B, C, H, W)`` is stored channels-last (``torch.channels_last``) and not also
    contiguous (the two orders agree when C == 1 or H * W == 1)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def image_rows(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x: (B, C, H, W)`` as rows (B, C * H * W) and whether they are in channels-last (H, W, C)
    order: a view when x is contiguous or channels-last, else a contiguous copy."""
    features = math.prod(x.shape[1:])
    if channels_last(x):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], features), True
    return x.reshape(x.shape[0], features), False


def as_output(rows: torch.Tensor, spec: LocalSpec) -> torch.Tensor:
    """Rows (B, L * C_out) in location-major (H_out, W_out, C_out) order as the output
    (B, C_out, H_out, W_out), a channels-last view."""
    return rows.view(rows.shape[0], spec.out_height, spec.out_width, spec.out_channels).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=64)
def _window_index_channels_last(spec: LocalSpec, device: torch.device) -> torch.Tensor:
    """:func:`_window_index` for inputs read in channels-last order: (L, K) int64 flat index
    (row * W_in + col) * C_in + c, ``spec.in_features`` outside the map."""
    index = _window_index(spec, device)
    plane = spec.in_height * spec.in_width
    moved = (index % plane) * spec.in_channels + index // plane
    return torch.where(index < spec.in_features, moved, spec.in_features)


def windows(rows: torch.Tensor, spec: LocalSpec, in_channels_last: bool) -> torch.Tensor:
    """Every location's window of the image rows (B, C_in * H_in * W_in) (channel-major, or
    channels-last when ``in_channels_last``) as (B, L, K), zeros outside the map."""
    batch = rows.shape[0]
    gathered = workspace("windows", (batch, spec.num_locations * spec.block_size), rows)
    if cpu_ops_take(rows) and rows.is_contiguous():  # one compiled pass (:func:`_gather_plan`)
        kind, plan = _gather_plan(spec, in_channels_last)
        if kind == "interleaved":
            torch.ops.ff_kernels.gather_interleaved(rows, plan, spec.in_channels, gathered)
        elif kind == "runs":
            torch.ops.ff_kernels.gather_runs(rows, plan, gathered)
        else:
            torch.ops.ff_kernels.gather_columns(rows, plan, gathered)
    else:
        index = (_window_index_channels_last if in_channels_last else _window_index)(spec, rows.device).view(-1)
        if not _all_inside(spec, rows.device):  # windows that leave the map read a zero column past the image
            rows = torch.cat([rows, rows.new_zeros(batch, 1)], dim=1)
        torch.index_select(rows, 1, index, out=gathered)
    return gathered.view(batch, spec.num_locations, spec.block_size)


MIN_RUN = 4  # mean columns per run from which copying runs beats gathering column by column


@functools.lru_cache(maxsize=64)
def _gather_plan(spec: LocalSpec, in_channels_last: bool) -> tuple[str, torch.Tensor]:
    """How :func:`windows` gathers on the CPU, from the flat window index (L * K,) (an entry
    ``spec.in_features`` reads zero):

    - ``("interleaved", starts (L, k * k))``: channels-last input, so window position q's C_in
      channels are contiguous in the input (from ``starts[l, q]``, -1 outside the map) and land
      every k * k entries of the channel-major window (``gather_interleaved``);
    - ``("runs", (R, 3))``: the index is runs of consecutive columns (dst, src or -1, length),
      at least ``MIN_RUN`` long on average: a channel-major input's window rows (``gather_runs``);
    - ``("columns", index)``: anything else, column by column (``gather_columns``).
    """
    cpu = torch.device("cpu")
    index = (_window_index_channels_last if in_channels_last else _window_index)(spec, cpu)  # (L, K)
    outside = spec.in_features
    if in_channels_last and spec.in_channels > 1:
        by_channel = index.view(spec.num_locations, spec.in_channels, spec.kernel * spec.kernel)
        starts = by_channel[:, 0, :]
        channel = torch.arange(spec.in_channels)[None, :, None]
        expected = torch.where(starts[:, None, :] == outside, outside, starts[:, None, :] + channel)
        if torch.equal(expected, by_channel):
            return "interleaved", torch.where(starts == outside, -1, starts).contiguous()
    flat = index.reshape(-1)
    inside = flat < outside
    continues = (inside[1:] & inside[:-1] & (flat[1:] == flat[:-1] + 1)) | (~inside[1:] & ~inside[:-1])
    first = torch.cat([torch.tensor([0]), torch.nonzero(~continues).flatten() + 1])
    lengths = torch.diff(first, append=torch.tensor([flat.numel()]))
    if flat.numel() >= MIN_RUN * first.numel():
        return "runs", torch.stack([first, torch.where(inside[first], flat[first], -1), lengths], dim=1).contiguous()
    return "columns", flat.contiguous()


@functools.lru_cache(maxsize=64)
def _all_inside(spec: LocalSpec, device: torch.device) -> bool:
    return bool((_window_index(spec, device) < spec.in_features).all())


def _preactivations(p: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """P @ W.T of the windows p (B, L, K) as (L, B, C_out), in a reused buffer (the bias is added
    by the pass after it, :func:`step_epilogue.relu_goodness_`)."""
    locations, batch, out_channels = weight.shape[0], p.shape[0], weight.shape[1]
    out = workspace("local_h", (locations, batch, out_channels), weight)
    return torch.bmm(p.transpose(0, 1), weight.transpose(1, 2), out=out)


def forward(x, weight, bias, spec, *, goodness, rms):
    """Normalized output (B, C_out, H_out, W_out) (channels-last) and goodness (B,) float32."""
    rows, in_channels_last = image_rows(x)
    h = _preactivations(windows(rows, spec, in_channels_last), weight)
    g, _ = step_epilogue.relu_goodness_(h, bias, goodness)
    output = h.new_empty(h.shape[1], spec.out_features)
    step_epilogue.output_and_delta_(h, step_epilogue.inverse_scale(g, goodness, spec.out_features, rms), output, None, goodness)
    return as_output(output, spec), g


def _step_rows(x_pos: torch.Tensor, x_neg: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The positive then negative images as one block of rows (B, C_in * H_in * W_in) (without a
    copy when they are adjacent in memory) and whether it is in channels-last order."""
    if channels_last(x_pos) != channels_last(x_neg):
        x_neg = x_neg.contiguous(memory_format=torch.channels_last if channels_last(x_pos) else torch.contiguous_format)
    (pos, in_channels_last), (neg, _) = image_rows(x_pos), image_rows(x_neg)
    return rows_together(pos, neg), in_channels_last


def train_step(
    x_pos, x_neg, weight, bias, spec, *, goodness, threshold, temperature, rms,
    mode, lr, momentum, weight_decay, weight_buf, bias_buf, peer=None,
) -> FFLayerStep:
    """One FF pass on (Bp, C_in, H_in, W_in) positives and (Bn, ...) negatives; see ops.local2d.ff_local2d_step.

    ``peer``: peer normalization inside the step (see ``ff_local2d_step``); its gradient, the
    mean positive image's windows times p at every location, rides on the gradient GEMM as
    p / Bp added to every positive row's delta.
    """
    n_pos = x_pos.shape[0]
    x, in_channels_last = _step_rows(x_pos, x_neg)
    p = windows(x, spec, in_channels_last)  # (B, L, K)
    h = _preactivations(p, weight)  # (L, B, C_out)
    with_peer = peer is not None and n_pos > 0
    g, positive_sum = step_epilogue.relu_goodness_(h, bias, goodness, n_pos if with_peer else 0)
    output = h.new_empty(h.shape[1], spec.out_features)
    # h becomes the delta; peer normalization's p (C_out * L,) is ordered like output.flatten(1)
    # (channels-major) while h is location-major; p times the mean positive window = p / Bp on
    # each positive row's delta
    loss, _, bias_delta = step_epilogue.loss_output_delta_(
        h, g, positive_sum, output, n_pos, goodness, threshold, temperature, spec.out_features, rms,
        peer if with_peer else None, channels_major=True, bias_sum=bias is not None)
    delta = h.transpose(1, 2)  # (L, C_out, B)
    pt = p.transpose(0, 1)  # (L, B, K)
    with torch.no_grad():
        if mode == "grad":
            for param in (weight, bias):
                if param is not None and param.grad is None:
                    param.grad = torch.zeros_like(param)
            weight.grad.baddbmm_(delta, pt)
            if bias is not None:
                bias.grad.add_(bias_delta)
        else:
            sgd_update(weight, weight_buf, lambda target, alpha, beta: target.baddbmm_(delta, pt, beta=beta, alpha=alpha),
                       lr, momentum, weight_decay)
            if bias is not None:
                sgd_update_with(bias, bias_buf, bias_delta, lr, momentum, weight_decay)
    return FFLayerStep(loss, g, as_output(output, spec))
