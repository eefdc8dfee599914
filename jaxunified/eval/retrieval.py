"""Image↔text retrieval recall@k over (possibly sharded) embedding galleries.

Relevance is given by integer group ids: a gallery item is a hit for a query when their groups
are equal, so duplicate captions (or several captions of one image) are handled without special
cases. Groups are ``[N]`` ints or ``[N, W]`` int words compared whole (``caption_groups`` gives
64-bit caption hashes as two int32 words, since JAX runs without 64-bit ints by default).

No top-k over the gallery: for each query only the best relevant score and how many
non-relevant items beat or tie it are counted. Those counts are sums over the gallery axis, so
a gallery sharded over the mesh's batch axes is reduced across devices by XLA, and queries go
through in chunks so a ``[Q, G]`` score matrix never exists.

Exact score ties are broken uniformly at random in expectation (``hit_rate``): a collapsed
model whose embeddings are all equal scores chance level, not a perfect recall.
"""

from __future__ import annotations

import functools
import hashlib
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxunified.parallel.mesh import BATCH_AXES, num_batch_shards
from jaxunified.quant.vq import l2_normalize


def caption_groups(captions: Sequence[str]) -> np.ndarray:
    """Deterministic group ids for caption strings (host side): ``[N, 2]`` int32, equal iff the text is.

    A 64-bit BLAKE2 digest, identical on every host and run (unlike ``hash``), and unlikely to
    collide even for millions of captions (a 32-bit hash collides somewhere in ~7% of 25k-caption
    sets, counting a stranger's caption as a hit).
    """
    if isinstance(captions, str):
        raise ValueError("caption_groups expects a sequence of captions, got a single string")
    digests = b"".join(hashlib.blake2b(str(c).encode("utf-8"), digest_size=8).digest() for c in captions)
    return np.frombuffer(digests, dtype="<i4").reshape(-1, 2).astype(np.int32)


def hit_rate(greater: jax.Array, tied_other: jax.Array, tied_relevant: jax.Array, k: int) -> jax.Array:
    """P(first relevant item ranks in the top ``k``) with exact ties ordered uniformly at random.

    ``greater``: non-relevant items scoring strictly above the best relevant one; ``tied_other`` /
    ``tied_relevant``: non-relevant / relevant items scoring exactly that best score (the latter
    ≥ 1 when there is a relevant item). Without ties this is ``greater < k``.
    """
    greater, t, r = (jnp.asarray(a, jnp.float32) for a in (greater, tied_other, tied_relevant))
    slots = k - greater  # hit iff fewer than `slots` tied non-relevant items come before a relevant one
    miss = jnp.ones_like(t)
    for i in range(k):  # P(the first i+1 of the shuffled tie block are all non-relevant)
        frac = jnp.where(t - i > 0, (t - i) / jnp.maximum(t + r - i, 1.0), 0.0)
        miss = miss * jnp.where(i < slots, frac, 1.0)
    return jnp.where((slots > 0) & (r > 0), 1.0 - miss, 0.0)


class RankStats(NamedTuple):
    """Per query, ``[Q]`` int32; see ``hit_rate``. ``has_relevant`` is False when no unmasked
    gallery item shares the query's group (such a query always misses)."""

    greater: jax.Array
    tied_other: jax.Array
    tied_relevant: jax.Array
    has_relevant: jax.Array


def _as_words(groups: jax.Array, n: int, what: str) -> jax.Array:
    groups = jnp.asarray(groups)
    if groups.ndim == 1:
        groups = groups[:, None]
    if groups.ndim != 2 or groups.shape[0] != n or not jnp.issubdtype(groups.dtype, jnp.integer):
        raise ValueError(
            f"{what} must be integer group ids of shape [{n}] or [{n}, W], got {groups.dtype}{groups.shape}"
        )
    return groups


def _as_mask(mask, n: int, what: str) -> jax.Array:
    if mask is None:
        return jnp.ones((n,), bool)
    mask = jnp.asarray(mask, bool)
    if mask.shape != (n,):
        raise ValueError(f"{what} must have shape [{n}], got {mask.shape}")
    return mask


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _chunk_stats(chunk, gallery, gallery_groups, gallery_mask):
    q, q_groups, q_mask = chunk
    s = jnp.einsum("qd,gd->qg", q, gallery, precision=jax.lax.Precision.HIGHEST)
    same = jnp.all(q_groups[:, None, :] == gallery_groups[None, :, :], axis=-1)
    valid = q_mask[:, None] & gallery_mask[None, :]
    relevant, other = same & valid, ~same & valid
    best = jnp.max(jnp.where(relevant, s, -jnp.inf), axis=1, keepdims=True)
    count = lambda m: jnp.sum(m, axis=1, dtype=jnp.int32)  # noqa: E731
    tied = s == best
    return RankStats(count(other & (s > best)), count(other & tied), count(relevant & tied), jnp.any(relevant, axis=1))


