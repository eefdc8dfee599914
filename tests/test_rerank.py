"""Best-of-n reranking: the layout of the candidates and which one is kept; the fixed-size chunks
the samplers and the scorer walk their rows in."""

import numpy as np
import pytest

from jaxunified.sample import rerank


def test_repeat_lays_candidates_out_prompt_major():
    assert rerank.repeat(["a", "b"], 3) == ["a", "a", "a", "b", "b", "b"]
    with pytest.raises(ValueError, match="n >= 1"):
        rerank.repeat(["a"], 0)


def test_rerank_keeps_each_prompts_highest_score_and_the_first_draw_on_ties():
    scores = np.array([0.1, 0.7, 0.3, 2.0, 2.0, -1.0])
    r = rerank.rerank(scores, 3)
    np.testing.assert_array_equal(r.chosen, [1, 3])
    candidates = np.arange(6) * 10
    np.testing.assert_array_equal(r.best(candidates), [10, 30])
    np.testing.assert_array_equal(r.first(candidates), [0, 30])
    np.testing.assert_array_equal(r.scores, scores.reshape(2, 3))


def test_one_candidate_is_the_plain_sampler():
    r = rerank.rerank(np.zeros(4), 1)
    np.testing.assert_array_equal(r.best(np.arange(4)), np.arange(4))
    np.testing.assert_array_equal(r.first(np.arange(4)), np.arange(4))


def test_rerank_rejects_scores_that_do_not_split_into_groups():
    with pytest.raises(ValueError, match="scores must be"):
        rerank.rerank(np.zeros(5), 2)
    with pytest.raises(ValueError, match="scores must be"):
        rerank.rerank(np.zeros((2, 2)), 2)


def test_fixed_size_chunks_cover_every_index_once_and_pad_the_last_chunk():
    from jaxunified.data.pipeline import fixed_size_chunks

    chunks = list(fixed_size_chunks(7, 3))
    assert [(s, n) for s, _, n in chunks] == [(0, 3), (3, 3), (6, 1)]
    np.testing.assert_array_equal(chunks[-1][1], [6, 6, 6])
    assert all(len(idx) == 3 for _, idx, _ in chunks)
    assert np.concatenate([idx[:n] for _, idx, n in chunks]).tolist() == list(range(7))
    assert list(fixed_size_chunks(0, 3)) == []
