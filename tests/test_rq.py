"""ResidualQuantizer: rq-vae golden parity, EMA schedules, restart, sharded EMA, straight-through."""

import dataclasses
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxunified.quant.rq import RQConfig, ResidualQuantizer


def _apply(mod, *args, **kw):
    """``mod.apply`` under one jit: far quicker on CPU than op-by-op eager dispatch."""
    return jax.jit(lambda *a: mod.apply(*a, **kw))(*args)


def _train(mod, v, x, key=None):
    """A training forward that may update the ``codebook`` collection → ((quant, codes, aux), vars)."""
    rngs = {} if key is None else {"quant": key}
    return jax.jit(lambda v, x, r: mod.apply(v, x, train=True, mutable=["codebook"], rngs=r))(v, x, rngs)


# ---------------------------------------------------------------- golden parity (kakaobrain RQBottleneck)


def _golden(golden_dir):
    g = np.load(golden_dir / "rq_ema_tiny.npz")
    meta = json.loads((golden_dir / "rq_ema_tiny.json").read_text())
    k = meta["n_embed"]
    cfg = RQConfig(
        codebook_size=k, embed_dim=meta["embed_dim"], depth=meta["depth"],
        shared_codebook=meta["shared_codebook"], ema_decay=meta["decay"], ema_eps=meta["eps"],
        restart=meta["restart_unused_codes"],
    )
    # The reference's weight has a padding row K that is never searched or updated: drop it.
    v = {"codebook": {
        "embedding": jnp.asarray(g["before/weight"][:k]),
        "cluster_size": jnp.asarray(g["before/cluster_size_ema"]),
        "embed_sum": jnp.asarray(g["before/embed_ema"]),
    }}
    return g, cfg, v


def test_golden_parity_eval_and_one_training_forward(golden_dir):
    """x is NHWC [B=2, h=4, w=4, d=4] as RQBottleneck takes it (h = w = d = 4 makes the layout
    ambiguous by shape alone; reading it as NCHW does not reproduce the reference codes)."""
    g, cfg, v = _golden(golden_dir)
    mod = ResidualQuantizer(cfg)
    x = jnp.asarray(g["x"])

    quant, codes, aux = _apply(mod, v, x)
    assert codes.shape == (2, 4, 4, 3) and codes.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(codes), g["codes"])
    np.testing.assert_allclose(np.asarray(quant), g["quant"], atol=1e-5)
    np.testing.assert_allclose(float(aux["commit_loss"]), float(g["commit_loss"]), atol=1e-5)
    used = [len(np.unique(g["codes"][..., d])) / cfg.codebook_size for d in range(3)]
    np.testing.assert_allclose(np.asarray(aux["usage"]), used)
    _, nchw_codes, _ = _apply(mod, v, x.transpose(0, 2, 3, 1))
    assert not np.array_equal(np.asarray(nchw_codes), g["codes"])

    # Eval never touches the state, even with a mutable collection.
    (_, codes_e, _), upd = _apply(mod, v, x, train=False, mutable=["codebook"])
    chex.assert_trees_all_equal(upd, v)
    np.testing.assert_array_equal(np.asarray(codes_e), g["codes"])

    # One training forward: the shared codebook takes one EMA step per depth, sequentially.
    (quant_t, codes_t, _), upd = _train(mod, v, x)
    np.testing.assert_array_equal(np.asarray(codes_t), g["codes_train"])
    np.testing.assert_allclose(np.asarray(quant_t), g["quant_train"], atol=1e-5)
    c = upd["codebook"]
    np.testing.assert_allclose(np.asarray(c["embedding"]), g["after/weight"][: cfg.codebook_size], atol=1e-5)
    np.testing.assert_allclose(np.asarray(c["cluster_size"]), g["after/cluster_size_ema"], atol=1e-5)
    np.testing.assert_allclose(np.asarray(c["embed_sum"]), g["after/embed_ema"], atol=1e-5)


# ---------------------------------------------------------------- schedules


def _ema_by_hand(v, cfg, codes, x):
    """Numpy float64: one EMA step from all depths' (residual, code) pairs of the eval forward."""
    cb = np.asarray(v["codebook"]["embedding"], np.float64)
    n_old = np.asarray(v["codebook"]["cluster_size"], np.float64)
    m_old = np.asarray(v["codebook"]["embed_sum"], np.float64)
    k, d = cb.shape
    codes = np.asarray(codes).reshape(-1, cfg.depth)
    r = np.asarray(x, np.float64).reshape(-1, d).copy()
    counts, sums = np.zeros(k), np.zeros((k, d))
    for depth in range(cfg.depth):
        np.add.at(counts, codes[:, depth], 1.0)
        np.add.at(sums, codes[:, depth], r)
        r -= cb[codes[:, depth]]
    n = cfg.ema_decay * n_old + (1 - cfg.ema_decay) * counts
    m = cfg.ema_decay * m_old + (1 - cfg.ema_decay) * sums
    tot = n.sum()
    return n, m, m / ((n + cfg.ema_eps) / (tot + k * cfg.ema_eps) * tot)[:, None]


