"""The fftriton kernels with the GPU's tiles, run on the CPU by the Triton interpreter.

``fftriton.config.gpu_tiles()`` makes the launchers choose the tiles, grids and tile maps of a
GPU (64 to 128 wide) instead of the interpreter's 16, and the shapes of test_fftriton.py are
scaled to those tiles (``make_cases(*tile_units())``): each weight spans two or more tiles of
every launcher in both dims, the aligned case has several row blocks with the positive/negative
split inside one, and the masks have empty and occupied tiles. So the GPU configs' multi-tile
paths (column blocks of the goodness partials, partial last tiles, skipped tiles, bias-owning
programs of empty tiles) are checked on every CI run. Only the interpreter needs this file: on a
GPU, test_fftriton.py runs these tiles already.

Tolerances and references: test_fftriton.py's. The default run takes a cross-section (every
case, one goodness); ``-m slow`` adds the rest.
"""

from __future__ import annotations

import pytest
from test_fftriton import (
    CASE_IDS,
    DTYPES,
    FEATURES,
    check_forward,
    check_sgd_bf16,
    check_sgd_fp32,
    check_update_grad,
    make_cases,
    tile_units,
)

from fftriton import block_config, update_block_config
from fftriton._checks import interpreting
from fftriton.config import gpu_tiles

pytestmark = pytest.mark.skipif(not interpreting(), reason="on a GPU, test_fftriton.py runs the GPU tiles")

with gpu_tiles():
    UNITS = tile_units()
GPU_CASES = make_cases(*UNITS)
SLOW = pytest.mark.slow


@pytest.fixture(autouse=True)
def _gpu_tiles():
    with gpu_tiles():
        yield


def test_units_are_the_gpu_tiles():
    """The scaled shapes really are GPU-sized: larger than the interpreter's 16-wide tiles."""
    assert UNITS[0] >= 64 and UNITS[1] >= 64, UNITS


def _goodness_params(default: str):
    return [g if g == default else pytest.param(g, marks=SLOW) for g in ("ssq", "neg_ssq", "sum")]


@pytest.mark.parametrize("features", [f if f in ("plain", "scaled_masked") else pytest.param(f, marks=SLOW)
                                      for f in FEATURES])
@pytest.mark.parametrize("case", GPU_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("goodness", [g if g == "ssq" else pytest.param(g, marks=SLOW) for g in ("ssq", "sum")])
def test_forward_gpu_tiles(device, goodness, dtype, case, features):
    check_forward(device, goodness, dtype, case, features)


@pytest.mark.parametrize("features", ["scaled_masked", pytest.param("plain", marks=SLOW)])
@pytest.mark.parametrize("case", GPU_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("goodness", _goodness_params("neg_ssq"))
def test_update_grad_gpu_tiles(device, goodness, dtype, case, features):
    check_update_grad(device, goodness, dtype, case, features)


@pytest.mark.parametrize("features", ["scaled_masked", pytest.param("plain", marks=SLOW)])
@pytest.mark.parametrize("case", [GPU_CASES[1], GPU_CASES[4]], ids=[CASE_IDS[1], CASE_IDS[4]])
@pytest.mark.parametrize("goodness", _goodness_params("sum"))
def test_update_sgd_fp32_gpu_tiles(device, goodness, case, features):
    check_sgd_fp32(device, goodness, case, features)


@pytest.mark.parametrize("case", [GPU_CASES[1], pytest.param(GPU_CASES[4], marks=SLOW)],
                         ids=[CASE_IDS[1], CASE_IDS[4]])
@pytest.mark.parametrize("goodness", _goodness_params("ssq"))
def test_update_sgd_bf16_gpu_tiles(device, goodness, case):
    check_sgd_bf16(device, goodness, case)


def test_cases_span_two_gpu_tiles():
    """Every case's weight spans two or more tiles of both launchers in both dims, at every dtype and precision."""
    for _, _, n, k, *_ in GPU_CASES:
        for dtype in DTYPES:
            for precision in ("tf32", "ieee"):
                for cfg in (block_config(dtype, n, k, precision), update_block_config(dtype, n, k, precision)):
                    assert -(-n // cfg.block_n) >= 2 and -(-k // cfg.block_k) >= 2, (n, k, dtype, precision, cfg)
