"""FFLocal2d as a module: autograd equivalence, optimizers, backends, the dense equivalent, state, errors.

Tolerances: the module's float32 results are compared with float32 autograd on
functional_local.py (or another float32 path) that sums the same terms in another order. A
gradient entry sums at most B * (units) products, a goodness sums <= 150 squares, so the
rounding differences are a few float32 ulps of the largest magnitude involved: we allow
1e-5 relative to the largest entry (about 80 ulps), far below any real error (an entry off by
a wrong term is off by O(1) of the scale).
"""

import io

import pytest
import torch

import ff_kernels
from ff_kernels.functional import local as FFL
from ff_kernels.ops import ext_local2d

from reference_tools import max_err, scale_of

needs_ext = pytest.mark.skipif(not ext_local2d.available(torch.device("cpu")),
                               reason=f"ff_kernels._C not built: {ext_local2d.load_error()}")
BACKENDS = ["reference", pytest.param("cpu", marks=needs_ext)]
GOODNESS = ["ssq", "neg_ssq", "sum"]
REL = 1e-5
# truncated edges (padding 2, stride 2) on a non-square map: 30 locations of 5 units, 18-entry blocks
GEOMETRY = {"in_channels": 2, "in_size": (9, 7), "out_channels": 5, "kernel": 3, "stride": 2, "padding": 2}
SPEC = FFL.LocalSpec(2, 9, 7, 5, kernel=3, stride=2, padding=2)


def close(got, want, rel=REL):
    """Equal up to ``rel`` times the largest magnitude of ``want`` (see the module docstring)."""
    got, want = got.detach(), want.detach()
    bound = rel * scale_of(want)
    assert max_err(got, want) <= bound, f"error {max_err(got, want):.3g} > {bound:.3g}"


def images(n_pos=4, n_neg=3, seed=0, shape=(2, 9, 7)):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n_pos, *shape, generator=gen), torch.rand(n_neg, *shape, generator=gen)


def make_layer(backend="cpu", kind="ssq", seed=0, **kwargs):
    """A layer whose threshold sits at the mean goodness of the test images, so no sigmoid saturates."""
    torch.manual_seed(seed)
    layer = ff_kernels.FFLocal2d(**GEOMETRY, goodness=kind, temperature=0.5, backend=backend, **kwargs)
    with torch.no_grad():
        layer.threshold = float(layer.goodness(torch.cat(images())).mean())
    return layer


def outside(t):
    """Entries of a (L, C_out, K) tensor whose window position lies outside the map."""
    return t.transpose(1, 2)[~FFL.local_valid_mask(SPEC, t.device)]


