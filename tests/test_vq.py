"""VectorQuantizer: chunked search, gradients, EMA/restart math, sharded EMA, IBQ, SimVQ, stats."""

import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxunified.quant.vq import (
    VQConfig,
    VectorQuantizer,
    entropy_loss,
    laplace_codebook,
    nearest_codes,
    squared_distances,
    usage_and_perplexity,
)


def _init(cfg, z, seed=0):
    return nn.meta.unbox(jax.jit(VectorQuantizer(cfg).init)(jax.random.key(seed), z))


def _train_step(mod):
    """A jitted EMA training forward returning only the updated ``codebook`` collection."""
    return jax.jit(
        lambda v, z, key: mod.apply(v, z, train=True, mutable=["codebook"], rngs={"quant": key})[1]
    )


def _apply(mod, *args, **kw):
    """``mod.apply`` under one jit: far quicker on CPU than op-by-op eager dispatch."""
    return jax.jit(lambda *a: mod.apply(*a, **kw))(*args)


@pytest.mark.parametrize("chunk", [1, 7, 128, 1000, 4096])
def test_chunked_argmin_equals_unchunked(chunk):
    kz, kc = jax.random.split(jax.random.key(0))
    z = jax.random.normal(kz, (300, 8))
    cb = jax.random.normal(kc, (1000, 8))
    full = jnp.argmin(squared_distances(z, cb), axis=-1)
    got = jax.jit(nearest_codes, static_argnums=2)(z, cb, chunk)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(full))


def test_chunked_ties_pick_lowest_index():
    cb = jnp.zeros((10, 2)).at[:, 0].set(1.0)  # ten identical codes
    z = jnp.ones((4, 2))
    np.testing.assert_array_equal(np.asarray(nearest_codes(z, cb, 3)), np.zeros(4))


def test_module_chunk_setting_does_not_change_codes():
    z = jax.random.normal(jax.random.key(1), (2, 5, 5, 4))
    big = VQConfig(codebook_size=200, embed_dim=4, l2_norm=False)
    small = VQConfig(codebook_size=200, embed_dim=4, l2_norm=False, distance_chunk=16)
    v = _init(big, z)
    _, c1, _ = _apply(VectorQuantizer(big), v, z)
    _, c2, _ = _apply(VectorQuantizer(small), v, z)
    assert c1.shape == (2, 5, 5)
    np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))


def test_ste_gradient_passes_through_and_losses():
    cfg = VQConfig(codebook_size=16, embed_dim=4, l2_norm=False)
    z = jax.random.normal(jax.random.key(2), (3, 7, 4))
    v = _init(cfg, z)
    w = jax.random.normal(jax.random.key(3), z.shape)
    mod = VectorQuantizer(cfg)

    g = jax.jit(jax.grad(lambda z: jnp.sum(mod.apply(v, z)[0] * w)))(z)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)

    zq, codes, aux = _apply(mod, v, z)
    cb = _apply(mod, v, method="codebook")
    q = cb[codes]
    np.testing.assert_allclose(np.asarray(zq), np.asarray(q), atol=1e-6)  # forward value is the code
    np.testing.assert_allclose(float(aux["vq_loss"]), float(jnp.mean((q - z) ** 2)), rtol=1e-6)
    np.testing.assert_allclose(float(aux["commit_loss"]), 0.25 * float(jnp.mean((q - z) ** 2)), rtol=1e-6)

    # The codebook loss moves only the codes that were picked.
    gp = jax.jit(jax.grad(lambda p: mod.apply({"params": p}, z)[2]["vq_loss"]))(v["params"])
    row_norm = np.linalg.norm(np.asarray(jax.tree.leaves(gp)[0]), axis=-1)
    used = np.zeros(16, bool)
    used[np.asarray(codes).ravel()] = True
    assert (row_norm[used] > 0).all() and (row_norm[~used] == 0).all()


def test_l2_norm_lookup_and_codebook_are_normalised():
    cfg = VQConfig(codebook_size=32, embed_dim=8, l2_norm=True)
    z = jax.random.normal(jax.random.key(4), (10, 8)) * 5
    v = _init(cfg, z)
    mod = VectorQuantizer(cfg)
    cb = _apply(mod, v, method="codebook")
    np.testing.assert_allclose(np.linalg.norm(np.asarray(cb), axis=-1), 1.0, rtol=1e-5)
    zq, codes, _ = _apply(mod, v, z)
    np.testing.assert_allclose(np.asarray(_apply(mod, v, codes, method="lookup")), np.asarray(zq), atol=1e-6)


