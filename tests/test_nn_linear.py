"""FFLinear and FFSequential as modules: autograd equivalence, optimizers, state, masks."""

import io

import pytest
import torch

import ff_kernels
from ff_kernels import functional as FF

from reference_tools import device_for, random_mask

BACKENDS = ["reference", "cpu", "triton"]  # triton: CPU tensors run in the interpreter (conftest)


def inputs(n_pos=6, n_neg=4, n_in=30, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    pair = torch.rand(n_pos, n_in, generator=gen, dtype=dtype), torch.rand(n_neg, n_in, generator=gen, dtype=dtype)
    return pair[0].to(device), pair[1].to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["ssq", "neg_ssq", "sum"])
def test_ff_backward_equals_autograd_on_reference_loss(backend, kind):
    torch.manual_seed(0)
    device = device_for(backend)
    layer = ff_kernels.FFLinear(30, 20, goodness=kind, threshold=3.0, temperature=0.7, backend=backend, device=device)
    x_pos, x_neg = inputs(device=device)
    loss = layer.ff_backward(x_pos, x_neg)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    expected = FF.ff_linear_loss(x_pos, x_neg, w, b, kind, 3.0, 0.7)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert w.grad.abs().sum() > 0


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("sgd_pass", ["compiled", "fused", "two"], ids=["compiled-pass", "fused-sgd-pass", "two-passes"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ff_step_equals_ff_backward_plus_torch_sgd(backend, sgd_pass, masked, monkeypatch):
    """``sgd_pass``: the CPU step's update with weight decay: the compiled pass after the GEMM
    into the momentum buffer (float32 CPU), torch's fused SGD kernel on a gradient workspace
    (elsewhere, from FUSED_SGD_MIN weights on; here for this small layer too) or two torch passes."""
    from ff_kernels.ops import cpu_linear

    monkeypatch.setattr(cpu_linear, "FUSED_SGD_MIN", 0 if sgd_pass == "fused" else 1 << 62)
    if sgd_pass != "compiled":
        monkeypatch.setattr(cpu_linear, "decay_apply_takes", lambda param, buf: False)
    torch.manual_seed(1)
    device = device_for(backend)
    mask = (torch.rand(16, 30) < 0.7).to(device) if masked else None
    fused = ff_kernels.FFLinear(30, 16, threshold=2.0, backend=backend, device=device, mask=mask)
    plain = ff_kernels.FFLinear(30, 16, threshold=2.0, backend=backend, device=device, mask=mask)
    plain.load_state_dict(fused.state_dict())
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for seed in range(4):
        x_pos, x_neg = inputs(seed=seed, device=device)
        fused.ff_step(x_pos, x_neg, lr=0.05, momentum=0.9, weight_decay=1e-3)
        opt.zero_grad()
        plain.ff_backward(x_pos, x_neg)
        opt.step()
    torch.testing.assert_close(fused.weight, plain.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.bias, plain.bias, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.weight_momentum, opt.state[plain.weight]["momentum_buffer"], rtol=1e-5, atol=1e-6)


def test_training_lowers_the_loss_and_separates_goodness():
    torch.manual_seed(2)
    layer = ff_kernels.FFLinear(30, 40, threshold=10.0)
    gen = torch.Generator().manual_seed(0)
    x_pos = torch.rand(64, 30, generator=gen) + torch.linspace(0, 1, 30)  # a different distribution
    x_neg = torch.rand(64, 30, generator=gen)
    opt = torch.optim.Adam(layer.parameters(), lr=0.01)
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = layer.ff_backward(x_pos, x_neg)
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 10.0)
        opt.step()
        first = float(loss) if first is None else first
    assert float(loss) < 0.5 * first
    assert (layer.probability(x_pos) > 0.5).float().mean() > 0.9
    assert (layer.probability(x_neg) < 0.5).float().mean() > 0.9


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_weights_stay_exactly_zero(backend):
    gen = torch.Generator().manual_seed(4)
    device = device_for(backend)
    mask = random_mask(24, 30, gen).to(device)
    layer = ff_kernels.FFLinear(30, 24, mask=mask.int(), threshold=4.0, backend=backend, device=device)
    assert (layer.weight[~mask] == 0).all() and (layer.weight[mask] != 0).all()
    opt = torch.optim.Adam(layer.parameters(), lr=0.05, weight_decay=0.1)
    for seed in range(10):
        x_pos, x_neg = inputs(seed=seed, device=device)
        layer.ff_step(x_pos, x_neg, lr=0.1, momentum=0.9, weight_decay=0.1)
        opt.zero_grad()
        layer.ff_backward(x_pos, x_neg)
        opt.step()
    assert (layer.weight[~mask] == 0).all()
    assert (layer.weight_momentum[~mask] == 0).all()


def test_state_dict_round_trip_with_momentum_and_mask():
    torch.manual_seed(5)
    mask = torch.rand(12, 30) > 0.3
    layer = ff_kernels.FFLinear(30, 12, mask=mask, threshold=2.0)
    x_pos, x_neg = inputs()
    layer.ff_step(x_pos, x_neg, lr=0.1, momentum=0.9)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    clone = ff_kernels.FFLinear(30, 12, threshold=2.0)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    for name in ("weight", "bias", "mask", "weight_momentum", "bias_momentum"):
        torch.testing.assert_close(getattr(clone, name), getattr(layer, name), rtol=0, atol=0)
    layer.ff_step(x_pos, x_neg, lr=0.1, momentum=0.9)
    clone.ff_step(x_pos, x_neg, lr=0.1, momentum=0.9)
    torch.testing.assert_close(clone.weight, layer.weight, rtol=0, atol=0)


def test_bfloat16_module():
    torch.manual_seed(6)
    layer = ff_kernels.FFLinear(30, 16, threshold=2.0).to(torch.bfloat16)
    x_pos, x_neg = inputs(dtype=torch.bfloat16)
    loss = layer.ff_backward(x_pos, x_neg)
    assert layer.weight.grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert layer(x_pos).dtype == torch.bfloat16
    reference = ff_kernels.FFLinear(30, 16, threshold=2.0, backend="reference").to(torch.bfloat16)
    reference.load_state_dict(layer.state_dict())
    reference.ff_backward(x_pos, x_neg)
    # both backends round the activities to bf16 (relative 2**-8); the gradients then agree to a few ulps
    torch.testing.assert_close(layer.weight.grad.float(), reference.weight.grad.float(), rtol=3e-2, atol=3e-2 * float(reference.weight.grad.abs().max()))


def test_forward_is_normalized_and_goodness_matches():
    layer = ff_kernels.FFLinear(30, 16, threshold=2.0)
    x, _ = inputs(n_pos=5)
    out = layer(x)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5), rtol=1e-4, atol=0)
    h = torch.relu(torch.nn.functional.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(layer.goodness(x), h.square().sum(1), rtol=1e-5, atol=1e-6)


class TestSequential:
    def make(self, backend="cpu"):
        torch.manual_seed(7)
        return ff_kernels.FFSequential(
            ff_kernels.FFLinear(30, 20, threshold=2.0, backend=backend),
            ff_kernels.FFLinear(20, 10, threshold=2.0, backend=backend),
            ff_kernels.FFLinear(10, 8, threshold=2.0, backend=backend),
        )

    def test_all_layers_learn_from_pre_update_normalized_outputs(self):
        net = self.make()
        x_pos, x_neg = inputs()
        losses = net.ff_backward(x_pos, x_neg)
        assert len(losses) == 3
        # layer 1 gets layer 0's normalized output as its input
        y_pos, y_neg = net[0](x_pos), net[0](x_neg)
        w = net[1].weight.detach().clone().requires_grad_()
        FF.ff_linear_loss(y_pos, y_neg, w, net[1].bias.detach(), "ssq", 2.0, 1.0).backward()
        torch.testing.assert_close(net[1].weight.grad, w.grad, rtol=1e-5, atol=1e-6)

    def test_greedy_layers_only_touch_chosen(self):
        net = self.make()
        x_pos, x_neg = inputs()
        losses = net.ff_step(x_pos, x_neg, lr=0.1, layers=[1])
        assert len(losses) == 1
        before = [layer.weight.detach().clone() for layer in net]
        net.ff_step(x_pos, x_neg, lr=0.1, layers=[1])
        after = [layer.weight for layer in net]
        assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
        assert not torch.equal(before[1], after[1])

    def test_goodness_and_activations_shapes(self):
        net = self.make()
        x, _ = inputs(n_pos=3)
        assert net.goodness(x).shape == (3, 3)
        assert [tuple(a.shape) for a in net.activations(x)] == [(3, 20), (3, 10), (3, 8)]
        torch.testing.assert_close(net.goodness(x)[:, 1], net[1].goodness(net[0](x)))

    def test_outputs_and_goodness_is_activations_and_goodness_in_one_pass(self):
        net = self.make()
        x, _ = inputs(n_pos=5)
        outputs, goodness = net.outputs_and_goodness(x)
        for got, expected in zip(outputs, net.activations(x), strict=True):
            assert torch.equal(got, expected)
        assert torch.equal(goodness, net.goodness(x))
        below = x
        for i, layer in enumerate(net):  # each column is the layer's own goodness of the output below it
            torch.testing.assert_close(goodness[:, i], layer.goodness(below))
            below = layer(below)

    def test_bad_layer_indices(self):
        with pytest.raises(ValueError, match="subset of 0..2"):
            self.make().ff_backward(*inputs(), layers=[3])
