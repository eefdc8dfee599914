"""Planning mode: frozen sub-models as shapes only (no checkpoint read), for ahead-of-time compiles
and benchmarks. ``train.frozen`` builds the shapes; ``train.task.fill_boxes`` and the tasks turn them
into arrays only inside traced code (``placeholder``)."""

from __future__ import annotations

import contextlib
import contextvars

import flax.linen as nn
import jax
import jax.numpy as jnp

_SHAPES_ONLY = contextvars.ContextVar("jaxunified_frozen_shapes_only", default=False)


@contextlib.contextmanager
def shapes_only(fill: str = "zeros"):
    """Within it, every frozen part comes as shapes (see the module docstring): no checkpoint is read.
    ``fill``: what the shapes become where a task makes arrays of them — "zeros" (plans: traced only)
    or "random" (benchmarks: small normal values, so no step runs on degenerate zeros)."""
    if fill not in ("zeros", "random"):
        raise ValueError(f"fill={fill!r}; use 'zeros' or 'random'")
    token = _SHAPES_ONLY.set(fill)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def is_shapes_only() -> bool:
    return bool(_SHAPES_ONLY.get())


def as_shapes(tree):
    """Variables (boxed or not, arrays or shapes) as plain ``ShapeDtypeStruct``s."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.meta.unbox(tree))


def placeholder(x: jax.ShapeDtypeStruct) -> jax.Array:
    """The array a shapes-only leaf stands for (see ``shapes_only``'s ``fill``)."""
    if _SHAPES_ONLY.get() == "random" and jnp.issubdtype(x.dtype, jnp.floating):
        seed = sum((i + 1) * d for i, d in enumerate(x.shape)) % (2**31)  # leaves of one shape share values
        return 0.02 * jax.random.normal(jax.random.key(seed), x.shape, x.dtype)
    return jnp.zeros(x.shape, x.dtype)


def materialize(tree):
    """Loaded variables as arrays: ShapeDtypeStruct leaves (shapes-only parts) become ``placeholder``s.
    Meant for code traced by ``jax.eval_shape``/``jit`` (a task's ``init_variables``)."""
    return jax.tree.map(lambda x: placeholder(x) if isinstance(x, jax.ShapeDtypeStruct) else x, tree)
