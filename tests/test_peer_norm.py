"""Peer normalization (footnote 9) on FFLinear and FFLocal2d: the gradient, the fused step, dead units, state.

The ground truth is float64 autograd on an explicit loss: the layer's FF loss plus
``L_peer = sum_j p_j * mean_b z_pos[b, j]`` with ``p = strength * (r - mean(r))`` held
constant, ``r`` the running mean updated with this batch's mean positive ReLU activity. The
layer works in float32 and recovers the activities from its normalized output, so its results
carry float32 rounding of a few ulps of the largest magnitude involved: we allow 1e-5 relative
to the largest entry (measured: below 2e-6), while a missing or misplaced peer term is off by
O(1) of the scale (each test checks that the peer part is a sizeable share of the gradient).
"""

import io

import pytest
import torch

import ff_kernels
from ff_kernels import functional as FF
from ff_kernels.functional import local as FFL
from ff_kernels.nn.peer_norm import mean_activity
from ff_kernels.ops import ext_local2d

from reference_tools import max_err, random_mask, scale_of

needs_ext = pytest.mark.skipif(not ext_local2d.available(torch.device("cpu")),
                               reason=f"ff_kernels._C not built: {ext_local2d.load_error()}")
REL = 1e-5
SPEC = FFL.LocalSpec(2, 9, 7, 5, kernel=3, stride=2, padding=2)  # truncated edges: 150 units
GEOMETRY = {"in_channels": 2, "in_size": (9, 7), "out_channels": 5, "kernel": 3, "stride": 2, "padding": 2}
# (layer type, backend, masked)
LAYERS = [
    ("linear", "cpu", False), ("linear", "reference", False), ("linear", "cpu", True),
    ("local", "reference", False), pytest.param("local", "cpu", False, marks=needs_ext),
]
LAYER_IDS = ["linear-cpu", "linear-reference", "linear-masked", "local-reference", "local-cpu"]


def close(got, want, rel=REL):
    got, want = got.detach(), want.detach()
    bound = rel * scale_of(want)
    assert max_err(got, want) <= bound, f"error {max_err(got, want):.3g} > {bound:.3g}"


class Case:
    """A layer with peer normalization, its inputs, and its pre-activations / FF loss written in plain torch."""

    def __init__(self, kind, backend, masked=False, goodness="ssq", rms=False, strength=1.0, peer=True, seed=0):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        self.kind = kind
        if kind == "linear":
            self.mask = random_mask(16, 20, gen) if masked else None
            self.shape = (20,)
            n_units = 16
            peer_norm = ff_kernels.PeerNormalization(n_units, strength, momentum=0.8) if peer else None
            self.layer = ff_kernels.FFLinear(20, 16, goodness=goodness, temperature=0.5, mask=self.mask, rms_norm=rms,
                                             backend=backend, peer_norm=peer_norm)
        else:
            self.mask = None
            self.shape = SPEC.input_shape
            n_units = SPEC.out_features
            peer_norm = ff_kernels.PeerNormalization(n_units, strength, momentum=0.8) if peer else None
            self.layer = ff_kernels.FFLocal2d(**GEOMETRY, goodness=goodness, temperature=0.5, rms_norm=rms,
                                              backend=backend, peer_norm=peer_norm)
        self.x_pos = torch.rand(6, *self.shape, generator=gen)
        self.x_neg = torch.rand(5, *self.shape, generator=gen)
        with torch.no_grad():  # a number, not a graph (the layer's forward is differentiable)
            self.layer.threshold = float(self.layer.goodness(torch.cat([self.x_pos, self.x_neg])).mean())
        if peer:  # a running mean from earlier steps, so the momentum term is exercised
            self.layer.peer_norm.running_mean.copy_(torch.rand(n_units, generator=gen))

    def z(self, x, w, b):
        """Pre-activations (B, N), units ordered like the layer's flattened output."""
        if self.kind == "linear":
            return torch.nn.functional.linear(x, w if self.mask is None else w * self.mask, b)
        return FFL.local_linear(x, w, b, SPEC).flatten(1)

    def ff_loss(self, x_pos, x_neg, w, b):
        layer = self.layer
        if self.kind == "linear":
            return FF.ff_linear_loss(x_pos, x_neg, w, b, layer.goodness_kind, layer.threshold, 0.5, self.mask)
        return FFL.ff_local_loss(x_pos, x_neg, w, b, SPEC, layer.goodness_kind, layer.threshold, 0.5)

    def truth(self):
        """float64: (new running mean, total dW, total db, peer-only dW) of one ff_backward."""
        peer = self.layer.peer_norm
        w = self.layer.weight.detach().double().requires_grad_()
        b = self.layer.bias.detach().double().requires_grad_()
        x_pos, x_neg = self.x_pos.double(), self.x_neg.double()
        with torch.no_grad():
            h = torch.relu(self.z(x_pos, w, b))
            r = peer.momentum * peer.running_mean.double() + (1 - peer.momentum) * h.mean(0)
            p = peer.strength * (r - r.mean())
        peer_loss = (p * self.z(x_pos, w, b).mean(0)).sum()
        (peer_dw,) = torch.autograd.grad(peer_loss, w, retain_graph=True)
        (peer_loss + self.ff_loss(x_pos, x_neg, w, b)).backward()
        return r, w.grad, b.grad, peer_dw


