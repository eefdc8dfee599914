"""Pre-LN transformer encoder pieces shared by the SigLIP towers, TokLIP and DualToken.

Attention itself (masks, GQA, RoPE, KV cache) is in attention.py; this file stacks it into
blocks. ``Encoder`` runs blocks unrolled (``layers_{i}`` params, any sub-range of layers
callable) or under ``nn.scan`` (one stacked ``layers`` subtree with a leading 'layers' axis: one
compiled block at depth 27), each optionally under ``nn.remat``. LayerNorm statistics run in
float32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.nn.activations import activation
from jaxunified.nn.attention import MultiHeadAttention
from jaxunified.nn.dense import dense, xavier_uniform
from jaxunified.nn.norm import layer_norm
from jaxunified.nn.sharding import MLP_AXES, TOKEN_AXES, constrain

Dtype = Any


class Mlp(nn.Module):
    mlp_dim: int
    act: str = "gelu_tanh"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        bias_init = nn.initializers.normal(1e-6)
        x = dense(self.mlp_dim, ("embed", "mlp"), bias_init=bias_init, dtype=self.dtype, name="fc1")(x)
        x = activation(self.act)(x)
        if x.ndim == 3:
            x = constrain(x, MLP_AXES)
        return dense(width, ("mlp", "embed"), bias_init=bias_init, dtype=self.dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
    """x + attn(ln1(x)); x + mlp(ln2(x)). Returns (x, x) so it can be the body of ``nn.scan``.

    ``decode``: the attention keeps a KV cache (``MultiHeadAttention``), for GPT-style causal stacks.
    ``dropout_rate`` > 0 drops each branch's output before its residual add (GPT-2's resid_pdrop)
    when the call is not ``deterministic``; at 0 (the default) nothing is added.
    """

    num_heads: int
    mlp_dim: int
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    causal_chunks: int = 1
    decode: bool = False
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True):
        attn = MultiHeadAttention(self.num_heads, self.dtype, self.causal_chunks, decode=self.decode, name="attn")
        y = layer_norm(self.ln_eps, "ln1")(x).astype(self.dtype)
        x = x + self._drop(attn(y, mask=mask), deterministic)
        y = layer_norm(self.ln_eps, "ln2")(x).astype(self.dtype)
        x = x + self._drop(Mlp(self.mlp_dim, self.act, self.dtype, name="mlp")(y), deterministic)
        x = constrain(x, TOKEN_AXES)  # activation names: the weights' "embed" is FSDP-split, the tokens' is not
        return x, x

    def _drop(self, h: jax.Array, deterministic: bool) -> jax.Array:
        return nn.Dropout(self.dropout_rate)(h, deterministic=deterministic) if self.dropout_rate > 0 else h


class Encoder(nn.Module):
    """A stack of ``EncoderBlock``s.

    ``__call__(x, mask, start, stop)`` runs layers [start, stop) and returns (x, hidden) where
    hidden[i] is the output of layer start+i. Sub-ranges (DualToken replaces the hidden state
    mid-tower) need ``scan=False``: scanned layers are one stacked parameter tree.
    ``causal_chunks`` > 1 promises that any mask passed is causal (``MultiHeadAttention``).
    """

    depth: int
    num_heads: int
    mlp_dim: int
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat: bool = False
    causal_chunks: int = 1

    def setup(self):
        block = EncoderBlock
        if self.remat:
            block = nn.remat(block, prevent_cse=not self.scan)
        kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, act=self.act, ln_eps=self.ln_eps, dtype=self.dtype,
                  causal_chunks=self.causal_chunks)
        if self.scan:
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(**kw)
        else:
            self.blocks = [block(**kw, name=f"layers_{i}") for i in range(self.depth)]

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, start: int = 0, stop: int | None = None):
        stop = self.depth if stop is None else stop
        if not 0 <= start <= stop <= self.depth:
            raise ValueError(f"layer range [{start}, {stop}) is outside the encoder's {self.depth} layers")
        if self.scan:
            if (start, stop) != (0, self.depth):
                raise ValueError("running a sub-range of layers needs an unscanned encoder (scan=False)")
            x, hidden = self.layers(x, mask)
            return x, list(hidden)
        hidden = []
        for blk in self.blocks[start:stop]:
            x, _ = blk(x, mask)
            hidden.append(x)
        return x, hidden


class MAPHead(nn.Module):
    """Multihead attention pooling: one learned query attends over the tokens, then a residual MLP."""

    num_heads: int
    mlp_dim: int
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        width = x.shape[-1]
        probe = self.param(
            "probe", nn.with_logical_partitioning(xavier_uniform, (None, None, "embed")), (1, 1, width)
        )
        probe = jnp.broadcast_to(probe, (x.shape[0], 1, width)).astype(self.dtype)
        h = MultiHeadAttention(self.num_heads, self.dtype, name="attn")(probe, x, mask=mask)
        y = layer_norm(self.ln_eps, "ln")(h).astype(self.dtype)
        h = h + Mlp(self.mlp_dim, self.act, self.dtype, name="mlp")(y)
        return h[:, 0]


def resize_posemb(posemb: jax.Array, grid: tuple[int, int], new_grid: tuple[int, int]) -> jax.Array:
    """[N, D] learned position embedding on a ``grid`` → ``new_grid`` (bilinear on the 2-D grid).

    Bilinear, as big_vision's ``resample_posemb``; HF's ``interpolate_pos_encoding`` uses bicubic,
    so resized embeddings match neither to the last digit (only fixed-resolution parity is claimed).
    """
    if tuple(grid) == tuple(new_grid):
        return posemb
    d = posemb.shape[-1]
    img = posemb.reshape(grid[0], grid[1], d)
    out = jax.image.resize(img.astype(jnp.float32), (new_grid[0], new_grid[1], d), method="bilinear")
    return out.reshape(new_grid[0] * new_grid[1], d).astype(posemb.dtype)


def stack_layers(tree: dict, depth: int, prefix: str = "layers_", name: str = "layers") -> dict:
    """Unrolled ``layers_{i}`` subtrees → one scanned ``layers`` subtree (leading axis = layer)."""
    out = {k: v for k, v in tree.items() if not k.startswith(prefix)}
    per_layer = [tree[f"{prefix}{i}"] for i in range(depth)]
    out[name] = jax.tree.map(_stack, *per_layer)
    return out


def _stack(*xs):
    if any(isinstance(x, jax.core.Tracer) for x in xs):  # traced (an init under jax.eval_shape)
        return jnp.stack(xs)
    return np.stack([np.asarray(x) for x in xs])  # host arrays stay on the host (converters)


def unstack_layers(tree: dict, depth: int, prefix: str = "layers_", name: str = "layers") -> dict:
    """Inverse of ``stack_layers``."""
    out = {k: v for k, v in tree.items() if k != name}
    for i in range(depth):
        out[f"{prefix}{i}"] = jax.tree.map(lambda x, i=i: x[i], tree[name])
    return out
