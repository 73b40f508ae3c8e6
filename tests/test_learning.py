"""End to end: a two-layer FF net with the label in the input learns MNIST in seconds.

Setup: the supervised recipe's defaults (SGD at lr 5e-4 with momentum 0.9, weight decay 2e-3,
hard negative labels, threshold = width at temperature 1, unit-mean-square activities, peer
normalization; docs/defaults.md) with 2 hidden layers of 500 ReLUs, 3 epochs on the first
10,000 training images, evaluated on the first 2,000 official test images by the paper's
procedure (i) (for two layers: the second layer's goodness) and (ii) (the neutral-label softmax).

Observed on the 2-core CPU, one thread, seeds 0, 1, 2: (i) 81.6, 82.3, 78.7% accuracy, (ii)
89.1, 88.9, 88.8%, in 12-20 s of training under load. The same runs with the FF updates off
score 10.2, 9.7, 6.3% by (i) (chance) and 84.5, 86.2, 85.9% by (ii) (a softmax on the random
features). The bars sit 4.7 points below the worst seed for (i) and 3.8 for (ii), about 5 and
4 binomial standard errors of 2,000 images (0.9 and 0.7 points): another BLAS or thread count
does not fail them, while a net whose FF layers learn the wrong thing, or whose test reads the
wrong layers or the wrong sign, does. (The full training set and more epochs reach about 97%:
RESULTS.md, 2 x 500 for 5 epochs, 2.97% test error.)
"""

import pytest
import torch

from ff_kernels.paper.data import mnist_splits
from ff_kernels.paper.recipes import SupervisedMNIST, SupervisedMNISTConfig
from ff_kernels.paper.train import train

from _paths import require_mnist

MIN_ACCURACY = 0.74  # procedure (i)
MIN_ACCURACY_SOFTMAX = 0.85  # procedure (ii)


@pytest.fixture(scope="module")
def mnist_dir():
    return require_mnist()


@pytest.fixture
def one_thread():
    """Nets this small train fastest on one thread; on a busy 2-core machine two made this test 3 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_layer_ff_net_learns_mnist(mnist_dir, tmp_path, one_thread):
    config = SupervisedMNISTConfig(epochs=3, width=500, depth=2, train_subset=10_000, eval_subset=2_000, seed=0)
    recipe = SupervisedMNIST(config, mnist_splits(mnist_dir, validation=False))
    summary = train(recipe, tmp_path, progress=False)
    assert 1.0 - summary["test_error"] >= MIN_ACCURACY, summary
    assert 1.0 - summary["test_error_softmax"] >= MIN_ACCURACY_SOFTMAX, summary
