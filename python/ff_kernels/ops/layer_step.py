"""What an FF layer op returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class FFLayerStep(NamedTuple):
    """Result of one FF training pass over a positive and a negative batch.

    loss:     () float32, the layer's FF loss (detached)
    goodness: (Bp + Bn,) float32, positive rows first, computed with the weights before the update;
              (Bp + Bn, k), one column per block, for a block-wise layer (``blocks=k``)
    output:   (Bp + Bn, D_out) normalized activities for the next layer, before the update,
              in the layer's dtype
    """

    loss: torch.Tensor
    goodness: torch.Tensor
    output: torch.Tensor
