"""One device mesh with axes ('data', 'fsdp', 'tensor') and a logical→mesh rules table.

Parameters carry logical axis names (``nn.with_logical_partitioning``); these rules turn them
into ``NamedSharding``s. A dimension whose size the mesh axes do not divide stays replicated,
so tiny test models and odd channel counts (RGB, 8-d codes) shard without special cases.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Default: pure FSDP. Weights shard their model/embedding dimension over 'fsdp'; the batch is split
# over both data-parallel axes; 'tensor' is available to configs that set it above 1.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("codebook", "fsdp"),
    ("code_dim", None),
    ("norm", None),
    ("length", None),
    ("height", None),
    ("width", None),
    ("channels", None),
    # Activations (``nn.with_logical_constraint``), named apart from the weights above so a
    # config can reshard one without the other; the batch splits over both data axes, the
    # head/MLP/vocab dims follow their weights onto 'tensor'.
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds an Auto-typed mesh. One entry of ``shape`` may be -1 (takes the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices but {len(devices)} are available; "
            "set config.mesh_shape so its product equals the device count (use -1 for one axis)"
        )
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # CPU/compile-only devices without topology information
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules: Iterable[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Normalises a rules table from a config (lists from ConfigDict) into tuples."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for name, axes in rules:
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((str(name), axes))
    return tuple(out)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(
    names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules
) -> P:
    """Maps logical axis names to a PartitionSpec, replicating dims the mesh axes do not divide."""
    if names is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = table.get(name) if name is not None else None
        if axes is not None:
            flat = (axes,) if isinstance(axes, str) else tuple(axes)
            flat = tuple(a for a in flat if a not in used and mesh.shape.get(a, 1) > 1)
            if flat and dim % _axis_size(mesh, flat) == 0:
                used.update(flat)
                spec.append(flat[0] if len(flat) == 1 else flat)
                continue
        spec.append(None)
    return P(*spec)


def _is_partitioned(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def tree_shardings(abstract_tree, mesh: Mesh, rules) -> Any:
    """NamedShardings for a (possibly ``LogicallyPartitioned``-boxed) abstract tree; unboxed leaves replicate."""

    def one(x):
        if _is_partitioned(x):
            if not hasattr(x.value, "shape"):  # e.g. optax.MaskedNode: frozen params hold no state
                return x.value
            return NamedSharding(mesh, logical_to_spec(x.names, x.value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_tree, is_leaf=_is_partitioned)


def unbox(tree):
    return nn.meta.unbox(tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
    return _axis_size(mesh, BATCH_AXES)


def sharded_init(init_fn, mesh: Mesh, rules, *args):
    """Runs ``init_fn(*args)`` directly into its sharded layout (no host copy of full weights).

    ``init_fn`` may return boxed (logically partitioned) leaves; the result is unboxed.
    Returns ``(variables, shardings)``.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = tree_shardings(abstract, mesh, rules)
    with jax.set_mesh(mesh):
        variables = jax.jit(lambda *a: unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return variables, shardings