def test_geometry_init_and_spec():
    layer = ff_kernels.FFLocal2d(**GEOMETRY)
    assert layer.spec == SPEC and layer.in_shape == (2, 9, 7) and layer.out_shape == (5, 6, 5)
    assert layer.weight.shape == (30, 5, 18) and layer.bias.shape == (30, 5)
    assert layer.threshold == 150.0  # C_out * H_out * W_out
    assert (outside(layer.weight) == 0).all()
    valid = FFL.local_valid_mask(SPEC)
    assert (layer.weight.transpose(1, 2)[valid] != 0).all()
    bound = valid.sum(1).float().rsqrt()  # per location 1 / sqrt(fan_in_l): 1/sqrt(8) at a corner, 1/sqrt(18) inside
    assert (layer.weight.abs().amax((1, 2)) <= bound).all() and (layer.bias.abs().amax(1) <= bound).all()
    assert float(bound.min()) < float(bound.max())  # the edge windows really are truncated
    # 5 * 8 (corner) or more draws per location: the largest of them comes within half the bound
    assert (layer.weight.abs().amax((1, 2)) > 0.5 * bound).all()
    assert ff_kernels.FFLocal2d(1, 28, 8, kernel=10, stride=6).spec.output_shape == (8, 4, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", GOODNESS)
def test_ff_backward_equals_autograd_on_reference_loss(backend, kind):
    layer = make_layer(backend, kind)
    x_pos, x_neg = images()
    loss = layer.ff_backward(x_pos, x_neg)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    expected = FFL.ff_local_loss(x_pos, x_neg, w, b, SPEC, kind, layer.threshold, 0.5)
    expected.backward()
    close(loss, expected.detach())
    close(layer.weight.grad, w.grad)
    close(layer.bias.grad, b.grad)
    assert w.grad.abs().sum() > 0 and (outside(layer.weight.grad) == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ff_step_equals_ff_backward_plus_torch_sgd(backend):
    fused, plain = make_layer(backend), make_layer(backend)
    plain.load_state_dict(fused.state_dict())
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for seed in range(3):
        x_pos, x_neg = images(seed=seed)
        fused.ff_step(x_pos, x_neg, lr=0.05, momentum=0.9, weight_decay=1e-3)
        opt.zero_grad()
        plain.ff_backward(x_pos, x_neg)
        opt.step()
    moved = max_err(fused.weight.detach(), make_layer(backend).weight.detach())
    assert moved > 1e-3, "the steps did not move the weights"
    close(fused.weight, plain.weight)
    close(fused.bias, plain.bias)
    close(fused.weight_momentum, opt.state[plain.weight]["momentum_buffer"])
    close(fused.bias_momentum, opt.state[plain.bias]["momentum_buffer"])


@needs_ext
@pytest.mark.parametrize("kind", GOODNESS)
def test_reference_and_compiled_backends_agree(kind):
    ref, cpu = make_layer("reference", kind), make_layer("cpu", kind)
    x_pos, x_neg = images(seed=1)
    for a, b in zip(ref.forward_with_goodness(x_pos), cpu.forward_with_goodness(x_pos)):
        close(b, a)
    ref.ff_backward(x_pos, x_neg)
    cpu.ff_backward(x_pos, x_neg)
    close(cpu.weight.grad, ref.weight.grad)
    close(cpu.bias.grad, ref.bias.grad)
    for layer in (ref, cpu):
        layer.ff_step(x_pos, x_neg, lr=0.1, momentum=0.9, weight_decay=0.01)
    close(cpu.weight, ref.weight)
    close(cpu.weight_momentum, ref.weight_momentum)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
def test_to_dense_is_the_same_layer(backend, rms):
    layer = make_layer(backend, rms_norm=rms)
    x_pos, x_neg = images(seed=2)
    layer.ff_step(x_pos, x_neg, lr=0.05, momentum=0.9)  # momentum buffers are carried over too
    dense = layer.to_dense()
    mask = FFL.local_dense_mask(SPEC)
    assert isinstance(dense, ff_kernels.FFLinear) and torch.equal(dense.mask, mask)
    assert (dense.weight[~mask] == 0).all() and dense.threshold == layer.threshold and dense.rms_norm == rms
    out, g = layer.forward_with_goodness(x_pos)
    dense_out, dense_g = dense.forward_with_goodness(x_pos.flatten(1))
    close(dense_out, out.flatten(1))
    close(dense_g, g)
    layer.ff_backward(x_pos, x_neg)
    dense.ff_backward(x_pos.flatten(1), x_neg.flatten(1))
    assert (dense.weight.grad[~mask] == 0).all()
    close(dense.weight.grad, FFL.local_weight_to_dense(layer.weight.grad, SPEC))
    close(dense.bias.grad, layer.bias.grad.t().reshape(-1))
    layer.ff_step(x_pos, x_neg, lr=0.05, momentum=0.9, weight_decay=0.01)
    dense.ff_step(x_pos.flatten(1), x_neg.flatten(1), lr=0.05, momentum=0.9, weight_decay=0.01)
    close(dense.weight, FFL.local_weight_to_dense(layer.weight, SPEC))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_masked_dense_weights_stay_exactly_zero(backend):
    dense = make_layer().to_dense()
    dense.backend = backend
    absent = ~dense.mask
    for seed in range(50):
        dense.ff_step(*[x.flatten(1) for x in images(seed=seed)], lr=0.05, momentum=0.9, weight_decay=0.1)
    assert (dense.weight[absent] == 0).all() and (dense.weight_momentum[absent] == 0).all()
    opt = torch.optim.Adam(dense.parameters(), lr=0.01, weight_decay=0.1)
    for seed in range(50):
        opt.zero_grad()
        dense.ff_backward(*[x.flatten(1) for x in images(seed=seed)])
        opt.step()
    assert (dense.weight[absent] == 0).all()
    assert max_err(dense.weight.detach(), make_layer().to_dense().weight.detach()) > 1e-2, "the weights did not move"


@pytest.mark.parametrize("backend", BACKENDS)
def test_entries_outside_the_map_stay_exactly_zero(backend):
    layer = make_layer(backend, peer_norm=ff_kernels.PeerNormalization(150, strength=1.0))
    for seed in range(10):
        layer.ff_step(*images(seed=seed), lr=0.05, momentum=0.9, weight_decay=0.1)
    assert (outside(layer.weight) == 0).all() and (outside(layer.weight_momentum) == 0).all()
    opt = torch.optim.Adam(layer.parameters(), lr=0.01, weight_decay=0.1)
    for seed in range(10):
        opt.zero_grad()
        layer.ff_backward(*images(seed=seed))
        opt.step()
    assert (outside(layer.weight) == 0).all() and (outside(layer.weight.grad) == 0).all()


def test_state_dict_round_trip():
    layer = make_layer(peer_norm=ff_kernels.PeerNormalization(150))
    x_pos, x_neg = images()
    layer.ff_step(x_pos, x_neg, lr=0.05, momentum=0.9)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    clone = ff_kernels.FFLocal2d(**GEOMETRY, temperature=0.5, peer_norm=ff_kernels.PeerNormalization(150))
    clone.threshold = layer.threshold  # hyper-parameters are constructor arguments, not state
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    names = ("weight", "bias", "weight_momentum", "bias_momentum", "peer_norm.running_mean")
    assert set(layer.state_dict()) == set(names)
    for name in names:
        assert torch.equal(clone.get_buffer(name) if "momentum" in name or "." in name else clone.get_parameter(name),
                           layer.state_dict()[name])
    layer.ff_step(x_pos, x_neg, lr=0.05, momentum=0.9)
    clone.ff_step(x_pos, x_neg, lr=0.05, momentum=0.9)
    assert torch.equal(clone.weight, layer.weight)


class TestSequential:
    def test_mnist_footnote_8_net_trains(self):
        torch.manual_seed(3)
        net = ff_kernels.FFSequential(
            ff_kernels.FFLocal2d(1, 28, 128, kernel=10, stride=6),
            ff_kernels.FFLocal2d(128, 4, 220, kernel=2),
            ff_kernels.FFLocal2d(220, 3, 512, kernel=2),
        )
        x_pos, x_neg = images(2, 2, shape=(1, 28, 28))
        assert [tuple(a.shape[1:]) for a in net.activations(x_pos)] == [(128, 4, 4), (220, 3, 3), (512, 2, 2)]
        assert net.goodness(x_pos).shape == (2, 3)
        before = [layer.weight.detach().clone() for layer in net]
        losses = net.ff_step(x_pos, x_neg, lr=0.01, momentum=0.9, weight_decay=1e-4)
        assert len(losses) == 3 and all(torch.isfinite(loss) for loss in losses)
        assert all(not torch.equal(b, layer.weight) for b, layer in zip(before, net))
        losses = net.ff_backward(x_pos, x_neg)
        assert all(layer.weight.grad.abs().sum() > 0 for layer in net)

    def test_layers_learn_from_the_normalized_output_below(self):
        torch.manual_seed(4)
        net = ff_kernels.FFSequential(
            ff_kernels.FFLocal2d(**GEOMETRY, threshold=1.0),
            ff_kernels.FFLocal2d(5, (6, 5), 3, kernel=2, threshold=0.5),
        )
        x_pos, x_neg = images()
        net.ff_backward(x_pos, x_neg)
        y_pos, y_neg = net[0](x_pos), net[0](x_neg)
        w = net[1].weight.detach().clone().requires_grad_()
        FFL.ff_local_loss(y_pos, y_neg, w, net[1].bias.detach(), net[1].spec, "ssq", 0.5, 1.0).backward()
        close(net[1].weight.grad, w.grad)


def test_non_contiguous_input_is_accepted():
    layer = make_layer()
    x = torch.rand(3, 7, 9, 2).permute(0, 3, 2, 1)  # (3, 2, 9, 7), not contiguous
    assert not x.is_contiguous()
    assert torch.equal(layer(x), layer(x.contiguous()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_clear_errors(backend):
    layer = make_layer(backend)
    x, _ = images()
    name = r"FFLocal2d\(2, 9x7, 5, kernel=3, stride=2, padding=2\): "
    with pytest.raises(ValueError, match=name + r"x must have shape \(batch, 2, 9, 7\), got shape \(4, 1, 9, 7\)"):
        layer(x[:, :1])  # wrong channels
    with pytest.raises(ValueError, match=name + r"x_pos must have shape \(batch, 2, 9, 7\), got shape \(4, 2, 8, 7\)"):
        layer.ff_backward(x[:, :, :8], x)  # wrong map size
    flat_hint = r"x must have shape \(batch, 2, 9, 7\), got flat rows .*x.view\(-1, 2, 9, 7\)"
    with pytest.raises(ValueError, match=name + flat_hint):
        layer(x.flatten(1))
    with pytest.raises(ValueError, match=name + r"x_neg must have shape .* got flat rows"):
        layer.ff_step(x, x.flatten(1), lr=0.1)
    with pytest.raises(TypeError, match=name + "x must have dtype torch.float32 \\(the layer's\\), got .*float64"):
        layer(x.double())
    layer.weight.data = layer.weight.data.transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match=name + "weight must be contiguous"):
        layer(x)


def test_constructor_errors():
    with pytest.raises(TypeError, match="in_size must be an int or a pair"):
        ff_kernels.FFLocal2d(1, (28, 28, 1), 4, kernel=3)
    with pytest.raises(ValueError, match="does not fit the 4x4 input map"):
        ff_kernels.FFLocal2d(1, 4, 4, kernel=5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ff_kernels.FFLocal2d(1, 8, 4, kernel=3, temperature=0)
    with pytest.raises(ValueError, match=r"goodness must be one of"):
        ff_kernels.FFLocal2d(1, 8, 4, kernel=3, goodness="l1")
    with pytest.raises(ValueError, match=r"peer_norm must track the layer's 144 units, got PeerNormalization\(10\)"):
        ff_kernels.FFLocal2d(1, 8, 4, kernel=3, peer_norm=ff_kernels.PeerNormalization(10))
