"""Windows of characters and their one-hot input rows for next-character prediction.

For strings ``s`` (S, L) whose first ``context`` characters are given and whose characters at
positions ``t = context .. L - 1`` are predicted, with windows of ``width`` characters:

- :func:`prediction_windows`: the input for predicting ``s[t]``, the previous ``width``
  characters ``s[t - width : t]``;
- :func:`target_windows`: the real window that ends with ``s[t]``, ``s[t - width + 1 : t + 1]``
  (positive data of FF: its last character is the one predicted);
- :func:`one_hot_rows`: a window (..., width) as one row of ``width * alphabet`` inputs, one
  block of ``alphabet`` entries per character, first character first.

Rows are ordered string-major: row ``i * (L - context) + (t - context)`` belongs to string
``i`` and position ``t``.
"""

from __future__ import annotations

import torch

from ...ops.validation import check_on_device


def _check(strings: torch.Tensor, width: int, context: int) -> None:
    if not isinstance(strings, torch.Tensor) or strings.dtype != torch.int64 or strings.dim() != 2:
        got = f"{strings.dtype} {tuple(strings.shape)}" if isinstance(strings, torch.Tensor) else type(strings).__name__
        raise TypeError(f"strings must be an int64 tensor (S, L), got {got}")
    if not 1 <= width <= context < strings.shape[1]:
        raise ValueError(
            f"need 1 <= width <= context < string length, got width {width}, context {context}, "
            f"length {strings.shape[1]}"
        )


def prediction_windows(strings: torch.Tensor, width: int, context: int) -> torch.Tensor:
    """``s[i, t - width : t]`` for every string i and position t in [context, L): (S * (L - context), width)."""
    _check(strings, width, context)
    windows = strings.unfold(1, width, 1)  # (S, L - width + 1, width): window j = s[j : j + width]
    return windows[:, context - width:-1].reshape(-1, width)


def target_windows(strings: torch.Tensor, width: int, context: int) -> torch.Tensor:
    """``s[i, t - width + 1 : t + 1]`` for every string i and position t in [context, L): (S * (L - context), width)."""
    _check(strings, width, context)
    windows = strings.unfold(1, width, 1)
    return windows[:, context - width + 1:].reshape(-1, width)


def one_hot_rows(windows: torch.Tensor, alphabet: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Windows of codes (..., W) int64 in [0, alphabet) -> one-hot rows (..., W * alphabet) of ``dtype``.

    Entry ``k * alphabet + c`` is 1 where character k of the window is c.
    """
    if windows.dtype != torch.int64:
        raise TypeError(f"windows must hold int64 character codes, got {windows.dtype}")
    if windows.numel():
        check_on_device("one_hot_rows", "character codes", ((windows < 0) | (windows >= alphabet)).any(),
                        f"must lie in [0, {alphabet})")
    return torch.nn.functional.one_hot(windows, alphabet).to(dtype).flatten(-2)
