"""Depth-by-depth sampling from a ``models.depth_head.RQTransformer`` (the reference's ``sample``).

One jit per (model, strategies, guidances, batch shape). Positions run in raster order as one
``lax.fori_loop``; at position t the body takes one step through its KV cache (the last condition
token at t = 0, else the codes of position t − 1), the head's cache is zeroed, and the D depth
steps follow, each one head step through that cache. The depth steps are unrolled inside the
loop body (D ≤ 16): each depth keeps its own static strategy, since ``lax.top_k`` needs a static
k and the reference lets top-k/top-p differ per depth.

``strategy``/``guidance`` take one value for every depth or a tuple with one per depth.

Guidance (not in the released code; DualToken/VILA-U guide at every depth step) runs a
[cond; uncond] batch of 2B rows and feeds each sampled code to both halves. The uncond rows use
``null_cond``: by default the model's null class (``config.null_cond=True`` adds that row,
index ``vocab_size_cond``, trained by ``cond_dropout``). Released checkpoints have no null row,
so guiding them needs an explicit ``null_cond`` (e.g. 0, which is the reference's SOS id for its
unconditional models, but an ordinary class of its ImageNet models). A depth whose guidance is
None reads the conditional half alone. ``Guidance.interval`` counts positions: position
t > interval + 1 is unguided at every depth.

Draws are per sample: row b's code at (t, d) folds ``keys[b]`` with t·D + d.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxunified.models.depth_head import RQTransformer, init_cache, reset_head_cache
from jaxunified.sample.strategies import Greedy, Guidance, Strategy, choose, guide, row_keys


def _per_depth(value, depth: int, what: str) -> tuple:
    if isinstance(value, (tuple, list)):
        if len(value) != depth:
            raise ValueError(f"{len(value)} {what} given for depth {depth}; pass one, or one per depth")
        return tuple(value)
    return (value,) * depth


@functools.partial(jax.jit, static_argnames=("model", "strategies", "guidances", "with_logits"))
def _run(model: RQTransformer, variables, cond, null, keys, forced, *, strategies, guidances, with_logits):
    c = model.config
    depth, positions, vocab = c.depth, c.num_positions, max(c.vocabs)
    dec = model.clone(decode=True)
    batch = cond.shape[0]
    guided = any(g is not None for g in guidances)
    rows_cond = jnp.concatenate([cond, null]) if guided else cond
    rows = rows_cond.shape[0]
    fixed = {k: v for k, v in variables.items() if k != "cache"}

    def call(method, cache, *args):
        out, state = dec.apply({**fixed, "cache": cache}, *args, method=method, mutable=["cache"])
        return out, state["cache"]

    def both(x):
        return jnp.concatenate([x, x]) if guided else x

    _, cache = call("prefill_cond", init_cache(dec, rows), rows_cond, rows)

    def position(t, carry):
        codes, logits_all, cache = carry
        prev = jax.lax.dynamic_index_in_dim(codes, jnp.maximum(t - 1, 0), axis=1, keepdims=False)
        ctx, cache = call("decode_body", cache, rows_cond, both(prev), t)
        cache = reset_head_cache(cache)
        cur = jnp.zeros((batch, depth), jnp.int32)
        step_logits = []
        for d in range(depth):
            logits, cache = call("decode_head", cache, ctx, both(cur), d)
            if guided:
                logits = guide(logits, guidances[d], t) if guidances[d] is not None else logits[:batch]
            if forced is not None:
                tok = forced[:, t, d]
            else:
                tok = choose(strategies[d], logits, keys, t * depth + d)
            cur = cur.at[:, d].set(tok)
            step_logits.append(logits)
        codes = jax.lax.dynamic_update_slice(codes, cur[:, None], (0, t, 0))
        if with_logits:
            logits_all = jax.lax.dynamic_update_slice(logits_all, jnp.stack(step_logits, 1)[:, None], (0, t, 0, 0))
        return codes, logits_all, cache

    codes = jnp.zeros((batch, positions, depth), jnp.int32)
    logits_all = jnp.zeros((batch, positions, depth, vocab) if with_logits else (), jnp.float32)
    codes, logits_all, _ = jax.lax.fori_loop(0, positions, position, (codes, logits_all, cache))
    shape = (batch, *c.block_size)
    codes = codes.reshape(shape)
    return (codes, logits_all.reshape(*shape, vocab)) if with_logits else codes


def _cond_rows(model: RQTransformer, cond, batch: int | None) -> jax.Array:
    c = model.config
    if cond is None:
        if batch is None:
            raise ValueError("unconditional sampling needs batch= (the number of samples)")
        return jnp.zeros((batch, c.cond_len), jnp.int32)
    cond = jnp.asarray(cond).astype(jnp.int32)
    return cond.reshape(cond.shape[0], c.cond_len)


def _null_rows(model: RQTransformer, cond: jax.Array, null_cond) -> jax.Array:
    c = model.config
    if null_cond is None:
        if c.null_class is None:
            raise ValueError("this RQ-Transformer has no null condition row (null_cond=False, as in every released "
                             "checkpoint): pass null_cond= the class id (or ids) to guide against, or guidance=None")
        null_cond = c.null_class
    null = jnp.asarray(null_cond).astype(jnp.int32)
    return jnp.broadcast_to(null if null.ndim == 0 else null.reshape(-1, cond.shape[1]), cond.shape)


def _row_keys(keys: jax.Array, batch: int) -> jax.Array:
    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    if keys.ndim == (0 if typed else 1):
        return row_keys(keys, batch)
    if keys.shape[0] != batch or keys.ndim != (1 if typed else 2):
        raise ValueError(f"keys must be one PRNG key or one per row ([{batch}]), got shape {keys.shape}")
    return keys


def sample_codes(
    model: RQTransformer,
    variables: Any,
    cond=None,
    *,
    strategy: Strategy | Sequence[Strategy] = Greedy(),
    keys: jax.Array | None = None,
    guidance: Guidance | Sequence[Guidance | None] | None = None,
    null_cond=None,
    batch: int | None = None,
    return_logits: bool = False,
):
    """Codes [B, H, W, D] int32 for ``cond`` (class ids [B], or [B, block_size_cond]; None with
    ``batch`` for an unconditional model). ``keys``: one PRNG key per row ([B], what
    ``strategies.choose`` takes: a row's draws then do not depend on its batch), or one key split
    into B (``strategies.row_keys``); default key 0. Greedy needs none.
    ``return_logits``: also the (guided) logits [B, H, W, D, V] each code was chosen from."""
    c = model.config
    cond = _cond_rows(model, cond, batch)
    strategies = _per_depth(strategy, c.depth, "strategies")
    guidances = _per_depth(guidance, c.depth, "guidances")
    null = _null_rows(model, cond, null_cond) if any(g is not None for g in guidances) else None
    if all(isinstance(s, Greedy) for s in strategies):
        keys = None
    else:
        keys = _row_keys(jax.random.key(0) if keys is None else keys, cond.shape[0])
    return _run(model.clone(decode=False), variables, cond, null, keys, None, strategies=strategies,
                guidances=guidances, with_logits=return_logits)


def cached_logits(model: RQTransformer, variables: Any, codes: jax.Array, cond=None) -> jax.Array:
    """Teacher forcing through the decode path (body and head KV caches, position by position):
    logits [B, H, W, D, V] that equal ``model.apply(variables, codes, cond)``."""
    codes = jnp.asarray(codes).astype(jnp.int32)
    b = codes.shape[0]
    cond = _cond_rows(model, cond, b)
    forced = codes.reshape(b, -1, model.config.depth)
    depth = model.config.depth
    _, logits = _run(model.clone(decode=False), variables, cond, None, None, forced, strategies=(Greedy(),) * depth,
                     guidances=(None,) * depth, with_logits=True)
    return logits


@functools.partial(jax.jit, static_argnames=("decoder",))
def decode_images(decoder, decoder_variables: Any, codes: jax.Array) -> jax.Array:
    """Codes [B, h, w, D] → images [B, H, W, 3] through an RQ-VAE decoder
    (``convert.rq_transformer.load_rqvae_decoder``)."""
    return decoder.apply(decoder_variables, codes)


__all__ = ["sample_codes", "cached_logits", "decode_images"]
