"""Residual quantiser (kakaobrain rq-vae ``RQBottleneck`` and DualToken's ``rq_ema`` variant).

Layouts: inputs are ``[..., d]`` (NHWC feature maps ``[B, h, w, d]``, token sequences
``[B, L, d]``, ...); codes are ``[..., D]`` int32 for depth ``D``. Distances, argmin, losses and
EMA statistics run in float32 whatever the input dtype; ``quant`` comes back in float32. The
rq-vae divisor reshape (``to_code_shape``: code grids coarser than the latent grid) is left to
the caller: reshape to ``[..., d·r²]`` first.

Each depth quantises the residual of the previous ones, ``r_0 = sg(x)``, ``c_d = argmin‖r_d − e‖``,
``r_{d+1} = r_d − e[c_d]``. Forward value ``Σ_d e[c_d]``, gradient straight through to ``x``.
``commit_loss = beta · mean_d mean((x − sg(Σ_{≤d} e[c_·]))²)`` (rq-vae's average over the depth
partial sums; ``beta=1`` returns rq-vae's unweighted term, DualToken weights it by 5, RQ-VAE's
trainer by 0.25).

Where the codebook lives (``[K, d]`` shared by all depths, else ``[D, K, d]``, one per depth):

* ``update="ema"``: ``codebook/{embedding, cluster_size, embed_sum}`` (rq-vae's ``weight[:-1]``,
  ``cluster_size_ema``, ``embed_ema``), rewritten by a forward with ``train=True`` when the caller
  passes ``mutable=["codebook"]``. Any other forward (eval, or a training forward with an
  immutable collection) quantises against the stored codebook and changes nothing.
* ``update="grad"``: ``params/embedding``, trained through
  ``vq_loss = mean_d mean((e[c_d] − sg(r_d))²)``, the per-depth VQ-VAE codebook term whose
  minimiser (each code at the mean of the residuals it is assigned) is the EMA's fixed point.

EMA schedules (they differ only for a shared codebook; with one book per depth each book sees
only its own depth, and both schedules give the same update):

* ``"per_depth"`` (rq-vae, DualToken's pixel branch ``rq``): after depth ``d`` picks its codes,
  the shared codebook takes one full EMA step (decay, restart, Laplace smoothing) on that depth's
  residuals, so a training forward applies ``D`` EMA steps and depth ``d+1`` searches the
  already-updated codebook. Depth ``d``'s own ``quant`` is looked up *before* its update.
  Training codes therefore differ from eval codes on the same state.
* ``"per_step"`` (DualToken's semantic branch ``rq_ema``): every depth searches and looks up the
  stored codebook (training codes = eval codes); counts and residual sums are summed over all
  depths and one EMA step runs at the end, with restart candidates drawn from the residuals of
  all depths.

Counts and sums are ``psum``'d over ``cfg.axis_name`` and restart candidates come from the global
batch with the same PRNG key on every device (rng stream ``"quant"``), so a ``shard_map`` over
the batch gives the single-device update of the whole batch. Losses stay per-device means for
the caller to ``pmean`` with the rest of its loss.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxunified.quant.vq import (
    code_histogram,
    ema_accumulate,
    laplace_codebook,
    nearest_codes,
    restart_candidates,
    restart_dead_codes,
    usage_and_perplexity,
)

UPDATES = ("ema", "grad")
EMA_SCHEDULES = ("per_depth", "per_step")
_CODEBOOK_AXES = ("codebook", "code_dim")


@dataclasses.dataclass(frozen=True)
class RQConfig:
    """Defaults are DualToken's quantisers (16384 × 32, depth 8, shared, decay 0.99, restart)."""

    codebook_size: int = 16384
    embed_dim: int = 32
    depth: int = 8
    shared_codebook: bool = True
    update: str = "ema"
    ema_schedule: str = "per_depth"
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    restart: bool = True
    restart_threshold: float = 1.0
    beta: float = 1.0
    distance_chunk: int = 8192
    axis_name: str | None = None

    def __post_init__(self):
        if self.update not in UPDATES:
            raise ValueError(f"RQConfig.update={self.update!r}; choose one of {UPDATES}")
        if self.ema_schedule not in EMA_SCHEDULES:
            raise ValueError(f"RQConfig.ema_schedule={self.ema_schedule!r}; choose one of {EMA_SCHEDULES}")
        if self.codebook_size < 1 or self.embed_dim < 1 or self.depth < 1:
            raise ValueError(
                "RQConfig needs codebook_size, embed_dim and depth >= 1, got "
                f"{self.codebook_size}, {self.embed_dim}, {self.depth}"
            )
        if self.distance_chunk < 1:
            raise ValueError(f"RQConfig.distance_chunk must be >= 1, got {self.distance_chunk}")
        if self.restart and self.update != "ema":
            raise ValueError("RQConfig.restart needs update='ema' (restart rewrites EMA statistics)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"RQConfig.ema_decay must be in [0, 1), got {self.ema_decay}")


def ema_step(cluster_size, embed_sum, counts, sums, decay: float, eps: float, candidates=None,
             threshold: float = 1.0):
    """One rq-vae EMA step (accumulate, optional restart, Laplace) → (N, m, codebook)."""
    cluster_size, embed_sum = ema_accumulate(cluster_size, embed_sum, counts, sums, decay)
    if candidates is not None:
        cluster_size, embed_sum = restart_dead_codes(cluster_size, embed_sum, candidates, threshold)
    return cluster_size, embed_sum, laplace_codebook(cluster_size, embed_sum, eps)


class ResidualQuantizer(nn.Module):
    """``__call__(x, train) -> (quant, codes, aux)``, like ``VectorQuantizer``; see the module docstring.

    ``aux`` holds float32 ``vq_loss`` (0 with EMA) and ``commit_loss`` scalars, and per-depth
    ``usage`` and ``perplexity`` [D] of the codes this forward picked (global under ``axis_name``).
    """

    cfg: RQConfig

    def setup(self):
        cfg = self.cfg
        shape = (cfg.codebook_size, cfg.embed_dim)
        axes = _CODEBOOK_AXES
        if not cfg.shared_codebook:
            shape, axes = (cfg.depth, *shape), (None, *axes)
        # rq-vae's nn.Embedding default init, N(0, 1).
        init = nn.initializers.normal(1.0)
        if cfg.update == "ema":
            self.ema_embedding = self.variable(
                "codebook", "embedding",
                nn.with_logical_partitioning(lambda: init(self.make_rng("params"), shape), axes),
            )
            # N starts at 0, m at the initial codebook (rq-vae): with restart on, the first
            # training steps re-seed the codebook from data.
            self.cluster_size = self.variable(
                "codebook", "cluster_size",
                nn.with_logical_partitioning(lambda: jnp.zeros(shape[:-1], jnp.float32), axes[:-1]),
            )
            self.embed_sum = self.variable(
                "codebook", "embed_sum",
                nn.with_logical_partitioning(lambda: self.ema_embedding.value, axes),
            )
        else:
            self.embedding = self.param("embedding", nn.with_logical_partitioning(init, axes), shape)

    def codebook(self) -> jax.Array:
        """The stored codebook, float32 [K, d] when shared, else [D, K, d]."""
        cb = self.ema_embedding.value if self.cfg.update == "ema" else self.embedding
        return cb.astype(jnp.float32)

    def _check_codes(self, codes):
        if codes.shape[-1:] != (self.cfg.depth,):
            raise ValueError(
                f"ResidualQuantizer codes must end in the depth axis of size {self.cfg.depth}, "
                f"got shape {codes.shape}"
            )

    def embed_codes_per_depth(self, codes: jax.Array, cumulative: bool = False) -> jax.Array:
        """Codebook vectors of ``codes`` [..., D] → float32 [..., D, d].

        ``cumulative=True`` gives the partial sums ``Σ_{≤d}`` instead (the quantised value after
        ``d+1`` depths; RQ-Transformer's depth-head input is these shifted by one).
        """
        self._check_codes(codes)
        cb = self.codebook()
        if self.cfg.shared_codebook:
            emb = jnp.take(cb, codes, axis=0)
        else:
            emb = cb[jnp.arange(self.cfg.depth), codes]
        return jnp.cumsum(emb, axis=-2) if cumulative else emb

    def embed_codes(self, codes: jax.Array) -> jax.Array:
        """``Σ_d e[c_d]`` for ``codes`` [..., D] → float32 [..., d] (the forward ``quant``)."""
        return jnp.sum(self.embed_codes_per_depth(codes), axis=-2)

    def __call__(self, x: jax.Array, train: bool = False):
        cfg = self.cfg
        if x.shape[-1] != cfg.embed_dim:
            raise ValueError(
                f"ResidualQuantizer got vectors of size {x.shape[-1]} (shape {x.shape}) but "
                f"embed_dim={cfg.embed_dim}; the last axis must be the code dimension (NHWC, not NCHW)"
            )
        lead = x.shape[:-1]
        x = x.astype(jnp.float32).reshape(-1, cfg.embed_dim)
        update = cfg.update == "ema" and train and self.is_mutable_collection("codebook")
        if update and cfg.restart and not self.has_rng("quant"):
            raise ValueError(
                "RQ dead-code restart draws random batch vectors: pass rngs={'quant': key} to apply()"
            )
        # One entry per stored codebook (1 when shared, else D), read and rewritten in place.
        books = self.codebook()
        books = [books] if cfg.shared_codebook else list(books)
        if update:
            state = [(self.cluster_size.value, self.embed_sum.value)]
            if not cfg.shared_codebook:
                state = list(zip(state[0][0], state[0][1]))
        accumulate = update and cfg.shared_codebook and cfg.ema_schedule == "per_step"

        residual = lax.stop_gradient(x)
        partial = jnp.zeros_like(x)
        codes, partials, counts, residuals, vq_terms = [], [], [], [], []
        for d in range(cfg.depth):
            i = 0 if cfg.shared_codebook else d
            c = nearest_codes(residual, books[i], cfg.distance_chunk)
            q = jnp.take(books[i], c, axis=0)  # looked up before this depth's update (rq-vae)
            n = code_histogram(c, cfg.codebook_size, cfg.axis_name)
            if cfg.update == "grad":
                vq_terms.append(jnp.mean((q - residual) ** 2))
            if accumulate:
                residuals.append(residual)
            elif update:
                n_ema, m_ema, books[i] = self._ema(state[i], n, self._sums(residual, c), residual)
                state[i] = (n_ema, m_ema)
            q = lax.stop_gradient(q)
            residual = residual - q
            partial = partial + q
            codes.append(c)
            partials.append(partial)
            counts.append(n)

        if accumulate:
            # Rows ordered (vector, depth): a device's shard is then a contiguous block of the
            # global pool, so restart picks agree between shard_map and the global view.
            pool = jnp.stack(residuals, axis=1).reshape(-1, cfg.embed_dim)
            sums = self._sums(pool, jnp.stack(codes, axis=1).reshape(-1))
            n_ema, m_ema, books[0] = self._ema(state[0], sum(counts), sums, pool)
            state[0] = (n_ema, m_ema)
        if update:
            join = (lambda xs: xs[0]) if cfg.shared_codebook else jnp.stack
            self.cluster_size.value = join([s[0] for s in state])
            self.embed_sum.value = join([s[1] for s in state])
            self.ema_embedding.value = join(books)

        commit = cfg.beta * jnp.mean(jnp.stack([jnp.mean((x - p) ** 2) for p in partials]))
        vq_loss = jnp.mean(jnp.stack(vq_terms)) if vq_terms else jnp.zeros((), jnp.float32)
        usage, perplexity = jax.vmap(usage_and_perplexity)(jnp.stack(counts))
        quant = x + lax.stop_gradient(partial - x)
        aux = {"vq_loss": vq_loss, "commit_loss": commit, "usage": usage, "perplexity": perplexity}
        return (
            quant.reshape(*lead, cfg.embed_dim),
            jnp.stack(codes, axis=-1).reshape(*lead, cfg.depth),
            aux,
        )

    def _sums(self, z, codes):
        s = jax.ops.segment_sum(z, codes, num_segments=self.cfg.codebook_size)
        return lax.psum(s, self.cfg.axis_name) if self.cfg.axis_name else s

    def _ema(self, state, counts, sums, pool):
        cfg = self.cfg
        cand = (
            restart_candidates(self.make_rng("quant"), pool, cfg.codebook_size, cfg.axis_name)
            if cfg.restart else None
        )
        return ema_step(*state, counts, sums, cfg.ema_decay, cfg.ema_eps, cand, cfg.restart_threshold)


__all__ = ["EMA_SCHEDULES", "RQConfig", "ResidualQuantizer", "UPDATES", "ema_step"]
