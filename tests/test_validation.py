"""Bad input is rejected with an error naming the layer, what was expected and what came."""

import pytest
import torch

import ff_kernels
from ff_kernels import ops


@pytest.fixture
def layer():
    return ff_kernels.FFLinear(8, 4)


def test_wrong_feature_size(layer):
    with pytest.raises(ValueError, match=r"FFLinear\(8, 4\): x must have shape \(batch, 8\), got shape \(3, 7\)"):
        layer(torch.ones(3, 7))


def test_one_dimensional_input_is_not_broadcast(layer):
    with pytest.raises(ValueError, match=r"shape \(batch, 8\), got shape \(8,\)"):
        layer.goodness(torch.ones(8))


def test_wrong_dtype(layer):
    with pytest.raises(TypeError, match=r"x_pos must have dtype torch.float32 .* got .*torch.float64"):
        layer.ff_backward(torch.ones(2, 8, dtype=torch.float64), torch.ones(2, 8))


def test_wrong_device(layer):
    with pytest.raises(ValueError, match=r"x must be on cpu .* got .*device meta"):
        layer(torch.ones(2, 8, device="meta"))


def test_positive_and_negative_widths_differ(layer):
    with pytest.raises(ValueError, match=r"same width, got x_pos \(2, 8\) and x_neg \(2, 9\)"):
        layer.ff_backward(torch.ones(2, 8), torch.ones(2, 9))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input(layer, bad):
    x = torch.ones(2, 8)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="x_neg contains NaN or Inf"):
        layer.ff_step(torch.ones(2, 8), x, lr=0.1)


def test_mask_of_wrong_shape():
    with pytest.raises(ValueError, match=r"mask must have shape \(4, 8\) .* got shape \(8, 4\)"):
        ff_kernels.FFLinear(8, 4, mask=torch.ones(8, 4))


def test_mask_with_values_other_than_zero_and_one():
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        ff_kernels.FFLinear(8, 4, mask=torch.full((4, 8), 0.5))


def test_unknown_goodness_and_backend():
    with pytest.raises(ValueError, match="goodness must be one of"):
        ff_kernels.FFLinear(8, 4, goodness="l1")
    with pytest.raises(ValueError, match="backend must be one of"):
        ff_kernels.FFLinear(8, 4, backend="fast")(torch.ones(1, 8))


def test_bad_hyper_parameters(layer):
    with pytest.raises(ValueError, match="lr must be a finite number >= 0.0, got -0.1"):
        layer.ff_step(torch.ones(2, 8), torch.ones(2, 8), lr=-0.1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ff_kernels.FFLinear(8, 4, temperature=0.0)


def test_empty_batches(layer):
    with pytest.raises(ValueError, match="both x_pos and x_neg are empty"):
        layer.ff_backward(torch.ones(0, 8), torch.ones(0, 8))


def test_momentum_needs_buffer_at_op_level():
    w = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="momentum=0.9 needs weight_buf"):
        ops.ff_linear_step(torch.ones(1, 8), torch.ones(1, 8), w, None, mode="sgd", lr=0.1, momentum=0.9)


def test_cpu_backend_refuses_bf16_compute_on_other_backends():
    with pytest.raises(ValueError, match="compute_dtype=torch.bfloat16 is a mode of the 'cpu' backend"):
        ff_kernels.FFLinear(8, 4, backend="reference", compute_dtype=torch.bfloat16)(torch.ones(1, 8))


def test_huge_finite_values_are_not_mistaken_for_inf(layer):
    x = torch.full((2, 8), 3e38)  # the float32 sum overflows, the values do not
    output, _ = ops.ff_linear_forward(x, layer.weight, layer.bias)
    assert output.shape == (2, 4)  # the op's NaN/Inf check lets them through
    with pytest.raises(ValueError, match=r"goodness .* overflows float32"):
        layer(x)  # the layer then says why every output row would be zeros


def _checked_widths(monkeypatch) -> list[int]:
    """Record the width of every tensor the ops check for NaN/Inf from now on."""
    from ff_kernels.ops import linear as ops_linear
    from ff_kernels.ops import validation

    widths = []
    real_all_finite = validation.all_finite

    def spy(x):
        widths.append(x.shape[-1])
        return real_all_finite(x)

    monkeypatch.setattr(validation, "all_finite", spy)
    monkeypatch.setattr(ops_linear, "all_finite", spy)
    return widths


@pytest.mark.parametrize("call", ["ff_step", "ff_backward", "activations", "goodness"])
def test_sequential_checks_only_its_own_inputs(monkeypatch, call):
    """A layer above the first gets the normalized output of a layer whose goodness was finite:
    FFSequential does not check it again (validation.trusted_inputs); the first layer's inputs
    are checked."""
    torch.manual_seed(0)
    net = ff_kernels.FFSequential(ff_kernels.FFLinear(12, 8, backend="cpu"), ff_kernels.FFLinear(8, 6, backend="cpu"),
                                  ff_kernels.FFLinear(6, 5, backend="cpu"))
    x = torch.rand(6, 12)
    widths = _checked_widths(monkeypatch)
    if call == "ff_step":
        net.ff_step(x[:3], x[3:], lr=0.1)
    elif call == "ff_backward":
        net.ff_backward(x[:3], x[3:])
    else:
        getattr(net, call)(x)
    assert widths and set(widths) == {12}


def test_sequential_checks_the_output_of_a_diverged_layer():
    """A layer whose weights hold NaN puts out NaN with NaN goodness: the layer above checks its
    inputs again and names the problem."""
    net = ff_kernels.FFSequential(ff_kernels.FFLinear(12, 8, backend="cpu"), ff_kernels.FFLinear(8, 6, backend="cpu"))
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    x = torch.rand(6, 12)
    with pytest.raises(ValueError, match=r"FFLinear\(8, 6\): x_pos contains NaN or Inf"):
        net.ff_step(x[:3], x[3:], lr=0.1)


def test_trusted_inputs_skip_the_input_checks_only_inside():
    from ff_kernels.ops import validation

    layer = ff_kernels.FFLinear(4, 3, backend="cpu")
    bad = torch.tensor([[float("nan"), 0.0, 0.0, 0.0]])
    with validation.trusted_inputs():
        layer(bad)  # not checked: the caller vouches for its inputs
        with validation.trusted_inputs(False):  # nesting keeps the trust
            layer(bad)
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        layer(bad)
