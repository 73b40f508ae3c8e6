"""The local ops of ops/local2d_primitives.py and the autograd layer built on them (paper/recipes/cifar_backprop_net.py).

Compiled backends (float32: "cpu", and "cuda" on a GPU) and reference (float64) against
functional_local.py + autograd, on 8x8 maps with kernel 3 and batch 1 or a few images.
"""

import pytest
import torch

from ff_kernels.functional import local as FFL
from ff_kernels.functional.local import LocalSpec
from ff_kernels.ops import ext_local2d
from ff_kernels.ops.local2d_primitives import local_delta_grad_, local_input_grad, local_linear, local_relu
from ff_kernels.paper.recipes.cifar_backprop_net import BackpropLocal2d

needs_ext = pytest.mark.skipif(ext_local2d.load_error() is not None, reason="ff_kernels._C is not built")
COMPILED = [pytest.param("cpu", marks=needs_ext), pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = [*COMPILED, "reference"]


def device_of(backend: str) -> str:
    """Where a backend's tensors live: the GPU for "cuda", else the CPU."""
    return "cuda" if backend == "cuda" else "cpu"


def compiled_dtype(backend: str) -> torch.dtype:
    """float32 for the compiled kernels, float64 for the reference."""
    return torch.float64 if backend == "reference" else torch.float32


def random_local(spec: LocalSpec, generator: torch.Generator):
    valid = FFL.local_valid_mask(spec)[:, None, :]
    weight = torch.randn(spec.weight_shape, generator=generator, dtype=torch.float64) * valid / spec.block_size**0.5
    return weight, torch.randn(spec.bias_shape, generator=generator, dtype=torch.float64) * 0.1



@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("extra_kind", ["none", "shared", "per_image"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_local_relu_matches_reference(backend, batch, extra_kind, with_bias):
    g = torch.Generator().manual_seed(batch)
    spec = LocalSpec(5, 8, 8, 3, kernel=3, padding=1)
    weight, bias = random_local(spec, g)
    bias = bias if with_bias else None
    x = torch.randn(batch, *spec.input_shape, generator=g, dtype=torch.float64)
    extra = {"none": None, "shared": torch.randn(1, *spec.output_shape, generator=g, dtype=torch.float64).expand(batch, -1, -1, -1),
             "per_image": torch.randn(batch, *spec.output_shape, generator=g, dtype=torch.float64)}[extra_kind]
    z = FFL.local_linear(x, weight, bias, spec)
    expected = torch.relu(z if extra is None else z + extra)
    f = lambda t: None if t is None else t.float().contiguous().to(device_of(backend))
    got = local_relu(f(x), f(weight), f(bias), spec, f(extra), backend=backend)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(local_relu(x, weight, bias, spec, extra, backend="reference"), expected)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("batch", [1, 6])
def test_local_delta_grad_matches_autograd(backend, batch):
    g = torch.Generator().manual_seed(10 + batch)
    spec = LocalSpec(4, 8, 8, 2, kernel=3, padding=1)
    weight, bias = random_local(spec, g)
    x = torch.randn(batch, *spec.input_shape, generator=g, dtype=torch.float64)
    delta = torch.randn(batch, *spec.output_shape, generator=g, dtype=torch.float64)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    (FFL.local_linear(x, w, b, spec) * delta).sum().backward()
    start_w, start_b = torch.randn(spec.weight_shape, generator=g), torch.randn(spec.bias_shape, generator=g)
    device = device_of(backend)
    grad_w, grad_b = start_w.clone().to(device), start_b.clone().to(device)
    local_delta_grad_(x.float().to(device), delta.float().to(device), spec, grad_w, grad_b, backend=backend)
    grad_w, grad_b = grad_w.cpu(), grad_b.cpu()
    torch.testing.assert_close(grad_w.double() - start_w.double(), w.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_b.double() - start_b.double(), b.grad, rtol=1e-5, atol=1e-5)
    assert not grad_w[~FFL.local_valid_mask(spec)[:, None, :].expand_as(grad_w)].sub(start_w[~FFL.local_valid_mask(
        spec)[:, None, :].expand_as(grad_w)]).any()
    ref_w, ref_b = torch.zeros_like(weight), torch.zeros_like(bias)
    local_delta_grad_(x, delta, spec, ref_w, ref_b, backend="reference")
    torch.testing.assert_close(ref_w, w.grad)
    torch.testing.assert_close(ref_b, b.grad)


def test_ops_reject_wrong_shapes():
    spec = LocalSpec(2, 8, 8, 2, kernel=3, padding=1)
    weight, bias = random_local(spec, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"extra must have shape \(2, 2, 8, 8\)"):
        local_relu(torch.zeros(2, 2, 8, 8, dtype=torch.float64), weight, bias, spec, torch.zeros(2, 2, 4, 4),
                   backend="reference")
    with pytest.raises(ValueError, match=r"delta must have shape \(3, 2, 8, 8\)"):
        local_delta_grad_(torch.zeros(3, 2, 8, 8, dtype=torch.float64), torch.zeros(3, 2, 7, 7, dtype=torch.float64),
                          spec, torch.zeros_like(weight), backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 4])
def test_local_linear_matches_reference(backend, batch):
    g = torch.Generator().manual_seed(20 + batch)
    spec = LocalSpec(3, 8, 8, 2, kernel=5, padding=2)
    weight, bias = random_local(spec, g)
    x = torch.randn(batch, *spec.input_shape, generator=g, dtype=torch.float64)
    dtype, device = compiled_dtype(backend), device_of(backend)
    got = local_linear(x.to(device, dtype), weight.to(device, dtype), bias.to(device, dtype), spec, backend)
    assert got.dtype == dtype and (got < 0).any() and (got > 0).any()
    torch.testing.assert_close(got.double().cpu(), FFL.local_linear(x, weight, bias, spec), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,kernel", [(1, 3), (3, 5), (2, 1)])
def test_local_input_grad_matches_autograd(backend, batch, kernel):
    g = torch.Generator().manual_seed(30 + batch)
    spec = LocalSpec(3, 8, 8, 2, kernel=kernel, padding=kernel // 2)
    weight, bias = random_local(spec, g)
    x = torch.randn(batch, *spec.input_shape, generator=g, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(batch, *spec.output_shape, generator=g, dtype=torch.float64)
    (FFL.local_linear(x, weight, bias, spec) * delta).sum().backward()
    dtype, device = compiled_dtype(backend), device_of(backend)
    got = local_input_grad(delta.to(device, dtype), weight.to(device, dtype), spec, backend)
    assert got.shape == x.shape
    torch.testing.assert_close(got.double().cpu(), x.grad, rtol=1e-5, atol=1e-5)


def test_local_input_grad_needs_same_geometry():
    spec = LocalSpec(3, 8, 8, 2, kernel=3, padding=0)
    weight, _ = random_local(spec, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="stride 1 and kernel = 2 \\* padding \\+ 1"):
        local_input_grad(torch.zeros(1, 2, 6, 6, dtype=torch.float64), weight, spec, "reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_backprop_local2d_stack_gradients_match_autograd_on_the_reference(backend, batch):
    dtype, device = compiled_dtype(backend), device_of(backend)
    torch.manual_seed(batch)
    layers = [BackpropLocal2d(3, 8, 2, kernel=3, backend=backend, dtype=dtype, device=device),
              BackpropLocal2d(2, 8, 2, kernel=3, backend=backend, dtype=dtype, device=device)]
    x = torch.randn(batch, 3, 8, 8, dtype=dtype, device=device, requires_grad=True)
    target = torch.randn(batch, 2, 8, 8, dtype=dtype, device=device)
    ((layers[1](layers[0](x)) - target) ** 2).sum().backward()
    params = [(l.weight.detach().double().requires_grad_(), l.bias.detach().double().requires_grad_()) for l in layers]
    x64 = x.detach().double().requires_grad_()
    h = x64
    for layer, (w, b) in zip(layers, params):
        h = torch.relu(FFL.local_linear(h, w, b, layer.spec))
    ((h - target.double()) ** 2).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    for layer, (w, b) in zip(layers, params):
        assert w.grad.abs().max() > 0
        torch.testing.assert_close(layer.weight.grad.double(), w.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.bias.grad.double(), b.grad, rtol=1e-4, atol=1e-5)
        assert not layer.weight.grad[~FFL.local_valid_mask(layer.spec, w.device)[:, None, :].expand_as(w)].any()


def test_backprop_local2d_rejects_even_kernels():
    with pytest.raises(ValueError, match="kernel must be an odd int"):
        BackpropLocal2d(3, 8, 2, kernel=4)
