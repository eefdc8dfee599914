"""The train state shared by every task, and the generic update around a task's gradient function."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


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
