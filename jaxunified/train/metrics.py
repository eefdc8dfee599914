"""Metric sinks: a JSONL file, TensorBoard event files, PNG grids."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Mapping

import numpy as np


def _scalar(v) -> float:
    return float(np.asarray(v))


class MetricWriter:
    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, tensorboard: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tb"))

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train"):
        if not self.enabled:
            return
        row = {"step": int(step), "split": prefix}
        for k, v in scalars.items():
            x = _scalar(v)
            row[k] = x if math.isfinite(x) else str(x)
            if self._tb is not None:
                self._tb.add_scalar(f"{prefix}/{k}", x, int(step))
        self._jsonl.write(json.dumps(row) + "\n")

    def flush(self):
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


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
