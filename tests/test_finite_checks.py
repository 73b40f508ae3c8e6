"""NaN/Inf checks of op inputs: at once on the CPU, deferred on CUDA so that no step waits for the device.

The deferred path is exercised on the CPU by declaring CPU tensors "not checked at once"
(``checks_at_once``); on a GPU, ``test_no_host_sync_in_a_cuda_step`` runs whole training
steps with torch's sync debug mode set to raise on any wait for the device.
"""

from __future__ import annotations

import pytest
import torch

import ff_kernels
from ff_kernels.ops import validation


@pytest.fixture
def deferred(monkeypatch):
    """CPU inputs take the device path: flags on the tensor's device, read every 3 checks."""
    monkeypatch.setattr(validation, "checks_at_once", lambda device: False)
    monkeypatch.setattr(validation, "finite_check_interval", 3)
    monkeypatch.setattr(validation, "_deferred_failures", {})
    monkeypatch.setattr(validation, "_unread_checks", 0)


def with_nan() -> torch.Tensor:
    x = torch.ones(2, 8)
    x[1, 3] = float("nan")
    return x


def test_cpu_input_raises_at_once():
    with pytest.raises(ValueError, match=r"FFLinear\(8, 4\): x_neg contains NaN or Inf"):
        ff_kernels.FFLinear(8, 4).ff_step(torch.ones(2, 8), with_nan(), lr=0.1)


def test_deferred_check_raises_at_the_interval(deferred):
    layer = ff_kernels.FFLinear(8, 4)
    layer.ff_step(torch.ones(2, 8), with_nan(), lr=0.1)  # checks 1 and 2: queued, no error yet
    with pytest.raises(ValueError, match=r"FFLinear\(8, 4\): x_neg contains NaN or Inf \(cpu\)"):
        layer(torch.ones(2, 8))  # check 3 reads the flags
    assert validation._deferred_failures == {} and validation._unread_checks == 0
    for _ in range(2):
        layer(torch.ones(2, 8))  # clean inputs after the report: no error
    validation.raise_deferred_checks()


def test_raise_deferred_checks_reads_the_flags_now(deferred):
    layer = ff_kernels.FFLinear(8, 4)
    layer(with_nan())
    with pytest.raises(ValueError, match=r"FFLinear\(8, 4\): x contains NaN or Inf \(cpu\)"):
        validation.raise_deferred_checks()
    validation.raise_deferred_checks()  # cleared: nothing left to report


def test_deferred_flags_name_each_input_once(deferred):
    layer = ff_kernels.FFLinear(8, 4)
    layer.ff_backward(with_nan(), with_nan())
    with pytest.raises(ValueError) as err:
        validation.raise_deferred_checks()
    assert "x_pos contains NaN or Inf (cpu)" in str(err.value) and "x_neg contains NaN or Inf (cpu)" in str(err.value)


def test_checks_off(deferred, monkeypatch):
    monkeypatch.setattr(validation, "check_finite_inputs", False)
    ff_kernels.FFLinear(8, 4).ff_step(torch.ones(2, 8), with_nan(), lr=0.1)
    assert validation._deferred_failures == {}


@pytest.mark.gpu
@pytest.mark.parametrize("layer_kind", ["linear", "linear_masked", "local2d"])
@pytest.mark.parametrize("mode", ["grad", "sgd"])
def test_no_host_sync_in_a_cuda_step(layer_kind, mode):
    """Steps after the first (which compiles and allocates) never wait for the device."""
    torch.manual_seed(0)
    if layer_kind == "local2d":
        from ff_kernels.ops import ext_local2d

        if not ext_local2d.available(torch.device("cuda")):
            pytest.fail("the CUDA local kernels are not built (torch.ops.ff_kernels.built_with_cuda() is False)")
        layer = ff_kernels.FFLocal2d(1, (12, 12), 4, kernel=3, padding=1, device="cuda")
        x_pos, x_neg = torch.rand(8, 1, 12, 12, device="cuda"), torch.rand(8, 1, 12, 12, device="cuda")
    else:
        mask = (torch.rand(256, 784) < 0.5).cuda() if layer_kind == "linear_masked" else None
        layer = ff_kernels.FFLinear(784, 256, mask=mask, device="cuda")
        x_pos, x_neg = torch.rand(64, 784, device="cuda"), torch.rand(64, 784, device="cuda")

    def step():
        if mode == "grad":
            return layer.ff_backward(x_pos, x_neg)
        return layer.ff_step(x_pos, x_neg, lr=0.01, momentum=0.9)

    step()
    validation.raise_deferred_checks()  # reads (and resets) the flags now, not within the next steps
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)
    validation.raise_deferred_checks()


def test_label_columns_mismatch_is_deferred_off_the_cpu(deferred, monkeypatch):
    """label_columns' check (rows equal past the label columns) takes the same deferred path."""
    monkeypatch.setattr(validation, "finite_check_interval", 100)  # read only when asked
    layer = ff_kernels.FFLinear(8, 4)
    x_pos = torch.rand(2, 8)
    x_neg = x_pos.clone()
    x_neg[:, :2] = 0.5
    layer.ff_step(x_pos, x_neg, lr=0.1, label_columns=2)
    validation.raise_deferred_checks()  # pairs: nothing to report
    x_neg[1, 5] += 1.0
    layer.ff_step(x_pos, x_neg, lr=0.1, label_columns=2)  # queued, no wait
    with pytest.raises(ValueError, match=r"FFLinear\(8, 4\): x_neg must equal x_pos past the first 2 columns "
                                         r"\(label_columns\) \(cpu\)"):
        validation.raise_deferred_checks()