def _ema_toy_state(cfg, z):
    v = _init(cfg, z)
    emb = jnp.array([[0.0, 0.0], [10.0, 10.0], [-10.0, 0.0]])
    return {
        "codebook": {
            "embedding": emb,
            "cluster_size": jnp.ones(3),
            "embed_sum": emb,
        }
    }, v


def test_ema_update_math():
    cfg = VQConfig(codebook_size=3, embed_dim=2, l2_norm=False, update="ema", ema_decay=0.5, ema_eps=1e-5)
    z = jnp.array([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0], [11.0, 11.0]])
    state, v = _ema_toy_state(cfg, z)
    assert set(v["codebook"]) == {"embedding", "cluster_size", "embed_sum"} and "params" not in v
    mod = VectorQuantizer(cfg)

    # Without a mutable collection (or in eval) the state is untouched.
    zq0, codes, aux0 = _apply(mod, state, z, train=True)
    np.testing.assert_array_equal(np.asarray(codes), [0, 0, 1, 1])
    assert float(aux0["vq_loss"]) == 0.0

    (zq, codes, aux), upd = _apply(mod, state, z, train=True, mutable=["codebook"])
    n_expected = np.array([1.5, 1.5, 0.5])  # 0.5·1 + 0.5·[2, 2, 0]
    m_expected = 0.5 * np.array([[0, 0], [10, 10], [-10, 0]]) + 0.5 * np.array([[1, 1], [20, 20], [0, 0]])
    n = n_expected.sum()
    smoothed = (n_expected + 1e-5) / (n + 3 * 1e-5) * n
    cb_expected = m_expected / smoothed[:, None]
    c = upd["codebook"]
    np.testing.assert_allclose(np.asarray(c["cluster_size"]), n_expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c["embed_sum"]), m_expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c["embedding"]), cb_expected, rtol=1e-6)
    direct = laplace_codebook(c["cluster_size"], c["embed_sum"], 1e-5)
    np.testing.assert_allclose(np.asarray(direct), cb_expected, rtol=1e-6)
    # The training output uses the updated codebook (rq-vae order).
    np.testing.assert_allclose(np.asarray(zq), cb_expected[[0, 0, 1, 1]], rtol=1e-6)
    assert float(aux["vq_loss"]) == 0.0 and float(aux["commit_loss"]) > 0


@pytest.mark.parametrize("n_vectors", [4, 40])  # fewer (tiled with noise) and more vectors than codes
def test_restart_revives_dead_codes(n_vectors):
    cfg = VQConfig(codebook_size=16, embed_dim=3, l2_norm=False, update="ema", restart=True)
    z = jax.random.normal(jax.random.key(5), (n_vectors, 3)) + 5.0
    v = _init(cfg, z)
    mod = VectorQuantizer(cfg)
    with pytest.raises(ValueError, match="rngs"):
        mod.apply(v, z, train=True, mutable=["codebook"])
    step = _train_step(mod)
    upd = step(v, z, jax.random.key(6))
    c = upd["codebook"]
    # Every code started dead (N = 0): all now have count >= 1 and a vector drawn from the batch.
    assert (np.asarray(c["cluster_size"]) >= 1.0 - 1e-6).all()
    dist = np.min(np.linalg.norm(np.asarray(c["embed_sum"])[:, None] - np.asarray(z)[None], axis=-1), axis=1)
    tol = 0.01 if n_vectors < 16 else 1e-6
    assert (dist <= tol).all(), dist
    # Same key → same pick; another key → another pick.
    chex.assert_trees_all_equal(upd, step(v, z, jax.random.key(6)))
    upd3 = step(v, z, jax.random.key(7))
    assert not np.array_equal(np.asarray(upd3["codebook"]["embed_sum"]), np.asarray(c["embed_sum"]))
    # Live codes are left alone: with every count now >= 0.99 > threshold, step 2 is a plain EMA step.
    live_cfg = dataclasses.replace(cfg, restart_threshold=0.5)
    plain_cfg = dataclasses.replace(cfg, restart=False)
    upd4 = _train_step(VectorQuantizer(live_cfg))(upd, z, jax.random.key(8))
    upd5 = _train_step(VectorQuantizer(plain_cfg))(upd, z, jax.random.key(8))
    chex.assert_trees_all_close(upd4, upd5)


