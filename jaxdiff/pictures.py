"""PNG pictures of samples: grids, DDIM trajectories, guidance sweeps and 2-D scatter plots.

Images come in as float arrays in [-1, 1] (what `jaxdiff.sample` returns), NHWC, and are written
as uint8 PNGs through PIL with a one-pixel white border between tiles. Images smaller than 32
pixels are enlarged (nearest neighbour) so that an 8x8 digit is visible.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw

MIN_TILE = 32  # tiles smaller than this many pixels are enlarged by an integer factor


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] -> uint8 in [0, 255] (round to nearest), as a NumPy array for saving."""
    images = np.asarray(images, np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def tile(images, nrow: int) -> np.ndarray:
    """Images [N, H, W, C] in [-1, 1] -> one uint8 grid [rows*(H+1)+1, nrow*(W+1)+1, C] with
    `nrow` images per row (torchvision's convention) and white borders; empty cells are white."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, H, W, C] batch, got shape "
                         f"{images.shape}")
    if not (isinstance(nrow, int) and nrow >= 1):
        raise ValueError(f"nrow (images per row) must be a positive integer, got {nrow!r}")
    n, h, w, c = images.shape
    nrow = min(nrow, n)
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, np.uint8)
    for i, image in enumerate(to_uint8(images)):
        r, col = divmod(i, nrow)
        grid[1 + r * (h + 1):(r + 1) * (h + 1), 1 + col * (w + 1):(col + 1) * (w + 1)] = image
    return grid


def _write(grid: np.ndarray, tile_size: int, path: str) -> str:
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    scale = max(1, MIN_TILE // tile_size)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    return path


def save_grid(images, path: str, nrow: int = 8) -> str:
    """Writes images [N, H, W, C] in [-1, 1] as a PNG grid, `nrow` images per row; returns path."""
    grid = tile(images, nrow)
    return _write(grid, np.shape(images)[1], path)


def save_trajectory(trajectory: dict, path: str, num_frames: int = 10) -> str:
    """A DDIM trajectory strip: per sample, a row of x_t and below it a row of the predicted x_0,
    at `num_frames` steps spaced evenly from the first (pure noise) to the last; x_t is clipped
    to [-1, 1] for display.

    `trajectory` is `jaxdiff.sample(..., return_trajectory=True)[1]`: {"xt", "pred_x0"}, each
    [num_steps, N, H, W, C].
    """
    xt, pred_x0 = np.asarray(trajectory["xt"]), np.asarray(trajectory["pred_x0"])
    if xt.ndim != 5 or xt.shape != pred_x0.shape:
        raise ValueError(f"trajectory 'xt' and 'pred_x0' must both be [steps, N, H, W, C], got "
                         f"{xt.shape} and {pred_x0.shape}")
    steps = np.unique(np.round(np.linspace(0, xt.shape[0] - 1, min(num_frames, xt.shape[0]))))
    steps = steps.astype(int)
    rows = [frames[steps, i] for i in range(xt.shape[1]) for frames in (np.clip(xt, -1, 1),
                                                                           pred_x0)]
    return save_grid(np.concatenate(rows), path, nrow=len(steps))


def save_guidance_sweep(images, path: str) -> str:
    """A guidance-scale sweep: images [num_scales, num_classes, H, W, C] in [-1, 1], one row per
    scale (in the order given), one column per class."""
    images = np.asarray(images)
    if images.ndim != 5:
        raise ValueError(f"images must be [num_scales, num_classes, H, W, C], got shape "
                         f"{images.shape}")
    return save_grid(images.reshape(-1, *images.shape[2:]), path, nrow=images.shape[1])


def save_scatter(points, path: str, reference=None, size: int = 400) -> str:
    """A scatter plot of 2-D `points` (blue) over optional `reference` points (grey) as a PNG.

    Both share one square frame around the 99.5th percentile of |coordinate|, so the samples and
    the data they should match are drawn at the same scale.
    """
    points = np.asarray(points, np.float64)
    reference = np.zeros((0, 2)) if reference is None else np.asarray(reference, np.float64)
    for name, p in (("points", points), ("reference", reference)):
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"{name} must be [N, 2], got shape {p.shape}")
    both = np.concatenate([points, reference])
    finite = both[np.isfinite(both).all(axis=1)]
    lim = (float(np.percentile(np.abs(finite), 99.5)) if len(finite) else 1.0) * 1.15 + 1e-6
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for pts, colour in ((reference, (170, 170, 170)), (points, (31, 90, 200))):
        pixels = (pts + lim) / (2 * lim) * (size - 1)
        for x, y in pixels[np.isfinite(pixels).all(axis=1)]:
            y = size - 1 - y  # image rows grow downwards
            draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=colour)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    return path
