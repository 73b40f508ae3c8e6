"""An FF layer's passes between its forward GEMM and its weight-gradient GEMM, two of them.

The activities are location-major, ``h: (L, B, C)``: L groups of C units (the locations of a
locally connected layer; ``h.unsqueeze(0)`` for a dense layer's (B, D)), B rows; row b's output
is ``out[b, l * C + c]``, rows (B, L * C). Between the GEMMs a step needs the ReLU, the goodness
(and, for peer normalization, the mean activity of the positive rows), then the normalized
output, dL/dz in place of h and its column sums for the bias:

    relu_goodness_(h, bias, goodness, n_sum, source) -> (g, col_sum)
        h = relu(source + bias[l])               (bias (L, C) or None; source (L, B, C) or None:
                                                 h itself, in place)
        g (B,) float32: sum over l, c of h^2 ("ssq", "neg_ssq") or h ("sum")
        col_sum (L, C) float32: sum of h over rows 0 .. n_sum - 1 (None when n_sum is 0)
    output_and_delta_(h, scale, out, coef, goodness, extra, n_extra, bias_sum) -> col_sum
        out (B, L * C) = h * scale[b]           the normalized output (scale = 1 / divisor)
        with coef (B,): h = coef[b] * dG/dz (+ extra (L, C) on rows 0 .. n_extra - 1) in place,
        dG/dz = 2h ("ssq", "neg_ssq") or 1[h > 0] ("sum"); returns the column sums of the new
        h (L, C) float32 when bias_sum, else None

Between them, :func:`loss_and_coef` is :func:`functional.ff_loss_and_goodness_grad` (the FF
loss and dL/dG of the (B,) goodness) as one compiled loop instead of eight tensor ops, and
:func:`peer_update_` turns the positive rows' column sums into peer normalization's
derivative (the running mean's update and p, in the unit order and as the positive rows' extra
term of the delta) in one compiled loop instead of about ten tensor ops. A step calls them
through :func:`loss_output_delta_`: the loss, the peer update, the row scale and the second pass
in one compiled call (each call right after a GEMM pays tens of microseconds of cache misses on
its own code, whatever it computes).

On float32 CPU tensors with the compiled ops loaded each is one pass over h
(csrc/ff_epilogue_cpu.cpp, vectorized, rows split among threads); otherwise, and as the
reference the tests hold the compiled passes to, the same math in torch ops
(:func:`relu_goodness_torch`, :func:`output_and_delta_torch`), several passes each.
"""

from __future__ import annotations

import torch

from .. import functional as FF
from .ext_local2d import cpu_ops_take


def relu_goodness_(h: torch.Tensor, bias: torch.Tensor | None, goodness: str, n_sum: int = 0,
                   source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ReLU (after the bias) of ``source`` (h itself when None) into h, goodness (B,) and the first
    ``n_sum`` rows' column sums; see the module doc."""
    if cpu_ops_take(h, bias, source):
        g, col_sum = torch.ops.ff_kernels.ff_relu_goodness_(h, bias, goodness, n_sum, source)
        return g, (col_sum if n_sum > 0 else None)
    return relu_goodness_torch(h, bias, goodness, n_sum, source)


def loss_and_coef(g: torch.Tensor, n_pos: int, goodness: str, threshold: float, temperature: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(FF loss (0-dim), dL/dG (B,)) of the goodness ``g`` (B,): :func:`functional.ff_loss_and_goodness_grad`."""
    if g.dim() == 1 and cpu_ops_take(g):
        return torch.ops.ff_kernels.ff_loss_coef(g, n_pos, FF.goodness_sign(goodness) / temperature, threshold)
    return FF.ff_loss_and_goodness_grad(g, n_pos, goodness, threshold, temperature)


def output_and_delta_(h: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, coef: torch.Tensor | None,
                      goodness: str, extra: torch.Tensor | None = None, n_extra: int = 0, bias_sum: bool = False
                      ) -> torch.Tensor | None:
    """Normalized output into ``out`` and, with ``coef``, the delta in place of ``h``; see the module doc."""
    if cpu_ops_take(h, scale, out, coef, extra):
        col_sum = torch.ops.ff_kernels.ff_output_delta_(h, scale, out, coef, goodness, extra, n_extra, bias_sum)
        return col_sum if bias_sum else None
    return output_and_delta_torch(h, scale, out, coef, goodness, extra, n_extra, bias_sum)


def _norm_divisor(goodness: str, n_features: int, rms: bool) -> float:
    """What the compiled row scale divides the goodness's root (or sum) by: the unit count (its
    root for the squared goodness) with ``rms``, else 1."""
    return (n_features if goodness == "sum" else n_features**0.5) if rms else 1.0


def inverse_scale(g: torch.Tensor, goodness: str, n_features: int, rms: bool) -> torch.Tensor:
    """``1 / functional.normalization_scale(g, goodness, n_features, rms)`` (B,): the factor of each
    row's normalized output; one compiled loop on a float32 CPU ``g`` (the same float32
    operations in the same order as the torch ops; torch's vectorized sqrt may differ from the
    correctly rounded one by an ulp)."""
    if g.dim() == 1 and cpu_ops_take(g):
        return torch.ops.ff_kernels.ff_inverse_scale(g, goodness, _norm_divisor(goodness, n_features, rms), FF.NORM_EPS)
    return FF.normalization_scale(g, goodness, n_features, rms).reciprocal_()


def loss_output_delta_(h: torch.Tensor, g: torch.Tensor, positive_sum: torch.Tensor | None, out: torch.Tensor,
                       n_pos: int, goodness: str, threshold: float, temperature: float, n_features: int, rms: bool,
                       peer=None, channels_major: bool = False, fold: bool = True, bias_sum: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Everything a step does between :func:`relu_goodness_` and its weight-gradient GEMM:
    :func:`loss_and_coef`, :func:`peer_update_` (when ``positive_sum``, the first ``n_pos`` rows'
    column sums, is given, with ``peer``), :func:`inverse_scale` and :func:`output_and_delta_`
    (with peer normalization's extra term on the first ``n_pos`` rows of the delta when ``fold``).

    Returns (loss (0-dim), p (N,) float32 or None, the delta's column sums (L, C) float32 when
    ``bias_sum``, else None). On float32 CPU tensors, with a folded peer term from a
    :class:`~ff_kernels.nn.PeerNormalization` (or none), one compiled call
    (``ff_loss_output_delta_``: the same four loops, so the same bits): each call right after a
    GEMM costs tens of microseconds of cache misses on its own code, whatever it computes.
    """
    running_mean = getattr(peer, "running_mean", None) if positive_sum is not None else None
    peer_compiled = positive_sum is None or (fold and running_mean is not None and running_mean.is_contiguous())
    if peer_compiled and g.dim() == 1 and cpu_ops_take(h, g, out, positive_sum, running_mean):
        loss, p, col_sum = torch.ops.ff_kernels.ff_loss_output_delta_(
            h, g, out, n_pos, FF.goodness_sign(goodness) / temperature, threshold, goodness,
            _norm_divisor(goodness, n_features, rms), FF.NORM_EPS, positive_sum, running_mean,
            peer.momentum if running_mean is not None else 0.0, peer.strength if running_mean is not None else 0.0,
            channels_major, bias_sum)
        return loss, (p if positive_sum is not None else None), (col_sum if bias_sum else None)
    loss, coef = loss_and_coef(g, n_pos, goodness, threshold, temperature)
    p, extra = peer_update_(peer, positive_sum, n_pos, channels_major) if positive_sum is not None else (None, None)
    col_sum = output_and_delta_(h, inverse_scale(g, goodness, n_features, rms), out, coef, goodness,
                                extra if fold else None, n_pos, bias_sum)
    return loss, p, col_sum


