"""One device mesh with axes ('data', 'fsdp', 'tensor') and a logical→mesh rules table.

Parameters carry logical axis names (``nn.with_logical_partitioning``); these rules turn them
into ``NamedSharding``s. A dimension whose size the mesh axes do not divide stays replicated,
so tiny test models and odd channel counts (RGB, 8-d codes) shard without special cases.
Activations carry their own ``activation_*`` names (``jaxunified.nn.sharding.constrain``), mapped
by the same table. Three named tables (:data:`RULE_TABLES`): ``"fsdp"``, ``"fsdp_tp"`` (the default)
and ``"data"``; a config picks one with ``config.logical_rules = "<name>"`` or gives its own pairs.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxunified.nn.sharding import ACTIVATION_RULES, BATCH_AXES, logical_spec

MESH_AXES = ("data", "fsdp", "tensor")

# Weight rules shared by the tables below: what every weight dimension name maps to when it is
# not split (norm scales, kernel spatial taps, code vectors, position tables, stacked layers).
_WHOLE = (
    ("conv_in", None),
    ("kv", None),
    ("code_dim", None),
    ("norm", None),
    ("length", None),
    ("height", None),
    ("width", None),
    ("channels", None),
    ("layers", None),
)

# Named rules tables (``config.logical_rules = "fsdp_tp"``). Weight names (``embed``, ``mlp``,
# ``heads``, ``conv_out``, ...) and activation names (``activation_*``, jaxunified.nn.sharding) are
# kept apart, so a table splits an FSDP weight's ``embed`` over 'fsdp' while the activations'
# ``activation_embed`` stays whole and their ``activation_batch`` splits over ('data', 'fsdp').
RULE_TABLES: dict[str, tuple[tuple[str, Any], ...]] = {
    # Pure FSDP: weights shard their model/embedding (conv: output-channel) dimension over 'fsdp' and are
    # all-gathered where they are used; the batch splits over both data axes; 'tensor' is not used.
    "fsdp": (
        ("batch", BATCH_AXES),
        ("embed", "fsdp"),
        ("conv_out", "fsdp"),
        ("codebook", "fsdp"),
        ("mlp", None),
        ("heads", None),
        ("vocab", None),
        *_WHOLE,
        ("activation_batch", BATCH_AXES),
        ("activation_length", None),
        ("activation_embed", None),
        ("activation_heads", None),
        ("activation_kv", None),
        ("activation_mlp", None),
        ("activation_vocab", None),
        ("activation_height", None),
        ("activation_width", None),
        ("activation_channels", None),
    ),
    # FSDP + tensor parallel (Megatron): as "fsdp", and the head / MLP / vocab dimensions of weights and
    # activations over 'tensor'. On a mesh whose 'tensor' axis is 1 it is exactly "fsdp".
    "fsdp_tp": (
        ("batch", BATCH_AXES),
        ("embed", "fsdp"),
        ("conv_out", "fsdp"),
        ("codebook", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", "tensor"),
        *_WHOLE,
        *ACTIVATION_RULES,
    ),
    # Data parallel only: every weight replicated on every device, the batch split over both data axes
    # (a mesh's 'fsdp' devices then act as more data parallelism).
    "data": (
        ("batch", BATCH_AXES),
        ("embed", None),
        ("conv_out", None),
        ("codebook", None),
        ("mlp", None),
        ("heads", None),
        ("vocab", None),
        *_WHOLE,
        ("activation_batch", BATCH_AXES),
        *((name, None) for name, _ in ACTIVATION_RULES if name != "activation_batch"),
    ),
}

# The default (``config.logical_rules`` unset): "fsdp_tp", which on the default mesh (1, -1, 1) is pure
# FSDP; 'tensor' only takes the head/MLP/vocab dimensions when a config sets it above 1.
DEFAULT_TABLE = "fsdp_tp"
DEFAULT_RULES: tuple[tuple[str, Any], ...] = RULE_TABLES[DEFAULT_TABLE]


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds an Auto-typed mesh. One entry of ``shape`` may be -1 (takes the remaining devices).

    Devices of several slices (multi-slice TPU) make a hybrid mesh with 'data' across the slices; a
    'data' of 1 with a -1 elsewhere (the default) becomes the slice count."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    num_slices = len({getattr(d, "slice_index", 0) or 0 for d in devices})
    if num_slices > 1 and shape[0] == 1 and -1 in shape[1:]:
        shape[0] = num_slices
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
    if num_slices > 1:
        arr = _hybrid_devices(shape, devices, sorted({getattr(d, "slice_index", 0) or 0 for d in devices}))
    else:
        try:
            from jax.experimental import mesh_utils

            arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
        except Exception:  # CPU/compile-only devices without topology information
            arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _hybrid_devices(shape: list[int], devices, slices) -> np.ndarray:
    """Several slices (multi-slice TPU, DCN between them): 'data' runs across the slices and each
    slice holds a contiguous block of every other axis, so only data-parallel gradient reductions cross
    the slower network (MaxText's hybrid mesh). 'data' must be a multiple of the slice count."""
    n = len(slices)
    if shape[0] % n:
        raise ValueError(f"mesh shape {tuple(shape)} on {n} slices: 'data' ({shape[0]}) must be a multiple of the "
                         f"slice count, e.g. config.mesh_shape=({n}, -1, 1)")
    ici = [shape[0] // n, *shape[1:]]
    per_slice = [[d for d in devices if (getattr(d, "slice_index", 0) or 0) == s] for s in slices]
    if len({len(p) for p in per_slice}) != 1:
        raise ValueError(f"slices of unequal size: {[len(p) for p in per_slice]} devices")
    try:
        from jax.experimental import mesh_utils

        return mesh_utils.create_hybrid_device_mesh(ici, [n, 1, 1], devices=devices, allow_split_physical_axes=True)
    except Exception as e:  # devices without topology information: slice-major blocks in device order
        logging.getLogger(__name__).warning("hybrid mesh by device order (%s)", e)
        return np.concatenate([np.asarray(p).reshape(ici) for p in per_slice], axis=0)


def rules_from_config(rules: str | Iterable[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """The rules table a config names: None (the default, ``"fsdp_tp"``), a table name of
    :data:`RULE_TABLES` (``"fsdp"``, ``"fsdp_tp"``, ``"data"``), or a list of ``(logical name, mesh
    axes)`` pairs (lists from a ConfigDict become tuples; a weight name not listed stays unsplit, an
    ``activation_*`` name not listed keeps its default, as flax's constraints would otherwise
    replicate that activation)."""
    if rules is None:
        return DEFAULT_RULES
    if isinstance(rules, str):
        if rules not in RULE_TABLES:
            raise ValueError(
                f"config.logical_rules={rules!r} is not a rules table; use one of {', '.join(map(repr, RULE_TABLES))} "
                "or a list of (logical name, mesh axes) pairs"
            )
        return RULE_TABLES[rules]
    out = []
    for entry in rules:
        if isinstance(entry, str) or len(entry) != 2:
            raise ValueError(
                f"config.logical_rules entry {entry!r} is not a (logical name, mesh axes) pair, e.g. "
                "('embed', 'fsdp') or ('activation_batch', ('data', 'fsdp'))"
            )
        name, axes = entry
        if isinstance(axes, list):
            axes = tuple(axes)
        bad = [a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if a not in MESH_AXES]
        if bad:
            raise ValueError(
                f"config.logical_rules maps {name!r} to unknown mesh axis {bad[0]!r}; the mesh axes are {MESH_AXES}"
            )
        out.append((str(name), axes))
    listed = {name for name, _ in out}
    return tuple(out) + tuple(r for r in ACTIVATION_RULES if r[0] not in listed)


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
    return logical_spec(names, shape, dict(mesh.shape), rules)


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
