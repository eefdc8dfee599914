"""CLIP and sigmoid losses: hand values, global-vs-per-device parity (values, metrics, gradients), no B×B."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxunified.losses import contrastive as C
from jaxunified.parallel.mesh import BATCH_AXES, batch_sharding, make_mesh, replicated

B, D_IN, D = 16, 6, 8  # 2 rows per device on 8 devices; D ≠ B so a B-sized dim is unambiguous
ATOL = 1e-5


def _sp(x):  # softplus(x) = −log σ(−x)
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------- hand-computed values

# Normalised: zimg = I, ztxt = [[1, 0], [.8, .6]]; unnormalised inputs check the in-loss l2 norm.
ZIMG = np.array([[3.0, 0.0], [0.0, 2.0]], np.float32)
ZTXT = np.array([[5.0, 0.0], [4.0, 3.0]], np.float32)


def test_clip_hand_values():
    # scale 2 → logits [[2, 1.6], [0, 1.2]]; text 1's positive (1.2) loses to image 0 (1.6).
    loss, m = C.clip_loss(ZIMG, ZTXT, math.log(2.0))
    want = 0.25 * (_sp(-0.4) + _sp(-1.2) + _sp(-2.0) + _sp(0.4))
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert float(m["i2t_acc"]) == 1.0 and float(m["t2i_acc"]) == 0.5
    np.testing.assert_allclose(m["logit_scale"], 2.0, rtol=1e-6)
    # normalize=False on already-unit inputs gives the same.
    unit_txt = ZTXT / np.linalg.norm(ZTXT, axis=-1, keepdims=True)
    loss2, _ = C.clip_loss(np.eye(2, dtype=np.float32), unit_txt, math.log(2.0), normalize=False)
    np.testing.assert_allclose(loss2, want, rtol=1e-6)


def test_sigmoid_hand_values():
    # e^t = 2, b = −1 → logits [[1, .6], [−1, .2]]; −log σ(y·l) summed, divided by B = 2.
    loss, m = C.sigmoid_loss(ZIMG, ZTXT, math.log(2.0), -1.0)
    want = (_sp(-1.0) + _sp(0.6) + _sp(-1.0) + _sp(-0.2)) / 2
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert float(m["i2t_acc"]) == 1.0 and float(m["t2i_acc"]) == 0.5
    np.testing.assert_allclose([m["temperature"], m["bias"]], [2.0, -1.0], rtol=1e-6)


def test_logit_scale_clamp():
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 3))
    g = jax.jit(jax.grad(lambda s: C.clip_loss(z[0], z[1], s)[0]))
    assert float(g(C.CLIP_MAX_LOGIT_SCALE + 0.5)) == 0.0  # clamped: no gradient
    assert abs(float(g(1.0))) > 1e-4
    np.testing.assert_allclose(C.clip_scale(10.0), 100.0, rtol=1e-6)
    np.testing.assert_allclose(C.clamp_logit_scale(jnp.array([-1.0, 2.0, 9.0])), [0.0, 2.0, math.log(100.0)])
    assert C.SIGLIP_INIT_T == math.log(10.0) and C.SIGLIP_INIT_B == -10.0


def test_hard_negatives_hand_values():
    # A negative caption identical to image 0's own caption: each image row gains its column
    # (2 for image 0, a tie with its positive; 0 for image 1), text rows are untouched; the
    # sigmoid loss gains −log σ(−logit) for both images.
    neg = ZTXT[:1]
    loss, m = C.clip_loss(ZIMG, ZTXT, math.log(2.0), negatives=neg)
    want = 0.25 * (math.log(2 * math.exp(2) + math.exp(1.6)) - 2 + math.log(2 + math.exp(1.2)) - 1.2
                   + _sp(-2.0) + _sp(0.4))
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert float(m["i2t_acc"]) == 0.5  # a tie with the negative is a miss
    loss, _ = C.sigmoid_loss(ZIMG, ZTXT, math.log(2.0), -1.0, negatives=neg)
    want = (_sp(-1.0) + _sp(0.6) + _sp(-1.0) + _sp(-0.2) + _sp(1.0) + _sp(-1.0)) / 2
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    with pytest.raises(ValueError, match="negatives must be"):
        C.clip_loss(ZIMG, ZTXT, 0.0, negatives=np.zeros((3, 5)))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        C.clip_loss(np.zeros((4, 3)), np.zeros((4, 5)), 0.0)
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        C.sigmoid_loss(np.zeros((2, 4, 3)), np.zeros((2, 4, 3)), 0.0, 0.0)


# ---------------------------------------------------------------- global vs per-device parity

MESH = make_mesh((2, -1, 1))  # both batch axes > 1, so the multi-axis gather/ring order is exercised
N_DEV = MESH.shape["data"] * MESH.shape["fsdp"]


def _loss_fn(kind, negatives=False):
    """Tiny towers (one linear map per side, replicated) plus additive probes whose grads are ∂L/∂z;
    with ``negatives`` the text tower also embeds K = 2 hard-negative captions per row (``xn``)."""

    def fn(params, probes, xi, xt, xn, axis_name):
        zi = xi @ params["img"] + probes[0]
        zt = xt @ params["txt"] + probes[1]
        zn = xn @ params["txt"] if negatives else None
        if kind == "clip":
            return C.clip_loss(zi, zt, params["logit_scale"], negatives=zn, axis_name=axis_name)
        return C.sigmoid_loss(zi, zt, params["t"], params["b"], negatives=zn, axis_name=axis_name)

    return fn


def _inputs(kind):
    k = jax.random.split(jax.random.PRNGKey(1), 5)
    w = jax.random.normal(k[0], (D_IN, D))
    params = {"img": w, "txt": w + 0.3 * jax.random.normal(k[1], (D_IN, D))}
    # Texts correlated with images, so accuracies are neither 0 nor 1 and every term matters.
    xi = jax.random.normal(k[2], (B, D_IN))
    xt = xi + 0.8 * jax.random.normal(k[3], (B, D_IN))
    if kind == "clip":
        params["logit_scale"] = jnp.float32(math.log(10.0))
    else:  # b well above −10 so negatives carry real gradient at this tiny batch
        params.update(t=jnp.float32(C.SIGLIP_INIT_T), b=jnp.float32(-3.0))
    probes = jnp.zeros((2, B, D))
    # Hard negatives near their rows' captions (row-major [B·K]: each device holds its rows' K).
    xn = jnp.repeat(xt, 2, axis=0) + 0.5 * jax.random.normal(k[4], (2 * B, D_IN))
    return params, probes, xi, xt, xn


def _global(kind, negatives=False):
    fn = jax.value_and_grad(_loss_fn(kind, negatives), argnums=(0, 1), has_aux=True)
    rows = batch_sharding(MESH, 2)
    return jax.jit(
        lambda p, e, xi, xt, xn: fn(p, e, xi, xt, xn, None),
        in_shardings=(replicated(MESH), NamedSharding(MESH, P(None, BATCH_AXES)), rows, rows, rows),
    )


def _per_device_body(kind, negatives=False):
    fn = jax.value_and_grad(_loss_fn(kind, negatives), argnums=(0, 1), has_aux=True)

    def body(p, e, xi, xt, xn):
        (loss, metrics), (gp, ge) = fn(p, e, xi, xt, xn, BATCH_AXES)
        # What the train loop does (state.make_train_step): pmean of loss, metrics and param grads.
        loss, metrics, gp = jax.lax.pmean((loss, metrics, gp), BATCH_AXES)
        return (loss, metrics), (gp, ge)

    return body


def _per_device(kind, negatives=False):
    return jax.jit(jax.shard_map(
        _per_device_body(kind, negatives), mesh=MESH,
        in_specs=(P(), P(None, BATCH_AXES), P(BATCH_AXES), P(BATCH_AXES), P(BATCH_AXES)),
        out_specs=((P(), P()), (P(), P(None, BATCH_AXES))),
        check_vma=False,  # the loop's setting: replicated params' grads stay per device
    ))


@pytest.mark.parametrize("negatives", [False, True], ids=["pairs", "hard_negatives"])
@pytest.mark.parametrize("kind", ["clip", "sigmoid"])
def test_global_and_per_device_agree(kind, negatives):
    args = _inputs(kind)
    with jax.set_mesh(MESH):
        (gl, gm), (ggp, gge) = _global(kind, negatives)(*args)
        (pl, pm), (pgp, pge) = _per_device(kind, negatives)(*args)
    np.testing.assert_allclose(pl, gl, atol=ATOL, rtol=0)
    chex.assert_trees_all_close(pm, gm, atol=ATOL, rtol=1e-6)
    assert 0.0 < float(gm["i2t_acc"]) < 1.0 and 0.0 < float(gm["t2i_acc"]) < 1.0
    # Tower weights and the learnable scale/bias: pmean of per-device grads == global grad.
    chex.assert_trees_all_close(pgp, ggp, atol=ATOL, rtol=1e-6)  # the scale grad ~80: float rounding
    for leaf in jax.tree.leaves(ggp):
        assert float(jnp.max(jnp.abs(leaf))) > 1e-3  # every gradient is non-trivial
    # Embedding cotangents: all_gather/ppermute transpose to psum_scatter/reverse ring, so each
    # device holds every device's contribution for its rows: N × the global gradient.
    chex.assert_trees_all_close(pge / N_DEV, gge, atol=ATOL, rtol=0)


def _avals(jaxpr):
    """Every intermediate's shape in a jaxpr, including nested (scan/remat/pjit) bodies."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield tuple(getattr(v.aval, "shape", ()))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _avals(sub)


