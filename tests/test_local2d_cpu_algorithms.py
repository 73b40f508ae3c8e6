"""The two algorithms of the compiled CPU local ops against the float64 reference.

"tiles" vectorizes over images (any stride); "rows" vectorizes over adjacent output columns
(stride 1 only) and is the automatic choice for wide stride-1 maps such as CIFAR-10's.
FF_KERNELS_LOCAL2D_CPU picks one at every call. The shapes cover ragged output widths (one
full vector and a partial one, a partial one only), output units that are not a multiple of
the register tile (3), batch 1, batches past the 8-image forward tile and the 32-image update
block, and windows truncated at every edge. Absent weight entries (window positions outside
the map) hold NaN: the ops must never read them (outputs stay finite) and never write them.
"""

import os
import subprocess
import sys

import pytest
import torch

from ff_kernels.functional import local as FFL
from ff_kernels.functional.local import LocalSpec
from ff_kernels.ops import ext_local2d

pytestmark = pytest.mark.skipif(not ext_local2d.available(torch.device("cpu")),
                                reason=f"ff_kernels._C not built: {ext_local2d.load_error()}")

ALGORITHMS = ["rows", "tiles"]
SPECS = [
    LocalSpec(3, 32, 32, 3, kernel=11, stride=1, padding=5),  # CIFAR-10's first layer
    LocalSpec(2, 11, 20, 4, kernel=5, stride=1, padding=2),  # 20 columns: one full 16-lane vector + 4
    LocalSpec(1, 7, 9, 5, kernel=4, stride=1, padding=3),  # 12 columns, 5 units: partial tiles only
    LocalSpec(2, 6, 13, 2, kernel=3, stride=1, padding=0),  # no padding, 2 units
]
SPEC_IDS = ["cifar", "w20-k5", "w12-u5", "p0-u2"]
BATCHES = [1, 9, 37]


def case(spec, batch, seed):
    """x (B, C, H, W), weight with NaN at the absent entries, bias, h, coef, all float32."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *spec.input_shape, generator=gen)
    valid = FFL.local_valid_mask(spec)[:, None, :].expand(spec.weight_shape)
    w = torch.randn(*spec.weight_shape, generator=gen) / spec.block_size**0.5
    w = torch.where(valid, w, torch.full_like(w, float("nan")))
    b = torch.randn(*spec.bias_shape, generator=gen)
    h = torch.relu(torch.randn(batch, *spec.output_shape, generator=gen))
    coef = torch.randn(batch, generator=gen)
    return x, w, b, h, coef, valid


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_forward_matches_the_reference_and_never_reads_absent_weights(monkeypatch, algorithm, spec, batch, relu):
    monkeypatch.setenv("FF_KERNELS_LOCAL2D_CPU", algorithm)
    x, w, b, _, _, valid = case(spec, batch, seed=batch)
    extra = torch.randn(batch, *spec.output_shape)
    got = torch.ops.ff_kernels.local2d_forward(x, w, b, spec.kernel, spec.stride, spec.padding, extra, relu)
    z = FFL.local_linear(x.double(), torch.where(valid, w, 0).double(), b.double(), spec) + extra.double()
    assert torch.isfinite(got).all() and (z < 0).any()
    # float32 sums of block_size products of unit-scale terms
    torch.testing.assert_close(got.double(), torch.relu(z) if relu else z, rtol=1e-5, atol=1e-5 * spec.block_size**0.5)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("goodness", ["ssq", "sum"])
def test_gradient_matches_the_reference_and_never_writes_absent_entries(monkeypatch, algorithm, spec, batch,
                                                                        goodness):
    monkeypatch.setenv("FF_KERNELS_LOCAL2D_CPU", algorithm)
    x, w, _, h, coef, valid = case(spec, batch, seed=100 + batch)
    grad_w = torch.where(valid, torch.ones_like(w), w)  # 1 where present (added to), NaN where absent
    grad_b = torch.ones(spec.bias_shape)
    torch.ops.ff_kernels.local2d_grad_(x, h, coef, goodness, spec.kernel, spec.stride, spec.padding, grad_w, grad_b)
    dg = 2 * h.double() if goodness == "ssq" else (h > 0).double()
    delta = (coef.double().view(-1, 1, 1, 1) * dg).flatten(2)  # (B, C_out, L)
    dw = torch.einsum("bol,blk->lok", delta, FFL.local_patches(x.double(), spec))
    assert torch.isnan(grad_w[~valid]).all()
    # float32 sums over batch terms of unit scale, each itself a product of two unit-scale numbers
    tol = 1e-5 * (batch * 4) ** 0.5
    torch.testing.assert_close(grad_w[valid].double(), 1 + dw[valid], rtol=1e-5, atol=tol)
    torch.testing.assert_close(grad_b.double(), 1 + delta.sum(0).t(), rtol=1e-5, atol=tol)


@pytest.mark.parametrize("spec", SPECS[1:3], ids=SPEC_IDS[1:3])
def test_fused_sgd_of_both_algorithms_agree(monkeypatch, spec):
    """One SGD step with momentum and weight decay: the two algorithms give the same parameters,
    and the absent entries (NaN) stay as they were in the weights and the momentum buffers."""
    x, w, b, h, coef, valid = case(spec, 37, seed=7)
    results = {}
    for algorithm in ALGORITHMS:
        monkeypatch.setenv("FF_KERNELS_LOCAL2D_CPU", algorithm)
        params = [w.clone(), b.clone(), torch.where(valid, 0.5, w), torch.full_like(b, 0.5)]
        torch.ops.ff_kernels.local2d_sgd_(x, h, coef, "ssq", spec.kernel, spec.stride, spec.padding, *params,
                                          0.1, 0.9, 0.01)
        results[algorithm] = params
    for rows, tiles, before in zip(results["rows"], results["tiles"], (w, b)):
        torch.testing.assert_close(rows, tiles, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isnan(results["rows"][0][~valid]).all() and torch.isnan(results["rows"][2][~valid]).all()
    assert (results["rows"][0][valid] != w[valid]).all()


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_narrower_builds_of_the_row_kernels_agree(isa, tmp_path):
    """The SSE2 / AVX2 builds of the row kernels (FF_KERNELS_CPU_ISA) against the widest build
    this CPU runs, which the tests above check against the reference."""
    script = (
        "import torch, test_local2d_cpu_algorithms as t\n"
        "for n, spec in enumerate(t.SPECS):\n"
        "    x, w, b, h, coef, valid = t.case(spec, 37, seed=3)\n"
        "    out = torch.ops.ff_kernels.local2d_forward(x, w, b, spec.kernel, spec.stride, spec.padding, None, True)\n"
        "    gw = torch.zeros_like(w)\n"
        "    torch.ops.ff_kernels.local2d_grad_(x, h, coef, 'ssq', spec.kernel, spec.stride, spec.padding, gw, None)\n"
        "    torch.save((out, gw), f'{n}.pt')\n"
    )
    tests = os.path.dirname(os.path.abspath(__file__))
    outputs = {}
    for name, extra in (("widest", {}), (isa, {"FF_KERNELS_CPU_ISA": isa})):
        folder = tmp_path / name
        folder.mkdir()
        env = dict(os.environ, FF_KERNELS_LOCAL2D_CPU="rows", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]), **extra)
        subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=folder)
        outputs[name] = [torch.load(folder / f"{n}.pt") for n in range(len(SPECS))]
    for widest, narrow in zip(outputs["widest"], outputs[isa]):
        for want, got in zip(widest, narrow):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