def test_per_step_is_one_update_over_all_depths(golden_dir):
    g, cfg, v = _golden(golden_dir)
    x = jnp.asarray(g["x"])
    step_cfg = dataclasses.replace(cfg, ema_schedule="per_step")
    (quant, codes, _), upd = _train(ResidualQuantizer(step_cfg), v, x)
    # Every depth searches the stored codebook: training output = eval output ...
    np.testing.assert_array_equal(np.asarray(codes), g["codes"])
    np.testing.assert_allclose(np.asarray(quant), g["quant"], atol=1e-5)
    # ... and the state takes exactly one EMA step over the residuals of all depths.
    n, m, cb = _ema_by_hand(v, cfg, g["codes"], g["x"])
    c = upd["codebook"]
    np.testing.assert_allclose(np.asarray(c["cluster_size"]), n, atol=1e-5)
    np.testing.assert_allclose(np.asarray(c["embed_sum"]), m, atol=1e-5)
    np.testing.assert_allclose(np.asarray(c["embedding"]), cb, atol=1e-5)
    # per_depth (the golden) updates D times, and later depths see it: codes and state differ.
    assert not np.array_equal(g["codes_train"], g["codes"])
    assert np.abs(np.asarray(c["cluster_size"]) - g["after/cluster_size_ema"]).max() > 1e-2


def test_schedules_coincide_with_one_codebook_per_depth():
    cfg = RQConfig(codebook_size=16, embed_dim=4, depth=3, shared_codebook=False, ema_decay=0.8, restart=False)
    x = jax.random.normal(jax.random.key(0), (6, 5, 4))
    v = nn.meta.unbox(jax.jit(ResidualQuantizer(cfg).init)(jax.random.key(1), x))
    assert v["codebook"]["embedding"].shape == (3, 16, 4) and v["codebook"]["cluster_size"].shape == (3, 16)
    step_cfg = dataclasses.replace(cfg, ema_schedule="per_step")
    out_d, upd_d = _train(ResidualQuantizer(cfg), v, x)
    out_s, upd_s = _train(ResidualQuantizer(step_cfg), v, x)
    chex.assert_trees_all_close((out_d, upd_d), (out_s, upd_s), atol=1e-6)
    eval_codes = _apply(ResidualQuantizer(cfg), v, x)[1]
    np.testing.assert_array_equal(np.asarray(out_d[1]), np.asarray(eval_codes))
    assert not np.allclose(np.asarray(upd_d["codebook"]["embedding"]), np.asarray(v["codebook"]["embedding"]))


# ---------------------------------------------------------------- restart


def _restart_state(k, d):
    emb = jax.random.normal(jax.random.key(2), (k, d)) * 10.0
    # N = 1 everywhere and decay 0.5: the codes this batch hits stay alive, every other one drops
    # to 0.5 < 1 and is restarted.
    return {"codebook": {"embedding": emb, "cluster_size": jnp.ones(k), "embed_sum": emb}}


