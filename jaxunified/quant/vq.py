"""Vector quantiser (LlamaGen/STAR-VQ semantics) with EMA, dead-code restart, IBQ and SimVQ options.

Layouts: inputs are ``[..., d]`` (any leading dims); codebooks ``[K, d]``. Everything numeric in
here runs in float32 whatever the model's compute dtype: distances, argmin, softmax, losses.

Where the codebook lives:

* ``update="grad"`` / ``"ibq"``: ``params/embedding`` (trained by the optimizer).
* ``simvq=True``: a frozen random basis ``codebook/base`` (a non-"params" collection, so no
  optimizer ever sees it) times a learnable linear map ``params/codebook_proj``.
* ``update="ema"``: ``codebook/{embedding, cluster_size, embed_sum}``, rewritten by a training
  forward when the caller passes ``mutable=["codebook"]``. ``restart=True`` re-seeds codes whose
  EMA count falls below ``restart_threshold`` from batch vectors: uniformly (``restart_from=
  "random"``, rq-vae) or ∝ squared quantisation error (``"error"``).

The pure helpers (``nearest_codes``, ``code_histogram``, ``ema_accumulate``, ``laplace_codebook``,
``restart_candidates``, ``restart_dead_codes``) are public so the residual quantiser can reuse them.
"""

from __future__ import annotations

import dataclasses
import math
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxunified.nn.conv import torch_default_init
from jaxunified.nn.dense import DENSE_KERNEL_AXES
from jaxunified.nn.norm import l2_normalize

UPDATES = ("grad", "ema", "ibq")
RESTART_SOURCES = ("random", "error")
_HIGHEST = lax.Precision.HIGHEST  # TPUs would otherwise run f32 matmuls as bf16 passes.


@dataclasses.dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 16384
    embed_dim: int = 8
    l2_norm: bool = True
    beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    entropy_temperature: float = 0.01
    update: str = "grad"
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    restart: bool = False
    restart_threshold: float = 1.0
    # Where restarted codes come from: "random" batch vectors (rq-vae), or "error": vectors drawn
    # with probability ∝ their squared distance to their code, so new codes go where the codebook
    # is worst (object edges) rather than to the dominant, already well-covered background.
    restart_from: str = "random"
    simvq: bool = False
    distance_chunk: int = 8192
    axis_name: str | None = None

    def __post_init__(self):
        if self.update not in UPDATES:
            raise ValueError(f"VQConfig.update={self.update!r}; choose one of {UPDATES}")
        if self.codebook_size < 1 or self.embed_dim < 1:
            raise ValueError(
                f"VQConfig needs codebook_size >= 1 and embed_dim >= 1, got {self.codebook_size}, {self.embed_dim}"
            )
        if self.distance_chunk < 1:
            raise ValueError(f"VQConfig.distance_chunk must be >= 1, got {self.distance_chunk}")
        if self.restart_from not in RESTART_SOURCES:
            raise ValueError(f"VQConfig.restart_from={self.restart_from!r}; choose one of {RESTART_SOURCES}")
        if self.restart and self.update != "ema":
            raise ValueError("VQConfig.restart needs update='ema' (restart rewrites EMA statistics)")
        if self.simvq and self.update == "ema":
            raise ValueError("VQConfig.simvq trains the codebook map by gradient; use update='grad' or 'ibq'")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"VQConfig.ema_decay must be in [0, 1), got {self.ema_decay}")


# ---------------------------------------------------------------- pure helpers


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """``‖z‖² + ‖e‖² − 2 z·e`` for ``z`` [N, d] and ``codebook`` [K, d] → [N, K] (the reference's order)."""
    z2 = jnp.sum(z * z, axis=-1, keepdims=True)
    e2 = jnp.sum(codebook * codebook, axis=-1)
    return z2 + e2[None, :] - 2.0 * jnp.matmul(z, codebook.T, precision=_HIGHEST)


