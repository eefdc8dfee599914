"""Token-choice strategies and classifier-free guidance, as small frozen dataclasses.

A strategy turns float32 logits [B, V] into tokens [B]. ``Categorical`` follows the reference
samplers' order (LlamaGen, STAR, RQ-Transformer): divide by the temperature, keep the top k,
then the top-p nucleus of what is left, then draw. The filters reproduce HF's
``top_k_top_p_filtering``:

- top-k keeps every logit ≥ the k-th largest, so ties at the k-th value all stay;
- top-p keeps the sorted tokens whose cumulative probability *before* them is ≤ p (the first
  token always stays). Ties that straddle the cut are all kept: HF's order among equal logits
  is whatever ``torch.sort`` returns, so no order between them is "the" reference one.

The nucleus is computed inside ``lax.top_k`` of the k kept values, not over a sort of the whole
vocabulary, so a 16k–65k image vocabulary costs one partial sort per step.

Randomness is per sample: ``keys`` [B] (one key per row, e.g. ``jax.random.split(key, B)``) is
folded with the step number, so a row's draw does not depend on which other rows share its
batch, its position in it, or the batch size.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Greedy:
    """argmax; ties go to the lowest token id (torch.argmax's choice)."""


@dataclasses.dataclass(frozen=True)
class Categorical:
    """A draw from softmax(logits / temperature) restricted to the top-k, then the top-p nucleus.

    ``top_k`` 0 and ``top_p`` 1.0 switch the filters off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use Greedy for argmax), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


Strategy = Greedy | Categorical


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance over a batch of [cond rows; uncond rows] (two halves).

    ``scale``: logits = uncond + scale · (cond − uncond). ``interval`` (LlamaGen's
    ``cfg_interval``): > −1 turns guidance off for the tokens after that many decode steps
    (token n > interval + 1 uses the conditional logits alone; both halves still run).
    """

    scale: float = 1.0
    interval: int = -1


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """HF ``top_k_top_p_filtering`` on [..., V] float logits: removed entries become −inf."""
    vocab = logits.shape[-1]
    if top_k <= 0 and top_p >= 1.0:
        return logits
    k = vocab if top_k <= 0 else min(top_k, vocab)
    values, _ = jax.lax.top_k(logits, k)  # descending
    if top_k > 0:
        # The k-th value as the min of all k (not values[..., -1:]): slicing one element out of
        # the top-k keeps XLA:CPU from its TopK kernel and costs a full sort, 7× the time.
        logits = jnp.where(logits < jnp.min(values, axis=-1, keepdims=True), NEG_INF, logits)
    if top_p < 1.0:
        # Normalise over everything top-k kept (ties beyond the k-th slot included), as HF's
        # softmax over the filtered row does.
        log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        probs = jnp.exp(values - log_z)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = before <= top_p
        keep = keep.at[..., 0].set(True)
        # The smallest kept value is the cut; everything at or above it stays.
        cut = jnp.min(jnp.where(keep, values, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cut, NEG_INF, logits)
    return logits


def choose(strategy: Strategy, logits: jax.Array, keys: jax.Array | None, step) -> jax.Array:
    """Tokens [B] int32 from logits [B, V] (float32 from here on); ``keys`` [B] per row."""
    logits = logits.astype(jnp.float32)
    if isinstance(strategy, Greedy):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if keys is None:
        raise ValueError("Categorical sampling needs per-row PRNG keys")
    logits = filter_logits(logits / strategy.temperature, strategy.top_k, strategy.top_p)

    def draw(key, row):
        return jax.random.categorical(jax.random.fold_in(key, step), row)

    return jax.vmap(draw)(keys, logits).astype(jnp.int32)


def guide(logits: jax.Array, guidance: Guidance | None, token_index) -> jax.Array:
    """[2B, V] cond/uncond halves → [B, V] guided logits for the token at ``token_index``
    (0 = the token sampled from the prefill). Without guidance the logits pass through."""
    if guidance is None:
        return logits
    if logits.shape[0] % 2:
        raise ValueError(f"guidance needs [cond; uncond] halves, got {logits.shape[0]} rows")
    cond, uncond = jnp.split(logits.astype(jnp.float32), 2, axis=0)
    guided = uncond + guidance.scale * (cond - uncond)
    if guidance.interval < 0:
        return guided
    return jnp.where(token_index - 1 > guidance.interval, cond, guided)


def row_keys(key: jax.Array, batch: int) -> jax.Array:
    """Per-row keys for ``batch`` samples from one key."""
    return jax.random.split(key, batch)


def strategy_from(sc) -> Strategy:
    """A config ``sample`` block's strategy (``temperature``, ``top_k``, ``top_p``): temperature 0 is greedy."""
    if float(sc.temperature) == 0.0:
        return Greedy()
    return Categorical(temperature=float(sc.temperature), top_k=int(sc.top_k), top_p=float(sc.top_p))


def guidance_from(sc) -> Guidance | None:
    """A config ``sample`` block's guidance (``cfg_scale``, optional ``cfg_interval``); scale 1 is none."""
    scale = float(sc.cfg_scale)
    return None if scale == 1.0 else Guidance(scale, int(sc.get("cfg_interval", -1)))
