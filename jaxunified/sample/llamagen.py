"""Image-token sampling from a ``models.llamagen_gpt.LlamaGenGPT`` (LlamaGen's ``generate.py``).

One jit per (model, strategy, guidance, num_tokens): the cache is created inside it, the
condition is prefilled (its last position gives image token 0), and ``sample.decode.generate``
runs the remaining tokens as one ``lax.while_loop`` over that static cache. Image token i sits
at sequence position (and cache slot, and 2-D RoPE row) ``cls_token_num + i``.

Guidance batches [cond; uncond] halves and feeds each sampled token to both:

- c2i: the uncond rows are the null class ``num_classes`` (needs a model with a null row,
  i.e. built with ``class_dropout_prob > 0``);
- t2i: the uncond rows are the ``uncond_embedding`` constant; both halves use the caption's
  ``cond_mask``, as LlamaGen's ``generate`` does (it tiles ``emb_masks`` over the doubled batch).

``Guidance.interval`` is LlamaGen's ``cfg_interval``. LlamaGen guides only when cfg_scale > 1;
here passing a ``Guidance`` always guides (scale 1 gives the conditional logits, at twice the cost).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxunified.models.llamagen_gpt import LlamaGenGPT, init_cache
from jaxunified.sample.decode import auto_windows, generate, sampler_jit
from jaxunified.sample.strategies import Greedy, Guidance, Strategy, row_keys


def _uncond_rows(model: LlamaGenGPT, variables, cond: jax.Array) -> jax.Array:
    c = model.config
    if c.caption_dim:
        try:
            null = variables["constants"]["cls_embedding"]["uncond_embedding"]
        except KeyError as e:
            raise ValueError("t2i guidance needs variables['constants'] (the uncond_embedding); pass the whole "
                             "variables dict from init or convert.load") from e
        return jnp.broadcast_to(jnp.asarray(null, cond.dtype), cond.shape)
    if not c.has_null_class:
        raise ValueError("this c2i model has no null-class row (built with class_dropout_prob=0), so it cannot be "
                         "guided; sample with guidance=None")
    return jnp.full_like(cond, c.null_class)


def _sample(model, variables, cond, cond_mask, keys, *, num_tokens, strategy, guidance, windows):
    c = model.config
    dec = model.clone(decode=True)
    if guidance is not None:
        cond = jnp.concatenate([cond, _uncond_rows(model, variables, cond)])
        if cond_mask is not None:
            cond_mask = jnp.concatenate([cond_mask, cond_mask])
    rows = cond.shape[0]
    # The last sampled token is never fed, so the condition plus num_tokens - 1 slots suffice.
    cache = init_cache(dec, rows, c.cls_token_num + num_tokens - 1)
    fixed = {k: v for k, v in variables.items() if k != "cache"}
    first, state = dec.apply({**fixed, "cache": cache}, cond, cond_mask=cond_mask, method="prefill",
                             mutable=["cache"])

    def step(tok, cache, n):
        # Feeds image token n - 1, which sits at position cls_token_num + n - 1.
        logits, state = dec.apply({**fixed, "cache": cache}, tok, c.cls_token_num + n - 1, cond_mask=cond_mask,
                                  method="step", mutable=["cache"])
        return logits, state["cache"]

    tokens, _ = generate(step, first, state["cache"], num_tokens, strategy, keys, guidance=guidance, windows=windows)
    return tokens


_sample = sampler_jit(_sample, static_argnames=("model", "num_tokens", "strategy", "guidance", "windows"))


def sample_images(
    model: LlamaGenGPT,
    variables: Any,
    cond,
    *,
    num_tokens: int | None = None,
    strategy: Strategy = Greedy(),
    key: jax.Array | None = None,
    guidance: Guidance | None = None,
    cond_mask: jax.Array | None = None,
    cache_windows: int | None = None,
) -> jax.Array:
    """Image codes [B, num_tokens] int32 (raster order) for ``cond``: class ids [B] (c2i) or
    left-padded caption states [B, cls_token_num, caption_dim] with ``cond_mask`` [B,
    cls_token_num] (t2i). ``num_tokens`` defaults to the whole grid (``block_size``).
    ``key`` seeds the per-row draws (``strategies.row_keys``); Greedy needs none.
    ``cache_windows``: ``sample.decode.generate``'s ``windows`` (None: ``auto_windows``): the same
    tokens from fewer KV bytes read.
    """
    c = model.config
    num_tokens = c.block_size if num_tokens is None else int(num_tokens)
    if not 1 <= num_tokens <= c.block_size:
        raise ValueError(f"num_tokens must be in [1, block_size={c.block_size}], got {num_tokens}")
    cond = jnp.asarray(cond)
    if cond_mask is not None:
        cond_mask = jnp.asarray(cond_mask, jnp.bool_)
        if cond_mask.shape != (cond.shape[0], c.cls_token_num):
            raise ValueError(f"cond_mask must be [B={cond.shape[0]}, cls_token_num={c.cls_token_num}], "
                             f"got {cond_mask.shape}")
    keys = None if isinstance(strategy, Greedy) else row_keys(jax.random.key(0) if key is None else key,
                                                               cond.shape[0])
    return _sample(model.clone(decode=False), variables, cond, cond_mask, keys, num_tokens=num_tokens,
                   strategy=strategy, guidance=guidance,
                   windows=auto_windows(num_tokens, cache_windows))


__all__ = ["sample_images"]
