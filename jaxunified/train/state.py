"""The train state shared by every task, and the generic update around a task's gradient function."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from jaxunified.parallel import mesh as meshlib
from jaxunified.train.optim import make_optimizer
from jaxunified.train.task import get_task


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a plain pytree so it shards, donates and checkpoints as one.

    ``params`` is a dict of named sub-models (e.g. ``generator``, ``disc``); ``collections`` holds
    their non-parameter state (``batch_stats``, ``codebook``) under the same names. ``ema_params``
    mirrors ``params`` when weight EMA is on, else is an empty dict.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    collections: Any
    ema_params: Any
    rng: jax.Array


def create(params, collections, tx: optax.GradientTransformation, rng, ema: bool) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        collections=collections,
        ema_params=jax.tree.map(jnp.copy, params) if ema else {},
        rng=rng,
    )


# grad_fn(params, collections, batch, rng, step, axis_name) -> (grads, new_collections, metrics)
GradFn = Callable[..., tuple[Any, Any, dict]]


def apply_update(
    state: TrainState,
    grads,
    collections,
    tx: optax.GradientTransformation,
    ema_decay: float | None,
) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema_decay:
        ema = optax.incremental_update(params, ema, step_size=1.0 - ema_decay)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         collections=collections, ema_params=ema)


def make_train_step(grad_fn: GradFn, tx, ema_decay: float | None, axis_name=None):
    """The whole step: task gradients → (cross-device mean when per-device) → optimizer → EMA.

    With ``axis_name`` the function is meant to run inside ``jax.shard_map``: the task sees only its
    device's shard of the batch, and gradients/metrics are averaged over the named axes, which is
    exactly the data-parallel (pmap) step. Without it, it runs in global view under ``jax.jit``.
    """

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        grads, collections, metrics = grad_fn(state.params, state.collections, batch, rng, state.step, axis_name)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            metrics = jax.lax.pmean(metrics, axis_name)
        new = apply_update(state, grads, collections, tx, ema_decay)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        return new, metrics

    return step


@dataclasses.dataclass
class StateLayout:
    """A run's train state before any array exists: what restore, the loop and AOT all start from."""

    task: Any
    tx: optax.GradientTransformation
    ema_decay: float | None
    init_fn: Callable[[jax.Array], TrainState]  # rng -> TrainState with logical boxes
    abstract: TrainState  # ShapeDtypeStructs, unboxed
    shardings: Any  # NamedShardings of the same tree

    @property
    def target(self) -> TrainState:
        """``abstract`` with each leaf carrying its sharding (a restore or lowering target)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract, self.shardings)


def abstract_state(config, mesh, *, task=None) -> StateLayout:
    """Shapes and shardings of ``config``'s train state over ``mesh`` (``task`` built when not given)."""
    task = get_task(config.task)(config, mesh) if task is None else task
    tx = make_optimizer(config.optim, task.param_labels, task.group_lr())
    ema = config.optim.get("ema_decay", None)
    ema_decay = float(ema) if ema else None

    def init_fn(rng):
        params, collections = task.init_variables(rng, task.dummy_batch())
        return create(params, collections, tx, rng, ema=bool(ema_decay))

    boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(int(config.seed)))
    rules = meshlib.rules_from_config(config.get("logical_rules"))
    return StateLayout(task, tx, ema_decay, init_fn, meshlib.unbox(boxed),
                       meshlib.tree_shardings(boxed, mesh, rules))
