"""Peer normalization of hidden activities (Hinton 2022, footnote 9).

The paper keeps hidden units from being permanently off or extremely active by tracking each
unit's mean activity and pushing it towards the mean activity of its peers, the other units of
the same layer. Here, for a layer of N units (FFLinear: ``out_features``; FFLocal2d: every
(channel, location) pair, ``C_out * H_out * W_out``, ordered like ``output.flatten(1)``):

1. After each training step (``ff_backward`` or ``ff_step``), the batch mean of every unit's
   ReLU activity ``h = relu(z)`` over the POSITIVE rows (the raw activity, not the normalized
   output; measured with the weights before the step's update) updates a running mean::

       r = momentum * r + (1 - momentum) * mean_b h_pos[b]          (N,), starts at 0

2. Unit j gets the extra derivative ``p_j = strength * (r_j - mean_k r_k)``, added to
   ``dL/dz_bj / Bp`` for every positive row b, whether or not its ReLU is on. It is the
   gradient of ``L_peer = sum_j p_j * mean_b z_pos[b, j]`` with p held constant, so gradient
   descent raises the pre-activations of under-active units (``r_j`` below the layer's mean:
   ``p_j < 0``) and a dead unit recovers, and it lowers those of over-active ones.

The extra gradient is rank-1: ``dW_j += p_j * mean_b x_pos[b]`` (masked by FFLinear's mask;
for FFLocal2d the mean positive image's window of each location, zero where the window leaves
the map) and ``db_j += p_j``. Because the zero start of ``r`` scales every unit alike, the pull
simply ramps up over the first ``1 / (1 - momentum)`` steps.

The layer takes the two batch statistics the term needs (``FFLayer.peer_norm_statistics``:
the mean positive activity and the mean positive input) and then applies the extra gradient
after its own step (``FFLayer.apply_peer_norm_``, with :func:`gradient_targets`); a step without
positive rows neither updates ``r`` nor adds anything.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as FF
from ..ops.validation import check_hyper


class PeerNormalization(nn.Module):
    """The running mean activity of a layer's units and the peer derivative it implies.

    Args:
        num_units: N, the number of units of the layer it is attached to.
        strength: the factor of ``p_j = strength * (r_j - mean_k r_k)``.
        momentum: decay of the running mean ``r`` (0 uses the latest batch only).

    Buffers: ``running_mean`` (N,) float32, persistent (in the layer's state_dict).
    """

    def __init__(self, num_units: int, strength: float = 0.03, momentum: float = 0.9, device=None) -> None:
        super().__init__()
        if int(num_units) <= 0:
            raise ValueError(f"PeerNormalization: num_units must be positive, got {num_units}")
        self.num_units = int(num_units)
        self.strength = check_hyper("PeerNormalization", "strength", strength)
        self.momentum = check_hyper("PeerNormalization", "momentum", momentum)
        if self.momentum >= 1.0:
            raise ValueError(f"PeerNormalization: momentum must be < 1, got {momentum}")
        self.register_buffer("running_mean", torch.zeros(self.num_units, device=device))

    def derivative(self) -> torch.Tensor:
        """p (N,) float32: ``strength * (r - mean(r))``."""
        r = self.running_mean.float()
        return (r - r.mean()).mul_(self.strength)

    @torch.no_grad()
    def update_(self, activity_mean: torch.Tensor) -> torch.Tensor:
        """Fold one batch's mean positive activity (N,) into ``r``; return the new :meth:`derivative`."""
        if tuple(activity_mean.shape) != (self.num_units,):
            raise ValueError(
                f"PeerNormalization({self.num_units}): activity_mean must have shape ({self.num_units},), "
                f"got {tuple(activity_mean.shape)}"
            )
        # r + (1 - momentum) (a - r), exact at momentum 0 (torch.lerp returns the end point at weight 1)
        self.running_mean.lerp_(activity_mean.to(self.running_mean.dtype), 1.0 - self.momentum)
        return self.derivative()

    def forward(self, activity_mean: torch.Tensor) -> torch.Tensor:
        """``peer(activity_mean)`` is :meth:`update_`: the module is the ``peer`` function the
        layers' fused steps take (which run its update as one compiled loop on the CPU,
        ``ops.step_epilogue.peer_update_``)."""
        return self.update_(activity_mean)

    def extra_repr(self) -> str:
        return f"{self.num_units}, strength={self.strength:g}, momentum={self.momentum:g}"


def check_peer_norm(
    layer: str, peer_norm: PeerNormalization | None, num_units: int, device: torch.device
) -> PeerNormalization | None:
    """Validate a layer's ``peer_norm`` argument (None or N = ``num_units`` units) and move it to ``device``."""
    if peer_norm is None:
        return None
    if not isinstance(peer_norm, PeerNormalization):
        raise TypeError(f"{layer}: peer_norm must be a PeerNormalization or None, got {type(peer_norm).__name__}")
    if peer_norm.num_units != num_units:
        raise ValueError(
            f"{layer}: peer_norm must track the layer's {num_units} units, got PeerNormalization({peer_norm.num_units})"
        )
    return peer_norm.to(device=device)


def mean_activity(output: torch.Tensor, goodness: torch.Tensor, kind: str, rms: bool = False) -> torch.Tensor:
    """Mean raw activity (N,) float32 of rows whose normalized output is ``output: (B, ...)``.

    ``h = output * s[:, None]`` with ``s = functional.normalization_scale(goodness (B,))``
    undoes the layer's normalization (an all-zero row stays zero). A block-wise layer's goodness
    (B, k) undoes each block's normalization over its N/k units.
    """
    flat = output.flatten(1).float()
    blocks = flat.unflatten(1, (goodness.shape[1], -1)) if goodness.dim() == 2 else flat.unsqueeze(1)  # (B, k, N/k)
    scale = FF.normalization_scale(goodness.float().view(blocks.shape[:2]), kind, blocks.shape[2], rms)
    return (blocks * scale[..., None]).flatten(1).mean(0)


@torch.no_grad()
def gradient_targets(
    param: torch.Tensor, mode: str, lr: float = 0.0, buf: torch.Tensor | None = None
) -> list[tuple[torch.Tensor, float]]:
    """Where an extra gradient g_extra of ``param`` goes after a step of ``mode``: (tensor, factor) pairs.

    "grad": ``param.grad += g_extra`` (``.grad`` created as zeros if absent). "sgd":
    ``buf += g_extra`` (when the step used a momentum buffer) and ``param -= lr * g_extra``.

    This equals including g_extra in the SGD step itself. The step (torch.optim.SGD,
    dampening 0) computed, from the parameter W and buffer v before it,
    ``v' = momentum * v + wd * W + g`` and ``W' = W - lr * v'``; both are affine in g with W
    and v fixed, so with ``g + g_extra`` instead of g they become ``v' + g_extra`` and
    ``W' - lr * g_extra``. Without a buffer (momentum 0) ``W' = W - lr * (g + wd * W)`` likewise
    becomes ``W' - lr * g_extra``. Weight decay is not applied to g_extra twice because it used
    W, which is unchanged. Where g_extra is zero (masked connections) nothing changes.
    """
    if mode == "grad":
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        return [(param.grad, 1.0)]
    return ([(buf, 1.0)] if buf is not None else []) + [(param, -lr)]
