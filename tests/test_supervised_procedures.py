"""The supervised recipe's two test procedures (Hinton 2022, section 3.3) on a hand-built net with known answers.

(i)  "run the net with a particular label as part of the input and accumulate the goodness of
     all but the first hidden layer"; pick the label with the best accumulated goodness.
(ii) "a single forward pass through the net" with a neutral label (0.1 per entry), whose
     normalized activities of all but the first hidden layer feed a softmax.

The net: 3 hidden layers of 11 units, no input scaling, length normalization (so a layer passes
on h / ||h||) and every weight set by hand:

    layer 1: unit j < 10 copies label pixel j times a_j; unit 10 copies image pixel 100 (u)
    layer 2: diag(b_0 .. b_9, 1)        layer 3: diag(c_0 .. c_9, 1)        biases 0

With label y every layer has two active units, y and 10, so the goodness is written out by hand:

    G1 = a_y^2 + u^2
    G2 = (b_y^2 a_y^2 + u^2) / G1
    G3 = (c_y^2 b_y^2 a_y^2 + u^2) / (b_y^2 a_y^2 + u^2)

(i)'s score is G2 + G3 (``neg_ssq``: -(G2 + G3)). a_3 is large, so label 3 would win if layer 1
counted. The expected values below are these formulas in plain Python, not the code under test.
"""

import math

import torch

from ff_kernels.paper.data import MnistSplits
from ff_kernels.paper.recipes import SupervisedMNIST, SupervisedMNISTConfig

A = [1.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
B = [1.0, 1.2, 0.9, 1.0, 1.1, 1.5, 1.0, 1.3, 0.8, 1.0]
C = [1.0, 1.0, 1.6, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.7]
U = [0.5, 2.0, 1.0, 0.25]  # pixel 100 of the four evaluation images
PIXEL = 100
WIDTH = 11
# The normalization divides by ||h|| + 1e-6; with ||h|| >= 0.5 here that moves a goodness by < 1e-5 relative.
RTOL = 1e-4


def layer_goodness(y: int, u: float) -> tuple[float, float, float]:
    """(G1, G2, G3) of image pixel u with label y, from the formulas of the module docstring."""
    a, b, c = A[y], B[y], C[y]
    g1 = a * a + u * u
    g2 = (b * b * a * a + u * u) / g1
    g3 = (c * c * b * b * a * a + u * u) / (b * b * a * a + u * u)
    return g1, g2, g3


def neutral_features(u: float) -> list[float]:
    """The head's input with the neutral label: layer 2's then layer 3's normalized output (22 values).

    With label pixels of 0.1 each, layer 1's activity is (0.1 a_0 .. 0.1 a_9, u); each diagonal
    layer multiplies it by its diagonal and the next one sees it divided by its length.
    """
    v1 = [0.1 * a for a in A] + [u]
    v2 = [x * b for x, b in zip(v1, B + [1.0])]
    v3 = [x * c for x, c in zip(v2, C + [1.0])]

    def unit(v):
        length = math.sqrt(sum(x * x for x in v))
        return [x / length for x in v]

    return unit(v2) + unit(v3)


def images(us) -> torch.Tensor:
    """Images with pixel 100 = u and random other pixels, which the hand-set weights ignore."""
    x = torch.rand(len(us), 784, generator=torch.Generator().manual_seed(0))
    x[:, PIXEL] = torch.tensor(us)
    return x


def hand_built_recipe(goodness: str = "ssq", depth: int = 3) -> SupervisedMNIST:
    config = SupervisedMNISTConfig(width=WIDTH, depth=depth, input_norm=False, rms_norm=False, peer_norm=0.0,
                                   goodness=goodness, batch_size=2)
    data = MnistSplits(images(U), torch.zeros(len(U), dtype=torch.int64), images(U), torch.zeros(len(U),
                       dtype=torch.int64), "test")
    recipe = SupervisedMNIST(config, data)
    net = recipe.model.net
    with torch.no_grad():
        for layer in net:
            layer.weight.zero_()
            layer.bias.zero_()
        for j in range(10):
            net[0].weight[j, j] = A[j]
        net[0].weight[10, PIXEL] = 1.0
        for layer, diagonal in zip(list(net)[1:], (B, C)):
            layer.weight.copy_(torch.diag(torch.tensor(diagonal + [1.0])))
    return recipe


def test_procedure_i_accumulates_the_goodness_of_all_layers_but_the_first():
    recipe = hand_built_recipe()
    expected = torch.tensor([[sum(layer_goodness(y, u)[1:]) for y in range(10)] for u in U])
    with_first = torch.tensor([[sum(layer_goodness(y, u)) for y in range(10)] for u in U])
    # premises: the answers differ per image, and counting layer 1 would change them (to label 3)
    assert expected.argmax(1).tolist() == [2, 5, 5, 2] and with_first.argmax(1).tolist() == [3, 3, 3, 3]
    torch.testing.assert_close(recipe.model.label_scores(images(U)), expected, rtol=RTOL, atol=0)


def test_procedure_i_with_min_ssq_prefers_the_lowest_goodness():
    recipe = hand_built_recipe("neg_ssq")
    expected = -torch.tensor([[sum(layer_goodness(y, u)[1:]) for y in range(10)] for u in U])
    scores = recipe.model.label_scores(images(U))
    torch.testing.assert_close(scores, expected, rtol=RTOL, atol=0)
    assert scores.argmax(1).tolist() == [9, 9, 9, 9]  # the label of LOWEST accumulated goodness


def test_procedure_i_with_one_hidden_layer_uses_its_goodness():
    recipe = hand_built_recipe(depth=1)
    expected = torch.tensor([[layer_goodness(y, u)[0] for y in range(10)] for u in U])
    torch.testing.assert_close(recipe.model.label_scores(images(U)), expected, rtol=RTOL, atol=0)


def test_procedure_ii_reads_layers_2_and_3_after_a_neutral_label_pass():
    recipe = hand_built_recipe()
    head = torch.zeros(10, 2 * WIDTH)  # logit k = layer 2's unit k + 2 x layer 3's unit k
    for k in range(10):
        head[k, k], head[k, WIDTH + k] = 1.0, 2.0
    with torch.no_grad():
        recipe.model.head.weight.copy_(head)
    features = torch.tensor([neutral_features(u) for u in U])
    expected = features @ head.t()
    torch.testing.assert_close(recipe.model.head_logits(images(U)), expected, rtol=RTOL, atol=1e-6)
    assert expected.argmax(1).tolist() == [3, 3, 3, 3]  # a_3 = 3 carries through every layer


def test_evaluate_reports_the_error_of_each_procedure():
    """Labels chosen so that (i) is right on images 0, 1 and 2 and (ii) on image 3 only: the two
    procedures are counted separately, each by its argmax, over the whole evaluation set."""
    recipe = hand_built_recipe()
    with torch.no_grad():
        recipe.model.head.weight.zero_()
        for k in range(10):
            recipe.model.head.weight[k, k] = 1.0
    # (i) picks 2, 5, 5, 2 (test above); (ii) with this head picks the largest of layer 2's units
    # 0..9, which are 0.1 a_k b_k over one length: label 3 (a_3 b_3 = 3, the next 1.5) for every image.
    recipe.eval_labels = torch.tensor([2, 5, 5, 3])
    assert recipe.evaluate() == {"test_error": 0.25, "test_error_softmax": 0.75}
