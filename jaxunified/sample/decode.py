"""The one token-by-token decode loop, written against a step function.

Every family (decoder LM, LlamaGen GPT, STAR) reduces to::

    step(tokens [R] int32, cache, n) -> (logits [R, V], cache)

which feeds the token sampled at decode position ``n - 1`` and returns the logits for token
``n``; ``R`` is the batch, or twice it under guidance ([cond; uncond] rows, the sampled token
fed to both). The family's prefill produces the first logits and a filled cache; ``generate``
then runs the rest as one ``lax.while_loop`` over that static cache: no Python loop per token,
the cache buffers updated in place (callers jit the whole thing and donate the cache), and the
loop exits early once every row has emitted ``eos_id``.

A one-token step attends over every slot of its cache, filled or not, so the KV bytes each step
reads are the whole buffer: for GPT-B at 256 tokens and 16 rows that is 311 MB of float32 per
step, as much as its weights. With ``windows`` = k the loop runs as k loops over growing
prefixes of the cache (the slots filled by each loop's last step; ``cache_slots``), which reads
about (k + 1) / 2k of it at the price of tracing the step k times. Masked slots contribute
nothing either way, so the tokens are the same.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxunified.nn import sums
from jaxunified.sample.strategies import Guidance, Strategy, choose, guide

StepFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


def auto_windows(num_tokens: int, windows: int | None = None) -> int:
    """The samplers' ``windows``: ``windows`` if given, else one per 32 tokens, at most 8 (GPT-B, 256
    tokens, 16 rows on 2 CPU cores: 94 → 106 / 109 tok/s with 4 / 8 windows in float32, 127 → 153 /
    157 in bfloat16)."""
    if windows is not None:
        return int(windows)
    return max(1, min(8, int(num_tokens) // 32))


# The attention cache's per-slot buffers (nn.attention: [..., B, Hkv, slots, D]).
SLOT_VARIABLES = ("cached_key", "cached_value")


def _is_slots(path) -> bool:
    return getattr(path[-1], "key", None) in SLOT_VARIABLES


def cache_slots(cache: Any) -> int:
    """The static slot count of ``cache``'s key/value buffers; a step that masks by slot sizes its
    mask with this (``windows`` hands it a prefix of the cache)."""
    sizes = {x.shape[-2] for p, x in jax.tree_util.tree_flatten_with_path(cache)[0] if _is_slots(p)}
    if len(sizes) != 1:
        raise ValueError(f"expected one slot count over the cache's {SLOT_VARIABLES} buffers, got {sorted(sizes)}")
    return sizes.pop()


def _window(full: Any, part: Any | None, length: int) -> Any:
    """The first ``length`` slots of the cache: ``part`` (a shorter prefix carrying the filled slots
    and the cache index) extended with ``full``'s next slots, or ``full`` cut to ``length``."""
    if part is None:
        return jax.tree_util.tree_map_with_path(
            lambda p, x: jax.lax.slice_in_dim(x, 0, length, axis=x.ndim - 2) if _is_slots(p) else x, full)

    def grow(p, f, x):
        if not _is_slots(p):
            return x
        return jnp.concatenate([x, jax.lax.slice_in_dim(f, x.shape[-2], length, axis=f.ndim - 2)], axis=f.ndim - 2)

    return jax.tree_util.tree_map_with_path(grow, full, part)


