"""Figures like the paper's (PNG files, matplotlib's Agg backend; no display needed).

- :func:`plot_hybrid_example`: Figure 1, a hybrid negative image: digit a, digit b, the mask
  and the hybrid ``a * mask + b * (1 - mask)``.
- :func:`plot_receptive_fields`: Figure 2, the first-layer weights of a net: for FFLinear
  (N, 784) each unit's weights as a 28 x 28 image; for FFLocal2d the per-location weight
  blocks, placed where their windows lie in the input image (rows: locations, columns: the
  first channels).
- :func:`write_run_figures`: both for a trained recipe, into its run directory (what
  ``ff-train RECIPE --figures`` calls after training).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..functional.local import LocalSpec, local_weight_to_dense
from .data.hybrid import hybrid_images, hybrid_mask

HYBRID_FIGURE = "hybrid_example.png"
RECEPTIVE_FIELDS_FIGURE = "receptive_fields.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _as_image(t: torch.Tensor, name: str, height: int = 28, width: int = 28) -> torch.Tensor:
    """One image (H*W,), (H, W) or (1, H, W) -> float (H, W) on the CPU."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.numel() != height * width:
        raise ValueError(f"{name} must hold one {height} x {width} image, got shape {tuple(t.shape)}")
    return t.detach().float().cpu().reshape(height, width)


def plot_hybrid_example(path: str | os.PathLike, images: torch.Tensor, mask: torch.Tensor) -> Path:
    """Figure 1: ``images`` = two digit images (2, 784), (2, 28, 28) or (2, 1, 28, 28); ``mask``
    one 0/1 mask (28, 28) or (784,). Draws digit a, digit b, the mask and the hybrid in a row
    and writes a PNG to ``path``; returns the path."""
    if not isinstance(images, torch.Tensor) or images.shape[0] != 2:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be two images (2, 784), (2, 28, 28) or (2, 1, 28, 28), got {got}")
    a, b = (_as_image(images[i], f"images[{i}]") for i in range(2))
    m = _as_image(mask, "mask")
    hybrid = hybrid_images(a[None], b[None], m[None])[0]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(8, 2.3))
    for ax, image, title in zip(axes, (a, b, m, hybrid), ("digit a", "digit b", "mask", "hybrid (negative)")):
        ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=max(1.0, float(image.max())))
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _receptive_field_grid(weight, spec: LocalSpec | None, max_units: int, max_channels: int) -> torch.Tensor:
    """(rows, cols, h, w) images of the weights (NaN where a grid cell is empty)."""
    if spec is not None:  # FFLocal2d: each unit's block placed in the input map
        if weight.dim() != 3 or tuple(weight.shape) != tuple(spec.weight_shape):
            raise ValueError(f"weight must have shape {spec.weight_shape} for {spec}, got {tuple(weight.shape)}")
        dense = local_weight_to_dense(weight, spec)  # (C_out * L, C_in * H * W), unit o * L + l
        maps = dense.view(spec.out_channels, spec.num_locations, spec.in_channels, spec.in_height, spec.in_width)
        maps = maps[:max_channels, :, 0]  # the first input channel: (C, L, H, W)
        return maps.transpose(0, 1)  # rows: locations, columns: channels
    if weight.dim() == 3:  # raw local blocks (L, C_out, K) without geometry: k x k blocks, one input channel
        k = math.isqrt(weight.shape[2])
        if k * k != weight.shape[2]:
            raise ValueError(
                f"local weight blocks (L, C_out, K) need K = k * k to be drawn without a spec, got K = {weight.shape[2]}; "
                "pass the FFLocal2d layer instead"
            )
        return weight[:, :max_channels].reshape(weight.shape[0], -1, k, k)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (N, D), (L, C_out, K) or an FFLinear / FFLocal2d, got {tuple(weight.shape)}")
    n, d = weight.shape
    side = math.isqrt(d)
    if side * side != d:
        raise ValueError(f"each unit's weights must form a square image (D = 784 for MNIST), got D = {d}")
    n = min(n, max_units)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.full((rows * cols, side, side), float("nan"))
    grid[:n] = weight[:n].reshape(n, side, side)
    return grid.view(rows, cols, side, side)


