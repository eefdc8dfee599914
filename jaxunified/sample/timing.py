"""Sampling throughput: the KV-cache decode against recomputing the whole sequence per token.

``time_decode`` times one jitted sampler call (compile excluded: a first call warms it up).
``time_recompute`` estimates what a no-cache sampler costs: token n needs a full causal forward
over the n tokens so far, so it times jitted forwards at ``points`` lengths spread over the
decode and integrates their time over every length (a Python loop of real recompute steps
would need one compile per length, which is what it measures against, not what it costs).
Figures are tokens/s of *generated* tokens over the whole batch (CFG rows not counted twice).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np


def time_decode(fn: Callable[[], Any], repeats: int = 1) -> float:
    """Seconds per call of ``fn`` (already jitted; one untimed call compiles it)."""
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / repeats


def time_recompute(forward: Callable[[int], Any], start: int, stop: int, points: int = 6) -> float:
    """Estimated seconds for ``forward(L)`` at every length L in [start, stop): timed at ``points``
    lengths (each compiled first), then integrated with the trapezoid rule."""
    lengths = np.unique(np.linspace(start, stop - 1, points).astype(int))
    secs = []
    for n in lengths:
        jax.block_until_ready(forward(int(n)))
        t0 = time.perf_counter()
        jax.block_until_ready(forward(int(n)))
        secs.append(time.perf_counter() - t0)
    if len(lengths) == 1:
        return float(secs[0]) * (stop - start)
    per = np.interp(np.arange(start, stop), lengths, secs)
    return float(per.sum())
