"""A LLaVA-style multimodal LM: a frozen vision model's token vectors → ``MlpProjector`` → input
embeddings of a ``models.lm.DecoderLM``, placed over the ``num_image_tokens`` image slots of the
chat prompt (``data.shapes_chat``: ``<|vision_start|>`` [image × N] ``<|vision_end|>``).

The vision side is not part of this module: the caller passes its vectors ([B, N, vision_dim]:
a SigLIP tower's patch states, a VQ's codebook rows of the image's codes, TokLIP's features).
``image_start`` [B] is the first image slot of each row (the chat layout's fixed offset plus a
row's left padding). With ``decode=True`` the prefill carries the image and later steps are text
only (``vision=None``).

With ``image_grid`` (rows, cols) on an mRoPE LM (``LMConfig.mrope_section``) the image slots get
Qwen2-VL's 3-D position ids (``mrope_positions``): the image's first position on the temporal axis,
that plus its row / column on the height / width axes, and the text after it continues from the
largest of those + 1 (HF's ``get_rope_index`` for one still image). The output then carries
``"position_shift"`` [B], what that does to the positions of every later token (HF's
``rope_deltas`` of an unpadded row); ``sample.lm`` adds it to the positions of the tokens it generates.
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
    image_grid: tuple[int, ...] = ()  # (rows, cols) of the image slots: 3-D mRoPE positions; () = 1-D

    def __post_init__(self):
        object.__setattr__(self, "image_grid", tuple(int(g) for g in self.image_grid))
        if self.image_grid:
            if len(self.image_grid) != 2 or self.image_grid[0] * self.image_grid[1] != self.num_image_tokens:
                raise ValueError(f"image_grid {self.image_grid} must be (rows, cols) of the {self.num_image_tokens} "
                                 "image tokens")
            if not self.lm.mrope_section:
                raise ValueError("image_grid places image tokens by mRoPE: the LM needs mrope_section")


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
        shift = None
        if c.image_grid:
            flat = jnp.broadcast_to(jnp.arange(length), (batch, length)) if positions is None else positions
            on = jnp.ones((batch,), bool) if has_image is None else has_image.astype(bool)
            positions, shift = mrope_positions(flat, start, c.image_grid, on)
        out = self.lm(input_ids, inputs_embeds=embeds, embeds_mask=mask, attention_mask=attention_mask,
                      positions=positions, return_hidden=return_hidden)
        return out if shift is None else {**out, "position_shift": shift}


def mrope_positions(positions: jax.Array, image_start: jax.Array, grid: tuple[int, int], has_image: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """(t, h, w) ids [B, T, 3] and the shift [B] of the tokens after the image, for 1-D positions
    [B, T] whose slots ``image_start`` [B] … + rows·cols hold a raster-ordered image (rows where
    ``has_image`` [B] is False keep 1-D ids: equal on the three axes).

    The image sits at its first slot's position p on t, p + row on h, p + column on w; later
    tokens continue at p + max(rows, cols), i.e. their 1-D position + max(rows, cols) − rows·cols."""
    rows, cols = grid
    n = rows * cols
    k = jnp.arange(positions.shape[1])[None] - image_start[:, None]  # slot index inside the image
    inside = has_image[:, None] & (k >= 0) & (k < n)
    shift = jnp.where(has_image, max(rows, cols) - n, 0).astype(positions.dtype)
    flat = jnp.where(has_image[:, None] & (k >= n), positions + shift[:, None], positions)
    first = jnp.take_along_axis(positions, jnp.clip(image_start, 0, positions.shape[1] - 1)[:, None], axis=1)
    ids = [jnp.where(inside, first, flat), jnp.where(inside, first + k // cols, flat),
           jnp.where(inside, first + k % cols, flat)]
    return jnp.stack(ids, axis=-1), shift


__all__ = ["MLLM", "MLLMConfig", "mrope_positions"]
