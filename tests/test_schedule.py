"""The recipes' per-epoch learning-rate factors (ffnew.m's epsgain and the linear decay)."""

import pytest
import torch

from ff_kernels.paper.recipes.schedule import LR_SCHEDULES, EpochLR, lr_factor


@pytest.mark.parametrize("schedule, expected", [
    ("half_linear", [1, 1, 1, 1, 7 / 8, 5 / 8, 3 / 8, 1 / 8]),  # (1 + 2 * (8 - epoch)) / 8 after epoch 4
    ("linear", [8 / 8, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]),
    ("constant", [1] * 8),
])
def test_factors_over_eight_epochs(schedule, expected):
    assert [lr_factor(schedule, epoch, 8) for epoch in range(1, 9)] == pytest.approx(expected)


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_epoch_lr_sets_each_epochs_rate_and_a_loaded_state_follows_a_new_length(schedule):
    class Config:
        lr_schedule, epochs = schedule, 4

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    config = Config()
    scheduler = EpochLR(optimizer, lambda done: lr_factor(config.lr_schedule, done + 1, config.epochs))
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.5 * lr_factor(schedule, e, 4) for e in range(1, 5)])
    config.epochs = 8  # resumed with a longer run: the next epoch (5 of 8) gets its factor
    scheduler.load_state_dict(scheduler.state_dict())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * lr_factor(schedule, 5, 8))
