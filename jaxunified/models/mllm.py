"""A LLaVA-style multimodal LM: a frozen vision model's token vectors → ``MlpProjector`` → input
embeddings of a ``models.lm.DecoderLM``, placed over the ``num_image_tokens`` image slots of the
chat prompt (``data.shapes_chat``: ``<|vision_start|>`` [image × N] ``<|vision_end|>``).

The vision side is not part of this module: the caller passes its vectors ([B, N, vision_dim]:
a SigLIP tower's patch states, a VQ's codebook rows of the image's codes, TokLIP's features).
``image_start`` [B] is the first image slot of each row (the chat layout's fixed offset plus a
row's left padding). With ``decode=True`` the prefill carries the image and later steps are text
only (``vision=None``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxunified.models import lm as lm_lib
from jaxunified.nn.projector import MlpProjector


@dataclasses.dataclass(frozen=True)
class MLLMConfig:
    lm: lm_lib.LMConfig
    vision_dim: int
    num_image_tokens: int
    image_start: int = 3
    projector_depth: int = 2


class MLLM(nn.Module):
    config: MLLMConfig
    decode: bool = False

    def setup(self):
        c = self.config
        self.projector = MlpProjector(c.lm.hidden_size, c.projector_depth, jnp.dtype(c.lm.dtype))
        self.lm = lm_lib.DecoderLM(c.lm, decode=self.decode)

    def project(self, vision: jax.Array) -> jax.Array:
        """Vision vectors [B, N, vision_dim] → the LM's input embeddings [B, N, H]."""
        return self.projector(vision)

    def __call__(self, input_ids: jax.Array, vision: jax.Array | None = None, *, image_start: jax.Array | None = None,
                 has_image: jax.Array | None = None, attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                 return_hidden: bool = False) -> dict[str, Any]:
        """Text logits [B, T, V] (``"logits"``) and the LM's states for ``input_ids`` [B, T] whose image
        slots are filled from ``vision`` [B, N, vision_dim]; rows whose ``has_image`` [B] is False are
        text only (their vision rows are ignored)."""
        if vision is None:
            return self.lm(input_ids, attention_mask=attention_mask, positions=positions, return_hidden=return_hidden)
        c = self.config
        batch, length = input_ids.shape
        n = vision.shape[1]
        if n != c.num_image_tokens or vision.shape[-1] != c.vision_dim:
            raise ValueError(f"vision vectors {vision.shape} where the model takes [B, {c.num_image_tokens}, "
                             f"{c.vision_dim}]")
        start = jnp.full((batch,), c.image_start, jnp.int32) if image_start is None else image_start.astype(jnp.int32)
        image = self.project(vision)
        embeds = jax.vmap(lambda e, s: jax.lax.dynamic_update_slice(
            jnp.zeros((length, c.lm.hidden_size), jnp.float32), e, (s, 0)))(image, start)
        slots = jnp.arange(length)[None]
        mask = (slots >= start[:, None]) & (slots < start[:, None] + n)
        if has_image is not None:
            mask = mask & has_image.astype(bool)[:, None]
        return self.lm(input_ids, inputs_embeds=embeds, embeds_mask=mask, attention_mask=attention_mask,
                       positions=positions, return_hidden=return_hidden)


__all__ = ["MLLM", "MLLMConfig"]