def test_error_restart_draws_the_worst_quantised_vectors():
    """restart_from="error": candidates are drawn ∝ squared quantisation error, so vectors that a
    live code already fits exactly are never picked while badly fitted ones are."""
    k, d = 8, 3
    cfg = VQConfig(codebook_size=k, embed_dim=d, l2_norm=False, update="ema", restart=True, restart_from="error",
                   ema_decay=0.5)
    emb = np.full((k, d), -100.0, np.float32)  # dead codes far from everything
    emb[0] = (1.0, 0.0, 0.0)  # the one live code; its 12 copies in the batch have error 0
    far = np.array([[0.0, 5.0, i] for i in range(4)], np.float32)
    z = jnp.asarray(np.concatenate([np.tile(emb[:1], (12, 1)), far]))
    count = np.zeros(k, np.float32)
    count[0] = 100.0
    v = {"codebook": {"embedding": jnp.asarray(emb), "cluster_size": jnp.asarray(count),
                      "embed_sum": jnp.asarray(emb * count[:, None])}}
    upd = _train_step(VectorQuantizer(cfg))(v, z, jax.random.key(0))["codebook"]
    n, m = np.asarray(upd["cluster_size"]), np.asarray(upd["embed_sum"])
    restarted = m[n == 1.0]
    assert len(restarted) == k - 1
    # 7 dead codes drawn with replacement from the 4 far vectors only (plus the tie-breaking noise).
    assert (np.abs(restarted[:, 1] - 5.0) < 0.05).all()
    assert set(np.rint(restarted[:, 2]).astype(int)) <= {0, 1, 2, 3}
    assert np.unique(restarted.round(6), axis=0).shape[0] == k - 1
    with pytest.raises(ValueError, match="restart_from"):
        VQConfig(restart_from="worst")


@pytest.mark.parametrize("batch,restart_from", [(16, "random"), (32, "random"), (16, "error"), (32, "error")])
def test_ema_shard_map_equals_global_view(batch, restart_from):
    """8 devices with axis_name give the global-view update for the same global batch and key."""
    k, d = 64, 4
    base = dict(codebook_size=k, embed_dim=d, l2_norm=True, update="ema", restart=True, ema_decay=0.9,
                restart_from=restart_from)
    z = jax.random.normal(jax.random.key(9), (batch, 2, d))  # 16 → 32 vectors (< K: tiled), 32 → 64
    key = jax.random.key(10)
    # A state where every code is alive (N = 1): after this step the hit codes stay alive and the
    # others (N = 0.9) are restarted, so both the psum'd statistics and the restart pick matter.
    emb = jax.random.normal(jax.random.key(11), (k, d))
    v1 = {"codebook": {"embedding": emb, "cluster_size": jnp.ones(k), "embed_sum": emb}}

    def run(cfg, v, z, key):
        (_, codes, aux), upd = VectorQuantizer(cfg).apply(
            v, z, train=True, mutable=["codebook"], rngs={"quant": key}
        )
        return upd, codes, aux["usage"], aux["perplexity"]

    want = jax.jit(lambda v, z, key: run(VQConfig(**base), v, z, key))(v1, z, key)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.jit(
        jax.shard_map(
            lambda v, z, key: run(VQConfig(**base, axis_name="data"), v, z, key),
            mesh=mesh,
            in_specs=(P(), P("data"), P()),
            out_specs=(P(), P("data"), P(), P()),
        )
    )
    got = sharded(v1, z, key)
    n = np.asarray(want[0]["codebook"]["cluster_size"])
    assert (n == 1.0).any() and (n > 1.05).any()  # some codes restarted, some kept by the EMA
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    chex.assert_trees_all_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(got[2]), float(want[2]), rtol=1e-6)
    np.testing.assert_allclose(float(got[3]), float(want[3]), rtol=1e-5)


