"""Sampling strategies against a fake model whose logits are known: the exact tokens each picks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunified.sample.decode import generate
from jaxunified.sample.strategies import Categorical, Greedy, Guidance, choose, filter_logits, guide, row_keys


def hf_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """HF ``top_k_top_p_filtering`` (min_tokens_to_keep 1), one row at a time, stable sort."""
    out = logits.astype(np.float64).copy()
    for row in out:
        if top_k > 0:
            kth = np.sort(row)[::-1][min(top_k, row.size) - 1]
            row[row < kth] = -np.inf
        if top_p < 1.0:
            order = np.argsort(-row, kind="stable")
            p = np.exp(row[order] - np.max(row))
            p = p / p.sum()
            remove = np.cumsum(p) > top_p
            remove[1:] = remove[:-1].copy()
            remove[0] = False
            row[order[remove]] = -np.inf
    return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (5, 0.8), (2, 0.3), (50, 0.95)])
def test_filter_matches_hf(top_k, top_p):
    logits = np.random.default_rng(top_k).normal(size=(6, 40)).astype(np.float32) * 3
    ours = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(hf_top_k_top_p(logits, top_k, top_p)))
    kept = ~np.isinf(ours)
    np.testing.assert_array_equal(ours[kept], logits[kept])


def test_ties_at_the_kth_value_are_all_kept():
    logits = jnp.asarray([[1.0, 3.0, 2.0, 2.0, 0.5]])
    assert np.isfinite(np.asarray(filter_logits(logits, top_k=2))).tolist() == [[False, True, True, True, False]]


def test_greedy_ties_go_to_lowest_id():
    assert choose(Greedy(), jnp.asarray([[0.0, 2.0, 2.0]]), None, 0).tolist() == [1]


def test_categorical_top1_is_argmax_and_draws_stay_in_the_top_k():
    logits = jax.random.normal(jax.random.key(3), (16, 30))
    keys = row_keys(jax.random.key(0), 16)
    np.testing.assert_array_equal(choose(Categorical(top_k=1), logits, keys, 0), jnp.argmax(logits, -1))
    np.testing.assert_array_equal(choose(Categorical(top_p=1e-6), logits, keys, 0), jnp.argmax(logits, -1))
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    for step in range(20):
        tok = np.asarray(choose(Categorical(temperature=2.0, top_k=3), logits, keys, step))
        assert all(t in row for t, row in zip(tok, top3))


def test_per_row_keys_make_a_row_independent_of_its_batch():
    logits = jax.random.normal(jax.random.key(5), (4, 50))
    keys = row_keys(jax.random.key(1), 4)
    full = choose(Categorical(), logits, keys, 7)
    sub = choose(Categorical(), logits[2:], keys[2:], 7)
    np.testing.assert_array_equal(full[2:], sub)


def test_categorical_frequencies_follow_the_filtered_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = row_keys(jax.random.key(2), 4000)
    toks = jax.vmap(lambda k: choose(Categorical(top_p=0.7), logits, k[None], 0)[0])(keys)
    freq = np.bincount(np.asarray(toks), minlength=4) / 4000
    # top-p 0.7 keeps {0.5, 0.3} (0.5 ≤ 0.7 before the second): renormalised 0.625 / 0.375.
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)


def test_guidance_combines_halves_and_interval_turns_it_off():
    cond = jnp.asarray([[1.0, 0.0, 3.0]])
    uncond = jnp.asarray([[0.0, 2.0, 1.0]])
    both = jnp.concatenate([cond, uncond])
    np.testing.assert_allclose(guide(both, Guidance(4.0), 0), uncond + 4.0 * (cond - uncond))
    g = Guidance(4.0, interval=2)
    np.testing.assert_allclose(guide(both, g, 3), uncond + 4.0 * (cond - uncond))  # decode step 2: still on
    np.testing.assert_allclose(guide(both, g, 4), cond)  # LlamaGen: step index 3 > interval 2


VOCAB = 11


def fake_step(tokens, cache, n):
    """Logits that favour (previous token + row + 1) mod V; row r of the uncond half favours 0."""
    rows = tokens.shape[0]
    target = (tokens + jnp.arange(rows) + 1) % VOCAB
    logits = jax.nn.one_hot(target, VOCAB) * 5.0
    return logits, cache + 1


def test_generate_exact_tokens_from_a_fake_model():
    first = jax.nn.one_hot(jnp.asarray([2, 4]), VOCAB) * 5.0
    tokens, lengths = generate(fake_step, first, jnp.int32(0), 5, Greedy(), None)
    expect = [[2], [4]]
    for _ in range(4):
        expect = [r + [(r[-1] + i + 1) % VOCAB] for i, r in enumerate(expect)]
    assert tokens.tolist() == expect and lengths.tolist() == [5, 5]


def test_generate_stops_at_eos_and_pads():
    first = jax.nn.one_hot(jnp.asarray([2, 4]), VOCAB) * 5.0
    tokens, lengths = generate(fake_step, first, jnp.int32(0), 6, Greedy(), None, eos_id=4, pad_id=-1)
    # row 0: 2 3 4 | row 1: 4 (EOS first)
    assert tokens.tolist() == [[2, 3, 4, -1, -1, -1], [4, -1, -1, -1, -1, -1]]
    assert lengths.tolist() == [3, 1]


def test_generate_with_guidance_feeds_both_halves():
    seen = []

    def step(tokens, cache, n):
        seen.append(tokens.shape)
        cond = jax.nn.one_hot((tokens[:1] + 1) % VOCAB, VOCAB)
        uncond = jax.nn.one_hot((tokens[1:] + 2) % VOCAB, VOCAB)
        return jnp.concatenate([cond, uncond]), cache

    first = jnp.concatenate([jax.nn.one_hot(jnp.asarray([3]), VOCAB), jnp.zeros((1, VOCAB))])
    tokens, _ = generate(step, first, jnp.int32(0), 4, Greedy(), None, guidance=Guidance(3.0))
    # guided = u + 3(c − u): +3 on c's token, −2 on u's token, so the cond chain wins: 3 4 5 6.
    assert tokens.tolist() == [[3, 4, 5, 6]] and seen[0] == (2,)
