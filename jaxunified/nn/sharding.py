"""Activation sharding constraints by logical name (``constrain``), and the logical → PartitionSpec map.

Weights name their dimensions with ``nn.with_logical_partitioning`` (``embed``, ``mlp``, ``heads``,
``conv_out``, ...); activations name theirs with the ``activation_*`` names below, so one rules
table can shard a weight dimension and the activation dimension of the same size differently (an
FSDP weight's ``embed`` splits over 'fsdp' while the activation's ``activation_embed`` stays whole
and its ``activation_batch`` splits over ('data', 'fsdp')).

``constrain(x, TOKEN_AXES)`` is ``jax.lax.with_sharding_constraint`` with the spec those names map
to on the mesh of the current trace. It does nothing when no mesh is set (``jax.set_mesh``), on a
one-device mesh, inside a ``shard_map`` that made the named axes manual, and when no dimension of
``x`` can be split (a mesh axis product that does not divide the dimension leaves it whole, as for
weights: a batch of one image at ``init`` stays unconstrained). So modules call it unconditionally
and single-device code is unaffected.

The rules come from flax's ``nn.logical_axis_rules`` context when one is set (a run's configured
table, ``jaxunified.parallel.mesh.RULE_TABLES``), else :data:`ACTIVATION_RULES` — the activation part
of every table there. This module imports nothing of the project (``parallel.mesh`` imports it).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

# Activation names. Tokens of a transformer (ViT towers, LM): [B, L, D]; their per-head projections
# [B, L, H, Dh]; MLP hidden [B, L, F]. Conv feature maps (VQGAN, LPIPS, stems): [B, H, W, C].
TOKEN_AXES = ("activation_batch", "activation_length", "activation_embed")
HEAD_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
MLP_AXES = ("activation_batch", "activation_length", "activation_mlp")
LOGIT_AXES = ("activation_batch", "activation_length", "activation_vocab")
FEATURE_MAP_AXES = ("activation_batch", "activation_height", "activation_width", "activation_channels")

# The default activation rules: the batch over both data-parallel axes, positions and model
# dimensions whole, head / MLP / vocab dimensions over 'tensor' (size 1 unless the mesh sets it).
ACTIVATION_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_height", None),
    ("activation_width", None),
    ("activation_channels", None),
)


def _flat(axes: Any) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh_shape: Mapping[str, int],
                 rules) -> P:
    """Logical names → PartitionSpec over a mesh of ``mesh_shape`` (axis → size).

    A name the rules do not list, a mesh axis of size 1 (or absent), a mesh axis already taken by an
    earlier dimension, and a dimension the axes' product does not divide all leave that dimension
    whole (``None``)."""
    if names is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        flat = _flat(table.get(name)) if name is not None else ()
        flat = tuple(a for a in flat if a not in used and mesh_shape.get(a, 1) > 1)
        if flat and dim % math.prod(mesh_shape[a] for a in flat) == 0:
            used.update(flat)
            spec.append(flat[0] if len(flat) == 1 else flat)
        else:
            spec.append(None)
    return P(*spec)


def current_rules():
    """flax's ``nn.logical_axis_rules`` table when one is set, else :data:`ACTIVATION_RULES`."""
    return tuple(nn.get_logical_axis_rules()) or ACTIVATION_RULES


def constrain(x: jax.Array, names: Sequence[str | None], rules=None) -> jax.Array:
    """``x`` constrained to the sharding its logical ``names`` map to on the current mesh (see module doc)."""
    if len(names) != x.ndim:
        raise ValueError(f"activation names {tuple(names)} do not match the {x.ndim}-d shape {tuple(x.shape)}")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    # Axes a shard_map made manual are per-device already; only Auto/Explicit axes can be asked for.
    sizes = {a: s for a, s, t in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types) if t != AxisType.Manual}
    spec = logical_spec(tuple(names), x.shape, sizes, current_rules() if rules is None else rules)
    if all(s is None for s in spec):
        return x  # nothing splits: leave the partitioner free rather than force a replicated copy
    return jax.lax.with_sharding_constraint(x, spec)


__all__ = [
    "ACTIVATION_RULES",
    "BATCH_AXES",
    "FEATURE_MAP_AXES",
    "HEAD_AXES",
    "LOGIT_AXES",
    "MLP_AXES",
    "TOKEN_AXES",
    "constrain",
    "current_rules",
    "logical_spec",
]