def window_bounds(num_tokens: int, windows: int) -> list[int]:
    """The decode positions where each window's loop stops: k near-equal spans of 1..num_tokens."""
    if windows < 1:
        raise ValueError(f"windows must be ≥ 1, got {windows}")
    steps = num_tokens - 1
    return sorted({1 + -(-steps * j // windows) for j in range(1, windows + 1)})


# XLA:CPU sends a 16-bit dot to YNNPACK's AMX / AVX512-BF16 kernels only when standalone dots are
# YNN fusions, which cpu_flags leaves off (they slow float32 training at small widths): a bf16
# [16, 768] × [768, 2304] decode dot takes 0.32 ms that way against 1.0 ms on the default path.
LOW_PRECISION_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def _computes_in_16_bits(model: Any, variables: Any) -> bool:
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    if dtype is not None and jnp.dtype(dtype).itemsize == 2:
        return True
    return any(jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2
               for x in jax.tree.leaves(variables) if hasattr(x, "dtype"))


def sampler_jit(fn: Callable, static_argnames: Sequence[str]) -> Callable:
    """``jax.jit(fn)`` for a sampler ``fn(model, variables, ...)``; a call whose model computes in, or
    whose weights are stored in, a 16-bit float runs a second compile with
    ``LOW_PRECISION_CPU_OPTIONS`` when it targets the CPU."""
    plain = jax.jit(fn, static_argnames=static_argnames)
    low = jax.jit(fn, static_argnames=static_argnames, compiler_options=LOW_PRECISION_CPU_OPTIONS)

    @functools.wraps(fn)
    def call(model, variables, *args, **kwargs):
        fast = sums.target_platform() == "cpu" and _computes_in_16_bits(model, variables)
        return (low if fast else plain)(model, variables, *args, **kwargs)

    return call


def cast_weights(variables: Any, dtype: Any) -> Any:
    """``variables`` with every floating array stored in ``dtype`` (use with the model's ``dtype``
    bfloat16, whose casts then cost nothing): half the bytes each decode step reads, and on a CPU
    the samplers' bf16 compile (``sampler_jit``). float32 returns ``variables`` as is."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return variables
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, variables)


def generate(
    step: StepFn,
    first_logits: jax.Array,
    cache: Any,
    num_tokens: int,
    strategy: Strategy,
    keys: jax.Array | None,
    *,
    guidance: Guidance | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    windows: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Samples ``num_tokens`` tokens per row: (tokens [B, num_tokens] int32, lengths [B]).

    ``first_logits`` [R, V] come from the prefill. After a row's ``eos_id`` its later tokens are
    ``pad_id``; ``lengths`` counts the tokens up to and including the EOS (``num_tokens`` for a
    row that never emits one). ``windows``: the number of growing cache prefixes (module
    docstring); the step at position n may write slots up to ``cache_slots(cache) - num_tokens + n``,
    i.e. the last token fed sits in the cache's last or second-to-last slot.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be ≥ 1, got {num_tokens}")

    def pick(logits, n):
        return choose(strategy, guide(logits, guidance, n), keys, n)

    def feed(tok):
        return jnp.concatenate([tok, tok]) if guidance is not None else tok

    tok = pick(first_logits, 0)
    batch = tok.shape[0]
    out = jnp.full((batch, num_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = tok == eos_id if eos_id is not None else jnp.zeros((batch,), jnp.bool_)
    lengths = jnp.where(done, 1, num_tokens).astype(jnp.int32)

    def cond_fn(stop):
        def fn(carry):
            n, _, _, _, done, _ = carry
            return jnp.logical_and(n < stop, jnp.logical_not(jnp.all(done)))

        return fn

    def body(carry):
        n, out, cache, tok, done, lengths = carry
        logits, cache = step(feed(tok), cache, n)
        new = pick(logits, n)
        if eos_id is not None:
            new = jnp.where(done, pad_id, new)
            hit = jnp.logical_and(jnp.logical_not(done), new == eos_id)
            lengths = jnp.where(hit, n + 1, lengths)
            done = jnp.logical_or(done, hit)
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, n))
        return n + 1, out, cache, new, done, lengths

    slots = cache_slots(cache) if windows > 1 else None
    carry, part = (jnp.int32(1), out, None, tok, done, lengths), None
    for stop in window_bounds(num_tokens, windows):
        # The steps before ``stop`` write nothing past the cache's first (slots - num_tokens + stop) slots.
        part = cache if slots is None else _window(cache, part, slots - num_tokens + stop)
        carry = jax.lax.while_loop(cond_fn(stop), body, carry[:2] + (part,) + carry[3:])
        part = carry[2]
    _, out, _, _, _, lengths = carry
    return out, lengths
