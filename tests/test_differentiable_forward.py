"""Autograd through FF layers' forward (ff_kernels.nn.differentiable), against float64 autograd.

The module runs its fast op forward and recomputes the reference math in float32 for the
backward; the truth here is autograd on ff_kernels.functional in float64 from the same inputs.
Tolerance: float32 against float64 over sums of at most a few hundred products, relative to the
largest entry: 1e-4 (about 800 float32 ulps; a wrong term is off by O(1) of the scale).
"""

import pytest
import torch

import ff_kernels
from ff_kernels import functional as FF
from ff_kernels.functional import local as FFL
from ff_kernels.ops import ext_local2d

from reference_tools import max_err, scale_of

REL = 1e-4
needs_ext = pytest.mark.skipif(not ext_local2d.available(torch.device("cpu")),
                               reason=f"ff_kernels._C not built: {ext_local2d.load_error()}")


def close(got, want, rel=REL):
    bound = rel * max(scale_of(want.detach()), 1e-30)
    assert max_err(got.detach().double(), want.detach()) <= bound, f"error {max_err(got.double(), want):.3g} > {bound:.3g}"


def random_readout(shapes, seed):
    """Fixed random weights (one per result) for a scalar that depends on every result entry."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def module_grads(layer, x, seed):
    """Gradients of sum(r1 * output) + sum(r2 * goodness) w.r.t. x, weight, bias via the module."""
    x = x.clone().requires_grad_(True)
    output, g = layer.forward_with_goodness(x)
    r_out, r_g = random_readout([output.shape, g.shape], seed)
    ((output.double() * r_out).sum() + (g.double() * r_g).sum()).backward()
    return output, g, [x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad]


def float64_grads(forward, x, weight, bias, seed, out_shape, g_shape):
    """The same gradients by float64 autograd on ``forward(x, weight, bias) -> (output, goodness)``."""
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
    output, g = forward(*leaves)
    r_out, r_g = random_readout([out_shape, g_shape], seed)
    ((output * r_out).sum() + (g * r_g).sum()).backward()
    return output, g, [t.grad if t is not None else None for t in leaves]


def linear_truth(kind, rms, mask, blocks):
    def forward(x, w, b):
        h = FF.linear_activity(x, w, b, None if mask is None else mask.double())
        return FF.normalize(h, kind, rms, blocks=blocks), FF.goodness(h, kind, blocks)
    return forward


LINEAR_CASES = [  # (batch, in, out, options)
    (1, 7, 5, {}),
    (6, 13, 9, {"goodness": "neg_ssq", "rms_norm": True}),
    (5, 11, 8, {"goodness": "sum", "bias": False}),
    (4, 10, 12, {"blocks": 3}),
    (3, 9, 6, {"masked": True}),
]
LINEAR_BACKENDS = ["reference", "cpu", "triton"]


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("case", range(len(LINEAR_CASES)))
def test_fflinear_gradients_equal_float64_autograd(backend, case):
    batch, d_in, d_out, options = LINEAR_CASES[case]
    options = dict(options)
    if backend == "triton" and "blocks" in options:
        pytest.skip("block-wise layers refuse the triton backend")
    torch.manual_seed(case)
    mask = (torch.rand(d_out, d_in) < 0.6) if options.pop("masked", False) else None
    layer = ff_kernels.FFLinear(d_in, d_out, backend=backend, mask=mask, **options)
    x = torch.randn(batch, d_in)
    output, g, grads = module_grads(layer, x, seed=case)
    truth = linear_truth(layer.goodness_kind, layer.rms_norm, mask, layer.blocks)
    want_out, want_g, want = float64_grads(truth, x, layer.weight, layer.bias, case, output.shape, g.shape)
    close(output, want_out)
    close(g, want_g)
    for got, expected in zip(grads, want):
        assert (got is None) == (expected is None)
        if got is not None:
            close(got, expected)
    if mask is not None:
        assert (layer.weight.grad[~mask] == 0).all()


def test_the_values_are_the_fast_ops_and_no_graph_without_grad():
    torch.manual_seed(0)
    layer = ff_kernels.FFLinear(12, 7)
    x = torch.randn(5, 12)
    with torch.no_grad():
        plain, g_plain = layer.forward_with_goodness(x)
    graphed, g_graphed = layer.forward_with_goodness(x)
    assert graphed.requires_grad and g_graphed.requires_grad
    assert not plain.requires_grad and not g_plain.requires_grad
    assert torch.equal(plain, graphed) and torch.equal(g_plain, g_graphed)
    layer.requires_grad_(False)
    assert not layer(x).requires_grad  # nothing requires grad: no graph
    assert layer(x.requires_grad_(True)).requires_grad  # the input does


def test_a_frozen_bias_gets_no_grad_and_the_input_gets_one():
    torch.manual_seed(1)
    layer = ff_kernels.FFLinear(6, 4)
    layer.bias.requires_grad_(False)
    x = torch.randn(3, 6, requires_grad=True)
    layer.goodness(x).sum().backward()
    assert layer.bias.grad is None and layer.weight.grad is not None and x.grad is not None


def test_an_ff_step_between_forward_and_backward_is_refused():
    torch.manual_seed(2)
    layer = ff_kernels.FFLinear(8, 5)
    x = torch.randn(4, 8)
    g = layer.goodness(x)
    layer.ff_step(torch.randn(3, 8), torch.randn(3, 8), lr=0.1)  # changes the weight in place
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        g.sum().backward()


def test_backprop_through_a_sequential_reaches_the_first_layer():
    torch.manual_seed(3)
    net = ff_kernels.FFSequential(ff_kernels.FFLinear(10, 8), ff_kernels.FFLinear(8, 6))
    x = torch.randn(5, 10)
    r = random_readout([(5, 6)], 3)[0]
    (net(x).double() * r).sum().backward()
    leaves = [t.detach().double().requires_grad_(True) for layer in net for t in (layer.weight, layer.bias)]
    h = x.double()
    for i in range(2):
        h = FF.normalize(FF.linear_activity(h, leaves[2 * i], leaves[2 * i + 1], None), "ssq", False)
    (h * r).sum().backward()
    for layer, (w, b) in zip(net, (leaves[:2], leaves[2:])):
        close(layer.weight.grad, w.grad)
        close(layer.bias.grad, b.grad)


def test_precomputed_preacts_carry_no_graph():
    torch.manual_seed(4)
    layer = ff_kernels.FFLinear(6, 4)
    x = torch.randn(3, 6)
    preact = (x @ layer.weight.t() + layer.bias).detach()
    assert not layer(None, preact=preact).requires_grad


LOCAL_SPEC = FFL.LocalSpec(2, 9, 7, 5, kernel=3, stride=2, padding=2)  # truncated edges, ragged map


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("kind", ["ssq", "neg_ssq"])
@pytest.mark.parametrize("batch", [1, 4])
def test_fflocal2d_gradients_equal_float64_autograd(backend, kind, batch):
    torch.manual_seed(batch)
    spec = LOCAL_SPEC
    layer = ff_kernels.FFLocal2d(spec.in_channels, (spec.in_height, spec.in_width), spec.out_channels, spec.kernel,
                                 spec.stride, spec.padding, goodness=kind, backend=backend)
    x = torch.randn(batch, *spec.input_shape)
    output, g, grads = module_grads(layer, x, seed=batch)

    def truth(x, w, b):
        h = FFL.local_activity(x, w, b, spec).flatten(1)
        return FF.normalize(h, kind, False).view(-1, *spec.output_shape), FF.goodness(h, kind)

    want_out, want_g, want = float64_grads(truth, x, layer.weight, layer.bias, batch, output.shape, g.shape)
    close(output, want_out)
    close(g, want_g)
    for got, expected in zip(grads, want):
        close(got, expected)
    valid = FFL.local_valid_mask(spec)[:, None, :].expand_as(layer.weight)
    assert (layer.weight.grad[~valid] == 0).all()  # entries outside the map stay without gradient
