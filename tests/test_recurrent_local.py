"""The recurrent locally connected FF net of section 4: dynamics and gradients.

Every check compares against float64 code written independently here: the bottom-up and top-down
windows as two separate ``functional_local.local_linear`` calls (not one op over concatenated
channels), the label as a plain matrix product, and autograd with the neighbours and the previous
state detached. Tiny maps (8x8, kernel 3) with batch 1 and a few images.
"""

import pytest
import torch

from ff_kernels import functional as FF
from ff_kernels.functional import local as FFL
from ff_kernels.functional.local import LocalSpec
from ff_kernels.ops import ext_local2d
from ff_kernels.paper.recipes.cifar_ff_net import FFRecurrentLocal

needs_ext = pytest.mark.skipif(ext_local2d.load_error() is not None, reason="ff_kernels._C is not built")
BACKENDS = [pytest.param("cpu", marks=needs_ext), pytest.param("cuda", marks=pytest.mark.gpu), "reference"]
IMAGE = (3, 8, 8)
LABELS = 4


# ---------------------------------------------------------------- naive float64 net


class Naive:
    """The net's equations in float64 from ``net``'s parameters, bottom-up and top-down as separate ops."""

    def __init__(self, net: FFRecurrentLocal) -> None:
        self.net = net
        self.params = [(layer.weight.detach().double(), layer.bias.detach().double()) for layer in net.layers]
        self.label_weight = net.label_weight.detach().double()

    def normalize(self, h):
        return FF.normalize(h.flatten(1), self.net.goodness_kind, self.net.rms_norm).view_as(h)

    def preactivation(self, l, below, above, labels, params=None, label_weight=None):
        """z of layer l: local(below; W_up) + local(above; W_down) + label @ V.T."""
        weight, bias = (params or self.params)[l]
        spec = self.net.layers[l].spec
        c_below, k = self.net.layers[l].below_channels, spec.kernel
        blocks = weight.view(spec.num_locations, spec.out_channels, spec.in_channels, k * k)
        up = LocalSpec(c_below, spec.in_height, spec.in_width, spec.out_channels, k, 1, k // 2)
        z = FFL.local_linear(below, blocks[:, :, :c_below].reshape(spec.num_locations, spec.out_channels, -1), bias, up)
        if above is not None:
            down = LocalSpec(spec.in_channels - c_below, spec.in_height, spec.in_width, spec.out_channels, k, 1, k // 2)
            z = z + FFL.local_linear(above, blocks[:, :, c_below:].reshape(spec.num_locations, spec.out_channels, -1),
                                    None, down)
        if l == len(self.params) - 1:
            v = self.label_weight if label_weight is None else label_weight
            z = z + (labels @ v.t()).view_as(z)
        return z

    def initial(self, images, labels):
        states, below = [], images
        for l in range(len(self.params)):
            states.append(torch.relu(self.preactivation(l, below, None, labels)))
            below = self.normalize(states[-1])
        return states

    def neighbours(self, states, images):
        k = len(states)
        below = [images] + [self.normalize(s) for s in states[:-1]]
        above = [self.normalize(states[l + 1]) if l + 1 < k else None for l in range(k)]
        return below, above

    def run(self, images, labels, iterations):
        history = [self.initial(images, labels)]
        d = self.net.damping
        for _ in range(iterations):
            states = history[-1]
            below, above = self.neighbours(states, images)
            history.append([d * h + (1 - d) * torch.relu(self.preactivation(l, below[l], above[l], labels))
                            for l, h in enumerate(states)])
        return history

    def grads(self, images, labels, n_pos, iterations, first=1):
        """Autograd of sum_l mean_{t >= first} FF loss_l(t) with neighbours and previous states detached."""
        params = [(w.clone().requires_grad_(), b.clone().requires_grad_()) for w, b in self.params]
        label_weight = self.label_weight.clone().requires_grad_()
        net, d = self.net, self.net.damping
        with torch.no_grad():
            states = self.initial(images, labels)
        total = 0.0
        for t in range(1, iterations + 1):
            below, above = self.neighbours(states, images)
            new = []
            for l, h in enumerate(states):
                z = self.preactivation(l, below[l], above[l], labels, params, label_weight)
                state = d * h + (1 - d) * torch.relu(z)
                g = FF.goodness(state.flatten(1), net.goodness_kind)
                if t >= first:
                    if net.loss == "pairwise":
                        loss = FF.pairwise_loss(g[:n_pos], g[n_pos:], net.goodness_kind, net.temperature)
                    else:
                        loss = FF.ff_loss(g[:n_pos], g[n_pos:], net.goodness_kind, net.threshold, net.temperature)
                    total = total + loss / (iterations - first + 1)
                new.append(state.detach())
            states = new
        total.backward()
        return [(w.grad, b.grad) for w, b in params], label_weight.grad


def make_net(depth, goodness="ssq", backend="cpu", dtype=torch.float32, seed=0, loss="threshold"):
    """A small net on the backend's device ("cuda" on the GPU, else the CPU)."""
    torch.manual_seed(seed)
    return FFRecurrentLocal(IMAGE, channels=2, depth=depth, kernel=3, num_labels=LABELS, goodness=goodness,
                            backend=backend, dtype=dtype, device="cuda" if backend == "cuda" else "cpu", loss=loss)


def inputs(batch, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, *IMAGE, generator=g).to(device, dtype)
    labels = torch.nn.functional.one_hot(torch.randint(0, LABELS, (batch,), generator=g), LABELS).to(device, dtype)
    return images, labels


# ---------------------------------------------------------------- dynamics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("depth,batch", [(2, 1), (2, 4), (3, 3)])
def test_run_matches_naive_loop(backend, depth, batch):
    dtype = torch.float64 if backend == "reference" else torch.float32
    net = make_net(depth, backend=backend, dtype=dtype)
    images, labels = inputs(batch, seed=depth + batch, dtype=dtype, device=net.label_weight.device)
    labels[0] = 1.0 / LABELS  # a neutral label row among one-hot rows
    got = net.run(images, labels, iterations=4)
    expected = Naive(net).run(images.double(), labels.double(), iterations=4)
    assert len(got) == 5 and all(len(states) == depth for states in got)
    for t, (states, ref) in enumerate(zip(got, expected)):
        for l, (a, b) in enumerate(zip(states, ref)):
            assert a.shape == (batch, 2, 8, 8)
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=f"t={t}, layer {l}")
    g = net.goodness(images, labels, iterations=4)
    assert g.shape == (4, batch, depth)
    ref_g = torch.stack([torch.stack([FF.goodness(s.flatten(1)) for s in states], 1) for states in expected[1:]])
    torch.testing.assert_close(g.double(), ref_g, rtol=1e-4, atol=1e-4)


def test_label_changes_the_last_layer_at_t0_and_the_others_later():
    net = make_net(3, backend="reference", dtype=torch.float64)
    images, labels = inputs(2, dtype=torch.float64)
    other = labels.roll(1, dims=1)
    a, b = net.run(images, labels, 2), net.run(images, other, 2)
    assert [torch.equal(x, y) for x, y in zip(a[0], b[0])] == [True, True, False]
    assert [torch.equal(x, y) for x, y in zip(a[1], b[1])] == [True, False, False]
    assert not any(torch.equal(x, y) for x, y in zip(a[2], b[2]))


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("goodness", ["ssq", "neg_ssq", "sum"])
@pytest.mark.parametrize("depth,n_pos,n_neg,first", [(2, 1, 1, 1), (3, 3, 2, 1), (2, 1, 0, 1), (2, 2, 1, 2),
                                                     (3, 1, 2, 3)])
def test_ff_backward_matches_autograd(backend, goodness, depth, n_pos, n_neg, first):
    check_ff_backward(backend, goodness, depth, n_pos, n_neg, first, "threshold")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("goodness", ["ssq", "neg_ssq"])
@pytest.mark.parametrize("depth,n_pos,first", [(2, 1, 1), (3, 2, 2), (2, 3, 3)])
def test_ff_backward_pairwise_matches_autograd(backend, goodness, depth, n_pos, first):
    check_ff_backward(backend, goodness, depth, n_pos, n_pos, first, "pairwise")


def check_ff_backward(backend, goodness, depth, n_pos, n_neg, first, loss):
    """ff_backward's gradients and losses against Naive.grads (float64 autograd)."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    net = make_net(depth, goodness, backend, dtype, seed=depth, loss=loss)
    images, labels = inputs(n_pos + n_neg, seed=7, dtype=dtype, device=net.label_weight.device)
    g = net.goodness(images, labels, 3)
    net.threshold, net.temperature = float(g.mean()), float(g.std()) + 1.0  # logits away from saturation
    losses = net.ff_backward(images, labels, n_pos, iterations=3, first=first)
    (ref, ref_label) = Naive(net).grads(images.double(), labels.double(), n_pos, 3, first)
    assert len(losses) == depth
    tol = {"rtol": 2e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-12}
    for l, (layer, (grad_w, grad_b)) in enumerate(zip(net.layers, ref)):
        assert grad_w.abs().max() > 0
        scale = float(grad_w.abs().max())
        torch.testing.assert_close(layer.weight.grad.double() / scale, grad_w / scale, **tol, msg=f"layer {l}")
        torch.testing.assert_close(layer.bias.grad.double() / scale, grad_b / scale, **tol, msg=f"layer {l}")
    scale = float(ref_label.abs().max())
    torch.testing.assert_close(net.label_weight.grad.double() / scale, ref_label / scale, **tol)


def test_ff_backward_accumulates_and_keeps_absent_weights_zero():
    net = make_net(2, backend="reference", dtype=torch.float64)
    images, labels = inputs(4, dtype=torch.float64)
    net.ff_backward(images, labels, 2, 2)
    first = [p.grad.clone() for p in net.parameters()]
    net.ff_backward(images, labels, 2, 2)
    for p, g in zip(net.parameters(), first):
        torch.testing.assert_close(p.grad, 2 * g)
    for layer in net.layers:
        outside = ~FFL.local_valid_mask(layer.spec)[:, None, :].expand_as(layer.weight)
        assert not layer.weight[outside].any() and not layer.weight.grad[outside].any()


def test_bad_inputs_name_what_was_expected():
    net = make_net(2, backend="reference", dtype=torch.float64)
    images, labels = inputs(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 8, 8\)"):
        net.run(images[:, :2], labels, 1)
    with pytest.raises(ValueError, match=r"labels must be float \(2, 4\)"):
        net.run(images, labels[:1], 1)
    with pytest.raises(ValueError, match="iterations must be an int >= 1"):
        net.run(images, labels, 0)
    with pytest.raises(ValueError, match="n_pos must be in 0..2"):
        net.ff_backward(images, labels, 3, 1)
    with pytest.raises(ValueError, match=r"first must be an int in 1..iterations \(2\), got 3"):
        net.ff_backward(images, labels, 1, 2, first=3)
    with pytest.raises(ValueError, match="kernel must be an odd int"):
        FFRecurrentLocal(IMAGE, kernel=4)
    with pytest.raises(ValueError, match=r"loss must be one of \('threshold', 'pairwise'\), got 'ranked'"):
        FFRecurrentLocal(IMAGE, loss="ranked")
    pairwise = make_net(2, backend="reference", dtype=torch.float64, loss="pairwise")
    images3, labels3 = inputs(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"pairwise loss needs one negative row per positive row \(B = 2 \* n_pos = 2\), "
                                         r"got B = 3"):
        pairwise.ff_backward(images3, labels3, 1, 1)
