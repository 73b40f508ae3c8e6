"""The local 2-D FF ops as one GEMM per location (batched), in torch ops.

A locally connected layer is L independent dense layers, one per output location, each over
its window: ``z[:, :, l] = W[l] @ window_l(x) + b[l]`` with W[l] (C_out, K). When the grid is
small and every location has many units, as in the MNIST net of footnote 8 (4x4, 3x3 and 2x2
grids of 128 to 512 units), that is a batch of L well-shaped GEMMs, and BLAS's batched GEMM
runs them near the speed of one dense GEMM with as many multiply-adds; the compiled kernels
(csrc/), made for wide maps of few units per location (CIFAR-10's 32x32x3), are slower there.

Layout: the windows of a batch are gathered once per step, image by image, as (B, L, K) (zero
where a window leaves the map); seen as ``P`` (L, K, B) (a strided view, no copy):

    h     = relu(W @ P + b)        (L, C_out, B)    one batched GEMM
    dW    = delta @ P.T            (L, C_out, K)    one batched GEMM, into .grad or the SGD target

and the output (B, C_out, H_out, W_out) is h transposed. Entries of W outside the map meet
zeros of P, so they do not change z, and their gradient is exactly zero (the layers keep those
weights zero). The step's large temporaries (the windows, h and the delta) live in buffers kept
from call to call (per thread, shape and dtype): a fresh multi-megabyte tensor each step costs
the page faults of new memory, which here cost more than the gather itself. float32 or bfloat16, any device. Same arguments and results as
:mod:`ff_kernels.ops.ext_local2d` (see :mod:`ff_kernels.ops.local2d` for when it is used).
"""

from __future__ import annotations

import collections
import functools
import threading

import torch

from .. import functional as FF
from ..functional.local import LocalSpec, _window_index
from .cpu_linear import rows_together
from .layer_step import FFLayerStep

MIN_OUT_CHANNELS = 16  # units per location from which the batched GEMMs beat the compiled CPU kernels
WORKSPACES = 16  # buffers kept per thread (the least recently used one goes first)

_local = threading.local()


