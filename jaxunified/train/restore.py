"""Reading a finished run back: its config and its (EMA) parameters, for use as a frozen part.

TokLIP's teacher and VQ tokenizer, DualToken's initial tower: all come out of earlier runs'
workdirs. A run writes ``config.json`` at start; the config can also be given as a file spec
(``configs/siglip.py:shapes``) plus overrides, which is what the built-in pipeline does.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
from typing import Any

import jax
import ml_collections as mlc


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


def restore_params(workdir, config, *, prefer_ema: bool = True, devices=None) -> tuple[dict, dict]:
    """The latest checkpoint of the run in ``workdir`` trained with ``config``.

    Returns ``(params, collections)`` as host-resident numpy trees (EMA weights when the run kept
    them and ``prefer_ema``). Raises ``FileNotFoundError`` naming the command to run first.
    """
    from jaxunified.train.checkpoint import Checkpointer, abstract_with_shardings
    from jaxunified.train.loop import Trainer

    workdir = pathlib.Path(workdir).expanduser()
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    if ckpt.latest_step() is None:
        ckpt.close()
        raise FileNotFoundError(
            f"no checkpoint in {workdir}/checkpoints: train that run first "
            f"(python train.py --config <its config> --workdir {workdir})"
        )
    trainer = Trainer(config, workdir, devices)
    state = ckpt.restore(abstract_with_shardings(trainer.abstract_state, trainer.state_shardings))
    ckpt.close()
    params = state.ema_params if (prefer_ema and state.ema_params) else state.params
    return jax.device_get(params), jax.device_get(state.collections)


def read_run_config(workdir) -> mlc.ConfigDict:
    """The ``config.json`` a run wrote into its workdir (lists where the config had tuples)."""
    path = pathlib.Path(workdir).expanduser() / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; pass the run's config explicitly")
    return mlc.ConfigDict(json.loads(path.read_text()))