def test_ibq_gives_gradients_to_all_codes():
    cfg = VQConfig(codebook_size=16, embed_dim=4, l2_norm=False, update="ibq")
    z = jax.random.normal(jax.random.key(12), (2, 3, 4))
    v = _init(cfg, z)
    mod = VectorQuantizer(cfg)
    zq, codes, aux = _apply(mod, v, z)
    cb = _apply(mod, v, method="codebook")
    np.testing.assert_allclose(np.asarray(zq), np.asarray(cb[codes]), atol=1e-5)  # forward = hard code
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(jnp.argmax(z @ cb.T, -1)))

    def loss(p):
        zq, _, aux = mod.apply({"params": p}, z)
        return jnp.sum(zq**2) + aux["vq_loss"] + aux["commit_loss"]

    g = np.asarray(jax.tree.leaves(jax.jit(jax.grad(loss))(v["params"]))[0])
    assert (np.linalg.norm(g, axis=-1) > 0).all()  # 16 codes, 6 vectors: unpicked codes learn too


def test_simvq_base_codebook_never_updates():
    cfg = VQConfig(codebook_size=32, embed_dim=4, l2_norm=False, simvq=True)
    z = jax.random.normal(jax.random.key(13), (2, 5, 4))
    v = _init(cfg, z)
    assert set(v["params"]) == {"codebook_proj"}
    assert set(v["codebook"]) == {"base"}  # not "params": an optimizer never sees it
    mod = VectorQuantizer(cfg)

    def loss(variables):
        zq, _, aux = mod.apply(variables, z)
        return jnp.sum(zq**2) + aux["vq_loss"] + aux["commit_loss"]

    g = jax.jit(jax.grad(loss))(v)
    assert float(jnp.abs(g["codebook"]["base"]).max()) == 0.0  # stop_gradient as a second guard
    assert float(jnp.abs(g["params"]["codebook_proj"]["kernel"]).max()) > 0
    (_, _, _), upd = _apply(mod, v, z, train=True, mutable=["codebook"])
    chex.assert_trees_all_equal(upd["codebook"], v["codebook"])
    # Effective codebook is base @ W + b.
    cb = _apply(mod, v, method="codebook")
    p = v["params"]["codebook_proj"]
    np.testing.assert_allclose(
        np.asarray(cb), np.asarray(v["codebook"]["base"] @ p["kernel"] + p["bias"]), rtol=1e-5, atol=1e-6
    )


def test_usage_and_perplexity_on_known_histograms():
    cfg = VQConfig(codebook_size=4, embed_dim=2, l2_norm=False)
    cb = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    z = jnp.array([[0.0, 0.1], [0.1, 0.0], [1.0, 0.1], [0.9, 0.0]])  # codes 0, 0, 1, 1
    _, codes, aux = _apply(VectorQuantizer(cfg), {"params": {"embedding": cb}}, z)
    np.testing.assert_array_equal(np.asarray(codes), [0, 0, 1, 1])
    np.testing.assert_allclose(float(aux["usage"]), 0.5)
    np.testing.assert_allclose(float(aux["perplexity"]), 2.0, rtol=1e-6)
    usage, ppl = usage_and_perplexity(jnp.array([3.0, 1.0, 0.0, 0.0]))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    np.testing.assert_allclose([float(usage), float(ppl)], [0.5, math.exp(h)], rtol=1e-6)


def test_entropy_loss_matches_definition():
    aff = jax.random.normal(jax.random.key(14), (6, 5))
    logits = np.asarray(aff, np.float64) / 0.5
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    sample = -np.mean(np.sum(p * np.log(p), -1))
    avg = p.mean(0)
    want = sample + np.sum(avg * np.log(avg + 1e-5))
    np.testing.assert_allclose(float(entropy_loss(aff, 0.5)), want, rtol=1e-5)
    cfg = VQConfig(codebook_size=8, embed_dim=4, l2_norm=True, entropy_loss_ratio=0.1)
    z = jax.random.normal(jax.random.key(15), (10, 4))
    v = _init(cfg, z)
    _, _, aux = _apply(VectorQuantizer(cfg), v, z)
    assert float(aux["entropy_loss"]) != 0.0


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"update": "kmeans"}, "update"),
        ({"restart": True}, "restart"),
        ({"simvq": True, "update": "ema"}, "simvq"),
        ({"distance_chunk": 0}, "distance_chunk"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        VQConfig(**kw)


def test_wrong_code_dim_is_a_clear_error():
    cfg = VQConfig(codebook_size=8, embed_dim=4)
    with pytest.raises(ValueError, match="embed_dim=4"):
        _init(cfg, jnp.zeros((2, 3)))
