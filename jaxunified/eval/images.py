"""Image grids and PNG files: reconstructions now, samples from the generators next."""

from __future__ import annotations

import pathlib

import numpy as np


def image_grid(images: np.ndarray, ncol: int = 8) -> np.ndarray:
    """[N, H, W, 3] in [-1, 1] → one uint8 grid image."""
    x = np.asarray(images, np.float32)
    x = np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    n, h, w, c = x.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + 2) + 2, ncol * (w + 2) + 2, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = x[i]
    return grid


def save_png(path: str | pathlib.Path, image_uint8: np.ndarray, upscale: int = 1):
    from PIL import Image

    img = Image.fromarray(image_uint8)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