@functools.partial(jax.jit, static_argnames=("chunk_size", "mesh", "normalize"))
def _rank_stats(queries, gallery, query_groups, gallery_groups, query_mask, gallery_mask, *, chunk_size, mesh,
                normalize):
    queries, gallery = queries.astype(jnp.float32), gallery.astype(jnp.float32)
    if normalize:
        queries, gallery = l2_normalize(queries), l2_normalize(gallery)
    n_q, n_g = queries.shape[0], gallery.shape[0]
    if mesh is not None:
        # Padded gallery rows are masked out; the padding only makes the rows divide the shards.
        rows = -(-n_g // num_batch_shards(mesh)) * num_batch_shards(mesh)
        gallery, gallery_groups, gallery_mask = (_pad_rows(a, rows) for a in (gallery, gallery_groups, gallery_mask))
        shard = lambda a: jax.lax.with_sharding_constraint(  # noqa: E731
            a, NamedSharding(mesh, P(BATCH_AXES, *([None] * (a.ndim - 1))))
        )
        gallery, gallery_groups, gallery_mask = shard(gallery), shard(gallery_groups), shard(gallery_mask)
        # Every device scores each query chunk against its gallery rows.
        queries, query_groups, query_mask = (
            jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P())) for a in (queries, query_groups, query_mask)
        )
    chunk = min(chunk_size, n_q)
    n_chunks = -(-n_q // chunk)
    chunked = tuple(
        _pad_rows(a, n_chunks * chunk).reshape(n_chunks, chunk, *a.shape[1:])
        for a in (queries, query_groups, query_mask)
    )
    one_chunk = functools.partial(
        _chunk_stats, gallery=gallery, gallery_groups=gallery_groups, gallery_mask=gallery_mask
    )
    stats = jax.lax.map(one_chunk, chunked)  # a loop: one chunk's [chunk, G] scores live at a time
    return RankStats(*(a.reshape(-1)[:n_q] for a in stats))


def rank_stats(
    queries: jax.Array,
    gallery: jax.Array,
    query_groups: jax.Array,
    gallery_groups: jax.Array,
    *,
    query_mask: jax.Array | None = None,
    gallery_mask: jax.Array | None = None,
    chunk_size: int = 1024,
    mesh: Mesh | None = None,
    normalize: bool = True,
) -> RankStats:
    """Per-query rank counts of ``queries`` [Q, D] against ``gallery`` [G, D] (cosine similarity
    unless ``normalize=False``). Masked rows (padding) are neither hits nor competitors.

    With ``mesh``, the gallery is laid out over the mesh's batch axes (padded to divide them) and
    queries are replicated; per device the peak is ``chunk_size × G / shards`` scores. Inputs may
    be host arrays (single process) or global ``jax.Array``s, e.g. concatenated ``to_global`` outputs.
    """
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"rank_stats expects queries [Q, D] and gallery [G, D], got {queries.shape} and {gallery.shape}"
        )
    n_q, n_g = queries.shape[0], gallery.shape[0]
    if chunk_size < 1 or n_q == 0 or n_g == 0:
        raise ValueError(f"rank_stats needs chunk_size ≥ 1 and non-empty inputs, got {chunk_size}, Q={n_q}, G={n_g}")
    q_groups = _as_words(query_groups, n_q, "query_groups")
    g_groups = _as_words(gallery_groups, n_g, "gallery_groups")
    if q_groups.shape[1] != g_groups.shape[1]:
        raise ValueError(f"query and gallery groups have {q_groups.shape[1]} and {g_groups.shape[1]} words per id")
    return _rank_stats(
        queries, gallery, q_groups, g_groups,
        _as_mask(query_mask, n_q, "query_mask"), _as_mask(gallery_mask, n_g, "gallery_mask"),
        chunk_size=int(chunk_size), mesh=mesh, normalize=bool(normalize),
    )


def recall_from_stats(
    stats: RankStats, ks: Sequence[int] = (1, 5), query_mask: jax.Array | None = None
) -> dict[int, jax.Array]:
    """Mean recall@k over unmasked queries, ``{k: scalar}``."""
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    mask = _as_mask(query_mask, stats.greater.shape[0], "query_mask").astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    return {
        k: jnp.sum(mask * hit_rate(stats.greater, stats.tied_other, stats.tied_relevant, k)) / n
        for k in ks
    }


def recall_at_k(
    queries, gallery, query_groups, gallery_groups, *, ks: Sequence[int] = (1, 5), query_mask=None, **kwargs
) -> dict[int, jax.Array]:
    """Recall@k of one direction, ``{k: scalar}``; ``kwargs`` as for ``rank_stats``."""
    stats = rank_stats(queries, gallery, query_groups, gallery_groups, query_mask=query_mask, **kwargs)
    return recall_from_stats(stats, ks, query_mask)


def image_text_retrieval(
    image_embs: jax.Array,
    text_embs: jax.Array,
    image_groups: jax.Array,
    text_groups: jax.Array | None = None,
    *,
    image_mask: jax.Array | None = None,
    text_mask: jax.Array | None = None,
    ks: Sequence[int] = (1, 5),
    chunk_size: int = 1024,
    mesh: Mesh | None = None,
) -> dict[str, jax.Array]:
    """Both directions: ``{"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"}`` (one key per k in ``ks``).

    For paired image–caption data pass ``caption_groups(captions)`` as ``image_groups`` (an image
    then counts as a hit for every text with an identical caption, and vice versa); for several
    captions per image, give each text its image's id via ``text_groups``. ``text_mask`` defaults
    to ``image_mask`` when the two have the same rows (the pipeline's padding mask).
    """
    if text_groups is None:
        text_groups = image_groups
    if text_mask is None and image_mask is not None and text_embs.shape[0] == image_embs.shape[0]:
        text_mask = image_mask
    common = dict(ks=ks, chunk_size=chunk_size, mesh=mesh)
    i2t = recall_at_k(
        image_embs, text_embs, image_groups, text_groups, query_mask=image_mask, gallery_mask=text_mask, **common
    )
    t2i = recall_at_k(
        text_embs, image_embs, text_groups, image_groups, query_mask=text_mask, gallery_mask=image_mask, **common
    )
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}
