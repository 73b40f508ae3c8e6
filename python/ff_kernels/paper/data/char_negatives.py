"""Negative data for next-character FF (Hinton 2022, section 4.1), made from the model's predictions.

- :func:`teacher_forcing_negatives`: real windows whose last character is replaced by a wrong
  one sampled from the model's prediction given the real previous characters;
- :func:`generate_strings`: strings whose first ``context`` characters are real and whose rest
  the model generates one character at a time from its own output; their windows
  (:func:`~ff_kernels.paper.data.char_windows.target_windows`) are the negatives generated
  "entirely by the model".

Characters are sampled from the predicted distribution (not its argmax, which locks a
generated string into repeating the most likely characters). Random numbers are drawn on the
generator's device (CPU when None); results are on the inputs' device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .labels import hard_wrong_labels


def sample_chars(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One character per row drawn from ``probs`` (B, A) (non-negative, rows need not sum to 1) -> int64 (B,)."""
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point() or probs.dim() != 2:
        got = f"{probs.dtype} {tuple(probs.shape)}" if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise TypeError(f"probs must be a floating-point tensor (B, A), got {got}")
    device = generator.device if generator is not None else torch.device("cpu")
    weights = probs.detach().to(device=device, dtype=torch.float32)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1).to(probs.device)


def teacher_forcing_negatives(
    windows: torch.Tensor, probs: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Copies of ``windows`` (B, W) int64 whose last character is replaced by a wrong one drawn from ``probs`` (B, A).

    ``probs[b]`` is the model's prediction of the last character of ``windows[b]`` from the
    characters before it. The true last character is excluded and the other probabilities
    renormalized (uniform over the wrong characters where they are all 0), so a negative never
    equals its positive; these are the supervised recipe's hard negative labels
    (:func:`~ff_kernels.paper.data.labels.hard_wrong_labels`) with characters for labels. The first
    W - 1 characters are unchanged.
    """
    if windows.dim() != 2 or probs.dim() != 2 or windows.shape[0] != probs.shape[0]:
        raise ValueError(f"windows (B, W) and probs (B, A) must have the same B, got {tuple(windows.shape)} "
                         f"and {tuple(probs.shape)}")
    negatives = windows.clone()
    negatives[:, -1] = hard_wrong_labels(probs, windows[:, -1], generator)
    return negatives


def generate_strings(
    strings: torch.Tensor,
    width: int,
    context: int,
    next_char_probs: Callable[[torch.Tensor], torch.Tensor],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Strings (S, L) int64 with the first ``context`` characters of ``strings`` and the rest generated.

    For t = context .. L - 1 in turn, character t of every string is drawn from
    ``next_char_probs(g[:, t - width : t])``: the model's distribution (S, A) given the
    previous ``width`` characters (S, width) of the string being generated, ``g``.
    """
    if strings.dim() != 2 or not 1 <= width <= context <= strings.shape[1]:
        raise ValueError(f"need strings (S, L) and 1 <= width <= context <= L, got strings {tuple(strings.shape)}, "
                         f"width {width}, context {context}")
    generated = strings.clone()
    for t in range(context, strings.shape[1]):
        generated[:, t] = sample_chars(next_char_probs(generated[:, t - width:t]), generator).to(strings.device)
    return generated