def plot_receptive_fields(
    path: str | os.PathLike, weight, max_units: int = 100, max_channels: int = 8, spec: LocalSpec | None = None
) -> Path:
    """Figure 2: first-layer weights as images, one per unit, each scaled to its own range
    (black: most negative, white: most positive, grey: 0), tiled in one picture.

    ``weight``: an FFLinear / FFLocal2d layer, or its weight tensor. FFLinear (N, D) with D a
    square (784): the first ``max_units`` units in a square grid of 28 x 28 images. FFLocal2d
    (L, C_out, K): one row per location, the first ``max_channels`` channels, each unit's block
    drawn where its window lies in the input map (from the layer's ``spec``, or ``spec``
    given here; without one, the bare k x k blocks). Writes a PNG to ``path``; returns the path.
    """
    if isinstance(weight, torch.nn.Module):
        spec = getattr(weight, "spec", spec)
        weight = weight.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or an FF layer, got {type(weight).__name__}")
    grid = _receptive_field_grid(weight.detach().float().cpu(), spec, max_units, max_channels)
    rows, cols, height, width = grid.shape
    # One mosaic, each unit scaled to [-1, 1] by its own largest |weight|, 1-pixel gaps (NaN).
    scale = grid.flatten(2).abs().nan_to_num(0.0).amax(2).clamp_min(1e-12)[:, :, None, None]
    tiles = torch.full((rows, cols, height + 1, width + 1), float("nan"))
    tiles[:, :, :height, :width] = grid / scale
    mosaic = tiles.permute(0, 2, 1, 3).reshape(rows * (height + 1), cols * (width + 1))[:-1, :-1]
    plt = _pyplot()
    inches = max(2.0, min(12.0, 0.5 * max(rows, cols) * max(height, width) / 14))
    fig, ax = plt.subplots(figsize=(inches * mosaic.shape[1] / max(mosaic.shape), inches * mosaic.shape[0] / max(mosaic.shape)))
    cmap = plt.get_cmap("gray").with_extremes(bad="tab:blue")  # gaps between units
    ax.imshow(mosaic.numpy(), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.axis("off")
    fig.subplots_adjust(left=0, right=1, top=1, bottom=0)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_run_figures(recipe, run_dir: str | os.PathLike, seed: int = 0) -> list[Path]:
    """Figures of a trained recipe into ``run_dir``: the receptive fields of the first layer of
    ``recipe.model.net`` (:data:`RECEPTIVE_FIELDS_FIGURE`) and, for a recipe with hybrid negatives
    (one that has ``blur_steps`` in its config), a hybrid of a random training image and the next
    one of another class (else simply the next one; :data:`HYBRID_FIGURE`, drawn with ``seed``). Returns the written paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_receptive_fields(run_dir / RECEPTIVE_FIELDS_FIGURE, recipe.model.net[0])]
    blur_steps = getattr(recipe.config, "blur_steps", None)
    if blur_steps is not None and recipe.train_images.shape[0] >= 2:
        generator = torch.Generator().manual_seed(seed)
        labels = recipe.train_labels.cpu()
        n = labels.shape[0]
        first = int(torch.randint(n, (1,), generator=generator))
        later = ((labels != labels[first]) & (torch.arange(n) > first)).nonzero().flatten()
        second = int(later[0]) if len(later) else (first + 1) % n
        pair = recipe.train_images[[first, second]].cpu()
        mask = hybrid_mask(1, blur_steps=blur_steps, generator=generator)[0]
        written.append(plot_hybrid_example(run_dir / HYBRID_FIGURE, pair, mask))
    return written


__all__ = [
    "HYBRID_FIGURE", "RECEPTIVE_FIELDS_FIGURE", "plot_hybrid_example", "plot_receptive_fields", "write_run_figures",
]
