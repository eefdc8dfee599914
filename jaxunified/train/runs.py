"""Runs on disk: a workdir's config, its restored state, and its model as a frozen part of another run.

``load_run(workdir) -> (config, model, variables)`` is how a task takes a sub-model from an earlier
run (TokLIP's VQ tokenizer and teacher, DualToken's initial tower, later the MLLM's and STAR's
parts) without importing that run's task module: it dispatches on the saved ``config.task``
through ``Task.export``. A run writes ``config.json`` when it starts; a config can also be given
as a file spec (``configs/siglip.py:shapes``) plus overrides, which the built-in pipeline uses.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
from typing import Any

import jax
import ml_collections as mlc

from jaxunified.parallel import mesh as meshlib
from jaxunified.train.checkpoint import Checkpointer
from jaxunified.train.state import abstract_state
from jaxunified.train.task import get_task


def load_config(spec: str, overrides: dict[str, Any] | None = None) -> mlc.ConfigDict:
    """``"configs/siglip.py:shapes"`` → that file's ``get_config("shapes")``; ``overrides`` are dotted keys."""
    path, _, arg = str(spec).partition(":")
    file = pathlib.Path(path)
    if not file.is_absolute() and not file.exists():
        file = pathlib.Path(__file__).resolve().parents[2] / path  # relative to the repository root
    if not file.exists():
        raise FileNotFoundError(f"config file {path!r} not found (from spec {spec!r})")
    module_spec = importlib.util.spec_from_file_location(f"_jaxunified_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg else module.get_config()
    for key, value in (overrides or {}).items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def save_config(config, workdir) -> None:
    path = pathlib.Path(workdir) / "config.json"
    path.write_text(config.to_json_best_effort(indent=1, sort_keys=True))


def read_run_config(workdir) -> mlc.ConfigDict:
    """The ``config.json`` a run wrote into its workdir (lists where the config had tuples)."""
    path = pathlib.Path(workdir).expanduser() / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; pass the run's config explicitly")
    return mlc.ConfigDict(json.loads(path.read_text()))


def run_config(workdir, config=None) -> mlc.ConfigDict:
    """``config`` as a ConfigDict: given, a spec string, or (None/"") the run's own ``config.json``."""
    if not config:
        return read_run_config(workdir)
    return load_config(config) if isinstance(config, str) else config


TEXT_FIELDS = ("tokenizer", "path", "max_len", "eos", "canonicalize")


def check_same_text(ours, workdir, config=None) -> None:
    """A run that feeds captions to the text tower of the run in ``workdir`` must tokenize them as
    that run did; raises naming each setting that differs. No-op without caption tokens."""
    if ours is None or not ours.get("tokenizer"):
        return
    theirs = run_config(workdir, config).data.get("text")
    if theirs is None:
        return
    diff = {k: (ours.get(k), theirs.get(k)) for k in TEXT_FIELDS if ours.get(k) != theirs.get(k)}
    if diff:
        raise ValueError(
            f"data.text differs from the text tower's training run {workdir}: "
            + ", ".join(f"{k}={a!r} (run: {b!r})" for k, (a, b) in diff.items())
            + "; set data.text to the run's settings"
        )


def restore_state(workdir, config, *, task=None, devices=None, mesh=None):
    """``(task, state)``: the latest checkpoint of ``workdir`` laid out for ``config``'s mesh.

    Raises ``FileNotFoundError`` naming the command to run first."""
    workdir = pathlib.Path(workdir).expanduser()
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"no checkpoint in {workdir}/checkpoints: train that run first "
                f"(python train.py --config <its config> --workdir {workdir})"
            )
        if mesh is None:
            mesh = getattr(task, "mesh", None) or meshlib.make_mesh(tuple(config.mesh_shape), devices)
        layout = abstract_state(config, mesh, task=task)
        return layout.task, ckpt.restore(layout.target)
    finally:
        ckpt.close()


def load_run(workdir, config=None, *, prefer_ema: bool = True, devices=None):
    """``(config, model, variables)`` of the run in ``workdir``: the module the run's task exports
    and its host-resident variables (EMA weights when the run kept them and ``prefer_ema``).

    ``config`` defaults to the run's ``config.json``; a spec string or ConfigDict also works."""
    config = run_config(workdir, config)
    task, state = restore_state(workdir, config, devices=devices)
    params = state.ema_params if (prefer_ema and state.ema_params) else state.params
    model, variables = task.export(jax.device_get(params), jax.device_get(state.collections))
    return config, model, variables


def model_config(workdir, config=None):
    """The exported model's dataclass config of a run, without restoring its checkpoint (a task whose
    model's shape follows its frozen parts, TokLIP, reads those parts' configs or files)."""
    config = run_config(workdir, config)
    return get_task(config.task).model_config(config)
