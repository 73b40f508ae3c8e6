"""The compiled SGD pass after a weight-gradient GEMM into the momentum buffer
(``ff_sgd_decay_apply_``, csrc/sgd_cpu.cpp) against its definition in float64.

The op computes ``buf += weight_decay * param; param -= lr * buf`` in float32, one multiply
and one add per update (an FMA may fuse them): each result is within a few float32 ulps of
the float64 value of the same formula on the same float32 inputs, measured against the
magnitudes of the terms. Sizes cross the op's chunks of 16384 entries and include 0 and 1.
The step that uses it (the GEMM writing ``momentum * buf + grad`` first) is held to
torch.optim.SGD in tests/test_nn_linear.py and tests/test_local2d_gemm.py.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ff_kernels.ops import cpu_linear, ext_local2d

pytestmark = pytest.mark.skipif(not ext_local2d.available(torch.device("cpu")),
                                reason=f"ff_kernels._C not built: {ext_local2d.load_error()}")
ULPS = 4 * 2.0**-24  # a few float32 roundings, relative to the terms' magnitudes


def decay_apply(param, buf, lr, weight_decay):
    torch.ops.ff_kernels.ff_sgd_decay_apply_(param, buf, lr, weight_decay)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([0, 1, 7, 1000, 16384, 16385, 40000]), st.floats(1e-5, 1.0), st.floats(0.0, 0.1),
       st.integers(0, 2**16))
def test_the_pass_follows_its_formula(n, lr, weight_decay, seed):
    gen = torch.Generator().manual_seed(seed)
    param, buf = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    p64, b64 = param.double(), buf.double()
    want_buf = b64 + weight_decay * p64
    want_param = p64 - lr * want_buf
    decay_apply(param, buf, lr, weight_decay)
    buf_scale = b64.abs() + weight_decay * p64.abs()
    assert ((buf.double() - want_buf).abs() <= ULPS * buf_scale + 1e-45).all()
    param_scale = p64.abs() + lr * buf_scale
    assert ((param.double() - want_param).abs() <= ULPS * param_scale + 1e-45).all()


def test_a_matrix_updates_in_place_like_the_torch_ops():
    gen = torch.Generator().manual_seed(0)
    param, buf = torch.randn(300, 200, generator=gen), torch.randn(300, 200, generator=gen)
    want_param, want_buf = param.clone(), buf.clone()
    want_buf.add_(want_param, alpha=0.01)
    want_param.add_(want_buf, alpha=-0.05)
    param_ptr, buf_ptr = param.data_ptr(), buf.data_ptr()
    decay_apply(param, buf, 0.05, 0.01)
    assert param.data_ptr() == param_ptr and buf.data_ptr() == buf_ptr
    torch.testing.assert_close(buf, want_buf, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(param, want_param, rtol=1e-6, atol=1e-7)


def test_the_step_takes_it_only_for_contiguous_float32_cpu_tensors():
    w = torch.zeros(4, 6)
    assert cpu_linear.decay_apply_takes(w, torch.zeros(4, 6))
    assert not cpu_linear.decay_apply_takes(w.t(), torch.zeros(6, 4).t())
    assert not cpu_linear.decay_apply_takes(w.bfloat16(), torch.zeros(4, 6, dtype=torch.bfloat16))


@pytest.mark.parametrize("param, buf, message", [
    (torch.zeros(4, 6), torch.zeros(4, 5), "buf must have shape"),
    (torch.zeros(4, 6), torch.zeros(4, 6, dtype=torch.float64), "buf must be float32"),
    (torch.zeros(4, 6, dtype=torch.bfloat16), torch.zeros(4, 6, dtype=torch.bfloat16), "param must be float32"),
    (torch.zeros(6, 4).t(), torch.zeros(4, 6), "param must be contiguous"),
    (torch.zeros(4, 6), torch.zeros(6, 4).t(), "buf must be contiguous"),
])
def test_the_op_says_which_argument_is_wrong(param, buf, message):
    with pytest.raises(RuntimeError, match=message):
        decay_apply(param, buf, 0.1, 0.01)


def test_the_op_refuses_one_tensor_as_both():
    w = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="two tensors"):
        decay_apply(w, w, 0.1, 0.01)
