"""The one training loop every task uses: sharded init, resume, jitted step, metrics, eval, checkpoints.

Behaviour a user relies on:
* re-running the same command in the same workdir resumes from the latest checkpoint (train state
  and data-iterator position), so an interrupted run ends with the same parameters as an
  uninterrupted one;
* SIGTERM (preemption) saves a checkpoint at the current step and exits cleanly; in a multi-process
  run (``jaxunified.parallel.distributed``) a SIGTERM to any process makes every process save the
  same step (JAX's preemption sync point) and exit;
* every process of a multi-process run takes part in each checkpoint save and restore (each writes
  its own shards and data-iterator position); only process 0 writes metrics and the config; such
  a run does not evaluate (``eval.py`` does, in one process, from its checkpoint);
* a NaN/Inf loss stops the run naming the step; checkpoints are only ever written from finite
  states, so the last good one is kept.
"""

from __future__ import annotations

import logging
import math
import pathlib
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxunified.data.pipeline import to_global
from jaxunified.parallel import mesh as meshlib
from jaxunified.train import state as statelib
from jaxunified.train.checkpoint import Checkpointer
from jaxunified.train.metrics import MetricWriter
from jaxunified.train.runs import save_config

log = logging.getLogger("jaxunified.train")


class NonFiniteLossError(RuntimeError):
    pass


def with_axis_rules(fn, rules):
    """``fn`` traced under ``rules``: the models' activation constraints (``nn.with_logical_constraint``,
    a no-op without rules) then shard what they name, e.g. logits over the batch axes."""

    def traced(*args):
        with nn.logical_axis_rules(rules):
            return fn(*args)

    return traced


