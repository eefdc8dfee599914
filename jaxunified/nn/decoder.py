"""A Qwen2/LLaMA-style pre-norm decoder block: RMSNorm → GQA self-attention with RoPE (and a
KV cache when decoding) → residual, RMSNorm → SwiGLU MLP → residual.

The residual stream keeps the caller's dtype (float32 for bf16 compute, as the encoders do);
each branch computes in ``dtype``. Qwen2's projections: q/k/v with bias, the output and all MLP
projections without. ``resid_dropout``/``mlp_dropout`` (LlamaGen's resid/ffn dropout) drop each
branch's output before its residual add when the call is not ``deterministic``; at 0 (the
default) nothing is added.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxunified.nn.attention import MultiHeadAttention, causal_mask
from jaxunified.nn.dense import dense
from jaxunified.nn.norm import RMSNorm
from jaxunified.nn.sharding import MLP_AXES, TOKEN_AXES

Dtype = Any


class SwiGluMlp(nn.Module):
    """``down(silu(gate(x)) · up(x))``, no biases."""

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        gate = dense(self.mlp_dim, ("embed", "mlp"), use_bias=False, dtype=self.dtype, name="gate")(x)
        up = dense(self.mlp_dim, ("embed", "mlp"), use_bias=False, dtype=self.dtype, name="up")(x)
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, MLP_AXES)
        return dense(width, ("mlp", "embed"), use_bias=False, dtype=self.dtype, name="down")(h)


class DecoderBlock(nn.Module):
    """One causal decoder layer; ``__call__(x, mask, positions=, rotary=) → x``.

    Without ``decode`` the block applies the causal mask itself (and-ed with a given padding
    mask); with it, the attention's cache supplies causality over the cached prefix.
    ``positions``/``rotary`` go to ``MultiHeadAttention`` (1-D RoPE positions, or a ready table).
    """

    num_heads: int
    mlp_dim: int
    num_kv_heads: int | None = None
    norm_eps: float = 1e-6
    rope_theta: float | None = 10000.0
    rope_interleaved: bool = False
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    decode: bool = False
    resid_dropout: float = 0.0
    mlp_dropout: float = 0.0

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        rotary: tuple[jax.Array, jax.Array] | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        if not self.decode:
            causal = causal_mask(x.shape[1])
            mask = causal if mask is None else jnp.logical_and(mask, causal)
        attn = MultiHeadAttention(
            self.num_heads,
            self.dtype,
            num_kv_heads=self.num_kv_heads,
            qkv_bias=self.qkv_bias,
            out_bias=False,
            rope_theta=self.rope_theta,
            rope_interleaved=self.rope_interleaved,
            decode=self.decode,
            name="attn",
        )
        y = RMSNorm(self.norm_eps, name="input_norm")(x).astype(self.dtype)
        x = x + self._drop(attn(y, mask=mask, positions=positions, rotary=rotary), self.resid_dropout, deterministic)
        x = nn.with_logical_constraint(x, TOKEN_AXES)
        y = RMSNorm(self.norm_eps, name="post_attention_norm")(x).astype(self.dtype)
        x = x + self._drop(SwiGluMlp(self.mlp_dim, self.dtype, name="mlp")(y), self.mlp_dropout, deterministic)
        return nn.with_logical_constraint(x, TOKEN_AXES)

    def _drop(self, h: jax.Array, rate: float, deterministic: bool) -> jax.Array:
        return nn.Dropout(rate)(h, deterministic=deterministic) if rate > 0 else h
