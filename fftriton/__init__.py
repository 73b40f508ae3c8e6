"""Triton kernels of one Forward-Forward layer (math reference: ``ff_kernels.functional``).

A training step of a linear FF layer is three launches, plus an optional fourth:

1. ``ff_linear_forward``: h = relu(x W^T + b) and partial goodness per (row, column block);
2. ``ff_row_stats``: goodness, loss share, dL/dG and the normalizing factor of every row;
3. ``ff_linear_update``: dW = delta^T x fused with gradient accumulation or an SGD step;
4. ``scale_rows``: the normalized output, when the next layer cannot take ``x_scale``.
"""

from .config import BlockConfig, RowConfig, block_config, mask_tile_occupancy, update_block_config
from .linear_forward import ff_linear_forward
from .linear_update import ff_linear_update
from .row_stats import RowStats, ff_row_stats, scale_rows

__all__ = [
    "BlockConfig",
    "RowConfig",
    "RowStats",
    "block_config",
    "ff_linear_forward",
    "ff_linear_update",
    "ff_row_stats",
    "mask_tile_occupancy",
    "scale_rows",
    "update_block_config",
]
