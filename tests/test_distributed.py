"""Scale-out with torch.distributed, on the CPU with gloo and 2 spawned processes (1 thread each).

Data parallel vs one process on the concatenated batch: the averaged gradients equal the
whole-batch gradients in exact arithmetic (ff_kernels.distributed.data_parallel), but float32
sums run in another order (the gradient GEMM over 4 rows per rank instead of 8, then the
all_reduce), so each step differs by a few float32 ulps of the gradient, about 1e-7 relative;
after 3 SGD steps with momentum we allow 1e-6 of the largest entry of each tensor (measured:
below 3e-7). A wrong average (a sum, a missing peer term, unequal weighting) is off by O(1).
The pipeline runs the very same float32 operations in the same order as its single-process
schedule, on the same (transferred bit for bit) inputs, so it must match exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ff_kernels import FFLinear
from ff_kernels.distributed import (
    DataParallelFF,
    LayerPipeline,
    partition_layers,
    sequential_reference,
    shard_batch,
    spawn,
)
from ff_kernels.distributed.p2p import BATCH, END, ActivitySender, decode_header, encode_header

import distributed_workers as W
from reference_tools import max_err, scale_of

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
REL = 1e-6
JOIN_S = 60  # a test process that has not finished by then has hung


def load_ranks(out_dir, n=2) -> list[dict]:
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(n)]


def reference(make_net=W.make_net, shape=(W.WIDTHS[0],), optimizer=False):
    """The single-process schedule on the whole batches: (state_dict, losses (T, L))."""
    net = make_net()
    update = {"optimizer": W.sgd(net.parameters())} if optimizer else W.SGD
    losses = sequential_reference(net, W.make_batches(shape), **update)
    return net.state_dict(), losses


def assert_close(got: dict, want: dict, rel=REL):
    for key, value in want.items():
        bound = rel * scale_of(value)
        assert max_err(got[key], value) <= bound, f"{key}: error {max_err(got[key], value):.3g} > {bound:.3g}"


def assert_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), f"{key}: differs by {max_err(got[key], value):.3g}"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("distributed")
    spawn(W.train_and_compare, 2, args=(str(out),), backend="gloo", timeout_s=JOIN_S)
    return load_ranks(out)


@pytest.mark.parametrize("path, optimizer", [("dp_backward", True), ("dp_fused", False)])
def test_data_parallel_equals_one_process_on_the_whole_batch(ranks, path, optimizer):
    want_state, want_losses = reference(optimizer=optimizer)
    (state0, losses0), (state1, losses1) = ranks[0][path], ranks[1][path]
    assert_equal(state1, state0)  # the replicas stay identical (rank 1 even started from other weights)
    assert torch.equal(losses1, losses0)
    assert_close(state0, want_state)
    assert_close({"losses": losses0}, {"losses": want_losses})


@pytest.mark.parametrize("path", ["pipe_fused", "pipe_local_fused", "pipe_backward"])
def test_pipeline_equals_its_single_process_schedule(ranks, path):
    if path == "pipe_local_fused":
        want_state, want_losses = reference(W.make_local_net, (2, 6, 6))
    else:
        want_state, want_losses = reference(optimizer=path == "pipe_backward")
    for rank in ranks:  # after synchronize() every rank holds every layer's trained state
        assert_equal(rank[path][0], want_state)
    losses = torch.cat([rank[path][1] for rank in ranks], dim=1)  # rank 0's layers, then rank 1's
    assert torch.equal(losses, want_losses)


def test_average_gradients_and_counts(ranks):
    for rank in ranks:
        assert torch.equal(rank["head_grad"], torch.full((2, 3), 0.5))
        assert rank["counts"] == (3, 20)


def run_failure(tmp_path, mode: str, timeout_s: float) -> list[dict]:
    """Start die_or_survive on 2 ranks; return what each wrote (the killed rank wrote nothing)."""
    context = spawn(W.die_or_survive, 2, args=(mode, str(tmp_path)), backend="gloo", timeout_s=timeout_s, join=False)
    survivor = 1 if mode == "pipeline" else 0
    try:
        context.processes[survivor].join(JOIN_S)
        assert not context.processes[survivor].is_alive(), f"rank {survivor} still waits after {JOIN_S} s"
        assert context.processes[survivor].exitcode == 0
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
    return torch.load(tmp_path / f"rank{survivor}.pt")


@pytest.mark.parametrize("mode", ["pipeline", "data_parallel"])
def test_a_dead_rank_stops_the_other_with_an_error_naming_it(tmp_path, mode):
    # A timeout far above the bound: the closed connection of the dead process must end the wait.
    outcome = run_failure(tmp_path, mode, timeout_s=120)
    victim = 0 if mode == "pipeline" else 1
    assert outcome["error"] is not None
    assert f"rank {victim} stopped" in outcome["error"], outcome["error"]
    assert outcome["seconds"] < 30


def test_a_silent_rank_makes_the_other_time_out(tmp_path):
    outcome = run_failure(tmp_path, "hang", timeout_s=3)
    assert outcome["error"] is not None and "rank 1 stopped" in outcome["error"], outcome["error"]
    assert "all_reduce of layer" in outcome["error"]
    assert 2.5 < outcome["seconds"] < 15


def test_shard_gradients_average_to_the_whole_batch_gradient():
    """The data-parallel argument itself, in one process: FF losses are means over pos and neg rows."""
    torch.manual_seed(0)
    x_pos, x_neg = torch.rand(8, 12), torch.rand(6, 12)
    whole = FFLinear(12, 16, threshold=1.0, backend="cpu")
    whole.ff_backward(x_pos, x_neg)
    grads = []
    for rank in range(2):
        shard = FFLinear(12, 16, threshold=1.0, backend="cpu")
        shard.load_state_dict(whole.state_dict())
        shard.ff_backward(*shard_batch((x_pos, x_neg), rank, 2))
        grads.append(shard.weight.grad)
    mean = (grads[0] + grads[1]) / 2
    assert max_err(mean, whole.weight.grad) <= REL * scale_of(whole.weight.grad)
    assert max_err(grads[0], whole.weight.grad) > 100 * REL * scale_of(whole.weight.grad)


def test_shard_batch():
    x, y = torch.arange(12).view(6, 2), torch.arange(4)
    assert torch.equal(shard_batch(x, 1, 3), x[2:4])
    pair = shard_batch((x, y), 1, 2)
    assert isinstance(pair, tuple) and torch.equal(pair[0], x[3:]) and torch.equal(pair[1], y[2:])
    with pytest.raises(ValueError, match="6 rows does not split into 4 equal shards"):
        shard_batch(x, 0, 4)
    with pytest.raises(ValueError, match="rank < world_size"):
        shard_batch(x, 2, 2)


def test_partition_layers():
    assert partition_layers(4, 2) == [range(2), range(2, 4)]
    assert partition_layers(5, 3) == [range(2), range(2, 4), range(4, 5)]
    assert partition_layers(3, 1) == [range(3)]
    with pytest.raises(ValueError, match="world_size <= n_layers"):
        partition_layers(2, 3)


def test_message_header_round_trip():
    x = torch.zeros(5, 3, 4, 2, dtype=torch.bfloat16)
    assert decode_header(encode_header(BATCH, 7, x, 2)) == (BATCH, 7, 2, torch.bfloat16, (5, 3, 4, 2))
    assert decode_header(encode_header(END, 9))[:2] == (END, 9)
    with pytest.raises(RuntimeError, match="malformed"):
        decode_header([5] + encode_header(END, 0)[1:])


def test_a_sender_keeps_at_most_max_in_flight_messages_and_waits_oldest_first(monkeypatch):
    posted, waited = [], []

    class Work:
        def __init__(self):
            self.message = len(posted) // 2  # a header and a payload per batch
            posted.append(self)

        def wait(self):
            waited.append(self.message)

    monkeypatch.setattr(dist, "isend", lambda tensor, group=None, group_dst=None: Work())
    sender = ActivitySender(1, None, torch.device("cpu"), max_in_flight=2)
    for t in range(5):
        sender.send(torch.zeros(3, 4), 1)
        assert len(posted) - len(waited) <= 2 * 2
    assert waited == [0, 0, 1, 1, 2, 2]
    sender.close()  # END (header only) after the last batch, then everything is waited for
    assert waited == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5] and len(posted) == 11


def test_clear_errors_without_a_process_group_or_with_two_updates():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        DataParallelFF(W.make_net())
    with pytest.raises(RuntimeError, match="not initialized"):
        LayerPipeline(W.make_net())
    with pytest.raises(ValueError, match="either optimizer .* or lr"):
        sequential_reference(W.make_net(), [], optimizer=None, lr=None)
