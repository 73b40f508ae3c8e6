"""Point-to-point activity messages between neighbouring pipeline ranks.

A message is a fixed-size int64 header followed, for a batch, by its payload:

    header = [kind, seq, n_pos, dtype, ndim, size_0, ..., size_{MAX_DIMS-1}]   (HEADER_LEN,)
    payload = activities (n_pos + n_neg, ...) of that dtype and shape, positive rows first

``kind`` is BATCH or END (end of stream, no payload); ``seq`` counts the batches so that a
receiver detects a lost or duplicated message. Messages between two ranks arrive in the
order they were sent (torch.distributed point-to-point semantics), so header and payload
need no tags of their own.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from .comm import peer_failure

BATCH, END = 1, 2
MAX_DIMS = 6
HEADER_LEN = 5 + MAX_DIMS
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def encode_header(kind: int, seq: int, x: torch.Tensor | None = None, n_pos: int = 0) -> list[int]:
    """The header (HEADER_LEN ints) announcing ``x`` (its first ``n_pos`` rows positive), or END."""
    if x is None:
        return [kind, seq] + [0] * (HEADER_LEN - 2)
    if x.dim() > MAX_DIMS or x.dtype not in DTYPES:
        raise ValueError(f"pipeline messages carry up to {MAX_DIMS}-D tensors of {DTYPES}, got {tuple(x.shape)} {x.dtype}")
    return [kind, seq, n_pos, DTYPES.index(x.dtype), x.dim(), *x.shape] + [0] * (MAX_DIMS - x.dim())


def decode_header(values: list[int]) -> tuple[int, int, int, torch.dtype, tuple[int, ...]]:
    """(kind, seq, n_pos, dtype, shape) of a header made by :func:`encode_header`."""
    kind, seq, n_pos, dtype, ndim = values[:5]
    if kind not in (BATCH, END) or not 0 <= dtype < len(DTYPES) or not 0 <= ndim <= MAX_DIMS:
        raise RuntimeError(f"pipeline: malformed message header {values}")
    return kind, seq, n_pos, DTYPES[dtype], tuple(values[5:5 + ndim])


class ActivitySender:
    """Sends batches of activities to group rank ``dst``, at most ``max_in_flight`` unfinished.

    Each :meth:`send` issues two ``isend`` (header, payload) and keeps their tensors alive until
    they complete; when ``max_in_flight`` messages are outstanding it first waits for the
    oldest. :meth:`close` sends END and waits for everything.
    """

    def __init__(self, dst: int, group: dist.ProcessGroup | None, device: torch.device, max_in_flight: int) -> None:
        self.dst, self.group, self.device, self.max_in_flight = dst, group, device, int(max_in_flight)
        self.seq = 0
        self.in_flight: deque = deque()  # (description, works, tensors kept alive)

    def send(self, x: torch.Tensor, n_pos: int) -> None:
        """Send ``x`` (n_pos + n_neg, ...) whose first ``n_pos`` rows are positive."""
        x = x.contiguous()
        self._post(encode_header(BATCH, self.seq, x, n_pos), x)

    def close(self) -> None:
        """Send END and wait for every outstanding message."""
        self._post(encode_header(END, self.seq), None)
        while self.in_flight:
            self._wait_oldest()

    def _post(self, header: list[int], payload: torch.Tensor | None) -> None:
        while len(self.in_flight) >= self.max_in_flight:
            self._wait_oldest()
        tensors = [torch.tensor(header, dtype=torch.int64, device=self.device)]
        if payload is not None:
            tensors.append(payload)
        what = f"sending {'batch ' + str(self.seq) if payload is not None else 'the end of the stream'} to rank {self.dst}"
        with peer_failure(what, [self.dst], self.group):
            works = [dist.isend(t, group=self.group, group_dst=self.dst) for t in tensors]
        self.in_flight.append((what, works, tensors))
        self.seq += 1

    def _wait_oldest(self) -> None:
        what, works, _ = self.in_flight.popleft()
        with peer_failure(what, [self.dst], self.group):
            for work in works:
                work.wait()


class ActivityReceiver:
    """Receives the messages an :class:`ActivitySender` on group rank ``src`` sends to this rank."""

    def __init__(self, src: int, group: dist.ProcessGroup | None, device: torch.device) -> None:
        self.src, self.group, self.device = src, group, device
        self.seq = 0

    def recv(self) -> tuple[torch.Tensor, int] | None:
        """The next batch as (activities (n_pos + n_neg, ...), n_pos), or None at END."""
        what = f"receiving batch {self.seq} from rank {self.src}"
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        with peer_failure(what, [self.src], self.group):
            dist.recv(header, group=self.group, group_src=self.src)
        kind, seq, n_pos, dtype, shape = decode_header(header.tolist())
        if seq != self.seq:
            raise RuntimeError(f"pipeline: expected message {self.seq} from rank {self.src}, got {seq}")
        if kind == END:
            return None
        x = torch.empty(shape, dtype=dtype, device=self.device)
        with peer_failure(what, [self.src], self.group):
            dist.recv(x, group=self.group, group_src=self.src)
        self.seq += 1
        return x, n_pos
