"""pytest-benchmark entries for one FF linear step (run: pytest benchmarks --benchmark-enable).

The table with ratios measured in one run is bench_linear_step.py; these entries let
pytest-benchmark store and compare runs (--benchmark-autosave, --benchmark-compare).
"""

import pytest
import torch

import ff_kernels

SGD = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}


@pytest.mark.parametrize("shape", [(784, 2000), (2000, 2000)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("provider", ["reference", "cpu-fp32", "cpu-bf16"])
def test_ff_linear_step(benchmark, shape, provider):
    d_in, d_out = shape
    torch.manual_seed(0)
    backend = "reference" if provider == "reference" else "cpu"
    compute_dtype = torch.bfloat16 if provider == "cpu-bf16" else None
    layer = ff_kernels.FFLinear(d_in, d_out, backend=backend, compute_dtype=compute_dtype)
    x_pos, x_neg = torch.rand(512, d_in), torch.rand(512, d_in)
    if provider == "reference":
        opt = torch.optim.SGD(layer.parameters(), **SGD)

        def step():
            opt.zero_grad(set_to_none=True)
            layer.ff_backward(x_pos, x_neg)
            opt.step()
    else:

        def step():
            layer.ff_step(x_pos, x_neg, **SGD)

    benchmark(step)
