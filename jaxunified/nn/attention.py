"""Masks, scaled dot-product attention and the one multi-head attention module.

Masks are boolean, True = may attend, applied to the float32 logits *before* the softmax
(TokLIP's reference adds its causal mask after the softmax in one code path; we do not copy that).
Q/K/V kernels are [embed, heads, head_dim] so the 'heads' axis shards over 'tensor'.

Grouped-query attention keeps k/v at their own ``num_kv_heads``: queries are viewed as
[B, T, Hkv, G, D] and contracted against k/v [B, S, Hkv, D], so neither the cache nor the
scores ever hold G repeated copies of a key. Query head h reads kv head h // G (HF's
``repeat_kv`` order).

With ``causal_chunks`` = n > 1 a masked self-attention runs as n query blocks, block i reading
only the keys up to its own end: the same result from (n+1)/2n of the score work, which for
TokLIP's causal tower is about half of a CPU train step (the [B, H, L, L] scores at L = 256).

``decode=True`` is flax's autoregressive-cache pattern: the first call (``init``) only creates
static [B, Hkv, max_len, D] key/value buffers, sized by that call's input length, in the
"cache" collection (heads before slots: XLA:CPU would otherwise transpose the whole cache of
every layer at every step to feed its dot, 17× the attention time of GPT-B's decode); every
later call (``apply(..., mutable=["cache"])``) writes its T new keys/values at ``cache_index``
and attends causally over the filled prefix. A T-token prefill and then one-token steps give
the full causal recompute's outputs. Writes past ``max_len`` are
clamped by ``dynamic_update_slice`` (under jit nobody can raise), so the caller bounds its steps.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.nn.dense import dense, low_precision_dot
from jaxunified.nn.rope import apply_rope, rope_1d
from jaxunified.nn.sharding import HEAD_AXES, TOKEN_AXES

Dtype = Any


def causal_mask(length: int) -> jax.Array:
    """[1, 1, L, L] boolean: position i attends to j ≤ i (raster order for image tokens)."""
    return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]


def padding_mask(valid: jax.Array) -> jax.Array:
    """[B, L] validity → [B, 1, 1, L] key mask."""
    return valid.astype(jnp.bool_)[:, None, None, :]


def _grouped_mask(mask: jax.Array, kv_heads: int) -> jax.Array:
    """A [.., H or 1, Lq, Lk] mask → [.., Hkv, G or 1, Lq, Lk] to match grouped logits."""
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[1] == 1:
        return mask[:, :, None]
    return mask.reshape(mask.shape[0], kv_heads, -1, *mask.shape[2:])


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
           heads_major: bool = False) -> jax.Array:
    """softmax(q·k/√d, masked) · v for q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (H a multiple of Hkv),
    or k/v [B, Hkv, Lk, D] with ``heads_major`` (the decode cache's layout)."""
    kv = "bhkd" if heads_major else "bkhd"
    heads, kv_heads = q.shape[2], k.shape[1 if heads_major else 2]
    scale = np.float32(q.shape[-1] ** -0.5)
    neg = jnp.finfo(jnp.float32).min
    if heads == kv_heads:
        logits = jnp.einsum(f"bqhd,{kv}->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits * scale
        if mask is not None:
            logits = jnp.where(mask, logits, neg)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return _weighted_values(f"bhqk,{kv}->bqhd", weights, v)
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not split into groups over {kv_heads} key/value heads")
    b, lq, _, d = q.shape
    qg = q.reshape(b, lq, kv_heads, heads // kv_heads, d)
    logits = jnp.einsum(f"bqhgd,{kv}->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(_grouped_mask(mask, kv_heads), logits, neg)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return _weighted_values(f"bhgqk,{kv}->bqhgd", weights, v).reshape(b, lq, heads, d)


def _weighted_values(spec: str, weights: jax.Array, v: jax.Array) -> jax.Array:
    if low_precision_dot(v.dtype) is None:
        return jnp.einsum(spec, weights, v)
    # XLA:CPU's bf16-result dots are slow (nn.dense.accumulate_f32).
    return jnp.einsum(spec, weights, v, preferred_element_type=jnp.float32).astype(v.dtype)


def attend_causal_blocks(q: jax.Array, k: jax.Array, v: jax.Array, mask, chunks: int) -> jax.Array:
    """``attend`` for a mask that lets no query see a later key, one query block at a time."""
    length = q.shape[1]
    if k.shape[1] != length or length % chunks:
        raise ValueError(f"causal_chunks={chunks} needs self-attention over a length it divides; "
                         f"got {length} queries and {k.shape[1]} keys")
    # A key-only mask ([..., 1, L], padding) cannot be causal; a concrete one is checked outright.
    concrete = not isinstance(mask, jax.core.Tracer)
    if mask.shape[-2] != length or (concrete and np.triu(np.asarray(mask), 1).any()):
        raise ValueError("causal_chunks > 1 needs a causal [..., L, L] mask: no query may attend to a later key")
    step = length // chunks
    outs = []
    for i in range(chunks):
        lo, hi = i * step, (i + 1) * step
        outs.append(attend(q[:, lo:hi], k[:, :hi], v[:, :hi], mask[..., lo:hi, :hi]))
    return jnp.concatenate(outs, axis=1)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with separate q/k/v projections and an output projection.

    ``num_kv_heads`` < ``num_heads``: grouped-query attention (key/value kernels [embed, Hkv, D]).
    ``rope_theta``: 1-D RoPE on q/k at ``positions`` ([T] or [B, T]; default 0..T-1, or the
    cache slots in decode mode). A ``rotary=(cos, sin)`` table given to the call (2-D RoPE, a
    table shared by all layers) is used instead. ``rope_interleaved`` picks the pairing (rope.py).
    ``causal_chunks`` > 1: a given mask is causal (no query sees a later key), so skip the key
    blocks after each query block (module docstring). No mask: dense attention either way.
    ``decode``: the KV cache (module docstring); self-attention only, always causal over the
    cache, and a given ``mask`` (e.g. padding over the cache slots) is and-ed with that.
    With none of these options the parameters and outputs are those of plain MHA.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    causal_chunks: int = 1
    num_kv_heads: int | None = None
    qkv_bias: bool = True
    out_bias: bool = True
    rope_theta: float | None = None
    rope_interleaved: bool = False
    decode: bool = False

    @nn.compact
    def __call__(
        self,
        x_q: jax.Array,
        x_kv: jax.Array | None = None,
        mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        rotary: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        self_attn = x_kv is None
        x_kv = x_q if x_kv is None else x_kv
        width = x_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"attention width {width} is not divisible by num_heads={self.num_heads}")
        head_dim = width // self.num_heads
        kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        if self.num_heads % kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={kv_heads}")
        rope = self.rope_theta is not None or rotary is not None
        if (rope or self.decode) and not self_attn:
            raise ValueError("RoPE and the decode cache are for self-attention; do not pass x_kv")

        def proj(heads, name):
            return dense((heads, head_dim), ("embed", "heads", "kv"), use_bias=self.qkv_bias, dtype=self.dtype,
                         name=name)

        q = proj(self.num_heads, "query")(x_q)
        k = proj(kv_heads, "key")(x_kv)
        v = proj(kv_heads, "value")(x_kv)

        cache = self._cache(k, v) if self.decode else None
        start = 0 if cache is None else cache["index"].value
        if rope:
            if rotary is None:
                if positions is None:
                    positions = start + jnp.arange(x_q.shape[1])
                rotary = rope_1d(positions, head_dim, self.rope_theta)
            q = apply_rope(q, *rotary, interleaved=self.rope_interleaved)
            k = apply_rope(k, *rotary, interleaved=self.rope_interleaved)
        q = nn.with_logical_constraint(q, HEAD_AXES)
        k = nn.with_logical_constraint(k, HEAD_AXES)
        v = nn.with_logical_constraint(v, HEAD_AXES)

        if self.decode:
            k, v, mask = self._update_cache(cache, k, v, mask, start)
            out = attend(q, k, v, mask, heads_major=True)
        elif mask is not None and self.causal_chunks > 1:
            out = attend_causal_blocks(q, k, v, mask, self.causal_chunks)
        else:
            out = attend(q, k, v, mask)
        out = nn.with_logical_constraint(out, HEAD_AXES)
        out = dense(width, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=self.out_bias, dtype=self.dtype,
                    name="out")(out)
        return nn.with_logical_constraint(out, TOKEN_AXES)

    def _cache(self, k: jax.Array, v: jax.Array) -> dict[str, Any] | None:
        """The cache variables; None on the creating call (init), which only sizes them."""
        if self.has_variable("cache", "cached_key"):
            if not self.is_mutable_collection("cache"):
                raise ValueError("decode=True writes the KV cache: call apply(..., mutable=['cache'])")
            created = False
        elif self.is_mutable_collection("cache"):
            created = True
        else:
            raise ValueError("decode=True needs a 'cache' collection: init the model with decode=True on an "
                             "input of max_len tokens and pass variables['cache'] to apply(..., mutable=['cache'])")
        shape = (k.shape[0], k.shape[2], k.shape[1], k.shape[3])  # [B, Hkv, max_len, D]
        # XLA:CPU runs a bf16 attention dot by converting both operands, i.e. the whole cache, to
        # float32 at every step (GPT-B bf16 decode: 4 s of converts in 22 s): keep a float32 cache there.
        dtype = jnp.float32 if low_precision_dot(k.dtype) is not None else k.dtype
        cache = {
            "key": self.variable("cache", "cached_key", jnp.zeros, shape, dtype),
            "value": self.variable("cache", "cached_value", jnp.zeros, shape, dtype),
            "index": self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32)),
        }
        return None if created else cache

    def _update_cache(self, cache, k, v, mask, start):
        """Writes k/v at the cache index; returns the whole buffers and the causal-prefix mask."""
        length = k.shape[1]
        if cache is None:  # init: attend over this call's own tokens, causally
            cmask = causal_mask(length)
            return jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), cmask if mask is None else jnp.logical_and(mask, cmask)
        max_len = cache["key"].value.shape[2]
        if not isinstance(start, jax.core.Tracer) and int(start) + length > max_len:
            raise ValueError(f"KV cache overflow: {int(start)} cached + {length} new tokens > max_len {max_len}")

        def write(buf, x):
            return jax.lax.dynamic_update_slice(buf, jnp.swapaxes(x, 1, 2).astype(buf.dtype), (0, 0, start, 0))

        k, v = write(cache["key"].value, k), write(cache["value"].value, v)
        cache["key"].value, cache["value"].value = k, v
        cache["index"].value = start + length
        qpos = start + jnp.arange(length)
        cmask = (jnp.arange(max_len)[None, :] <= qpos[:, None])[None, None]
        return k, v, cmask if mask is None else jnp.logical_and(mask, cmask)