def workspace(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A buffer of ``shape`` with ``like``'s dtype and device, the same one for every call with the
    same name, shape, dtype and device on this thread (contents undefined)."""
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = collections.OrderedDict()
    key = (name, tuple(shape), like.dtype, like.device)
    buffer = cache.pop(key, None)
    if buffer is None:
        buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
        while len(cache) >= WORKSPACES:
            cache.popitem(last=False)
    cache[key] = buffer
    return buffer


def pays(spec: LocalSpec) -> bool:
    """Whether this form is the faster one on the CPU: enough units per location for a GEMM
    (the footnote-8 net's layers, not CIFAR-10's 3 per location)."""
    return spec.out_channels >= MIN_OUT_CHANNELS


def windows(x: torch.Tensor, spec: LocalSpec) -> torch.Tensor:
    """Every location's window of ``x: (B, C_in, H_in, W_in)`` as P (L, K, B), zeros outside the
    map: a view of the gathered (B, L, K)."""
    batch = x.shape[0]
    flat = x.reshape(batch, -1)
    index = _window_index(spec, x.device)
    if not _all_inside(spec, x.device):  # windows that leave the map read a zero column past the image
        flat = torch.cat([flat, flat.new_zeros(batch, 1)], dim=1)
    gathered = workspace("windows", (batch, spec.num_locations * spec.block_size), x)
    torch.index_select(flat, 1, index.reshape(-1), out=gathered)
    return gathered.view(batch, spec.num_locations, spec.block_size).permute(1, 2, 0)


@functools.lru_cache(maxsize=64)
def _all_inside(spec: LocalSpec, device: torch.device) -> bool:
    return bool((_window_index(spec, device) < spec.in_features).all())


def _activities(p: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """relu(W @ P + b) (L, C_out, B), written into ``out``."""
    if bias is None:
        torch.bmm(weight, p, out=out)
    else:
        torch.baddbmm(bias.unsqueeze(2), weight, p, out=out)
    return out.relu_()


def _goodness_and_output(h: torch.Tensor, spec: LocalSpec, goodness: str, rms: bool):
    """Goodness (B,) float32 and the normalized output (B, C_out, H_out, W_out) of h (L, C_out, B)."""
    g = (h if goodness == "sum" else h.square()).sum((0, 1), dtype=torch.float32)
    divisor = FF.normalization_scale(g, goodness, spec.out_features, rms)
    output = h.new_empty(h.shape[2], *spec.output_shape)
    torch.div(h.permute(2, 1, 0), divisor.to(h.dtype)[:, None, None], out=output.view(h.shape[2], h.shape[1], -1))
    return g, output


def forward(x, weight, bias, spec, *, goodness, rms):
    """Normalized output (B, C_out, H_out, W_out) and goodness (B,) float32."""
    p = windows(x, spec)
    h = _activities(p, weight, bias, workspace("h", (weight.shape[0], weight.shape[1], p.shape[2]), weight))
    g, output = _goodness_and_output(h, spec, goodness, rms)
    return output, g


def train_step(
    x_pos, x_neg, weight, bias, spec, *, goodness, threshold, temperature, rms,
    mode, lr, momentum, weight_decay, weight_buf, bias_buf, peer=None,
) -> FFLayerStep:
    """One FF pass on (Bp, C_in, H_in, W_in) positives and (Bn, ...) negatives; see ops.local2d.ff_local2d_step.

    ``peer``: peer normalization inside the step (see ``ff_local2d_step``); its gradient, the
    mean positive image's windows times p at every location, is one more image of the
    gradient GEMM.
    """
    n_pos, batch = x_pos.shape[0], x_pos.shape[0] + x_neg.shape[0]
    x = rows_together(x_pos.reshape(n_pos, spec.in_features), x_neg.reshape(x_neg.shape[0], spec.in_features))
    x_mean = x[:n_pos].mean(0, dtype=torch.float32) if peer is not None and n_pos > 0 else None
    if x_mean is not None:  # one more image: the mean positive one
        x_ext = workspace("x", (batch + 1, spec.in_features), x)
        x_ext[:batch] = x
        x_ext[batch] = x_mean
        x = x_ext
    p = windows(x.view(-1, *spec.input_shape), spec)  # (L, K, B or B + 1)
    columns = p.shape[2]  # the delta gets the peer column next to the images' (below)
    full = workspace("h", (weight.shape[0], weight.shape[1], columns), weight)
    h = _activities(p[:, :, :batch], weight, bias, full if columns == batch else full[:, :, :batch])
    g, output = _goodness_and_output(h, spec, goodness, rms)
    loss, coef = FF.ff_loss_and_goodness_grad(g, n_pos, goodness, threshold, temperature)
    peer_p = None
    if x_mean is not None:  # (L, C_out) like the bias, from p (C_out * L,) ordered like output.flatten(1)
        peer_p = peer(h[:, :, :n_pos].mean(2, dtype=torch.float32).t().reshape(-1))
        peer_p = peer_p.view(spec.out_channels, spec.num_locations).t().to(h.dtype)
    coef = coef.to(h.dtype)
    if goodness == "sum":  # dG/dz = 1[h > 0]
        delta = h.sign_().mul_(coef)
    else:  # dG/dz = 2h
        delta = h.mul_(2.0 * coef)
    bias_delta = delta.sum(2)
    if peer_p is not None:
        full[:, :, batch] = peer_p
        delta = full
        bias_delta.add_(peer_p)
    pt = p.transpose(1, 2)  # (L, B, K)
    with torch.no_grad():
        if mode == "grad":
            for param in (weight, bias):
                if param is not None and param.grad is None:
                    param.grad = torch.zeros_like(param)
            weight.grad.baddbmm_(delta, pt)
            if bias is not None:
                bias.grad.add_(bias_delta)
        else:
            _sgd(weight, weight_buf, lambda target, alpha, beta: target.baddbmm_(delta, pt, beta=beta, alpha=alpha),
                 lr, momentum, weight_decay)
            if bias is not None:
                _sgd(bias, bias_buf, lambda target, alpha, beta: target.mul_(beta).add_(bias_delta, alpha=alpha),
                     lr, momentum, weight_decay)
    return FFLayerStep(loss, g, output)


def _sgd(param, buf, add, lr: float, momentum: float, weight_decay: float) -> None:
    """torch.optim.SGD (dampening 0) with the gradient added by ``add(target, alpha, beta)``
    (``target = beta * target + alpha * grad``), as the CPU linear op does it."""
    if buf is None:
        add(param, -lr, 1.0 - lr * weight_decay)
        return
    add(buf, 1.0, momentum)
    if weight_decay:
        buf.add_(param, alpha=weight_decay)
    param.add_(buf, alpha=-lr)
