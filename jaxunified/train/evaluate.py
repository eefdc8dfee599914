"""Evaluation of a finished (or running) workdir: restore the latest state and ask the task."""

from __future__ import annotations

import json
import pathlib

import jax

from jaxunified.train.checkpoint import Checkpointer, abstract_with_shardings
from jaxunified.train.loop import Trainer


def evaluate_run(config, workdir, split: str = "test") -> dict:
    workdir = pathlib.Path(workdir)
    trainer = Trainer(config, workdir)
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(
            f"no checkpoint in {workdir}/checkpoints; train first with "
            f"`python train.py --config <same config> --workdir {workdir}`"
        )
    state = ckpt.restore(abstract_with_shardings(trainer.abstract_state, trainer.state_shardings))
    ckpt.close()
    step = int(jax.device_get(state.step))
    metrics = {k: float(v) for k, v in trainer.task.evaluate(state, split, workdir, step).items()}
    metrics["step"] = step
    (workdir / f"eval_{split}.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return metrics
