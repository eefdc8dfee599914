"""Zero-shot classification from any image/text embedding model.

Two ways to turn a class's prompts into a score. CLIP's prompt ensembling (``class_embeddings``:
the mean of the prompts' unit embeddings, renormalised) suits prompts that vary only the context of
the class name ("a photo of a {}", "a sketch of a {}"). When the prompts vary other content of the
scene ("a red circle", "three blue circles"), the mean only works if the embedding is additive in
those attributes; ``best_prompt_logits`` instead scores a class by its best-matching prompt — the
class of the caption the model ranks first among all candidate captions.

The encoders run once over every prompt (``prompt_embeddings``); the scoring functions are pure
``jnp`` and jit-able on image embeddings sharded over the batch axis (their sums reduce across
devices). Top-k uses the same tie-aware rank count as retrieval (``hit_rate``): no sort.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.data.pipeline import fixed_size_chunks
from jaxunified.eval.retrieval import hit_rate
from jaxunified.quant.vq import l2_normalize


def prompt_embeddings(
    encode_text: Callable[[list[str]], jax.Array], prompts_per_class: Sequence[Sequence[str]], batch_size: int = 256
) -> tuple[jax.Array, np.ndarray]:
    """Unit embeddings ``[P, D]`` of every prompt, in class order, and each prompt's class id ``[P]``.

    ``encode_text(prompts)`` maps a list of ``batch_size`` strings to ``[batch_size, D]``; the last
    batch is padded by repeating its final prompt, so a jitted encoder compiles once.
    """
    if isinstance(prompts_per_class, str) or not len(prompts_per_class):
        raise ValueError("zero-shot prompts: expected a non-empty list of prompt lists, one per class")
    for c, prompts in enumerate(prompts_per_class):
        if isinstance(prompts, str) or not len(prompts) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"class {c}: expected a non-empty list of prompt strings, got {prompts!r}")
    if batch_size < 1:
        raise ValueError(f"zero-shot prompts: batch_size must be ≥ 1, got {batch_size}")
    flat = [p for prompts in prompts_per_class for p in prompts]
    owner = np.repeat(np.arange(len(prompts_per_class)), [len(p) for p in prompts_per_class])
    parts = []
    for _, idx, n in fixed_size_chunks(len(flat), batch_size):
        out = jnp.asarray(encode_text([flat[j] for j in idx]))
        if out.ndim != 2 or out.shape[0] != batch_size:
            raise ValueError(f"encode_text must return [{batch_size}, D] for {batch_size} prompts, got {out.shape}")
        parts.append(l2_normalize(out[:n].astype(jnp.float32)))
    return jnp.concatenate(parts), owner


def ensemble(prompt_embs: jax.Array, owner: np.ndarray) -> jax.Array:
    """``[C, D]`` class embeddings: each class's prompt embeddings averaged and renormalised."""
    owner = np.asarray(owner)  # host ids: the class count must be static under jit
    # Mean then renormalise equals sum then renormalise.
    return l2_normalize(jax.ops.segment_sum(prompt_embs, jnp.asarray(owner), num_segments=int(owner.max()) + 1))


def class_embeddings(
    encode_text: Callable[[list[str]], jax.Array], prompts_per_class: Sequence[Sequence[str]], batch_size: int = 256
) -> jax.Array:
    """``[C, D]`` unit class embeddings (CLIP prompt ensembling; see ``prompt_embeddings``)."""
    return ensemble(*prompt_embeddings(encode_text, prompts_per_class, batch_size))


def best_prompt_logits(image_embs: jax.Array, prompt_embs: jax.Array, owner: np.ndarray) -> jax.Array:
    """``[B, C]``: each class's highest cosine similarity over its prompts (``prompt_embeddings``)."""
    owner = np.asarray(owner)  # host ids: the class count must be static under jit
    sims = zero_shot_logits(image_embs, prompt_embs)  # [B, P]
    return jax.ops.segment_max(sims.T, jnp.asarray(owner), num_segments=int(owner.max()) + 1).T


def zero_shot_logits(image_embs: jax.Array, class_embs: jax.Array) -> jax.Array:
    """Cosine similarities ``[B, C]`` of image embeddings ``[B, D]`` to class embeddings ``[C, D]``."""
    if image_embs.ndim != 2 or class_embs.ndim != 2 or image_embs.shape[1] != class_embs.shape[1]:
        raise ValueError(f"zero_shot_logits expects [B, D] and [C, D], got {image_embs.shape} and {class_embs.shape}")
    img = l2_normalize(image_embs.astype(jnp.float32))
    cls = l2_normalize(class_embs.astype(jnp.float32))
    return jnp.einsum("bd,cd->bc", img, cls, precision=jax.lax.Precision.HIGHEST)


def zero_shot_counts(
    image_embs: jax.Array,
    class_embs: jax.Array,
    labels: jax.Array,
    mask: jax.Array | None = None,
    ks: Sequence[int] = (1, 5),
) -> dict[str, jax.Array]:
    """Sums to accumulate over eval batches: ``{"top{k}": hits, "count": rows}`` (float32 scalars).

    Only ``k ≤ C`` are reported (top-5 needs at least 5 classes). Rows with ``mask`` False
    (padding, or examples a task does not apply to) count nowhere; ``labels`` there may be anything.
    """
    return counts_from_logits(zero_shot_logits(image_embs, class_embs), labels, mask, ks)


def counts_from_logits(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None, ks: Sequence[int] = (1, 5)
) -> dict[str, jax.Array]:
    """``zero_shot_counts`` for precomputed class scores ``[B, C]`` (e.g. ``best_prompt_logits``)."""
    n_classes = logits.shape[1]
    mask = jnp.ones(logits.shape[:1], bool) if mask is None else jnp.asarray(mask, bool)
    labels = jnp.clip(jnp.asarray(labels, jnp.int32), 0, n_classes - 1)
    true = jnp.take_along_axis(logits, labels[:, None], axis=1)
    greater = jnp.sum(logits > true, axis=1)
    tied = jnp.sum(logits == true, axis=1) - 1  # the true class ties itself
    weight = mask.astype(jnp.float32)
    out = {f"top{k}": jnp.sum(weight * hit_rate(greater, tied, 1, k)) for k in ks if k <= n_classes}
    out["count"] = jnp.sum(weight)
    return out


def accuracy_from_counts(counts: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """``{"top{k}": accuracy}`` from (accumulated) ``zero_shot_counts``; 0 when no row counted."""
    n = jnp.maximum(counts["count"], 1.0)
    return {k: v / n for k, v in counts.items() if k != "count"}


def zero_shot_accuracy(
    image_embs: jax.Array,
    class_embs: jax.Array,
    labels: jax.Array,
    mask: jax.Array | None = None,
    ks: Sequence[int] = (1, 5),
) -> dict[str, jax.Array]:
    """``{"top1": acc, "top5": acc}`` of one batch (see ``zero_shot_counts``)."""
    return accuracy_from_counts(zero_shot_counts(image_embs, class_embs, labels, mask, ks))