def nearest_codes(z: jax.Array, codebook: jax.Array, chunk: int = 8192) -> jax.Array:
    """Index of the nearest codebook row for each ``z`` row, int32 [N].

    The codebook is scanned in chunks of ``chunk`` rows so a 65536-entry codebook never
    materialises the full [N, K] distance matrix; ties resolve to the lowest index, like a
    single ``argmin`` over all codes.
    """
    z = lax.stop_gradient(z.astype(jnp.float32))
    codebook = lax.stop_gradient(codebook.astype(jnp.float32))
    num_codes, dim = codebook.shape
    if num_codes <= chunk:
        return jnp.argmin(squared_distances(z, codebook), axis=-1).astype(jnp.int32)
    n_chunks = -(-num_codes // chunk)
    padded = jnp.pad(codebook, ((0, n_chunks * chunk - num_codes), (0, 0)))
    e2 = jnp.sum(padded * padded, axis=-1)
    e2 = jnp.where(jnp.arange(padded.shape[0]) < num_codes, e2, jnp.inf)  # padding never wins
    z2 = jnp.sum(z * z, axis=-1, keepdims=True)

    def step(carry, xs):
        best_d, best_i = carry
        cb, cb2, start = xs
        d = z2 + cb2[None, :] - 2.0 * jnp.matmul(z, cb.T, precision=_HIGHEST)
        i = jnp.argmin(d, axis=-1)
        m = jnp.take_along_axis(d, i[:, None], axis=-1)[:, 0]
        better = m < best_d  # strict: an earlier chunk keeps ties
        return (jnp.where(better, m, best_d), jnp.where(better, i.astype(jnp.int32) + start, best_i)), None

    init = (jnp.full((z.shape[0],), jnp.inf, jnp.float32), jnp.zeros((z.shape[0],), jnp.int32))
    xs = (
        padded.reshape(n_chunks, chunk, dim),
        e2.reshape(n_chunks, chunk),
        jnp.arange(n_chunks, dtype=jnp.int32) * chunk,
    )
    (_, codes), _ = lax.scan(step, init, xs)
    return codes


def entropy_loss(affinity: jax.Array, temperature: float = 0.01) -> jax.Array:
    """LlamaGen/MaskGIT codebook entropy loss over ``affinity`` [N, K]: sample entropy − batch entropy.

    Low per-sample entropy makes assignments confident; high entropy of the batch-averaged
    distribution spreads them over the codebook.
    """
    logits = affinity.astype(jnp.float32) / temperature
    probs = jax.nn.softmax(logits, axis=-1)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    avg_probs = jnp.mean(probs, axis=0)
    avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
    sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
    return sample_entropy - avg_entropy


def code_histogram(codes: jax.Array, num_codes: int, axis_name: str | None = None) -> jax.Array:
    """Per-code counts (float32 [K]) of ``codes``, summed over ``axis_name`` when given."""
    counts = jax.ops.segment_sum(
        jnp.ones(codes.shape, jnp.float32), codes.reshape(-1), num_segments=num_codes
    )
    return lax.psum(counts, axis_name) if axis_name else counts


def usage_and_perplexity(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Fraction of codes hit, and ``exp(entropy)`` of the code histogram ``counts`` [K]."""
    usage = jnp.mean((counts > 0).astype(jnp.float32))
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return usage, jnp.exp(-jnp.sum(plogp))


def ema_accumulate(cluster_size, embed_sum, counts, sums, decay: float):
    """``N ← γN + (1−γ)n``, ``m ← γm + (1−γ)s`` (rq-vae ``_update_buffers``)."""
    return (
        decay * cluster_size + (1.0 - decay) * counts,
        decay * embed_sum + (1.0 - decay) * sums,
    )


def laplace_codebook(cluster_size: jax.Array, embed_sum: jax.Array, eps: float) -> jax.Array:
    """``e_k = m_k / Ñ_k`` with Laplace-smoothed ``Ñ_k = n (N_k + ε) / (n + Kε)``, ``n = Σ N``."""
    n = jnp.sum(cluster_size)
    smoothed = (cluster_size + eps) / (n + cluster_size.shape[0] * eps) * n
    return embed_sum / smoothed[:, None]


def restart_candidates(
    key: jax.Array, z: jax.Array, num_codes: int, axis_name: str | None = None, weights: jax.Array | None = None
) -> jax.Array:
    """``num_codes`` random rows of the *global* batch (``z`` [n, d] is this device's shard).

    ``weights`` [n] (≥ 0, this shard's rows): draw rows with probability ∝ weight, with
    replacement, from the global rows' weights (all-gathered: n floats, not the batch); the
    draws get the same small noise as tiled rows, so repeats differ.

    The pick is a function only of ``key`` and the global batch, so global-view jit and a
    ``shard_map`` over ``axis_name`` choose the same vectors: every device draws the same
    permutation of global row indices, fills the rows it owns, and one ``psum`` assembles them
    (cheaper than all-gathering the batch, and exact since the other summands are zero).
    When the batch has fewer rows than codes it is tiled, with U(0, 1)·0.01/√d noise so the
    copies differ (rq-vae ``_tile_with_noise``).
    """
    n_local, dim = z.shape
    n_dev = lax.axis_size(axis_name) if axis_name else 1
    n = n_local * n_dev
    reps = -(-num_codes // n)
    k_perm, k_noise = jax.random.split(key)
    if weights is None:
        src = jax.random.permutation(k_perm, n * reps)[:num_codes] % n
    else:
        logw = jnp.log(jnp.maximum(weights.astype(jnp.float32), 0.0) + 1e-12)
        if axis_name:
            logw = lax.all_gather(logw, axis_name, tiled=True)
        src = jax.random.categorical(k_perm, logw, shape=(num_codes,))
    if axis_name:
        local = src - lax.axis_index(axis_name) * n_local
        mine = (local >= 0) & (local < n_local)
        rows = jnp.where(mine[:, None], z[jnp.clip(local, 0, n_local - 1)], 0.0)
        rows = lax.psum(rows, axis_name)
    else:
        rows = z[src]
    if reps > 1 or weights is not None:
        rows = rows + jax.random.uniform(k_noise, rows.shape, rows.dtype) * (0.01 / math.sqrt(dim))
    return rows


def restart_dead_codes(cluster_size, embed_sum, candidates, threshold: float):
    """Codes whose EMA count is below ``threshold`` take a candidate vector and count 1."""
    dead = cluster_size < threshold
    return (
        jnp.where(dead, 1.0, cluster_size),
        jnp.where(dead[:, None], candidates.astype(embed_sum.dtype), embed_sum),
    )


# ---------------------------------------------------------------- initialisers


def _uniform_codebook(l2_norm: bool):
    """LlamaGen's init: U(−1/K, 1/K), l2-normalised when the quantiser normalises."""

    def init(key, shape, dtype=jnp.float32):
        w = jax.random.uniform(key, shape, dtype, -1.0 / shape[0], 1.0 / shape[0])
        return l2_normalize(w) if l2_norm else w

    return init


def _simvq_basis(key, shape, dtype=jnp.float32):
    """SimVQ's frozen basis: N(0, d^-1/2)."""
    return jax.random.normal(key, shape, dtype) * shape[1] ** -0.5


_CODEBOOK_AXES = ("codebook", "code_dim")


class VectorQuantizer(nn.Module):
    """Nearest-neighbour VQ. ``__call__(z, train) -> (z_q, codes, aux)``; see the module docstring.

    ``aux`` holds float32 scalars ``vq_loss``, ``commit_loss``, ``entropy_loss`` (already weighted
    by ``beta``/``entropy_loss_ratio``), ``usage`` and ``perplexity``. Under ``cfg.axis_name`` the
    histogram statistics and EMA updates are global (psum); the losses stay per-device means, as
    in a DDP reference, for the caller to ``pmean`` with the rest of its loss.
    """

    cfg: VQConfig

    def setup(self):
        cfg = self.cfg
        shape = (cfg.codebook_size, cfg.embed_dim)
        if cfg.update == "ema":
            init = _uniform_codebook(cfg.l2_norm)
            self.ema_embedding = self.variable(
                "codebook", "embedding",
                nn.with_logical_partitioning(lambda: init(self.make_rng("params"), shape), _CODEBOOK_AXES),
            )
            # N starts at 0 and m at the initial codebook, as in rq-vae: with restart on, the
            # first training steps re-seed the codebook from data.
            self.cluster_size = self.variable(
                "codebook", "cluster_size",
                nn.with_logical_partitioning(lambda: jnp.zeros(shape[:1], jnp.float32), _CODEBOOK_AXES[:1]),
            )
            self.embed_sum = self.variable(
                "codebook", "embed_sum",
                nn.with_logical_partitioning(lambda: self.ema_embedding.value, _CODEBOOK_AXES),
            )
        elif cfg.simvq:
            self.base = self.variable(
                "codebook", "base",
                nn.with_logical_partitioning(lambda: _simvq_basis(self.make_rng("params"), shape), _CODEBOOK_AXES),
            )
            self.codebook_proj = nn.Dense(
                cfg.embed_dim,
                kernel_init=nn.with_logical_partitioning(torch_default_init, DENSE_KERNEL_AXES),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                precision=_HIGHEST,
            )
        else:
            self.embedding = self.param(
                "embedding", nn.with_logical_partitioning(_uniform_codebook(cfg.l2_norm), _CODEBOOK_AXES), shape
            )

    def _raw_codebook(self) -> jax.Array:
        if self.cfg.update == "ema":
            return self.ema_embedding.value
        if self.cfg.simvq:
            return self.codebook_proj(lax.stop_gradient(self.base.value))
        return self.embedding

    def codebook(self) -> jax.Array:
        """The effective codebook [K, d] that codes index (l2-normalised when ``cfg.l2_norm``)."""
        cb = self._raw_codebook().astype(jnp.float32)
        return l2_normalize(cb) if self.cfg.l2_norm else cb

    def lookup(self, codes: jax.Array) -> jax.Array:
        """Codebook vectors for integer ``codes`` [...] → float32 [..., d]."""
        return jnp.take(self.codebook(), codes, axis=0)

    def __call__(self, z: jax.Array, train: bool = False):
        cfg = self.cfg
        if z.shape[-1] != cfg.embed_dim:
            raise ValueError(
                f"VectorQuantizer got vectors of size {z.shape[-1]} (shape {z.shape}) but "
                f"embed_dim={cfg.embed_dim}; the last axis must be the code dimension"
            )
        lead = z.shape[:-1]
        z = z.astype(jnp.float32).reshape(-1, cfg.embed_dim)
        if cfg.l2_norm:
            z = l2_normalize(z)
        cb = self.codebook()

        if cfg.update == "ibq":
            z_q, codes, vq_loss, commit_loss, affinity = self._ibq(z, cb)
        else:
            codes = nearest_codes(z, cb, cfg.distance_chunk)
            if cfg.update == "ema" and train and self.is_mutable_collection("codebook"):
                cb = self._ema_update(z, codes, cb)
            q = jnp.take(cb, codes, axis=0)
            vq_loss = (
                jnp.zeros((), jnp.float32) if cfg.update == "ema"
                else jnp.mean((q - lax.stop_gradient(z)) ** 2)
            )
            commit_loss = cfg.beta * jnp.mean((lax.stop_gradient(q) - z) ** 2)
            z_q = z + lax.stop_gradient(q - z)
            affinity = None

        if cfg.entropy_loss_ratio > 0:
            # Needs the full [N, K] affinity (with gradients); keep the ratio at 0 for 65536-code books.
            if affinity is None:
                affinity = -squared_distances(z, cb)
            ent = cfg.entropy_loss_ratio * entropy_loss(affinity, cfg.entropy_temperature)
        else:
            ent = jnp.zeros((), jnp.float32)

        counts = code_histogram(codes, cfg.codebook_size, cfg.axis_name)
        usage, perplexity = usage_and_perplexity(counts)
        aux = {
            "vq_loss": vq_loss,
            "commit_loss": commit_loss,
            "entropy_loss": ent,
            "usage": usage,
            "perplexity": perplexity,
        }
        return z_q.reshape(*lead, cfg.embed_dim), codes.reshape(lead), aux

    def _ibq(self, z, cb):
        """Index backpropagation (IBQ): the straight-through path runs through a softmax over all
        codes, so every code gets a gradient each step. Losses follow the IBQ reference: the
        double-quantisation and codebook terms go to ``vq_loss``, the unit-weight commitment to
        ``commit_loss``. Forms the full [N, K] logits."""
        cfg = self.cfg
        logits = jnp.matmul(z, cb.T, precision=_HIGHEST)
        codes = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        soft = jax.nn.softmax(logits, axis=-1)
        hard = jax.nn.one_hot(codes, cfg.codebook_size, dtype=jnp.float32)
        z_q = jnp.matmul(hard - lax.stop_gradient(soft) + soft, cb, precision=_HIGHEST)
        q = jnp.take(cb, codes, axis=0)
        vq_loss = jnp.mean((z_q - z) ** 2) + cfg.beta * jnp.mean((q - lax.stop_gradient(z)) ** 2)
        commit_loss = jnp.mean((lax.stop_gradient(q) - z) ** 2)
        return z_q, codes, vq_loss, commit_loss, logits

    def _ema_update(self, z, codes, cb) -> jax.Array:
        """One EMA step on this batch's assignments to ``cb`` (the effective codebook they were
        made against); returns the new effective codebook."""
        cfg = self.cfg
        z = lax.stop_gradient(z)
        counts = code_histogram(codes, cfg.codebook_size, cfg.axis_name)
        sums = jax.ops.segment_sum(z, codes, num_segments=cfg.codebook_size)
        if cfg.axis_name:
            sums = lax.psum(sums, cfg.axis_name)
        cluster_size, embed_sum = ema_accumulate(
            self.cluster_size.value, self.embed_sum.value, counts, sums, cfg.ema_decay
        )
        if cfg.restart:
            if not self.has_rng("quant"):
                raise ValueError(
                    "VQ dead-code restart draws random batch vectors: pass rngs={'quant': key} to apply()"
                )
            weights = None
            if cfg.restart_from == "error":
                weights = jnp.sum((z - jnp.take(cb, codes, axis=0)) ** 2, axis=-1)
            cand = restart_candidates(self.make_rng("quant"), z, cfg.codebook_size, cfg.axis_name, weights)
            cluster_size, embed_sum = restart_dead_codes(
                cluster_size, embed_sum, cand, cfg.restart_threshold
            )
        embedding = laplace_codebook(cluster_size, embed_sum, cfg.ema_eps)
        self.cluster_size.value = cluster_size
        self.embed_sum.value = embed_sum
        self.ema_embedding.value = embedding
        return l2_normalize(embedding) if cfg.l2_norm else embedding


__all__ = [
    "UPDATES",
    "VQConfig",
    "VectorQuantizer",
    "code_histogram",
    "ema_accumulate",
    "entropy_loss",
    "l2_normalize",
    "laplace_codebook",
    "nearest_codes",
    "restart_candidates",
    "restart_dead_codes",
    "squared_distances",
    "usage_and_perplexity",
]
