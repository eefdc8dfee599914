"""Text generation from a ``models.lm.DecoderLM``: batched prompts of different lengths, EOS stop.

Prompts are left-padded into one [B, T] block so every row's next token lands in the same
cache slot; the padding slots are masked out of attention for the whole decode and each row's
RoPE positions start at its own first real token, so a padded row produces exactly the logits
it would alone. The prefill and the token loop run in one jit (``sample.decode.generate``);
the static cache lives inside it and is updated in place. Prompt lengths are bucketed to a
multiple of ``bucket`` so a new prompt length rarely means a new compile.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.models.lm import DecoderLM, init_cache
from jaxunified.sample.decode import auto_windows, cache_slots, generate, sampler_jit
from jaxunified.sample.strategies import Greedy, Guidance, Strategy, row_keys


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, bucket: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Token lists → (ids [B, T], valid [B, T]) right-aligned, T rounded up to ``bucket``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    length = -(-longest // bucket) * bucket
    ids = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = p
        valid[i, length - len(p):] = True
    return ids, valid


def leading_pads(valid: jax.Array) -> jax.Array:
    """[B, 1] int32: the left padding of each row of ``valid`` [B, T] (masked slots inside a prompt
    keep their positions, so only the leading ones shift a row's RoPE positions)."""
    first = jnp.argmax(valid, axis=1)
    return jnp.where(valid.any(axis=1), first, valid.shape[1])[:, None].astype(jnp.int32)


def prompt_positions(valid: jax.Array, offset: jax.Array | None = None) -> jax.Array:
    """[B, T] RoPE positions of left-padded prompts ``valid`` [B, T] (``offset``: their
    ``leading_pads``, when already known); pads sit at 0."""
    offset = leading_pads(valid) if offset is None else offset
    return jnp.maximum(jnp.arange(valid.shape[1])[None] - offset, 0)


def cache_layout(valid: jax.Array, max_new_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For left-padded prompts ``valid`` [B, T]: (slot_valid [B, T + max_new_tokens], the left pads
    per row [B, 1], the prompt's RoPE positions [B, T]). Token n after the prompt sits at position
    ``T + n - pads``."""
    batch = valid.shape[0]
    # Slots after the prompt are always valid; a row's pads never are.
    slot_valid = jnp.concatenate([valid, jnp.ones((batch, max_new_tokens), bool)], axis=1)
    offset = leading_pads(valid)
    return slot_valid, offset, prompt_positions(valid, offset)


def zero_cache(dec, batch: int, max_len: int) -> Any:
    """The zeroed "cache" collection of any decode-mode module whose ``init`` takes ids [B, max_len]."""
    if isinstance(dec, DecoderLM):
        return init_cache(dec, batch, max_len)
    ids = jnp.zeros((batch, max_len), jnp.int32)
    shapes = jax.eval_shape(lambda: dec.init(jax.random.key(0), ids))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def prefill_and_step(model, params, ids: jax.Array, valid: jax.Array, max_new_tokens: int,
                     prefill_inputs: dict | None = None):
    """(first_logits [B, V], cache, step) for ``decode.generate`` over left-padded prompts.

    ``model``: a ``DecoderLM`` or a module with its call convention (``models.mllm.MLLM``), whose
    prefill also takes ``prefill_inputs`` (e.g. the image vectors and their first slot) and may
    return ``"position_shift"`` [B], added to the positions of the generated tokens."""
    dec = model.clone(decode=True)
    batch, length = ids.shape
    slot_valid, offset, positions = cache_layout(valid, max_new_tokens)
    cache = zero_cache(dec, batch, length + max_new_tokens)
    out, state = dec.apply({"params": params, "cache": cache}, ids, attention_mask=slot_valid,
                           positions=positions, mutable=["cache"], **(prefill_inputs or {}))
    # A model whose prompt positions are not its slots' (an MLLM's mRoPE image) says how later ones move.
    shift = out.get("position_shift")
    offset = offset if shift is None else offset - shift[:, None]

    def step(tok, cache, n):
        pos = length + n - 1 - offset
        o, s = dec.apply({"params": params, "cache": cache}, tok[:, None],
                         attention_mask=slot_valid[:, :cache_slots(cache)], positions=pos, mutable=["cache"])
        return o["logits"][:, 0], s["cache"]

    return out["logits"][:, -1], state["cache"], step


def _generate(model, params, ids, valid, keys, prefill_inputs, *, max_new_tokens, strategy, guidance, eos_id, pad_id,
              windows):
    first, cache, step = prefill_and_step(model, params, ids, valid, max_new_tokens, prefill_inputs)
    return generate(step, first, cache, max_new_tokens, strategy, keys, guidance=guidance, eos_id=eos_id,
                    pad_id=pad_id, windows=windows)


_generate = sampler_jit(_generate, static_argnames=("model", "max_new_tokens", "strategy", "guidance", "eos_id",
                                                   "pad_id", "windows"))


def generate_text(
    model: DecoderLM,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    strategy: Strategy = Greedy(),
    key: jax.Array | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    bucket: int = 8,
    guidance: Guidance | None = None,
    uncond_prompts: Sequence[Sequence[int]] | None = None,
    prefill_inputs: dict | None = None,
    cache_windows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Continuations of ``prompts``: (tokens [B, max_new_tokens], lengths [B]) — after a row's
    EOS (counted in its length) the rest is ``pad_id``.

    ``guidance`` with ``uncond_prompts`` (one per prompt, e.g. STAR's ``<|fim_pad|>`` rows): the
    two sets run as one [cond; uncond] batch and each sampled token is fed to both rows.
    ``prefill_inputs``: more arrays for the prefill call (an ``MLLM``'s ``vision``/``image_start``),
    one row per prompt row. ``cache_windows``: ``sample.decode.generate``'s ``windows`` (None: ``auto_windows``).
    """
    rows = list(prompts)
    if guidance is not None:
        if uncond_prompts is None or len(uncond_prompts) != len(rows):
            raise ValueError("guidance needs one unconditional prompt per prompt")
        rows += list(uncond_prompts)
    ids, valid = left_pad(rows, pad_id, bucket)
    keys = None if isinstance(strategy, Greedy) else row_keys(
        jax.random.key(0) if key is None else key, len(prompts))
    tokens, lengths = _generate(model, params, jnp.asarray(ids), jnp.asarray(valid), keys, prefill_inputs,
                                max_new_tokens=max_new_tokens, strategy=strategy, guidance=guidance, eos_id=eos_id,
                                pad_id=pad_id,
                                windows=auto_windows(max_new_tokens, cache_windows))
    return np.asarray(tokens), np.asarray(lengths)


__all__ = ["zero_cache", "leading_pads", "prompt_positions", "cache_layout", "generate_text", "left_pad", "prefill_and_step"]
