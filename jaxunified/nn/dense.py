"""The one dense-layer factory: flax's ``Dense``/``DenseGeneral`` with logical axis names.

Every projection in the library is built here, so kernel/bias sharding names, float32
parameters and initialisers are chosen at the call site in one vocabulary. A plain [in, out]
layer stays an ``nn.Dense`` and a multi-axis one an ``nn.DenseGeneral``: the class fixes an
unnamed layer's auto-name, and ``DenseGeneral`` initialises the *flattened* kernel (fan-in/out
of the merged axes), so each caller keeps exactly the parameters it had.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxunified.nn import sums

Dtype = Any
Initializer = Any

xavier_uniform = nn.initializers.xavier_uniform()

# The in → hidden layout: a channel-mixing 1×1 conv and the SimVQ codebook map use it.
DENSE_KERNEL_AXES = ("embed", "mlp")


def accumulate_f32(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` computed with a float32 result, then cast to the dtype it would have had
    (the value a bf16 dot returns). XLA:CPU with its default YNNPACK fusions runs a bf16 × bf16 →
    bf16 dot about 6× slower than the same dot with a float32 result ([16, 768] × [768, 36864]:
    70 vs 12 ms; 22 ms with float32 weights); with them off (``cpu_flags``) the gain is small
    ([16, 1, 768] × [768, 36864]: 45 vs 42 ms)."""
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32)
    return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def low_precision_dot(dtype):
    """The dot_general for a layer computing in ``dtype``: ``accumulate_f32`` for 16-bit floats on CPU,
    else None (flax's default)."""
    if dtype is None or jnp.dtype(dtype).itemsize > 2 or sums.target_platform() != "cpu":
        return None
    return accumulate_f32


class _FlatInitPartitioned(nn.spmd.LogicallyPartitioned):
    """A logical box that skips its constraint while its value does not have one dimension per name:
    ``DenseGeneral`` initialises the flattened kernel (and bias) and only then reshapes them, and flax's
    parameter shape check re-runs that init at apply time, under the train step's axis rules."""

    def unbox(self, apply_constraint=True):
        if apply_constraint and getattr(self.value, "ndim", len(self.names)) != len(self.names):
            return self.value
        return super().unbox(apply_constraint)


def _partitioned(init, names: tuple):
    def wrapped(*args, **kw):
        return _FlatInitPartitioned(init(*args, **kw), names)

    return wrapped


def dense(
    features: int | Sequence[int],
    axes: Sequence[str | None],
    *,
    axis: int | Sequence[int] = -1,
    use_bias: bool = True,
    kernel_init: Initializer = xavier_uniform,
    bias_init: Initializer = nn.initializers.zeros,
    bias_axes: Sequence[str | None] | None = None,
    dtype: Dtype | None = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    precision: Any = None,
    name: str | None = None,
) -> nn.Module:
    """A dense layer whose kernel carries logical ``axes`` (one name per kernel dimension).

    ``features`` may be a tuple (e.g. (heads, head_dim)) and ``axis`` several input axes, which
    makes it a ``DenseGeneral``. The bias takes the kernel's trailing (output) axis names unless
    ``bias_axes`` says otherwise.
    """
    out_dims = len(features) if isinstance(features, (tuple, list)) else 1
    in_dims = len(axis) if isinstance(axis, (tuple, list)) else 1
    if len(axes) != in_dims + out_dims:
        raise ValueError(f"dense {name or ''}: {len(axes)} kernel axis names {tuple(axes)} for a kernel of "
                         f"{in_dims} input and {out_dims} output dimensions")
    bias_axes = tuple(axes[-out_dims:]) if bias_axes is None else tuple(bias_axes)
    kw = dict(
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        dot_general=low_precision_dot(dtype),
        kernel_init=_partitioned(kernel_init, tuple(axes)),
        bias_init=_partitioned(bias_init, bias_axes),
        name=name,
    )
    if isinstance(features, int) and axis == -1:
        return nn.Dense(features, **kw)
    return nn.DenseGeneral(features, axis=axis, **kw)