@pytest.mark.parametrize("goodness,rms", [("ssq", False), ("neg_ssq", True), ("sum", False), ("sum", True)])
def test_normalization_scale_undoes_normalize(goodness, rms):
    gen = torch.Generator().manual_seed(0)
    h = torch.relu(torch.randn(5, 12, generator=gen, dtype=torch.float64))
    h[2] = 0.0  # an all-zero row: s = eps, output 0, recovered 0
    s = FF.normalization_scale(FF.goodness(h, goodness), goodness, 12, rms)
    assert s.shape == (5,)
    assert torch.equal(FF.normalize(h, goodness, rms), h / s[:, None])
    torch.testing.assert_close(FF.normalize(h, goodness, rms) * s[:, None], h, rtol=1e-14, atol=0)
    torch.testing.assert_close(mean_activity(FF.normalize(h, goodness, rms), FF.goodness(h, goodness), goodness, rms),
                               h.mean(0).float())


@pytest.mark.parametrize("layer_kind,backend,masked", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("goodness,rms", [("ssq", False), ("sum", True)])
def test_peer_gradient_equals_autograd_of_the_peer_loss(layer_kind, backend, masked, goodness, rms):
    case = Case(layer_kind, backend, masked, goodness, rms)
    r, dw, db, peer_dw = case.truth()
    case.layer.ff_backward(case.x_pos, case.x_neg)
    close(case.layer.peer_norm.running_mean, r)
    close(case.layer.weight.grad, dw)
    close(case.layer.bias.grad, db)
    assert float(peer_dw.norm()) > 0.1 * float((dw - peer_dw).norm()), "the peer term is too small to be checked"
    if masked:
        assert (case.layer.weight.grad[~case.mask] == 0).all()
    if layer_kind == "local":
        assert (case.layer.weight.grad.transpose(1, 2)[~FFL.local_valid_mask(SPEC)] == 0).all()


@pytest.mark.parametrize("layer_kind,backend,masked", LAYERS, ids=LAYER_IDS)
def test_fused_step_equals_ff_backward_plus_torch_sgd(layer_kind, backend, masked):
    fused, plain = Case(layer_kind, backend, masked), Case(layer_kind, backend, masked)
    opt = torch.optim.SGD(plain.layer.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    start = fused.layer.weight.detach().clone()
    for _ in range(3):
        fused.layer.ff_step(fused.x_pos, fused.x_neg, lr=0.05, momentum=0.9, weight_decay=0.01)
        opt.zero_grad()
        plain.layer.ff_backward(plain.x_pos, plain.x_neg)
        opt.step()
    assert max_err(fused.layer.weight.detach(), start) > 1e-3
    close(fused.layer.weight, plain.layer.weight)
    close(fused.layer.bias, plain.layer.bias)
    close(fused.layer.weight_momentum, opt.state[plain.layer.weight]["momentum_buffer"])
    close(fused.layer.bias_momentum, opt.state[plain.layer.bias]["momentum_buffer"])
    close(fused.layer.peer_norm.running_mean, plain.layer.peer_norm.running_mean)
    # without momentum there is no buffer: W -= lr * (g + g_peer) with weight decay on W
    fused.layer.ff_step(fused.x_pos, fused.x_neg, lr=0.05, weight_decay=0.01)
    opt_plain = torch.optim.SGD(plain.layer.parameters(), lr=0.05, weight_decay=0.01)
    opt_plain.zero_grad()
    plain.layer.ff_backward(plain.x_pos, plain.x_neg)
    opt_plain.step()
    close(fused.layer.weight, plain.layer.weight)


def kill_unit(case):
    """Force one unit dead: bias -100 and non-positive weights, so its ReLU is off for every input >= 0.

    Returns a function giving that unit's activities (Bp,) on the positive inputs.
    """
    layer = case.layer
    # FFLinear: unit 0; FFLocal2d: channel o = 0 at the interior location l = 12, unit o * L + l of the flat output
    unit, row = (0, 0) if case.kind == "linear" else (12, (12, 0))
    with torch.no_grad():
        layer.bias[row] = -100.0
        layer.weight[row] = -layer.weight[row].abs()

    @torch.no_grad()
    def activity():
        return torch.relu(case.z(case.x_pos, layer.weight, layer.bias))[:, unit]

    return activity


@pytest.mark.parametrize("layer_kind,backend,masked", LAYERS[:2] + LAYERS[3:], ids=LAYER_IDS[:2] + LAYER_IDS[3:])
def test_a_dead_unit_recovers_only_with_peer_normalization(layer_kind, backend, masked):
    """With the default threshold (mean squared activity 1) and strength 0.3 the unit comes back
    after 38-47 steps of the 100 allowed (strength 0.1: 90-120 steps) (bias -100 is overcome mostly through the weights,
    which grow along the mean positive input). Without peer normalization the FF gradient of
    an inactive unit is exactly zero, so nothing moves it."""
    for peer in (True, False):
        case = Case(layer_kind, backend, masked, strength=0.3, peer=peer)
        case.layer.threshold = float(16 if layer_kind == "linear" else SPEC.out_features)
        case.x_pos += 0.5  # positives differ from negatives, and every window sees a clearly positive input
        activity = kill_unit(case)
        assert (activity() == 0).all()
        for _ in range(100):
            case.layer.ff_step(case.x_pos, case.x_neg, lr=0.05, momentum=0.9)
            if peer and (activity() > 0).any():
                break
        assert bool((activity() > 0).any()) == peer


def test_no_positive_rows_leave_the_running_mean_and_gradient_alone():
    with_peer, without = Case("linear", "cpu"), Case("linear", "cpu", peer=False)
    before = with_peer.layer.peer_norm.running_mean.clone()
    with_peer.layer.ff_backward(with_peer.x_pos[:0], with_peer.x_neg)
    without.layer.ff_backward(without.x_pos[:0], without.x_neg)
    assert torch.equal(with_peer.layer.peer_norm.running_mean, before)
    assert torch.equal(with_peer.layer.weight.grad, without.layer.weight.grad)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_to_dense_carries_peer_normalization(backend):
    local = Case("local", backend).layer
    dense = local.to_dense()
    x_pos, x_neg = Case("local", backend).x_pos, Case("local", backend).x_neg
    assert torch.equal(dense.peer_norm.running_mean, local.peer_norm.running_mean)
    local.ff_backward(x_pos, x_neg)
    dense.ff_backward(x_pos.flatten(1), x_neg.flatten(1))
    close(dense.peer_norm.running_mean, local.peer_norm.running_mean)
    close(dense.weight.grad, FFL.local_weight_to_dense(local.weight.grad, SPEC))
    close(dense.bias.grad, local.bias.grad.t().reshape(-1))


@pytest.mark.parametrize("layer_kind", ["linear", "local"])
def test_running_mean_is_in_the_state_dict(layer_kind):
    case = Case(layer_kind, "reference")
    case.layer.ff_step(case.x_pos, case.x_neg, lr=0.05)
    state = case.layer.state_dict()
    assert torch.equal(state["peer_norm.running_mean"], case.layer.peer_norm.running_mean)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    clone = Case(layer_kind, "reference", seed=1).layer
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(clone.peer_norm.running_mean, case.layer.peer_norm.running_mean)


def test_errors():
    expected = r"FFLinear\(20, 16\): peer_norm must track the layer's 16 units, got PeerNormalization\(15\)"
    with pytest.raises(ValueError, match=expected):
        ff_kernels.FFLinear(20, 16, peer_norm=ff_kernels.PeerNormalization(15))
    with pytest.raises(TypeError, match="peer_norm must be a PeerNormalization or None, got float"):
        ff_kernels.FFLinear(20, 16, peer_norm=0.03)
    with pytest.raises(ValueError, match="momentum must be < 1"):
        ff_kernels.PeerNormalization(4, momentum=1.0)
    with pytest.raises(ValueError, match="strength must be a finite number >= 0"):
        ff_kernels.PeerNormalization(4, strength=-1.0)
    with pytest.raises(ValueError, match=r"activity_mean must have shape \(4,\)"):
        ff_kernels.PeerNormalization(4).update_(torch.zeros(5))


@pytest.mark.filterwarnings("ignore:compute_dtype=torch.bfloat16 on a CPU without")
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16], ids=["fp32", "bf16-compute"])
def test_cpu_step_adds_exactly_the_rank_one_peer_gradient(compute_dtype, masked):
    """The CPU step's peer term is outer(p, mean positive row) (and p for the bias), whether it
    rides on the gradient GEMM (float32) or is added after it (bf16 compute, the GEMM in bf16):
    the gradients with and without a fixed p differ by exactly that, up to float32 rounding."""
    from ff_kernels import ops

    gen = torch.Generator().manual_seed(5)
    x_pos, x_neg = torch.rand(7, 20, generator=gen), torch.rand(5, 20, generator=gen)
    mask = random_mask(16, 20, gen) if masked else None
    weight = (torch.rand(16, 20, generator=gen) - 0.4) * 0.7
    weight = weight if mask is None else weight * mask
    bias = torch.randn(16, generator=gen) * 0.1
    p = torch.randn(16, generator=gen)

    def grads(peer):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        with torch.no_grad():
            ops.ff_linear_step(x_pos, x_neg, w, b, threshold=4.0, temperature=2.0, mask=mask, backend="cpu",
                               compute_dtype=compute_dtype, peer=peer)
        return w.grad, b.grad

    (dw_peer, db_peer), (dw, db) = grads(lambda mean_h: p), grads(None)
    rows = x_pos if compute_dtype is None else x_pos.to(compute_dtype).float()  # the rows the GEMM sees
    want_dw = torch.outer(p, rows.mean(0))
    want_dw = want_dw if mask is None else want_dw * mask
    assert scale_of(want_dw) > 0.3 * scale_of(dw), "degenerate case: the peer term is a small share"
    close(dw_peer - dw, want_dw, rel=REL * scale_of(dw) / scale_of(want_dw) + REL)
    close(db_peer - db, p, rel=REL * scale_of(db) / scale_of(p) + REL)
