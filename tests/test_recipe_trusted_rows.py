"""The MNIST recipes check their images once, when they are built, and trust the rows they
build from them in every step (labelled copies, hybrids): the layers run no NaN/Inf reductions
over them, while a divergence (non-finite weights) still stops the step with the layers' own
error."""

import pytest
import torch

from ff_kernels.nn import layer as layer_module
from ff_kernels.ops import linear as linear_ops
from ff_kernels.ops import validation
from ff_kernels.paper.data import MnistSplits
from ff_kernels.paper.recipes import SupervisedMNIST, SupervisedMNISTConfig, UnsupervisedMNIST, UnsupervisedMNISTConfig
from ff_kernels.paper.recipes.local_mnist import LocalMNIST, LocalMNISTConfig


def splits(n: int = 30, seed: int = 0) -> MnistSplits:
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.rand(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
    return MnistSplits(images[:20], labels[:20], images[20:], labels[20:], "test")


def small_config(**kwargs) -> SupervisedMNISTConfig:
    return SupervisedMNISTConfig(width=16, depth=3, batch_size=10, epochs=1, **kwargs)


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("recipe, config", [(SupervisedMNIST, small_config),
                                            (UnsupervisedMNIST, lambda: UnsupervisedMNISTConfig(width=16, depth=2))])
def test_non_finite_images_are_refused_when_the_recipe_is_built(recipe, config, split, bad):
    data = splits()
    images = data.train_images if split == "train" else data.eval_images
    images[3, 500] = bad
    with pytest.raises(ValueError, match=r"(training|test) images must be finite floating-point values.*NaN or Inf"):
        recipe(config(), data)


STEPPED_RECIPES = {
    "supervised": lambda: SupervisedMNIST(small_config(), splits()),
    "unsupervised": lambda: UnsupervisedMNIST(UnsupervisedMNISTConfig(width=16, depth=3, batch_size=10), splits()),
    "local": lambda: LocalMNIST(LocalMNISTConfig(channels=(4, 6, 8), batch_size=10), splits()),
}


@pytest.mark.parametrize("name", list(STEPPED_RECIPES))
def test_a_step_reads_no_row_twice_for_nan(monkeypatch, name):
    recipe = STEPPED_RECIPES[name]()
    batch = torch.arange(10)
    recipe.train_step(batch, torch.Generator().manual_seed(0))  # warm: the momentum buffers exist
    checked = []
    original = validation.check_finite

    def spy(layer, name, x):
        if validation.checking_inputs():
            checked.append(name)
        return original(layer, name, x)

    def norms_spy(x, *args, **kwargs):  # the layers' overflow bound reads the inputs' norms
        checked.append("norm")
        return original_norm(x, *args, **kwargs)

    original_norm = torch.linalg.vector_norm
    for module in (validation, linear_ops):
        monkeypatch.setattr(module, "check_finite", spy)
    monkeypatch.setattr(linear_ops, "all_finite", lambda x: checked.append("all_finite") or True)
    monkeypatch.setattr(layer_module.torch.linalg, "vector_norm", norms_spy)
    loss, _, size = recipe.train_step(batch, torch.Generator().manual_seed(1))
    assert checked == [] and torch.isfinite(loss) and size == 10


def test_non_finite_weights_still_stop_the_step_before_any_update():
    """NaN weights (a divergence) make the neutral pass's softmax NaN: the step raises before it
    updates anything (the training loop's guard then reports the divergence)."""
    recipe = SupervisedMNIST(small_config(), splits())
    with torch.no_grad():
        recipe.model.net[0].weight[0, 50] = float("nan")
    before = {name: p.clone() for name, p in recipe.model.named_parameters()}
    with pytest.raises(ValueError, match="NaN|finite"):
        recipe.train_step(torch.arange(10), torch.Generator().manual_seed(0))
    for name, p in recipe.model.named_parameters():  # NaN where it was, every other entry unchanged
        assert torch.equal(p.isnan(), before[name].isnan()) and torch.equal(p.nan_to_num(), before[name].nan_to_num())


@pytest.mark.parametrize("name", ["unsupervised", "local"])
def test_non_finite_first_layer_weights_stop_a_hybrid_step_at_the_layer_above(name):
    """The hybrid recipes have no neutral pass: a NaN weight in layer 1 makes its goodness NaN,
    so layer 2 checks its inputs and refuses them before layer 2 or any layer above moves."""
    recipe = STEPPED_RECIPES[name]()
    with torch.no_grad():
        recipe.model.net[0].weight.view(-1)[7] = float("nan")
    above = {key: p.clone() for key, p in recipe.model.net[1:].named_parameters()}
    with pytest.raises(ValueError, match="NaN or Inf"):
        recipe.train_step(torch.arange(10), torch.Generator().manual_seed(0))
    for key, p in recipe.model.net[1:].named_parameters():
        assert torch.equal(p, above[key]), key
