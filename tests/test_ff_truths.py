"""FFLinear against numbers worked out by hand from the paper's definitions (Hinton 2022, section 2).

Every test builds a 3-unit layer with weight I and bias 0, so that for the input x = (1, -2, 3)
the ReLU activities are h = (1, 0, 3) and everything else follows on paper:

    goodness           sum of squares 1 + 0 + 9 = 10; "sum" goodness 1 + 0 + 3 = 4
    output             h / ||h|| = h / sqrt(10); unit mean square: h / sqrt(10 / 3);
                       "sum": h / 4; "sum" with unit mean: h / (4 / 3)
    p(positive)        sigmoid((G - theta) / T), for "neg_ssq" sigmoid(-(G - theta) / T)
    loss               softplus(-s) for a positive row, softplus(s) for a negative one, s the logit
    one SGD step       dL/dW = c * 2h x^T, c = dL/dG = -sigmoid(-s) / T (positive row) or
                       sigmoid(s) / T (negative row), signs reversed for "neg_ssq"

The backends used by the recipes on a CPU ("cpu") and the plain-torch reference are both checked.
The expected values are written with ``math``, never with ff_kernels' own functions.
"""

import math

import pytest
import torch

from ff_kernels import FFLinear, FFSequential

BACKENDS = ["reference", "cpu"]
X = torch.tensor([[1.0, -2.0, 3.0]])
H = [1.0, 0.0, 3.0]
SSQ, SUM = 10.0, 4.0
# float32 arithmetic on numbers of order 10: a few ulps
RTOL = 1e-5


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def identity_layer(backend: str, goodness: str = "ssq", **kwargs) -> FFLinear:
    layer = FFLinear(3, 3, goodness=goodness, backend=backend, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(3))
        layer.bias.zero_()
    return layer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("goodness,rms,goodness_value,divisor", [
    ("ssq", False, SSQ, math.sqrt(SSQ)),
    ("ssq", True, SSQ, math.sqrt(SSQ / 3)),
    ("neg_ssq", False, SSQ, math.sqrt(SSQ)),
    ("sum", False, SUM, SUM),
    ("sum", True, SUM, SUM / 3),
])
def test_goodness_and_normalized_output(backend, goodness, rms, goodness_value, divisor):
    """Goodness is the sum of squared activities (the sum for "sum"); the next layer sees h divided
    by its length (its sum for "sum"), or scaled to unit mean square (unit mean) with rms."""
    layer = identity_layer(backend, goodness, rms_norm=rms)
    output, g = layer.forward_with_goodness(X)
    torch.testing.assert_close(g, torch.tensor([goodness_value]), rtol=RTOL, atol=0)
    torch.testing.assert_close(output, torch.tensor([[v / divisor for v in H]]), rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_threshold_is_the_number_of_units(backend):
    """Section 2: p(positive) = sigmoid(sum of squares - threshold); the default threshold is the
    layer's width, here 3, so G = 10 gives sigmoid(7)."""
    layer = identity_layer(backend)
    assert layer.threshold == 3.0
    torch.testing.assert_close(layer.probability(X), torch.tensor([sigmoid(7.0)]), rtol=RTOL, atol=0)
    wide = FFLinear(3, 5, backend=backend)
    assert wide.threshold == 5.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("goodness,sign", [("ssq", 1.0), ("neg_ssq", -1.0)])
def test_loss_of_a_positive_and_a_negative_row(backend, goodness, sign):
    """Positive row x (G = 10), negative row 2x (G = 40), threshold 12, temperature 4:
    s_pos = sign * (10 - 12) / 4, s_neg = sign * (40 - 12) / 4, loss = softplus(-s_pos) + softplus(s_neg)."""
    layer = identity_layer(backend, goodness, threshold=12.0, temperature=4.0)
    s_pos, s_neg = sign * (10.0 - 12.0) / 4.0, sign * (40.0 - 12.0) / 4.0
    expected = softplus(-s_pos) + softplus(s_neg)
    loss = layer.ff_backward(X, 2 * X)
    assert math.isclose(float(loss), expected, rel_tol=RTOL)
    assert math.isclose(float(identity_layer(backend, goodness, threshold=12.0, temperature=4.0).ff_backward(
        X, X[:0])), softplus(-s_pos), rel_tol=RTOL)  # positives only
    assert math.isclose(float(identity_layer(backend, goodness, threshold=12.0, temperature=4.0).ff_backward(
        X[:0], 2 * X)), softplus(s_neg), rel_tol=RTOL)  # negatives only


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("goodness,sign", [("ssq", 1.0), ("neg_ssq", -1.0)])
@pytest.mark.parametrize("positive", [True, False])
def test_weight_gradient_of_one_row(backend, goodness, sign, positive):
    """dL/dW = c * 2 h x^T with c = -sign * sigmoid(-s) / T for a positive row and
    sign * sigmoid(s) / T for a negative one; s = sign * (10 - 6) / 2; dL/db = c * 2h."""
    layer = identity_layer(backend, goodness, threshold=6.0, temperature=2.0)
    s = sign * (SSQ - 6.0) / 2.0
    c = (-sigmoid(-s) if positive else sigmoid(s)) * sign / 2.0
    x_pos, x_neg = (X, X[:0]) if positive else (X[:0], X)
    layer.ff_backward(x_pos, x_neg)
    expected_w = torch.tensor([[c * 2 * H[i] * X[0, j].item() for j in range(3)] for i in range(3)])
    torch.testing.assert_close(layer.weight.grad, expected_w, rtol=RTOL, atol=1e-7)
    torch.testing.assert_close(layer.bias.grad, torch.tensor([c * 2 * h for h in H]), rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("goodness", ["ssq", "neg_ssq", "sum"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_small_step_moves_positives_towards_good_and_negatives_away(backend, goodness, momentum):
    """The direction of learning: one small SGD step (with or without a momentum buffer, which the
    recipes use) raises the goodness of a positive row and lowers that of a negative row ("neg_ssq":
    the reverse), on either side of the threshold."""
    sign = -1.0 if goodness == "neg_ssq" else 1.0
    x = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.5, 0.0]])  # goodness 10 and 0.5 (ssq): either side of 3
    for positive in (True, False):
        layer = identity_layer(backend, goodness)
        before = layer.goodness(x)
        layer.ff_step(x if positive else x[:0], x[:0] if positive else x, lr=1e-3, momentum=momentum)
        change = (layer.goodness(x) - before) * sign * (1.0 if positive else -1.0)
        assert bool((change > 0).all()), (positive, before, layer.goodness(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stack_passes_on_the_normalized_output(backend):
    """Two identity layers: the second sees h / ||h|| = (1, 0, 3) / sqrt(10), whose goodness is 1
    whatever the first layer's was (section 2: only the orientation passes on)."""
    net = FFSequential(identity_layer(backend), identity_layer(backend))
    torch.testing.assert_close(net.goodness(X), torch.tensor([[SSQ, 1.0]]), rtol=RTOL, atol=0)
    torch.testing.assert_close(net.goodness(5 * X), torch.tensor([[25 * SSQ, 1.0]]), rtol=RTOL, atol=0)