def peer_update_(peer, col_sum: torch.Tensor, n_pos: int, channels_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Peer normalization's step from the first ``n_pos`` rows' column sums ``col_sum`` (L, C)
    float32 (:func:`relu_goodness_`'s): ``peer`` takes the mean positive activity (N = L * C,) in
    its unit order ((C, L) when ``channels_major``, a locally connected layer's
    ``output.flatten(1)`` order; else (L, C)) and returns p (N,). Returns (p (N,) float32 in
    the unit order, ``extra`` (L, C) = p / n_pos in location-major order, the term every
    positive row's delta gets).

    ``peer`` is a function, or a :class:`~ff_kernels.nn.PeerNormalization` (``peer(mean)`` is its
    ``update_``), whose update runs as one compiled loop over its float32 CPU buffer.
    """
    running_mean = getattr(peer, "running_mean", None)
    if running_mean is not None and cpu_ops_take(col_sum, running_mean) and running_mean.is_contiguous():
        return torch.ops.ff_kernels.ff_peer_update_(running_mean, col_sum, n_pos, peer.momentum, peer.strength,
                                                     channels_major)
    return peer_update_torch(peer, col_sum, n_pos, channels_major)


def peer_update_torch(peer, col_sum, n_pos, channels_major):
    """:func:`peer_update_` in torch ops (any dtype and device, any ``peer`` function)."""
    mean = col_sum / n_pos
    p = peer((mean.t() if channels_major else mean).reshape(-1))
    locations, channels = col_sum.shape
    by_location = p.view(channels, locations).t() if channels_major else p.view(locations, channels)
    return p, (by_location / n_pos).contiguous()


def relu_goodness_torch(h, bias, goodness, n_sum=0, source=None):
    """:func:`relu_goodness_` in torch ops (any dtype and device)."""
    if source is not None:
        h.copy_(source)
    if bias is not None:
        h.add_(bias.to(h.dtype).unsqueeze(1))
    h.relu_()
    if goodness == "sum":
        g = h.sum(2, dtype=torch.float32).sum(0)
    else:
        g = torch.linalg.vector_norm(h, dim=2, dtype=torch.float32).square_().sum(0)
    return g, (h[:, :n_sum].sum(1, dtype=torch.float32) if n_sum > 0 else None)


def output_and_delta_torch(h, scale, out, coef, goodness, extra=None, n_extra=0, bias_sum=False):
    """:func:`output_and_delta_` in torch ops (any dtype and device)."""
    locations, batch, channels = h.shape
    torch.mul(h.transpose(0, 1), scale.to(h.dtype)[:, None, None], out=out.view(batch, locations, channels))
    if coef is None:
        return None
    factor = (coef if goodness == "sum" else 2.0 * coef).to(h.dtype)[:, None]
    if goodness == "sum":  # h >= 0, so sign(h) = 1[h > 0]
        h.sign_()
    if extra is None or n_extra == 0:
        h.mul_(factor)
    else:
        first = h[:, :n_extra]
        torch.addcmul(extra.to(h.dtype).unsqueeze(1), first, factor[:n_extra], out=first)
        h[:, n_extra:].mul_(factor[n_extra:])
    return h.sum(1, dtype=torch.float32) if bias_sum else None
