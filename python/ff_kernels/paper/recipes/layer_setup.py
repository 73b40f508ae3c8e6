"""FF-layer helpers shared by the recipes: ffnew.m's initialization and optional peer normalization."""

from __future__ import annotations

import math

import torch

from ...nn import FFLinear, PeerNormalization


def normal_init_(layer) -> None:
    """ffnew.m's initialization: weights N(0, 1 / fan_in) (per location for FFLocal2d, with the
    entries outside the map kept zero), biases 0."""
    with torch.no_grad():
        if isinstance(layer, FFLinear):
            layer.weight.normal_(0.0, 1.0 / math.sqrt(layer.in_features))
        else:
            fan_in = layer.valid_mask().sum(2, keepdim=True).clamp_min(1)  # (L, 1, 1)
            layer.weight.normal_().mul_(fan_in.to(layer.weight.dtype).rsqrt())
            layer.zero_invalid_()
        if layer.bias is not None:
            layer.bias.zero_()


def peer_norm_for(num_units: int, strength: float) -> PeerNormalization | None:
    """Peer normalization of ``num_units`` units at ``strength``, or None when it is 0 (off)."""
    return PeerNormalization(num_units, strength=strength) if strength else None
