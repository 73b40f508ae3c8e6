"""FFRecurrent (section 3.4): dynamics against a naive loop, local gradients against autograd."""

import pytest
import torch
import torch.nn.functional as F

from ff_kernels.functional.recurrent import recurrent_layer_grads
from ff_kernels.nn.recurrent import FFRecurrent

from recurrent_reference import naive_run, rms_normalize

BOTTOM, HIDDEN, TOP = 7, (5, 4, 6), 3


def make_net(hidden=HIDDEN, seed=0, **kwargs) -> FFRecurrent:
    torch.manual_seed(seed)
    net = FFRecurrent(BOTTOM, hidden, TOP, **kwargs)
    with torch.no_grad():  # non-zero biases, so that the bias enters every check
        for layer in net.layers:
            layer.bias.normal_(0.0, 0.3)
    return net


def clamped(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized bottom rows (batch, BOTTOM) and top rows (batch, TOP)."""
    g = torch.Generator().manual_seed(seed)
    bottom = torch.rand(batch, BOTTOM, generator=g)
    top = F.one_hot(torch.randint(0, TOP, (batch,), generator=g), TOP).float()
    return torch.stack([rms_normalize(r) for r in bottom]), torch.stack([rms_normalize(r) for r in top])


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("hidden", [(5,), (5, 4), HIDDEN])
def test_dynamics_match_naive_loop(batch, hidden):
    net = make_net(hidden)
    bottom, top = clamped(batch)
    iterations = 8
    ref_states, ref_goodness = naive_run(net, bottom, top, iterations)
    states = net.initial_states(bottom)
    for t in range(iterations + 1):
        for got, want in zip(states, ref_states[t], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        states = net.step(states, bottom, top)
    torch.testing.assert_close(net.goodness(bottom, top, iterations), ref_goodness, rtol=1e-5, atol=1e-5)
    if len(hidden) > 1:  # the comparison can tell synchronous updates from in-place ones
        _, in_place = naive_run(net, bottom, top, iterations, synchronous=False)
        assert not torch.allclose(in_place, ref_goodness, rtol=1e-3, atol=1e-3)


def test_damping_is_applied():
    bottom, top = clamped(3)
    damped = make_net(damping=0.3)
    undamped = make_net(damping=0.0)
    g_damped = damped.goodness(bottom, top, 8)
    torch.testing.assert_close(g_damped, naive_run(damped, bottom, top, 8)[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(undamped.goodness(bottom, top, 8), naive_run(undamped, bottom, top, 8)[1],
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(g_damped, undamped.goodness(bottom, top, 8), rtol=1e-3, atol=1e-3)


def test_initial_states_ignore_the_top_input():
    net = make_net()
    bottom, top = clamped(4)
    start = net.initial_states(bottom)
    other_top = top.roll(1, dims=1)
    torch.testing.assert_close(net.goodness(bottom, top, 3), net.goodness(bottom, top, 3, start))
    assert not torch.allclose(net.goodness(bottom, top, 1), net.goodness(bottom, other_top, 1))


def autograd_layer_loss(x, previous, weight, bias, n_pos, damping, kind, threshold, temperature):
    """The FF loss of one damped update, written from the paper's definitions; x and previous detached.

    Mean over the positive rows plus mean over the negative ones; an empty part adds 0.
    """
    z = x.detach() @ weight.T + bias
    h = damping * previous.detach() + (1 - damping) * torch.relu(z)
    g = h.sum(1) if kind == "sum" else h.square().sum(1)
    s = (-1.0 if kind == "neg_ssq" else 1.0) * (g - threshold) / temperature
    return F.softplus(-s[:n_pos]).sum() / max(n_pos, 1) + F.softplus(s[n_pos:]).sum() / max(len(s) - n_pos, 1)


@pytest.mark.parametrize("kind", ["ssq", "neg_ssq", "sum"])
@pytest.mark.parametrize("batch,n_pos", [(1, 1), (1, 0), (6, 3), (5, 2)])
def test_one_iteration_local_gradient_equals_autograd(kind, batch, n_pos):
    net = make_net(goodness=kind, temperature=2.0)
    bottom, top = clamped(batch)
    states = net.step(net.initial_states(bottom), bottom, top)  # t = 1
    inputs = net.layer_inputs(states, bottom, top)
    for layer, x, h in zip(net.layers, inputs, states):
        step = recurrent_layer_grads(x, h, layer.weight.detach(), layer.bias.detach(), n_pos, 0.3, kind,
                                     layer.threshold, layer.temperature)
        w = layer.weight.detach().clone().requires_grad_()
        b = layer.bias.detach().clone().requires_grad_()
        loss = autograd_layer_loss(x, h, w, b, n_pos, 0.3, kind, layer.threshold, layer.temperature)
        loss.backward()
        torch.testing.assert_close(step.loss, loss.detach())
        torch.testing.assert_close(step.grad_weight, w.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(step.grad_bias, b.grad, rtol=1e-5, atol=1e-6)
        assert w.grad.abs().sum() > 0


def reference_gradients(net, bottom, top, n_pos, iterations, detach=True):
    """Autograd gradients (dW, db per layer) of each layer's mean FF loss over the iterations.

    ``detach=True``: every iteration sees its neighbours' states and its own previous state as
    constants (FF's local learning); False: backpropagation through layers and time, which must differ.
    """
    params = [(layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_())
              for layer in net.layers]
    widths = net.sizes
    cut = (lambda t: t.detach()) if detach else (lambda t: t)
    states = []
    below = bottom
    for (w, b), d_below in zip(params, widths):
        states.append(torch.relu(below @ w[:, :d_below].T + b))
        below = rms_normalize_rows(cut(states[-1]))
    states = [cut(s) for s in states]
    total = 0.0
    for _ in range(iterations):
        neighbours = [bottom, *(rms_normalize_rows(cut(s)) for s in states), top]
        new = []
        for l, (w, b) in enumerate(params):
            x = torch.cat([neighbours[l], neighbours[l + 2]], dim=1)
            h = net.damping * cut(states[l]) + (1 - net.damping) * torch.relu(x @ w.T + b)
            g = h.square().sum(1) - net.layers[l].threshold
            total = total + (F.softplus(-g[:n_pos]).mean() + F.softplus(g[n_pos:]).mean()) / iterations
            new.append(h)
        states = new
    total.backward()
    return [(w.grad, b.grad) for w, b in params]


def rms_normalize_rows(h):
    return h / (h.square().mean(1, keepdim=True).sqrt() + 1e-6)


@pytest.mark.parametrize("batch,n_pos", [(2, 1), (6, 3)])
def test_ff_step_is_sgd_on_local_gradients_over_iterations(batch, n_pos):
    """Two ff_steps equal torch.optim.SGD (momentum, weight decay) on the detached-input autograd gradients."""
    net = make_net(hidden=(5, 4), threshold=2.0)
    reference = make_net(hidden=(5, 4), threshold=2.0)
    params = [p for layer in reference.layers for p in (layer.weight, layer.bias)]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
    for seed in (1, 2):
        bottom, top = clamped(batch, seed)
        grads = reference_gradients(reference, bottom, top, n_pos, iterations=4)
        full_bptt = reference_gradients(reference, bottom, top, n_pos, iterations=4, detach=False)
        assert not torch.allclose(grads[0][0], full_bptt[0][0], rtol=1e-3, atol=1e-6)
        for layer, (gw, gb) in zip(reference.layers, grads):
            layer.weight.grad, layer.bias.grad = gw, gb
        optimizer.step()
        net.ff_step(bottom, top, n_pos, iterations=4, lr=0.05, momentum=0.9, weight_decay=0.01)
        for got, want in zip(net.layers, reference.layers):
            torch.testing.assert_close(got.weight, want.weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got.bias, want.bias, rtol=1e-5, atol=1e-6)


def test_ff_step_peer_normalization_uses_means_over_iterations():
    """First step with peer norm: r = 0.1 * mean positive damped state; dW += p x_mean^T, db += p."""
    strength, lr, iterations, n_pos = 0.5, 0.05, 3, 2
    net = make_net(hidden=(5, 4), threshold=2.0, peer_norm=strength)
    plain = make_net(hidden=(5, 4), threshold=2.0)
    bottom, top = clamped(4)
    states, means_h, means_x = net.initial_states(bottom), [0.0, 0.0], [0.0, 0.0]
    for _ in range(iterations):
        inputs = net.layer_inputs(states, bottom, top)
        states = net.step(states, bottom, top)
        for l in range(2):
            means_h[l] = means_h[l] + states[l][:n_pos].mean(0) / iterations
            means_x[l] = means_x[l] + inputs[l][:n_pos].mean(0) / iterations
    net.ff_step(bottom, top, n_pos, iterations, lr=lr)
    plain.ff_step(bottom, top, n_pos, iterations, lr=lr)
    for l, (got, base) in enumerate(zip(net.layers, plain.layers)):
        r = 0.1 * means_h[l]
        p = strength * (r - r.mean())
        torch.testing.assert_close(got.weight, base.weight - lr * torch.outer(p, means_x[l]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.bias, base.bias - lr * p, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named():
    net = make_net()
    bottom, top = clamped(3)
    with pytest.raises(ValueError, match=r"bottom must have shape \(batch, 7\)"):
        net.initial_states(bottom[:, :5])
    with pytest.raises(ValueError, match="bottom and top must have the same rows"):
        net.goodness(bottom, top[:2], 2)
    with pytest.raises(ValueError, match="states must hold 3 tensors"):
        net.goodness(bottom, top, 2, states=net.initial_states(bottom)[:2])
    with pytest.raises(ValueError, match="n_pos must be in 0..3"):
        net.ff_step(bottom, top, 4, 2, lr=0.1)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        net.goodness(bottom, top, 0)
    with pytest.raises(ValueError, match=r"damping must be in \[0, 1\)"):
        FFRecurrent(BOTTOM, HIDDEN, TOP, damping=1.0)
    with pytest.raises(ValueError, match="at least one hidden width"):
        FFRecurrent(BOTTOM, [], TOP)


@pytest.mark.parametrize("init", ["balanced", "normal"])
def test_initialization_scales_each_block(init):
    torch.manual_seed(0)
    below, width, above = 400, 300, 10
    net = FFRecurrent(below, [width], above, init=init)
    weight = net.layers[0].weight.detach()
    if init == "balanced":
        expected = (1 / (2 * below) ** 0.5, 1 / (2 * above) ** 0.5)
    else:
        expected = (1 / (below + above) ** 0.5,) * 2
    for block, std in zip((weight[:, :below], weight[:, below:]), expected):
        assert abs(block.std().item() / std - 1) < 0.05, (init, block.std().item(), std)
        assert abs(block.mean().item()) < 0.05 * std
    assert not net.layers[0].bias.any()
    with pytest.raises(ValueError, match=r"init must be one of \('balanced', 'normal'\), got 'uniform'"):
        FFRecurrent(below, [width], above, init="uniform")