class Trainer:
    """Holds the pieces of a run; ``train.py`` calls ``run()``, tests drive the parts directly."""

    def __init__(self, config, workdir: str | pathlib.Path, devices=None):
        self.config = config
        self.workdir = pathlib.Path(workdir)
        self.mesh = meshlib.make_mesh(tuple(config.mesh_shape), devices)
        self.layout = statelib.abstract_state(config, self.mesh)
        self.task, self.tx, self.ema_decay = self.layout.task, self.layout.tx, self.layout.ema_decay
        self.state_shardings = self.layout.shardings
        self.abstract_state = self.layout.abstract
        self.rules = meshlib.rules_from_config(config.get("logical_rules"))

    # ---- state ----
    def init_state(self):
        key = jax.random.PRNGKey(int(self.config.seed))
        init_fn = self.layout.init_fn
        init = jax.jit(lambda k: meshlib.unbox(init_fn(k)), out_shardings=self.state_shardings)
        with jax.set_mesh(self.mesh):
            return init(key)

    # ---- step ----
    def batch_shardings(self, batch: dict[str, Any]):
        return {k: meshlib.batch_sharding(self.mesh, len(np.shape(v))) for k, v in batch.items()}

    def make_step(self, batch_example: dict[str, Any]):
        per_device = self.config.get("step_form", "global") == "per_device"
        grad_fn = self.task.grad_fn
        if per_device:
            axes = meshlib.BATCH_AXES
            inner = statelib.make_train_step(grad_fn, self.tx, self.ema_decay, axis_name=axes)
            batch_specs = {k: P(axes) for k in batch_example}
            fn = jax.shard_map(
                inner, mesh=self.mesh, in_specs=(P(), batch_specs), out_specs=(P(), P()), check_vma=False
            )
        elif self.config.get("step_form", "global") == "global":
            fn = with_axis_rules(statelib.make_train_step(grad_fn, self.tx, self.ema_decay, axis_name=None),
                                 self.rules)
        else:
            raise ValueError(f"config.step_form={self.config.step_form!r}; use 'global' or 'per_device'")
        return jax.jit(
            fn,
            in_shardings=(self.state_shardings, self.batch_shardings(batch_example)),
            out_shardings=(self.state_shardings, NamedSharding(self.mesh, P())),
            donate_argnums=(0,),
            compiler_options=self.compiler_options(),
        )

    def compiler_options(self) -> dict[str, Any] | None:
        """``config.xla_cpu_options`` when the mesh is on CPU devices (None elsewhere)."""
        opts = self.config.get("xla_cpu_options") or {}
        if not opts or self.mesh.devices.flat[0].platform != "cpu":
            return None
        return {str(k): v for k, v in (opts.to_dict() if hasattr(opts, "to_dict") else dict(opts)).items()}

    # ---- the run ----
    def run(self) -> Any:
        cfg = self.config
        self.workdir.mkdir(parents=True, exist_ok=True)
        is_main = jax.process_index() == 0
        if is_main:
            save_config(cfg, self.workdir)
        writer = MetricWriter(self.workdir, enabled=is_main)
        ckpt = Checkpointer(self.workdir / "checkpoints", keep=int(cfg.get("keep_checkpoints", 3)))
        data_iter = iter(self.task.build_dataset("train"))

        if ckpt.latest_step() is not None:
            state = ckpt.restore(self.layout.target, data_iter)
            log.info("resumed from step %d in %s", int(state.step), ckpt.directory)
        else:
            state = self.init_state()
        start = int(jax.device_get(state.step))
        total = int(cfg.total_steps)
        multi = jax.process_count() > 1
        # The evaluators read each batch's results on one host; several processes evaluate with eval.py.
        evaluate = not multi
        if multi and cfg.get("eval_every") is not None and (cfg.get("eval_every") or cfg.get("final_eval", True)):
            log.warning("a multi-process run skips evaluation; afterwards run python eval.py with the same "
                        "--config and --workdir (one process)")

        stop = {"signal": None}

        def on_term(signum, frame):  # preemption: finish the current step, save, exit cleanly
            stop["signal"] = signum

        # Several processes must agree on the step to save at: JAX's preemption service (started by
        # jax.distributed.initialize; it catches SIGTERM itself) tells every process the same one.
        old_handler = None if multi else signal.signal(signal.SIGTERM, on_term)
        step_fn = None
        pending = None  # (step, metrics) of the previous step, checked one step late so dispatch overlaps
        window: list[dict] = []
        t0, n0 = time.time(), start
        progress = _progress(start, total, enabled=is_main and cfg.get("progress", True))
        try:
            for step in range(start, total):
                host_batch = next(data_iter)
                batch = to_global(host_batch, self.mesh)
                if step_fn is None:
                    step_fn = self.make_step(batch)
                with jax.set_mesh(self.mesh):
                    state, metrics = step_fn(state, batch)
                if pending is not None:
                    window.append(_check_finite(*pending))
                pending = (step + 1, metrics)
                done = step + 1
                if multi and _reached_preemption_sync_point(done):
                    stop["signal"] = "preemption notice (SIGTERM)"
                if done % int(cfg.log_every) == 0 or done == total:
                    window.append(_check_finite(*pending))
                    pending = None
                    means = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                    rate = (done - n0) / max(time.time() - t0, 1e-9)
                    means["steps_per_sec"] = rate
                    writer.write(done, means)
                    progress.update(done, means)
                    window, t0, n0 = [], time.time(), done
                if evaluate and cfg.get("eval_every") and done % int(cfg.eval_every) == 0 and done != total:
                    self._evaluate(state, done, writer)
                if done % int(cfg.checkpoint_every) == 0 or done == total or stop["signal"]:
                    if pending is not None:
                        window.append(_check_finite(*pending))
                        pending = None
                    ckpt.save(done, state, data_iter, force=True)
                if stop["signal"]:
                    log.warning("received signal %s: saved step %d, exiting", stop["signal"], done)
                    break
            else:
                if evaluate and cfg.get("eval_every") is not None and cfg.get("final_eval", True):
                    self._evaluate(state, int(jax.device_get(state.step)), writer)
        except NonFiniteLossError:
            ckpt.wait()
            raise
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
            progress.close()
            ckpt.close()
            writer.close()
        return state

    def _evaluate(self, state, step: int, writer: MetricWriter):
        with nn.logical_axis_rules(self.rules):  # eval programs shard like the step's
            metrics = self.task.evaluate(state, "test", self.workdir, step)
        writer.write(step, metrics, prefix="eval")
        log.info("eval at step %d: %s", step, {k: round(float(v), 4) for k, v in metrics.items()})
        return metrics


def _reached_preemption_sync_point(step: int) -> bool:
    """Whether every process has been told to save at ``step`` after some process got SIGTERM
    (call at every step, on every process); False when JAX's preemption service is off."""
    from jax.experimental import multihost_utils

    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service=False
        return False


def _check_finite(step: int, metrics) -> dict[str, float]:
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    loss = host.get("loss", 0.0)
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}; stopping. The last good checkpoint is kept; "
            "lower the learning rate or check the data, then re-run to resume from it."
        )
    return host


class _progress:
    def __init__(self, start: int, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0)
        self.last = start

    def update(self, step: int, metrics: dict):
        if self.bar is None:
            return
        self.bar.update(step - self.last)
        self.last = step
        shown = {k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "psnr", "usage", "steps_per_sec")}
        self.bar.set_postfix(shown, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train(config, workdir) -> Any:
    return Trainer(config, workdir).run()
