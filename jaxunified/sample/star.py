"""Text-to-image sampling from a ``models.star.STAR`` (the reference's ``generate_images``).

Prompts are chat-templated ids ending in ``<|vision_start|>``. Under guidance every prompt gets
STAR's unconditional row: the same ids with everything between the first and the last four
tokens replaced by ``<|fim_pad|>`` (``uncond_ids``), so both rows have the same length. The rows
run as [cond; uncond] halves (the reference interleaves them; each row's numbers are the same)
and each sampled code is fed to both. Prompts of different lengths are left-padded into one
block (``sample.lm.cache_layout``); both decoders' caches are created inside one jit and
``sample.decode.generate`` runs the codes as a ``lax.while_loop``.

The reference's sampler hard-codes temperature 1 and filters top-k then top-p: ``Categorical(1.0,
top_k, top_p)``; its top-k 1 is ``Greedy()``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxunified.models.star import STAR, image_origin
from jaxunified.sample.decode import auto_windows, cache_slots, generate, sampler_jit
from jaxunified.sample.lm import cache_layout, left_pad, zero_cache
from jaxunified.sample.strategies import Greedy, Guidance, Strategy, row_keys

# Qwen2's ids for the tokens STAR's generation rows use.
FIM_PAD_ID = 151662
VISION_START_ID = 151652


def uncond_ids(ids: Sequence[int], fim_pad_id: int = FIM_PAD_ID, keep_tail: int = 4,
               keep: Sequence[int] = ()) -> list[int]:
    """STAR's unconditional row for prompt ``ids``: position 0 and the last ``keep_tail`` ids
    (``<|im_start|> assistant \\n <|vision_start|>``) kept, ``<|fim_pad|>`` in between — except
    ids in ``keep`` (an edit's source-image block stays in both rows, so guidance is on the text)."""
    ids = list(ids)
    if len(ids) < keep_tail + 1:
        raise ValueError(f"a STAR prompt needs more than {keep_tail} ids, got {len(ids)}")
    keep = set(keep)
    middle = [i if i in keep else fim_pad_id for i in ids[1:len(ids) - keep_tail]]
    return ids[:1] + middle + ids[-keep_tail:]


def prefill_and_step(model: STAR, variables: Any, ids: jax.Array, valid: jax.Array, num_tokens: int,
                     source_codes: jax.Array | None = None, source_id: int | None = None,
                     shared_positions: bool = False, source_embeds: jax.Array | None = None):
    """(first pixel logits [R, K], caches, step) for ``decode.generate`` over left-padded prompts;
    an edit's ``source_codes`` [R, N] fill the prompt slots holding ``source_id`` (then its
    understanding tokens ``source_embeds`` [R, M, H], if any, the next M). With
    ``shared_positions`` the output image takes the source block's positions
    (``models.star.image_origin``)."""
    dec = model.clone(decode=True)
    rows, length = ids.shape
    slot_valid, _, positions = cache_layout(valid, num_tokens)
    origin = image_origin(ids, positions, source_id if shared_positions else None)
    positions = positions.at[:, -1].set(origin)
    # The last sampled code is never fed: the prompt plus num_tokens - 1 slots suffice.
    slot_valid = slot_valid[:, :length + num_tokens - 1]
    cache = zero_cache(dec, rows, length + num_tokens - 1)
    fixed = {k: v for k, v in variables.items() if k != "cache"}
    source = {} if source_codes is None else {"source_codes": source_codes, "source_mask": ids == source_id,
                                              "source_embeds": source_embeds}
    out, state = dec.apply({**fixed, "cache": cache}, ids, attention_mask=slot_valid, positions=positions,
                           mutable=["cache"], **source)

    def step(codes, cache, n):
        # Feeds code n - 1, at position origin + n.
        logits, state = dec.apply({**fixed, "cache": cache}, codes[:, None],
                                  attention_mask=slot_valid[:, :cache_slots(cache)], positions=(origin + n)[:, None],
                                  method="step_codes", mutable=["cache"])
        return logits[:, 0], state["cache"]

    return out["pixel_logits"][:, -1], state["cache"], step


def _sample(model, variables, ids, valid, keys, source_codes=None, source_embeds=None, *, num_tokens, strategy,
            guidance, source_id=None, shared_positions=False, windows=1):
    first, cache, step = prefill_and_step(model, variables, ids, valid, num_tokens, source_codes, source_id,
                                          shared_positions, source_embeds)
    codes, _ = generate(step, first, cache, num_tokens, strategy, keys, guidance=guidance, windows=windows)
    return codes


_sample = sampler_jit(_sample, static_argnames=("model", "num_tokens", "strategy", "guidance", "source_id",
                                                "shared_positions", "windows"))


def generate_images(
    model: STAR,
    variables: Any,
    prompts: Sequence[Sequence[int]],
    *,
    num_tokens: int,
    strategy: Strategy = Greedy(),
    guidance: Guidance | None = None,
    key: jax.Array | None = None,
    uncond_prompts: Sequence[Sequence[int]] | None = None,
    fim_pad_id: int = FIM_PAD_ID,
    keep_tail: int = 4,
    pad_id: int = 0,
    bucket: int = 8,
    source_codes=None,
    source_id: int | None = None,
    uncond_keep: Sequence[int] = (),
    masked_id: int | None = None,
    shared_positions: bool = False,
    source_embeds=None,
    cache_windows: int | None = None,
) -> jax.Array:
    """Image codes [B, num_tokens] (raster order) for chat-templated ``prompts`` (each ending in
    ``<|vision_start|>``). With ``guidance`` the unconditional rows are ``uncond_prompts`` or,
    by default, ``uncond_ids(prompt, fim_pad_id, keep_tail)``. Decode them with ``STAR.decode_image``.

    Editing: ``source_codes`` [B, N] are each prompt's source-image codes, entering at the
    prompt's ``source_id`` slots in both guidance rows, followed by its understanding tokens
    ``source_embeds`` [B, M, H] if given: pass the image block's ids (``source_id`` and its
    delimiters) as ``uncond_keep`` so the default unconditional rows keep it, as STAR's do.
    Tokens equal to ``masked_id`` inside a prompt hold their slot and position but are not attended
    (``data.shapes_chat.edit_ids``' fixed-length instruction). ``shared_positions``: the output
    image takes the source block's RoPE positions (``models.star.image_origin``).
    ``cache_windows``: ``sample.decode.generate``'s ``windows`` (None: ``auto_windows``)."""
    rows = [list(p) for p in prompts]
    if guidance is not None:
        if uncond_prompts is None:
            unc = [uncond_ids(p, fim_pad_id, keep_tail, uncond_keep) for p in rows]
        else:
            unc = [list(p) for p in uncond_prompts]
        if len(unc) != len(rows):
            raise ValueError(f"{len(unc)} unconditional prompts for {len(rows)} prompts")
        rows += unc
    ids, valid = left_pad(rows, pad_id, bucket)
    if masked_id is not None:
        valid = valid & (ids != masked_id)
    keys = None if isinstance(strategy, Greedy) else row_keys(jax.random.key(0) if key is None else key,
                                                               len(prompts))
    if source_codes is not None:
        source_codes = jnp.asarray(source_codes, jnp.int32)
        if guidance is not None:
            source_codes = jnp.concatenate([source_codes, source_codes])
    if source_embeds is not None:
        if source_codes is None:
            raise ValueError("source_embeds follow an edit's source_codes in its image slots; pass both")
        source_embeds = jnp.asarray(source_embeds)
        if guidance is not None:
            source_embeds = jnp.concatenate([source_embeds, source_embeds])
    return _sample(model.clone(decode=False), variables, jnp.asarray(ids), jnp.asarray(valid), keys, source_codes,
                   source_embeds,
                   num_tokens=int(num_tokens), strategy=strategy, guidance=guidance, source_id=source_id,
                   shared_positions=bool(shared_positions) and source_codes is not None,
                   windows=auto_windows(num_tokens, cache_windows))


__all__ = ["FIM_PAD_ID", "VISION_START_ID", "generate_images", "prefill_and_step", "uncond_ids"]
