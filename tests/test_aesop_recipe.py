"""The ``aesop`` recipe's wiring: config checks, the epochs of each regime, what one step of each
regime updates, generation and the evaluation at the start (a zero softmax predicts uniformly).

Tiny synthetic strings and widths; the learning itself is tested in test_aesop_learning.py.
"""

import copy
import math

import pytest
import torch

from ff_kernels.paper.recipes.aesop import AesopConfig, AesopFF

A = 30


def tiny(regime, **fields):
    """A recipe on 4 random training strings and 2 test strings of 16 characters, 2 x 16 ReLUs."""
    g = torch.Generator().manual_seed(0)
    strings = (torch.randint(0, A, (4, 16), generator=g), torch.randint(0, A, (2, 16), generator=g))
    config = AesopConfig(regime=regime, width=16, depth=2, window=3, context=4, string_length=16, num_strings=4,
                         test_strings=2, batch_size=8, epochs=2, **fields)
    return AesopFF(config, strings)


def snapshot(recipe):
    return {k: v.clone() for k, v in recipe.model.state_dict().items() if k.endswith(("weight", "bias"))}


def changed(before, after, prefix):
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))


@pytest.mark.parametrize("fields, message", [
    ({"regime": "dream"}, "regime must be one of"),
    ({"window": 11}, "need window <= context < string_length"),
    ({"context": 100}, "need window <= context < string_length"),
    ({"width": 0}, "width must be an int >= 1"),
    ({"head_lr": 0.0}, "head_lr must be a number > 0, got 0.0"),
    ({"momentum": 1.0}, "momentum must be a number >= 0 and < 1, got 1.0"),
])
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        AesopConfig(**fields)


def test_generate_every_regenerates_all_strings_every_n_batches():
    recipe = tiny("generated", generate_every=2)
    batches = recipe.epoch_batches(torch.Generator().manual_seed(0))
    assert len(batches) == 6  # 48 predicted characters in batches of 8
    assert [b.generate is not None for b in batches] == [True, False, True, False, True, False]
    assert all(b.generate.tolist() == [0, 1, 2, 3] for b in batches[::2])
    with pytest.raises(ValueError, match="generate_every must be an int >= 1, got 0"):
        AesopConfig(generate_every=0)


@pytest.mark.parametrize("regime", ["teacher", "generated", "random"])
def test_online_epochs_cover_every_predicted_character_once(regime):
    recipe = tiny(regime)
    batches = recipe.epoch_batches(torch.Generator().manual_seed(0))
    rows = torch.cat([b.rows for b in batches])
    assert sorted(rows.tolist()) == list(range(4 * 12))  # 4 strings, 16 - 4 predicted characters
    assert {b.phase for b in batches} == {"both"} and all(b.generate is None for b in batches[1:])
    if regime == "generated":
        assert batches[0].generate.tolist() == [0, 1, 2, 3]
    else:
        assert batches[0].generate is None


def test_sleep_epoch_alternates_wake_and_sleep_phases_over_groups_of_strings():
    batches = tiny("sleep", sleep_strings=3).epoch_batches(torch.Generator().manual_seed(0))
    # 4 strings in groups of 3 and 1: 36 rows (5 batches of 8) and 12 rows (2 batches)
    assert [b.phase for b in batches] == ["wake"] * 5 + ["sleep"] * 5 + ["wake"] * 2 + ["sleep"] * 2
    cycles = [batches[:10], batches[10:]]
    seen = []
    for cycle in cycles:
        n = len(cycle) // 2
        wake, sleep = cycle[:n], cycle[n:]
        assert all(torch.equal(w.rows, s.rows) for w, s in zip(wake, sleep))
        assert all(b.generate is None for b in wake + sleep[1:])
        group = sleep[0].generate.tolist()
        rows = sorted(torch.cat([b.rows for b in wake]).tolist())
        assert rows == sorted(i * 12 + k for i in group for k in range(12))  # all of the group's characters
        seen += group
    assert sorted(seen) == [0, 1, 2, 3]


def test_random_regime_learns_only_the_softmax():
    recipe = tiny("random")
    before = snapshot(recipe)
    loss, errors, counted = recipe.train_step(recipe.epoch_batches(torch.Generator())[0], torch.Generator())
    after = snapshot(recipe)
    assert not changed(before, after, "net.") and changed(before, after, "head.")
    assert math.isclose(float(loss), math.log(A), rel_tol=1e-6)  # the zero softmax's cross-entropy
    assert counted == 8 and 0 <= int(errors) <= 8


@pytest.mark.parametrize("regime", ["teacher", "generated"])
def test_online_regimes_update_the_ff_layers_and_the_softmax(regime):
    recipe = tiny(regime)
    generator = torch.Generator().manual_seed(0)
    before = snapshot(recipe)
    loss, _, counted = recipe.train_step(recipe.epoch_batches(generator)[0], generator)
    after = snapshot(recipe)
    assert changed(before, after, "net.") and changed(before, after, "head.")
    assert math.isfinite(float(loss)) and counted == 8


def test_sleep_regime_wakes_on_positives_and_sleeps_on_generated_negatives():
    recipe = tiny("sleep", optimizer="adam")
    generator = torch.Generator().manual_seed(0)
    batches = recipe.epoch_batches(generator)
    wake, sleep = batches[0], batches[len(batches) // 2]

    # wake: the FF layers get the gradient of their loss on the positives alone
    reference = copy.deepcopy(recipe.model.net)
    x_pos = recipe.model.inputs(recipe.positives[wake.rows])
    reference.ff_backward(x_pos, x_pos[:0])
    expected_grads = [p.grad.clone() for p in reference.parameters()]
    recipe.train_step(wake, generator)
    assert recipe.generated is None  # nothing generated while awake
    assert all(torch.allclose(p.grad, g) for p, g in zip(recipe.model.net.parameters(), expected_grads))

    # sleep: generate from the model, then update the FF layers only, with negatives only
    before = snapshot(recipe)
    _, errors, counted = recipe.train_step(sleep, generator)
    after = snapshot(recipe)
    assert changed(before, after, "net.") and not changed(before, after, "head.")
    assert counted == 0 and int(errors) == 0
    group = sleep.generate
    generated = recipe.generated.view(4, 12, 3)[group]  # (strings, predicted characters, window)
    real = recipe.positives.view(4, 12, 3)[group]
    assert torch.equal(generated[:, 0, :2], real[:, 0, :2])  # the first window holds 2 context characters


def test_generate_keeps_the_context():
    recipe = tiny("generated")
    generated = recipe.generate(recipe.train_strings, torch.Generator().manual_seed(3))
    assert generated.shape == (4, 16) and torch.equal(generated[:, :4], recipe.train_strings[:, :4])
    assert int(generated.min()) >= 0 and int(generated.max()) < A


def test_evaluation_of_the_untrained_model_is_uniform():
    recipe = tiny("teacher")
    metrics = recipe.evaluate()
    assert set(metrics) == {f"{s}_{k}" for s in ("train", "test") for k in ("log2p", "perplexity", "error")}
    for split, strings in (("train", recipe.train_strings), ("test", recipe.test_strings)):
        assert math.isclose(metrics[f"{split}_log2p"], -math.log2(A), rel_tol=1e-6)
        assert math.isclose(metrics[f"{split}_perplexity"], A, rel_tol=1e-5)
        # all logits are 0, so the prediction is the first symbol, "a"
        predicted = strings[:, 4:].flatten().tolist()
        assert math.isclose(metrics[f"{split}_error"], sum(c != 0 for c in predicted) / len(predicted))
