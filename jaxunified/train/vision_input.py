"""A frozen vision model whose token vectors an LM reads: the ``vision`` block of an ``mllm`` run,
and the understanding tokens STAR's edits give the frozen base through that run's projector.

Kinds (``vision.kind``):

- ``siglip``: a SigLIP vision tower's patch states (the LLaVA baseline; ``vision.source`` is a
  ``train.frozen.load_siglip`` block). ``vision.select_layer`` picks them as LLaVA's
  ``mm_vision_select_layer`` does: 0 (default) the tower's output after its post-LayerNorm, a
  negative k the k-th last of (embeddings, layer 1 output, …) without it (LLaVA-1.5 reads -2);
- ``vq``: the codebook rows of a VQ tokenizer's codes — discrete visual tokens, the input STAR's
  generation path uses (``vision.source`` is a ``train.frozen.load_vq`` block);
- ``toklip``: TokLIP's code embeddings ⊕ causal features, as the TokLIP paper feeds its MLLM
  (``vision.source``: a ``toklip`` run or ``kind="toklip"`` checkpoint);
- ``dualtoken``: DualToken's pixel ⊕ semantic residual code sums (a ``dualtoken`` run or checkpoint).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxunified.data.pipeline import as_float_images
from jaxunified.models import siglip as siglip_lib
from jaxunified.models import toklip as toklip_lib
from jaxunified.models import vqgan as vqgan_lib
from jaxunified.train import frozen as frozen_parts
from jaxunified.train import planning
from jaxunified.train.task import fill_boxes

VISION_KINDS = ("siglip", "vq", "toklip", "dualtoken")


class VisionInput:
    """The frozen vision model of block ``vc`` at ``resolution``: ``num_tokens`` vectors of ``dim``
    per image (``vectors``), its variables for a task's frozen collection (``frozen_variables``)."""

    def __init__(self, vc, resolution: int):
        self.kind, self.resolution = vc.kind, int(resolution)
        self.select_layer = int(vc.get("select_layer", 0))
        r = self.resolution
        if self.select_layer and vc.kind != "siglip":
            raise ValueError(f"vision.select_layer applies to siglip inputs, not {vc.kind!r}")
        if vc.kind == "siglip":
            siglip, sv = frozen_parts.load_siglip(vc.source)
            self.model = siglip_lib.VisionTower(siglip.cfg.vision)
            siglip_lib.check_select_layer(self.select_layer, self.model.cfg.depth)
            self._variables = {"params": sv["params"]["vision"]}
            shape = jax.eval_shape(lambda v: self.vectors(v, jnp.zeros((1, r, r, 3))), self._variables)
            self.num_tokens, self.dim = shape.shape[1:]
        elif vc.kind == "vq":
            self.model, self._variables = frozen_parts.load_vq(vc.source)
            g = r // self.model.cfg.downsample_factor
            self.num_tokens, self.dim = g * g, self.model.cfg.vq.embed_dim
        elif vc.kind in ("toklip", "dualtoken"):
            load = frozen_parts.load_toklip if vc.kind == "toklip" else frozen_parts.load_dualtoken
            self.model, self._variables = load(vc.source)
            shape = jax.eval_shape(lambda v: self.vectors(v, jnp.zeros((1, r, r, 3))), self._variables)
            self.num_tokens, self.dim = shape.shape[1:]
        else:
            raise ValueError(f"vision.kind={vc.kind!r}; use one of {', '.join(VISION_KINDS)}")

    def loaded_variables(self):
        """The variables as loaded (host arrays, unboxed): what a cache of the vectors is keyed by and
        computed from."""
        return nn.meta.unbox(self._variables)

    def frozen_variables(self):
        """The variables as a frozen collection entry: SigLIP/VQ boxed like a fresh init, so they shard
        like it; TokLIP/DualToken as loaded (replicated; they are small)."""
        loaded = planning.materialize(self.loaded_variables())
        if self.kind not in ("siglip", "vq"):
            return loaded
        r = self.resolution
        v_abs = jax.eval_shape(lambda: self.model.init(jax.random.key(0), jnp.zeros((1, r, r, 3))))
        if self.kind == "siglip":
            v_abs = {"params": v_abs["params"]}
        return fill_boxes(v_abs, loaded, "the frozen vision model")

    def vectors(self, variables, images) -> jax.Array:
        """[B, num_tokens, dim] float32 for images in [-1, 1] (uint8 batches are normalised here)."""
        images = as_float_images(images)
        if self.kind == "siglip":
            out = siglip_lib.selected_states(self.model, variables, images, self.select_layer)
        elif self.kind == "toklip":
            # TokLIP's MLLM input: code embeddings ⊕ causal features
            def both(m, x):
                codes, feats = m.encode_tokens(x)
                return toklip_lib.concat_tokens(m.codebook_vectors(codes), feats)
            out = self.model.apply(variables, images, method=both)
        elif self.kind == "dualtoken":
            # DualToken's: pixel ⊕ semantic residual code sums per token
            def both(m, x):
                enc = m.encode_image(x)
                emb = m.code_embeddings(enc["code_pix"], enc["code_sem"])
                return emb.reshape(emb.shape[0], -1, emb.shape[-1])
            out = self.model.apply(variables, images, method=both)
        else:
            _, codes, _ = self.model.apply(variables, images, method=vqgan_lib.VQGAN.encode)
            out = self.model.apply(variables, codes.reshape(codes.shape[0], -1), method=vqgan_lib.VQGAN.lookup)
        return jax.lax.stop_gradient(out.astype(jnp.float32))


__all__ = ["VISION_KINDS", "VisionInput"]
