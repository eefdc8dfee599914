"""Evaluation of a finished (or running) workdir: restore the latest state and ask the task."""

from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax

from jaxunified.parallel import mesh as meshlib
from jaxunified.train.runs import restore_state


def evaluate_run(config, workdir, split: str = "test") -> dict:
    workdir = pathlib.Path(workdir)
    task, state = restore_state(workdir, config)
    step = int(jax.device_get(state.step))
    with nn.logical_axis_rules(meshlib.rules_from_config(config.get("logical_rules"))):
        metrics = {k: float(v) for k, v in task.evaluate(state, split, workdir, step).items()}
    metrics["step"] = step
    (workdir / f"eval_{split}.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return metrics
