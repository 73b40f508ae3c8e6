"""Shared test helpers: float64 ground truth from functional.py and error measures."""

from __future__ import annotations

import torch

from ff_kernels import functional as FF


def ref64_step(x_pos, x_neg, weight, bias, *, goodness, threshold, temperature, rms=False, mask=None):
    """Loss, goodness (M,), normalized output (M, N), dW, db of one FF step, all in float64."""
    d = lambda t: None if t is None else t.detach().double()
    xp, xn, w, b = d(x_pos), d(x_neg), d(weight), d(bias)
    m = None if mask is None else mask.double()
    loss, dw, db = FF.ff_linear_grads(xp, xn, w, b, goodness, threshold, temperature, m)
    h = FF.linear_activity(torch.cat([xp, xn]), w, b, m)
    return {"loss": loss, "goodness": FF.goodness(h, goodness), "output": FF.normalize(h, goodness, rms), "dw": dw, "db": db}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max())


def scale_of(t: torch.Tensor) -> float:
    """Largest magnitude of ``t`` (at least a tiny positive number)."""
    return max(float(t.double().abs().max()) if t.numel() else 0.0, 1e-12)


def random_mask(n_out: int, n_in: int, generator: torch.Generator, density: float = 0.5) -> torch.Tensor:
    """A random 0/1 mask (n_out, n_in) bool with one fully empty 16x16 corner and no empty row."""
    mask = torch.rand(n_out, n_in, generator=generator) < density
    mask[:16, :16] = False
    mask[torch.arange(n_out), torch.randint(0, n_in, (n_out,), generator=generator)] = True
    mask[:16, :16] = False
    return mask


def device_for(backend: str) -> str:
    """Where a backend's test tensors live: CUDA for "triton" when there is a GPU, else the CPU
    (where "triton" runs in the interpreter, see conftest.py)."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
