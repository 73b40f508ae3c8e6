"""The learning-rate schedule of the recipes: a factor per epoch, stepped once per epoch.

The schedules follow ffnew.m (Hinton's Matlab code for the paper): "half_linear" keeps the
learning rate for the first half of the epochs, then lowers it linearly; "linear" lowers it
linearly from the first epoch on; "constant" keeps it.
"""

from __future__ import annotations

import torch

LR_SCHEDULES = ("half_linear", "linear", "constant")
SCHEDULE_HELP = ("half_linear: constant, then linear decay over the second half; linear: linear decay from the "
                 "first epoch")


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The learning-rate multiplier of 1-based ``epoch`` out of ``epochs``.

    "half_linear" (ffnew.m's epsgain): 1 while ``epoch <= epochs / 2``, then
    ``(1 + 2 * (epochs - epoch)) / epochs``, which falls linearly to ``1 / epochs`` in the
    last epoch. "linear": ``(epochs - epoch + 1) / epochs``, from 1 down to ``1 / epochs``.
    "constant": 1.
    """
    if schedule == "linear":
        return (epochs - epoch + 1) / epochs
    if schedule == "constant" or epoch <= epochs / 2:
        return 1.0
    return max(1.0 + 2.0 * (epochs - epoch), 1.0) / epochs


class EpochLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR stepped once per epoch whose factor depends on the config's current ``epochs``.

    ``epochs`` may change when a run is resumed, so loading a state re-derives the learning
    rates from the lambda for the next epoch instead of keeping the saved ones: a resumed run
    then follows the schedule of its new length (exactly the uninterrupted run's as long as the
    old and the new length give the finished epochs the same factors, e.g. while no decay has
    started).
    """

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._last_lr = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


def epoch_schedule(optimizer: torch.optim.Optimizer, config) -> EpochLR:
    """EpochLR scaling every param group of ``optimizer`` by ``lr_factor(config.lr_schedule, next
    epoch, config.epochs)``; LambdaLR's argument is the number of finished epochs."""
    return EpochLR(optimizer, lambda done: lr_factor(config.lr_schedule, done + 1, config.epochs))
