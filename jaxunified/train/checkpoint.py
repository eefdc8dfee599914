"""Orbax checkpoints of the train state with the grain iterator state saved beside it.

Restores go against an abstract target carrying the *current* run's shardings, so a run can
resume on a different mesh than the one that saved it.
"""

from __future__ import annotations

import logging
import pathlib

import grain
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data"),
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter=None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state, data_iter=None, step: int | None = None):
        """Restores ``step`` (default latest) into the layout of ``abstract_state``.

        ``abstract_state`` is a tree of ``jax.ShapeDtypeStruct`` with ``sharding`` set; ``data_iter``
        (if given) has its position set in place.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        has_data = (self.directory / str(step) / "data").exists()
        if data_iter is not None and has_data:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:  # tree structure/shape mismatch: name it and the likely fix
            raise ValueError(
                f"checkpoint at {self.directory}/{step} does not match this run's train state ({e}). "
                "Use a fresh --workdir, or the config that wrote this checkpoint."
            ) from e
        return out["state"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

