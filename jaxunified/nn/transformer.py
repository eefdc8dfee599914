"""Pre-LN transformer pieces shared by the SigLIP towers, TokLIP and DualToken.

One attention module serves self-attention (encoder blocks) and cross-attention from learned
queries (the MAP pooling head). Q/K/V kernels are [embed, heads, head_dim] so the 'heads' axis
shards over 'tensor'; softmax and LayerNorm statistics run in float32 whatever the compute dtype.
Masks are boolean, True = may attend, applied to the logits *before* the softmax (TokLIP's
reference adds its causal mask after the softmax in one code path; we do not copy that).
With ``causal_chunks`` = n > 1 a masked self-attention runs as n query blocks, block i reading
only the keys up to its own end: the same result from (n+1)/2n of the score work, which for
TokLIP's causal tower is about half of a CPU train step (the [B, H, L, L] scores at L = 256).

``Encoder`` runs blocks unrolled (``layers_{i}`` params, any sub-range of layers callable) or
under ``nn.scan`` (one stacked ``layers`` subtree with a leading 'layers' axis: one compiled
block at depth 27), each optionally under ``nn.remat``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # HF "gelu_pytorch_tanh", SigLIP
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact erf (timm nn.GELU)
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}

kernel_init = nn.initializers.xavier_uniform()


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def layer_norm(eps: float, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def causal_mask(length: int) -> jax.Array:
    """[1, 1, L, L] boolean: position i attends to j ≤ i (raster order for image tokens)."""
    return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """softmax(q·k/√d, masked) · v for q [B, Lq, H, D], k/v [B, Lk, H, D]."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * np.float32(q.shape[-1] ** -0.5)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _attend_causal_blocks(q: jax.Array, k: jax.Array, v: jax.Array, mask, chunks: int) -> jax.Array:
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


def padding_mask(valid: jax.Array) -> jax.Array:
    """[B, L] validity → [B, 1, 1, L] key mask."""
    return valid.astype(jnp.bool_)[:, None, None, :]


class Mlp(nn.Module):
    mlp_dim: int
    act: str = "gelu_tanh"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.normal(1e-6), ("mlp",)),
            name="fc1",
        )(x)
        x = activation(self.act)(x)
        return nn.Dense(
            width,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(kernel_init, ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.normal(1e-6), ("embed",)),
            name="fc2",
        )(x)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with separate q/k/v projections and an output projection.

    ``causal_chunks`` > 1: a given mask is causal (no query sees a later key), so skip the key
    blocks after each query block (module docstring). No mask: dense attention either way.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    causal_chunks: int = 1

    @nn.compact
    def __call__(self, x_q: jax.Array, x_kv: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
        x_kv = x_q if x_kv is None else x_kv
        width = x_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"attention width {width} is not divisible by num_heads={self.num_heads}")
        head_dim = width // self.num_heads

        def proj(name):
            return nn.DenseGeneral(
                (self.num_heads, head_dim),
                dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "heads", "kv")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")),
                name=name,
            )

        q = proj("query")(x_q)
        k = proj("key")(x_kv)
        v = proj("value")(x_kv)
        if mask is not None and self.causal_chunks > 1:
            out = _attend_causal_blocks(q, k, v, mask, self.causal_chunks)
        else:
            out = attend(q, k, v, mask)
        return nn.DenseGeneral(
            width,
            axis=(-2, -1),
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(kernel_init, ("heads", "kv", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="out",
        )(out)


class EncoderBlock(nn.Module):
    """x + attn(ln1(x)); x + mlp(ln2(x)). Returns (x, x) so it can be the body of ``nn.scan``."""

    num_heads: int
    mlp_dim: int
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    causal_chunks: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None):
        y = layer_norm(self.ln_eps, "ln1")(x).astype(self.dtype)
        x = x + MultiHeadAttention(self.num_heads, self.dtype, self.causal_chunks, name="attn")(y, mask=mask)
        y = layer_norm(self.ln_eps, "ln2")(x).astype(self.dtype)
        x = x + Mlp(self.mlp_dim, self.act, self.dtype, name="mlp")(y)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, x


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
            "probe", nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, None, "embed")), (1, 1, width)
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
    out[name] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_layer)
    return out


def unstack_layers(tree: dict, depth: int, prefix: str = "layers_", name: str = "layers") -> dict:
    """Inverse of ``stack_layers``."""
    out = {k: v for k, v in tree.items() if k != name}
    for i in range(depth):
        out[f"{prefix}{i}"] = jax.tree.map(lambda x, i=i: x[i], tree[name])
    return out
