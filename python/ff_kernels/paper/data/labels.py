"""Labels in the input for supervised FF (Hinton 2022, section 3.3).

The first ``num_classes`` pixels of an MNIST image (black border) are replaced by a one-of-N
code of the label. Positive data carries the true label, negative data a wrong one; a
"neutral" label of ten entries 0.1 lets a single forward pass see the image without a label.
"""

from __future__ import annotations

import math

import torch

from ...ops.validation import check_on_device, checks_at_once


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}"


def _check_class_labels(labels: torch.Tensor, num_classes: int, batch: int | None = None) -> None:
    """``labels`` must be an int64 (B,) tensor with values in [0, num_classes)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64 class indices, got {_describe(labels)}")
    if labels.dim() != 1 or (batch is not None and labels.shape[0] != batch):
        expected = "(B,)" if batch is None else f"({batch},)"
        raise ValueError(f"labels must have shape {expected}, got {_describe(labels)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 so that a wrong label exists, got {num_classes}")
    if labels.numel():  # read at once on the CPU, deferred on a GPU (no wait for the device per batch)
        check_on_device("labels", "values", ((labels < 0) | (labels >= num_classes)).any(),
                        f"must lie in [0, {num_classes})")


def neutral_label(batch: int, num_classes: int = 10, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The neutral label vector: ``(batch, num_classes)`` filled with ``1 / num_classes`` (0.1 for MNIST)."""
    return torch.full((batch, num_classes), 1.0 / num_classes, device=device, dtype=dtype)


def overlay_label(images: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """A copy of ``images`` with the first ``num_classes`` pixels replaced by the label.

    images: float (B, D) with D > num_classes (D = 784 for flattened MNIST).
    labels: int64 class indices (B,) -> one-of-N code (1 at the label, 0 elsewhere),
        or a float label vector (B, num_classes) written as given (e.g. :func:`neutral_label`).
    Returns (B, D) with the images' dtype and device.
    """
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        got = _describe(images) if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"images must be a floating-point torch.Tensor (B, D), got {got}")
    if images.dim() != 2 or images.shape[1] <= num_classes:
        raise ValueError(f"images must have shape (B, D) with D > {num_classes}, got {_describe(images)}")
    batch = images.shape[0]
    if isinstance(labels, torch.Tensor) and labels.is_floating_point():
        if tuple(labels.shape) != (batch, num_classes):
            raise ValueError(f"a label vector must have shape ({batch}, {num_classes}), got {_describe(labels)}")
        code = labels.to(images.dtype)
    else:
        _check_class_labels(labels, num_classes, batch)
        code = torch.nn.functional.one_hot(labels, num_classes).to(images.dtype)
    out = images.clone()
    out[:, :num_classes] = code.to(images.device)
    return out


def random_wrong_labels(
    labels: torch.Tensor, num_classes: int = 10, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A wrong label for each row, uniform over the ``num_classes - 1`` wrong classes.

    labels: int64 (B,) -> int64 (B,) on the labels' device, never equal to ``labels``.
    Random numbers are drawn on the generator's device (CPU when None).
    """
    _check_class_labels(labels, num_classes)
    device = generator.device if generator is not None else torch.device("cpu")
    shift = torch.randint(1, num_classes, labels.shape, generator=generator, device=device)
    return (labels + shift.to(labels.device)) % num_classes


def hard_wrong_labels(
    probs: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A wrong label for each row drawn in proportion to the model's predicted probabilities.

    probs: float (B, C) non-negative scores per class (e.g. a softmax); the true class is
    excluded and the rest renormalized. A row that gives all wrong classes zero weight falls
    back to a uniform draw among them. labels: int64 (B,). Returns int64 (B,) on the labels'
    device, never equal to ``labels``. Random numbers are drawn on the generator's device.
    """
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point() or probs.dim() != 2:
        got = _describe(probs) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise TypeError(f"probs must be a floating-point (B, num_classes) tensor, got {got}")
    batch, num_classes = probs.shape
    _check_class_labels(labels, num_classes, batch)
    device = generator.device if generator is not None else torch.device("cpu")
    targets = labels.to(device)
    if checks_at_once(probs.device):  # read at once: the checked weights need no repair
        _check_probs_now(probs)
        weights = probs.detach().to(device=device, dtype=torch.float32, copy=True)
        weights.scatter_(1, targets.unsqueeze(1), 0.0)
        if batch == 0 or float(weights.sum(1).min()) > 0:
            return torch.multinomial(weights, 1, generator=generator).squeeze(1).to(labels.device)
    else:
        check_on_device("hard_wrong_labels", "probs", (~torch.isfinite(probs) | (probs < 0)).any(),
                        "must be finite and non-negative")
        # a bad row (possible while the check above is deferred) draws uniformly among the wrong classes
        weights = torch.nan_to_num(probs.detach().to(device=device, dtype=torch.float32), nan=0.0, posinf=0.0)
        weights = weights.clamp_min_(0.0)
    rows = torch.arange(batch, device=device)
    weights[rows, targets] = 0.0
    weights[weights.sum(1) <= 0] = 1.0  # a row without weight on any wrong class: uniform over them
    weights[rows, targets] = 0.0
    return torch.multinomial(weights, 1, generator=generator).squeeze(1).to(labels.device)


def _check_probs_now(probs: torch.Tensor) -> None:
    """ValueError unless every entry of the CPU tensor ``probs`` is finite and non-negative: its
    minimum is >= 0 (a NaN minimum is not) and its sum is finite (or, when a sum of large
    entries overflows, every entry is)."""
    if probs.numel() == 0:
        return
    probs = probs.detach()
    if not float(probs.min()) >= 0 or (not math.isfinite(float(probs.sum()))
                                       and not bool(torch.isfinite(probs).all())):
        raise ValueError("hard_wrong_labels: probs must be finite and non-negative")
