"""Metric sinks: a JSONL file and TensorBoard event files."""

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

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