@pytest.mark.parametrize(
    "depth,schedule,n_vectors",
    [(1, "per_depth", 4), (1, "per_depth", 40), (2, "per_step", 40)],  # 4 < K: tiled with noise
)
def test_restart_replaces_dead_codes_with_batch_vectors(depth, schedule, n_vectors):
    k, d = 16, 3
    cfg = RQConfig(codebook_size=k, embed_dim=d, depth=depth, ema_schedule=schedule, ema_decay=0.5, restart=True)
    v = _restart_state(k, d)
    emb = np.asarray(v["codebook"]["embedding"])
    # Vectors next to codes 0 and 1 only: the batch uses few codes.
    x = jnp.asarray(emb[np.arange(n_vectors) % 2]) + 0.1 * jax.random.normal(jax.random.key(3), (n_vectors, d))
    mod = ResidualQuantizer(cfg)

    with pytest.raises(ValueError, match="rngs"):
        _train(mod, v, x)
    # Eval, or a training forward that cannot write the collection, needs no key and restarts nothing.
    (_, codes, _), upd = _apply(mod, v, x, train=False, mutable=["codebook"])
    chex.assert_trees_all_equal(upd, v)
    _apply(mod, v, x, train=True)

    (_, codes_t, _), upd = _train(mod, v, x, jax.random.key(4))
    c = jax.tree.map(np.asarray, upd["codebook"])
    hit = np.zeros(k, bool)
    hit[np.asarray(codes).ravel()] = True
    assert 1 < hit.sum() < k // 2
    # Live codes took a plain EMA step; the dead ones restarted with count 1 at a pool vector.
    assert (c["cluster_size"][hit] >= 1.0).all()
    np.testing.assert_array_equal(c["cluster_size"][~hit], 1.0)
    want_live = 0.5 * emb[hit] + 0.5 * _sums(x, codes, emb, k)[hit]
    np.testing.assert_allclose(c["embed_sum"][hit], want_live, rtol=1e-5, atol=1e-5)
    pool = _residual_pool(x, codes, emb)
    dist = np.linalg.norm(c["embed_sum"][~hit][:, None] - pool[None], axis=-1).min(axis=1)
    if n_vectors * depth < k:
        # Tiled copies carry U(0, 1)·0.01/√d noise per component, so they are distinct, near the pool.
        assert (dist <= 0.01 + 1e-6).all() and (dist > 0).any()
        assert len(np.unique(c["embed_sum"][~hit], axis=0)) == (~hit).sum()
    else:
        np.testing.assert_allclose(dist, 0.0, atol=1e-6)

    # Same key, same restart; another key, another pick.
    chex.assert_trees_all_equal(upd, _train(mod, v, x, jax.random.key(4))[1])
    other = np.asarray(_train(mod, v, x, jax.random.key(5))[1]["codebook"]["embed_sum"])
    assert not np.array_equal(other[~hit], c["embed_sum"][~hit])
    np.testing.assert_allclose(other[hit], c["embed_sum"][hit])


def _residual_pool(x, codes, emb):
    """The residuals every depth quantised, [N·D, d], for codes picked against ``emb``."""
    r, out = np.asarray(x, np.float64), []
    for depth in range(codes.shape[-1]):
        out.append(r)
        r = r - emb[np.asarray(codes)[:, depth]]
    return np.concatenate(out)


def _sums(x, codes, emb, k):
    pool = _residual_pool(x, codes, emb)
    s = np.zeros((k, emb.shape[1]))
    np.add.at(s, np.asarray(codes).T.ravel(), pool)
    return s


# ---------------------------------------------------------------- sharded EMA


@pytest.mark.parametrize(
    "shared,schedule", [(True, "per_depth"), (True, "per_step"), (False, "per_depth")]
)
def test_shard_map_update_equals_single_device(shared, schedule):
    """8 devices with axis_name give the single-device update of the same global batch and key."""
    k, d, depth = 64, 4, 3
    base = dict(codebook_size=k, embed_dim=d, depth=depth, shared_codebook=shared, ema_schedule=schedule,
                ema_decay=0.9, restart=True)
    # 32 vectors: per depth fewer than K (tiled with noise); per_step pools 96 > K.
    x = jax.random.normal(jax.random.key(6), (16, 2, d))
    key = jax.random.key(7)
    shape = (k, d) if shared else (depth, k, d)
    emb = jax.random.normal(jax.random.key(8), shape)
    # Every code alive (N = 1): after a step hit codes stay alive, the rest (N = 0.9) restart, so
    # both the psum'd statistics and the restart pick matter.
    v = {"codebook": {"embedding": emb, "cluster_size": jnp.ones(shape[:-1]), "embed_sum": emb}}

    def run(cfg, v, x, key):
        (quant, codes, aux), upd = ResidualQuantizer(cfg).apply(
            v, x, train=True, mutable=["codebook"], rngs={"quant": key}
        )
        return upd, quant, codes, aux["usage"], aux["perplexity"]

    want = jax.jit(lambda v, x, key: run(RQConfig(**base), v, x, key))(v, x, key)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.jit(jax.shard_map(
        lambda v, x, key: run(RQConfig(**base, axis_name="data"), v, x, key),
        mesh=mesh,
        in_specs=(P(), P("data"), P()),
        out_specs=(P(), P("data"), P("data"), P(), P()),
    ))
    got = sharded(v, x, key)
    n = np.asarray(want[0]["codebook"]["cluster_size"])
    assert (n == 1.0).any() and (n > 1.05).any()  # some codes restarted, some kept by the EMA
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))
    chex.assert_trees_all_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(got[1], want[1], atol=1e-5)
    chex.assert_trees_all_close(got[3:], want[3:], rtol=1e-5)


# ---------------------------------------------------------------- gradients, embedding, errors


