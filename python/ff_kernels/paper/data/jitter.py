"""Jittered images (Hinton 2022, section 3.3): each image shifted by a few pixels, zero-filled.

"... jittering the images by up to two pixels in each direction to get 25 different shifts
for each image." A shift (dy, dx) moves the content dy rows down and dx columns right (negative:
up / left); what moves out of the frame is lost and the uncovered border is zero. That is
``torch.roll`` with the wrapped-around rows and columns set to zero.
"""

from __future__ import annotations

import math

import torch


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def shift_images(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """All of ``images`` (B, H, W) shifted by the same (dy, dx), zero-filled; a new tensor."""
    out = torch.zeros_like(images)
    height, width = images.shape[-2:]
    if abs(dy) >= height or abs(dx) >= width:
        return out
    src_rows, dst_rows = slice(max(-dy, 0), height - max(dy, 0)), slice(max(dy, 0), height - max(-dy, 0))
    src_cols, dst_cols = slice(max(-dx, 0), width - max(dx, 0)), slice(max(dx, 0), width - max(-dx, 0))
    out[..., dst_rows, dst_cols] = images[..., src_rows, src_cols]
    return out


def random_shifts(
    images: torch.Tensor,
    max_shift: int = 2,
    generator: torch.Generator | None = None,
    return_shifts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Each image shifted by its own random (dy, dx), both uniform in [-max_shift, max_shift].

    images: (B, H, W), or (B, H * W) flattened square images such as MNIST's (B, 784); any
        dtype and device. The result has the same shape, dtype and device; the input is not
        changed.
    max_shift: the largest shift in each direction; (2 * max_shift + 1) ** 2 shifts are
        possible (25 for the paper's 2), each drawn with equal probability.
    generator: the random source (torch's global one when None); the numbers are drawn on the
        generator's device (the CPU when None).
    return_shifts: also return the drawn shifts, int64 (B, 2) of (dy, dx) rows on the images'
        device.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor (B, H, W) or (B, H * W), got {type(images).__name__}")
    if images.dim() == 3:
        height, width = images.shape[1:]
    elif images.dim() == 2 and math.isqrt(images.shape[1]) ** 2 == images.shape[1]:
        height = width = math.isqrt(images.shape[1])
    else:
        raise ValueError(f"images must have shape (B, H, W) or (B, H * W) with square images, got {_describe(images)}")
    if isinstance(max_shift, bool) or not isinstance(max_shift, int):
        raise TypeError(f"max_shift must be an int, got {type(max_shift).__name__}")
    if not 0 <= max_shift < min(height, width):
        raise ValueError(f"max_shift must be in 0..{min(height, width) - 1} for {height}x{width} images, got {max_shift}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    batch = images.shape[0]
    device = generator.device if generator is not None else torch.device("cpu")
    shifts = torch.randint(-max_shift, max_shift + 1, (batch, 2), generator=generator, device=device)
    shifts = shifts.to(images.device)
    square = images.reshape(batch, height, width)
    out = torch.empty_like(square)
    # One slice copy per distinct shift: (2 * max_shift + 1) ** 2 vectorized copies, not B.
    side = 2 * max_shift + 1
    code = (shifts[:, 0] + max_shift) * side + (shifts[:, 1] + max_shift)
    for k in torch.unique(code).tolist():
        rows = (code == k).nonzero().squeeze(1)
        dy, dx = k // side - max_shift, k % side - max_shift
        out[rows] = shift_images(square[rows], dy, dx)
    out = out.reshape(images.shape)
    return (out, shifts) if return_shifts else out
