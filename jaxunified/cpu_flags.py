"""XLA:CPU options the project sets for the processes it starts (train.py, eval.py, bench, tests).

XLA:CPU 0.10 routes convolutions and their fusions through YNNPACK by default; its weight gradient
of a 3×3 conv (backprop-filter) then runs ~6× slower than the Eigen path (2.4 s vs 0.40 s for
128 channels at 256², batch 2), which made every conv model train slower than PyTorch on the same
CPU. Turning the YNN fusions off roughly halves the VQ-16 train step and speeds up the ViT towers a
little; forward results agree to float32 rounding. The option only affects the CPU compiler, so a
TPU/GPU process carrying it compiles as before.

A user's own ``XLA_FLAGS`` entry for the same option wins. The flags must be in the environment
before JAX initialises its backends; :func:`apply` says so when it is too late.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def merged(xla_flags: str) -> str:
    """``xla_flags`` plus every :data:`CPU_FLAGS` option it does not already set."""
    given = {f.lstrip("-").split("=", 1)[0] for f in xla_flags.split()}
    extra = [f"--{k}={v}" for k, v in CPU_FLAGS.items() if k not in given]
    return " ".join([xla_flags.strip(), *extra]).strip()


def apply() -> bool:
    """Adds the project's XLA:CPU options to ``XLA_FLAGS`` unless the run is for a platform other than
    the CPU (``JAX_PLATFORMS``). Returns whether the environment changed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.split(","):
        return False
    old = os.environ.get("XLA_FLAGS", "")
    new = merged(old)
    if new == old:
        return False
    if _backends_started():
        log.warning("JAX already initialised its backends; XLA:CPU options %s not applied", CPU_FLAGS)
        return False
    os.environ["XLA_FLAGS"] = new
    return True


def _backends_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except ImportError:  # a JAX without the private module: assume it is not too late
        return False


__all__ = ["CPU_FLAGS", "apply", "merged"]