def test_straight_through_and_loss_gradients():
    cfg = RQConfig(codebook_size=16, embed_dim=4, depth=3, update="grad", restart=False, beta=0.25)
    x = jax.random.normal(jax.random.key(9), (3, 5, 4))  # a [B, L, d] token sequence
    mod = ResidualQuantizer(cfg)
    v = nn.meta.unbox(jax.jit(mod.init)(jax.random.key(10), x))
    assert set(v) == {"params"}
    w = jax.random.normal(jax.random.key(11), x.shape)

    quant, codes, aux = _apply(mod, v, x)
    assert codes.shape == (3, 5, 3)
    summed = _apply(mod, v, codes, method="embed_codes")
    np.testing.assert_allclose(np.asarray(summed), np.asarray(quant), atol=1e-6)
    per_depth = _apply(mod, v, codes, method="embed_codes_per_depth")
    partials = _apply(mod, v, codes, method="embed_codes_per_depth", cumulative=True)
    assert per_depth.shape == (3, 5, 3, 4)
    np.testing.assert_allclose(np.asarray(partials), np.cumsum(np.asarray(per_depth), axis=-2), atol=1e-6)
    # Depth d quantised the residual of depths < d: the codes are its nearest codes.
    cb = np.asarray(v["params"]["embedding"])
    before = np.concatenate([np.zeros((3, 5, 1, 4)), np.asarray(partials)[..., :-1, :]], axis=-2)
    r = np.asarray(x)[..., None, :] - before  # [B, L, D, d]: what each depth quantised
    dist = ((r[..., None, :] - cb) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(codes), dist.argmin(-1))

    def grads(fn):
        return jax.jit(jax.grad(lambda p, x: fn(mod.apply({"params": p}, x)), argnums=(0, 1)))(v["params"], x)

    # Straight-through: quant's gradient is the identity to x and nothing to the codebook.
    gp, gx = grads(lambda out: jnp.sum(out[0] * w))
    np.testing.assert_allclose(np.asarray(gx), np.asarray(w), rtol=1e-6)
    assert float(jnp.abs(gp["embedding"]).max()) == 0.0
    # Commitment: encoder only, beta · mean_d 2 (x − Σ_{≤d} q) / n.
    gp, gx = grads(lambda out: out[2]["commit_loss"])
    want = 0.25 * np.mean(2 * (np.asarray(x)[..., None, :] - np.asarray(partials)), axis=-2) / x.size
    np.testing.assert_allclose(np.asarray(gx), want, rtol=1e-5, atol=1e-8)
    assert float(jnp.abs(gp["embedding"]).max()) == 0.0
    # Codebook loss: codebook only, and only the picked codes.
    gp, gx = grads(lambda out: out[2]["vq_loss"])
    assert float(jnp.abs(gx).max()) == 0.0
    used = np.zeros(16, bool)
    used[np.asarray(codes).ravel()] = True
    row = np.linalg.norm(np.asarray(gp["embedding"]), axis=-1)
    assert (row[used] > 0).all() and (row[~used] == 0).all()
    np.testing.assert_allclose(
        float(aux["vq_loss"]), float(jnp.mean(jnp.stack([jnp.mean((per_depth[..., i, :] - r[..., i, :]) ** 2)
                                                          for i in range(3)]))), rtol=1e-5)


def test_codebook_logical_axes():
    x = jnp.zeros((2, 4))
    for shared, names in [(True, ("codebook", "code_dim")), (False, (None, "codebook", "code_dim"))]:
        cfg = RQConfig(codebook_size=8, embed_dim=4, depth=2, shared_codebook=shared)
        boxed = jax.eval_shape(ResidualQuantizer(cfg).init, jax.random.key(0), x)["codebook"]
        assert boxed["embedding"].names == names and boxed["embed_sum"].names == names
        assert boxed["cluster_size"].names == names[:-1]


def test_bad_inputs_are_clear_errors():
    cfg = RQConfig(codebook_size=8, embed_dim=4, depth=2)
    mod = ResidualQuantizer(cfg)
    with pytest.raises(ValueError, match="embed_dim=4"):
        mod.init(jax.random.key(0), jnp.zeros((2, 4, 4, 3)))
    v = mod.init(jax.random.key(0), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="depth axis of size 2"):
        mod.apply(v, jnp.zeros((2, 3), jnp.int32), method="embed_codes")
    for kw, match in [({"update": "kmeans"}, "update"), ({"ema_schedule": "once"}, "ema_schedule"),
                      ({"update": "grad"}, "restart"), ({"depth": 0}, "depth"), ({"ema_decay": 1.0}, "ema_decay")]:
        with pytest.raises(ValueError, match=match):
            RQConfig(**kw)
