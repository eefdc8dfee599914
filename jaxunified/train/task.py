"""What a task module provides to the shared loop, and the registry of tasks."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

# task name -> "module:Class"
TASKS = {
    "vqgan": "jaxunified.train.vqgan:VQGANTask",
    "siglip": "jaxunified.train.siglip:SigLIPTask",
    "dualtoken": "jaxunified.train.dualtoken:DualTokenTask",
    "toklip": "jaxunified.train.toklip:TokLIPTask",
}


class Task:
    """Base class. A task builds its models, initial variables, gradients and eval; never the loop.

    Subclasses implement:
      * ``init_variables(rng, batch) -> (params, collections)``: dicts keyed by sub-model name;
        leaves may be logically-partitioned boxes.
      * ``grad_fn(params, collections, batch, rng, step, axis_name) -> (grads, collections, metrics)``:
        gradients for every param leaf (zeros for frozen ones are fine; the optimizer ignores them).
        When ``axis_name`` is set the function runs per device inside ``shard_map`` and must
        reduce anything that needs the global batch (EMA stats, BN stats, adaptive weights) itself;
        the loop averages the returned gradients and metrics.
      * ``evaluate(state, split, workdir, step) -> dict`` for eval.py and periodic eval.
    and may override ``param_labels`` (optimizer groups; ``"frozen"`` = not trained) and ``group_lr``.
    """

    def __init__(self, config, mesh):
        self.config = config
        self.mesh = mesh

    def dummy_batch(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def init_variables(self, rng, batch):
        raise NotImplementedError

    def param_labels(self, params) -> Any:
        return None

    def group_lr(self) -> dict[str, float]:
        return {}

    def grad_fn(self, params, collections, batch, rng, step, axis_name=None):
        raise NotImplementedError

    def build_dataset(self, split: str):
        """The run's host batches for ``split``; tasks with cached inputs (TokLIP codes) override it."""
        from jaxunified.data.pipeline import build_dataset

        return build_dataset(self.config.data, split, self.mesh)

    def evaluate(self, state, split: str, workdir, step: int) -> dict:
        raise NotImplementedError


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    mod, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(mod), cls)
