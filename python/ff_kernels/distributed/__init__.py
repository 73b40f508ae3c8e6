"""Scale-out with torch.distributed: data-parallel FF training and FF's layer pipeline.

- :class:`DataParallelFF`: a replica per rank, each batch sharded (:func:`shard_batch`), each
  layer's gradient all-reduced as soon as the layer is done (overlapping the next layer).
- :class:`LayerPipeline`: each rank trains a group of layers (:func:`partition_layers`) on
  the activities the rank below sends it; nothing is sent backward.
- :func:`init_from_env` (torchrun) / :func:`spawn` (local processes) start the group with a
  timeout; a dead or stuck peer raises :class:`PeerError` (see :mod:`.comm`).

Backends: gloo on CPU, NCCL on GPUs (one process per GPU, ``cuda:LOCAL_RANK``).
"""

from .comm import PeerError
from .data_parallel import DataParallelFF, all_reduce_counts, average_gradients, shard_batch
from .launch import DEFAULT_TIMEOUT_S, default_backend, init_from_env, spawn
from .pipeline import LayerPipeline, partition_layers, sequential_reference
from .state import broadcast_parameters

__all__ = [
    "DEFAULT_TIMEOUT_S", "DataParallelFF", "LayerPipeline", "PeerError", "all_reduce_counts", "average_gradients",
    "broadcast_parameters", "default_backend", "init_from_env", "partition_layers", "sequential_reference",
    "shard_batch", "spawn",
]
