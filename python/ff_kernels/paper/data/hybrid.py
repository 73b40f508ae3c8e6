"""Hybrid images as negative data for unsupervised FF (Hinton 2022, section 3.2, Figure 1).

The paper wants negative data with the same short-range correlations as real images but
different long-range ones: "we create a mask containing fairly large regions of ones and zeros.
We then create hybrid images for the negative data by adding together one digit image times the
mask and a different digit image times the reverse of the mask. Masks like this can be created
by starting with a random bit image and then repeatedly blurring the image with a filter of the
form [1/4, 1/2, 1/4] in both the horizontal and vertical directions. After repeated blurring,
the image is then thresholded at 0.5."

The paper does not say how often it blurs. :data:`BLUR_STEPS` = 10 passes (each one horizontal
plus one vertical filter, i.e. a Gaussian of standard deviation sqrt(10 / 2) ~ 2.2 pixels) gives
masks of a few large blobs per 28 x 28 image, like Figure 1: neighbouring pixels agree about 91%
of the time (2 passes: 80%, 6: 88%, 16: 93%), and half the pixels are ones. The border is
reflected while blurring, so edges are not biased towards either image.
"""

from __future__ import annotations

import functools

import torch

from ...ops.ext_local2d import cpu_ops_take
from ...ops.validation import check_on_device

BLUR_STEPS = 10
BLUR_FILTER = (0.25, 0.5, 0.25)


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"shape {tuple(t.shape)}, dtype {t.dtype}"


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@functools.lru_cache(maxsize=16)
def blur_matrix(size: int, steps: int) -> torch.Tensor:
    """``steps`` passes of [1/4, 1/2, 1/4] along a line of ``size`` >= 2 pixels as one float32
    (size, size) matrix: ``blurred = matrix @ line``. The border is reflected (x[-1] = x[1]), so
    the end pixels weigh their single neighbour 1/2."""
    one = torch.zeros(size, size, dtype=torch.float64)
    index = torch.arange(size)
    one[index, index] = BLUR_FILTER[1]
    one[index[1:], index[:-1]] = BLUR_FILTER[0]
    one[index[:-1], index[1:]] = BLUR_FILTER[2]
    one[0, 1] = BLUR_FILTER[0] + BLUR_FILTER[2]
    one[size - 1, size - 2] = BLUR_FILTER[0] + BLUR_FILTER[2]
    return torch.linalg.matrix_power(one, steps).to(torch.float32)


