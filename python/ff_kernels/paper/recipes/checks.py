"""Config checks and CLI options shared by the recipes with FF layers, a softmax head and SGD."""

from __future__ import annotations

import argparse


def check_sgd_settings(config) -> None:
    """``lr``, ``head_lr`` > 0; ``weight_decay``, ``head_weight_decay``, ``peer_norm`` >= 0; ``momentum`` in [0, 1)."""
    for name in ("lr", "head_lr"):
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(config, name)}")
    for name in ("weight_decay", "head_weight_decay", "peer_norm"):
        if not getattr(config, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    if not 0 <= config.momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {config.momentum}")


def check_choices(config, choices: tuple[tuple[str, tuple], ...]) -> None:
    """Each (field, allowed values) of ``choices`` holds one of its values."""
    for name, allowed in choices:
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(config, name)!r}")


def add_mnist_subset_arguments(parser: argparse.ArgumentParser) -> None:
    """--train-subset, --eval-subset, --eval-every and --validation, as every MNIST recipe takes them."""
    parser.add_argument("--train-subset", type=int, help="train on the first N training images (default all)")
    parser.add_argument("--eval-subset", type=int, help="evaluate on the first N evaluation images (default all)")
    parser.add_argument("--eval-every", type=int,
                        help="evaluate after every N-th epoch and after the last (default 1); may change on --resume")
    parser.add_argument("--validation", action="store_true",
                        help="evaluate on the last 10,000 training images (held out) instead of the test set")