def _body_shapes(kind, negatives=False):
    with jax.set_mesh(MESH):
        jaxpr = jax.make_jaxpr(_per_device(kind, negatives))(*_inputs(kind)).jaxpr
    bodies = []

    def find(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "shard_map":
                bodies.append(eqn.params["jaxpr"])
            for p in eqn.params.values():
                sub = getattr(p, "jaxpr", p)
                if hasattr(sub, "eqns"):
                    find(sub)

    find(jaxpr)
    assert len(bodies) == 1  # the per-device program, forward and backward
    return set(_avals(bodies[0]))


def test_sigmoid_per_device_never_holds_global_logits():
    n = B // N_DEV
    shapes = _body_shapes("sigmoid")
    assert (n, n) in shapes  # the per-chunk logits block
    offenders = sorted(s for s in shapes if B in s)
    assert not offenders, f"per-device sigmoid loss materialises batch-sized arrays {offenders}"
    # Hard negatives ride the ring beside the texts: [n, n·K] blocks, nothing of size B or B·K.
    shapes = _body_shapes("sigmoid", negatives=True)
    assert (n, 2 * n) in shapes
    offenders = sorted(s for s in shapes if B in s or 2 * B in s)
    assert not offenders, f"per-device sigmoid loss with negatives materialises {offenders}"
    # Control: the CLIP form all-gathers, and the walker does see its [n, B] logits.
    assert (n, B) in _body_shapes("clip")


def test_check_vma_true_would_double_count():
    """Why the per-device step must run with check_vma=False: with True, JAX psums replicated params'
    gradients itself (transpose of the implicit pvary), so the loop's pmean leaves them N × global."""
    args = _inputs("clip")
    with jax.set_mesh(MESH):
        _, (ggp, _) = _global("clip")(*args)
        strict = jax.jit(jax.shard_map(
            _per_device_body("clip"), mesh=MESH,
            in_specs=(P(), P(None, BATCH_AXES), P(BATCH_AXES), P(BATCH_AXES), P(BATCH_AXES)),
            out_specs=((P(), P()), (P(), P(None, BATCH_AXES))), check_vma=True,
        ))
        _, (pgp, _) = strict(*args)
    chex.assert_trees_all_close(pgp, jax.tree.map(lambda g: N_DEV * g, ggp), atol=1e-4, rtol=1e-5)
