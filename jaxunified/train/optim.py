"""Optax optimizers from a config: AdamW/Adam, warmup + cosine, clipping, parameter groups, frozen parts.

Frozen sub-trees are labelled ``"frozen"`` and routed to ``optax.set_to_zero`` through
``optax.multi_transform``, so they hold no optimizer state (no Adam moments for a frozen teacher).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

FROZEN = "frozen"


def schedule(cfg: Mapping[str, Any], lr: float | None = None) -> optax.Schedule:
    """Linear warmup to ``lr`` then cosine (or constant) decay over ``total_steps``."""
    lr = cfg["lr"] if lr is None else lr
    warmup = int(cfg.get("warmup_steps", 0))
    total = int(cfg.get("total_steps", 0))
    kind = cfg.get("schedule", "cosine")
    end = lr * float(cfg.get("end_lr_factor", 0.0))
    if kind == "constant" or total <= 0:
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, max(total - warmup, 1), alpha=end / lr if lr else 0.0)
    else:
        raise ValueError(f"optim.schedule={kind!r}; use 'cosine' or 'constant'")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def decay_mask(params) -> Any:
    """Weight decay only on ≥2-D weights. Exempt, as in open_clip/TokLIP: 1-D and scalar params
    (norms, logit scale) and anything named ``bias`` — attention biases are 2-D ``[heads, head_dim]``."""

    def decays(path, p) -> bool:
        last = path[-1] if path else None
        name = str(getattr(last, "key", getattr(last, "name", "")))
        return jnp.ndim(p) >= 2 and name != "bias"

    return jax.tree_util.tree_map_with_path(decays, params)


def _one(cfg: Mapping[str, Any], lr: float | None = None) -> optax.GradientTransformation:
    name = cfg.get("name", "adamw")
    sched = schedule(cfg, lr)
    b1, b2, eps = float(cfg.get("b1", 0.9)), float(cfg.get("b2", 0.999)), float(cfg.get("eps", 1e-8))
    if name == "adamw":
        opt = optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=float(cfg.get("weight_decay", 0.0)),
                          mask=decay_mask)
    elif name == "adam":
        opt = optax.adam(sched, b1=b1, b2=b2, eps=eps)
    elif name == "sgd":
        opt = optax.sgd(sched, momentum=cfg.get("momentum", None))
    else:
        raise ValueError(f"optim.name={name!r}; use 'adamw', 'adam' or 'sgd'")
    clip = cfg.get("clip_norm", None)
    if clip:
        opt = optax.chain(optax.clip_by_global_norm(float(clip)), opt)
    return opt


def make_optimizer(
    cfg: Mapping[str, Any],
    labels: Callable[[Any], Any] | Any | None = None,
    group_lr: Mapping[str, float] | None = None,
) -> optax.GradientTransformation:
    """One optimizer for the whole parameter tree.

    ``labels`` (a tree or a function of params) names each leaf's group; leaves labelled
    ``"frozen"`` get no update and no state. Each other group uses ``cfg`` with its own learning
    rate from ``group_lr`` (default ``cfg.lr``), so e.g. a discriminator can have its own lr while
    sharing clipping and the schedule shape. Gradient clipping is per group.
    """
    if labels is None:
        return _one(cfg)
    group_lr = dict(group_lr or {})

    def transforms(label_tree):
        names = set(jax.tree.leaves(label_tree))
        out = {FROZEN: optax.set_to_zero()}
        for n in names - {FROZEN}:
            out[n] = _one(cfg, group_lr.get(n))
        return out

    if not callable(labels):
        return optax.multi_transform(transforms(labels), labels)

    # multi_transform needs the group names up front; a label function only reveals them per tree.
    def init(params):
        lt = labels(params)
        return optax.multi_transform(transforms(lt), lt).init(params)

    def update(grads, state, params=None):
        lt = labels(grads)
        return optax.multi_transform(transforms(lt), lt).update(grads, state, params)

    return optax.GradientTransformation(init, update)