def random_bit_words(bits: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``bits`` fair random bits packed 32 to an int64 entry: int64 ``(ceil(bits / 32),)`` of
    values in [0, 2**32); bit ``j`` is bit ``j % 32`` of entry ``j // 32``. One draw of the
    generator per 32 bits (a draw per bit costs more than blurring them). On the generator's
    device (CPU when None)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 0:
        raise ValueError(f"bits must be a non-negative int, got {bits!r}")
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.empty((bits + 31) // 32, dtype=torch.int64, device=device).random_(0, 2**32, generator=generator)


def unpack_bits(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The first ``bits`` bits of :func:`random_bit_words`'s ``words`` as float32 0/1 ``(bits,)``."""
    if not isinstance(words, torch.Tensor) or words.dim() != 1 or words.dtype != torch.int64:
        raise ValueError(f"words must be an int64 (N,) tensor, got {_describe(words)}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= 32 * words.shape[0]:
        raise ValueError(f"bits must be an int in [0, {32 * words.shape[0]}] (32 per word), got {bits!r}")
    shifts = torch.arange(32, dtype=torch.int64, device=words.device)
    return words.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1).view(-1)[:bits].to(torch.float32)


def hybrid_mask(
    n: int,
    height: int = 28,
    width: int = 28,
    blur_steps: int = BLUR_STEPS,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """``n`` random masks of large regions of ones and zeros: float32 ``(n, height, width)`` of 0/1.

    Each mask starts as a random bit image (ones with probability 1/2; the bits of all masks
    are :func:`random_bit_words`, in row-major order), is blurred ``blur_steps`` times with
    [1/4, 1/2, 1/4] horizontally and vertically (borders reflected; the passes are applied at
    once as :func:`blur_matrix` products), and is thresholded: 1 where the blurred value exceeds
    0.5. ``blur_steps=0`` returns the raw bits. The bits are drawn with ``generator`` on its
    device (CPU when None); the result is on ``device`` (default: the generator's device).
    """
    _check_mask_args(n, height, width, blur_steps)
    words = random_bit_words(n * height * width, generator)
    return _mask_from_words(words, n, height, width, blur_steps, device)


def _check_mask_args(n, height, width, blur_steps) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    _check_size("height", height)
    _check_size("width", width)
    if isinstance(blur_steps, bool) or not isinstance(blur_steps, int) or blur_steps < 0:
        raise ValueError(f"blur_steps must be a non-negative int, got {blur_steps!r}")
    if blur_steps and min(height, width) < 2:
        raise ValueError(f"blurring needs masks of at least 2 x 2 pixels, got {height} x {width}")


def _mask_from_words(words: torch.Tensor, n: int, height: int, width: int, blur_steps: int, device) -> torch.Tensor:
    """:func:`hybrid_mask` from its drawn bits: float32 (n, height, width) 0/1 on ``device``
    (default: the words' device)."""
    x = unpack_bits(words, n * height * width).view(n, height, width)
    x = x.to(device=device if device is not None else words.device)
    if n and blur_steps:
        # Blurring is linear: all passes in both directions are two small matrix products.
        rows = blur_matrix(height, blur_steps).to(x.device)
        cols = blur_matrix(width, blur_steps).to(x.device)
        x = ((rows @ x @ cols.t()) > 0.5).to(torch.float32)
    return x


def hybrid_images(images_a: torch.Tensor, images_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``images_a * mask + images_b * (1 - mask)``: each pixel from exactly one of the two images.

    The mask must be binary (0/1 or bool; anything else raises ValueError); the pixels are
    selected, not computed, so a hybrid pixel equals its source pixel exactly.

    images_a, images_b: the same shape and floating dtype, ``(B, H, W)``, ``(B, C, H, W)`` or
    flattened ``(B, H * W)`` (then the mask's ``(B, H, W)`` is flattened to match).
    mask: 0/1 values ``(B, H, W)`` (one mask per pair, shared by all channels), or already the
    images' shape. Returns a new tensor with the images' shape, dtype and device.
    """
    for name, t in (("images_a", images_a), ("images_b", images_b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {_describe(t)}")
    if images_a.shape != images_b.shape or images_a.dtype != images_b.dtype:
        raise ValueError(f"images_a and images_b must match, got {_describe(images_a)} and {_describe(images_b)}")
    if images_a.device != images_b.device:
        raise ValueError(f"images_a and images_b must be on one device, got {images_a.device} and {images_b.device}")
    if images_a.dim() not in (2, 3, 4):
        raise ValueError(f"images must be (B, H*W), (B, H, W) or (B, C, H, W), got {_describe(images_a)}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {_describe(mask)}")
    m = _mask_like(mask, images_a)
    check_on_device("hybrid_images", "mask", ((m != 0) & (m != 1)).any(), "must hold only 0 and 1 (or False and True)")
    return _mix(images_a, images_b, m)


def _mask_like(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``mask`` (B, H, W), or the images' shape, as a view that broadcasts against ``images``."""
    batch = images.shape[0]
    if mask.shape == images.shape:
        return mask
    if images.dim() == 2 and mask.dim() == 3 and mask.shape[0] == batch and mask[0].numel() == images.shape[1]:
        return mask.reshape(batch, -1)
    if images.dim() == 4 and mask.shape == (batch, *images.shape[2:]):
        return mask.unsqueeze(1)
    raise ValueError(
        f"mask must have shape (B, H, W) matching images {_describe(images)} (or the images' shape), "
        f"got {_describe(mask)}"
    )


def _mix(images_a: torch.Tensor, images_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """images_a where mask, else images_b; mask 0/1 broadcastable to the images."""
    return torch.where(mask.to(device=images_a.device, dtype=torch.bool), images_a, images_b)


def random_partners(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation ``j`` of ``0..n-1`` with ``j[i] != i`` for every i (n >= 2): int64 (n,).

    A random order ``o`` is drawn and ``o[i]`` is paired with ``o[i + 1]`` (cyclically), so every
    row is mixed with another row and every row is used once as the second image. ``n = 1``
    gives ``[0]`` (there is no other row). Drawn on the generator's device (CPU when None).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(n, generator=generator, device=device)
    partners = torch.empty_like(order)
    partners[order] = order.roll(-1)
    return partners


def hybrid_negatives(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    blur_steps: int = BLUR_STEPS,
    height: int = 28,
    width: int = 28,
) -> torch.Tensor:
    """Negative data for a batch of real images: each image mixed with another image of the batch.

    images: float ``(B, height * width)``, ``(B, height, width)`` or ``(B, C, height, width)``,
    B >= 2. Row i of the result is ``hybrid_images(images[i], images[j[i]], mask_i)`` with
    ``j = random_partners(B)`` and a fresh :func:`hybrid_mask` per row (drawn after j). Same
    shape, dtype and device as ``images``; random numbers come from ``generator``. Single-channel
    contiguous float32 images on the CPU are mixed by one compiled pass (``hybrid_mix``,
    csrc/hybrid_cpu.cpp: the same bits and blur products, a mask pixel flipping only where its
    blurred value rounds to the other side of 0.5), others by torch ops.
    """
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a floating-point torch.Tensor, got {_describe(images)}")
    flat_ok = images.dim() == 2 and images.shape[1] == height * width
    map_ok = images.dim() in (3, 4) and tuple(images.shape[-2:]) == (height, width)
    if not (flat_ok or map_ok):
        raise ValueError(
            f"images must be (B, {height * width}), (B, {height}, {width}) or (B, C, {height}, {width}), "
            f"got {_describe(images)}"
        )
    batch = images.shape[0]
    if batch < 2:
        raise ValueError(f"hybrid negatives need at least 2 images to mix, got {batch}")
    _check_mask_args(batch, height, width, blur_steps)
    partners = random_partners(batch, generator).to(images.device)
    words = random_bit_words(batch * height * width, generator)
    maps = images.reshape(batch, -1, height, width)
    if cpu_ops_take(images) and words.is_cpu and maps.shape[1] == 1 and images.is_contiguous():
        out = torch.empty_like(images)
        blur = [blur_matrix(size, blur_steps) if blur_steps else torch.eye(size) for size in (height, width)]
        torch.ops.ff_kernels.hybrid_mix(maps.view(batch, height, width), partners, words, *blur,
                                        out.view(batch, height, width))
        return out
    mask = _mask_from_words(words, batch, height, width, blur_steps, images.device)
    return _mix(images, images[partners], _mask_like(mask, images))
