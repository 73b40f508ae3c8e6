"""The untrained control of a learning test: the same recipe, seed and batches with the FF updates off.

:func:`freeze` wraps a recipe class's ``train_step`` so that, after every step, the parameters of
the recipe's FF layers (``recipe.model.net``) are put back to what they were before it. Everything
else runs as in a trained run: the same random draws (negatives, hybrids, shifts, batches), the
softmax heads' updates, the evaluation. For the backprop recipes, which have no FF layers, the
whole model is frozen, so their control is the untrained net.

A learning test compares a trained run with its control: whatever the trained run has beyond the
control comes from the updates that were turned off.
"""

from __future__ import annotations

import torch


def frozen_module(recipe) -> torch.nn.Module:
    """The part of ``recipe.model`` whose updates the control turns off."""
    return getattr(recipe.model, "net", recipe.model)


def freeze(monkeypatch, recipe_cls) -> None:
    """Make every ``recipe_cls`` (and subclass) instance undo its FF layers' update after each train_step."""
    original = recipe_cls.train_step

    def train_step_without_ff_updates(self, batch, generator):
        params = list(frozen_module(self).parameters())
        before = [p.detach().clone() for p in params]
        result = original(self, batch, generator)
        with torch.no_grad():
            for p, saved in zip(params, before):
                p.copy_(saved)
        return result

    monkeypatch.setattr(recipe_cls, "train_step", train_step_without_ff_updates)
