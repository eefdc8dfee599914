"""Zero-shot classification and image↔text retrieval over one split, for any image/text encoder pair.

Shared by the SigLIP, TokLIP and DualToken tasks: each builds ``EncoderPair``s (an image
encoder takes the global batch, so TokLIP can read cached ``codes`` and SigLIP ``image``). Image and caption embeddings of the whole split are gathered once; retrieval
then runs sharded over the mesh (``eval.retrieval``), zero-shot against prompt-ensembled class
embeddings (``eval.zero_shot``; the shapes tasks come from ``eval.templates``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.data.pipeline import build_dataset, to_global
from jaxunified.data.text import TextTokenizer, tokenize_batch
from jaxunified.eval import retrieval, templates, zero_shot


@dataclasses.dataclass(frozen=True)
class EncoderPair:
    """``image(global_batch) -> [B, D]`` and ``text(tokens [N, L]) -> [N, D]``, both compiled."""

    image: Callable[[Mapping[str, jax.Array]], jax.Array]
    text: Callable[[jax.Array], jax.Array]


def encoder_pair(image_fn: Callable[[Any, Mapping[str, jax.Array]], jax.Array],
                 text_fn: Callable[[Any, jax.Array], jax.Array], weights: Any) -> EncoderPair:
    """Jits ``image_fn(weights, batch)`` and ``text_fn(weights, tokens)`` with the weights as
    arguments, not closed-over constants (at So400m size those are gigabytes baked into the program)."""
    image, text = jax.jit(image_fn), jax.jit(text_fn)
    return EncoderPair(image=lambda batch: image(weights, batch), text=lambda tokens: text(weights, tokens))


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts, axis=0) if parts else np.zeros((0,), np.float32)


def evaluate_image_text(
    encoders: EncoderPair,
    text_tokenizer: TextTokenizer,
    data_cfg: Any,
    split: str,
    mesh,
    *,
    num_examples: int | None = None,
    ks: tuple[int, ...] = (1, 5),
    prompt_batch: int = 64,
) -> dict[str, float]:
    """Metrics over ``split``: ``zs_{task}_top1`` (shapes colour/shape/count, best-prompt scoring;
    ``zs_{task}_ensemble_top1`` with CLIP prompt ensembling; only images for which the task is well
    defined count), ``i2t_r{k}``/``t2i_r{k}`` (an image whose caption equals the
    query's counts as a hit) and ``num_examples``.

    The batches come from ``build_dataset(data_cfg, split, mesh)`` with ``data_cfg.text`` set.
    """
    encode_image, encode_text = encoders.image, encoders.text
    data = build_dataset(data_cfg, split, mesh)
    img_parts, txt_parts, masks, captions = [], [], [], []
    labels: dict[str, list[np.ndarray]] = {}
    seen = 0
    with jax.set_mesh(mesh):
        for host in data:
            if "tokens" not in host:
                raise ValueError("image-text evaluation needs caption tokens: set data.text.tokenizer in the config")
            batch = to_global(host, mesh)
            img_parts.append(np.asarray(jax.device_get(encode_image(batch)), np.float32))
            txt_parts.append(np.asarray(jax.device_get(encode_text(batch["tokens"])), np.float32))
            masks.append(np.asarray(host["mask"], bool))
            captions.extend(str(c) for c in host["caption"])
            for k in ("obj_color", "obj_shape", "obj_mask", "main_color", "main_shape", "count"):
                if k in host:
                    labels.setdefault(k, []).append(np.asarray(host[k]))
            seen += int(host["mask"].sum())
            if num_examples and seen >= num_examples:
                break
        img, txt, mask = _concat(img_parts), _concat(txt_parts), _concat(masks)
        if num_examples:
            mask &= np.cumsum(mask) <= num_examples
        out: dict[str, float] = {"num_examples": float(mask.sum())}
        groups = retrieval.caption_groups(captions)
        img = jnp.asarray(img)  # one host→device copy for retrieval and every zero-shot score below
        rec = retrieval.image_text_retrieval(img, jnp.asarray(txt), groups, image_mask=mask, ks=ks,
                                             mesh=mesh)
        out.update({k: float(v) for k, v in rec.items()})
        if len(labels) == 6:  # the shapes dataset: its zero-shot tasks
            lab = {k: _concat(v) for k, v in labels.items()}
            targets = templates.shapes_targets(lab, mask)

            def encode_prompts(prompts: list[str]) -> jax.Array:
                return encode_text(jnp.asarray(tokenize_batch(text_tokenizer, prompts)))

            for name, task in templates.shapes_tasks().items():
                prompts, owner = zero_shot.prompt_embeddings(encode_prompts, task.prompts, batch_size=prompt_batch)
                y, valid = targets[name]
                scores = {"best": zero_shot.best_prompt_logits(img, prompts, owner),
                          "mean": zero_shot.zero_shot_logits(img, zero_shot.ensemble(prompts, owner))}
                if task.scoring not in scores:
                    raise ValueError(f"zero-shot task {name!r}: unknown scoring {task.scoring!r}; use {sorted(scores)}")
                keys = {"best": "best_top1", "mean": "ensemble_top1", task.scoring: "top1"}
                for scoring, logits in scores.items():
                    acc = zero_shot.accuracy_from_counts(zero_shot.counts_from_logits(logits, y, valid, ks=(1,)))
                    out[f"zs_{name}_{keys[scoring]}"] = float(acc["top1"])
                out[f"zs_{name}_count"] = float(np.asarray(valid).sum())
    return out
