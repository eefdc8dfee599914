"""Distillation losses: hand values, reference reductions (torch), masks, stop-gradient, per-device parity."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxunified.losses import distill as Dl
from jaxunified.parallel.mesh import BATCH_AXES, batch_sharding, make_mesh, replicated


def test_pooled_hand_values():
    s = np.array([[3.0, 4.0]], np.float32)  # → (.6, .8)
    t = np.array([[2.0, 0.0]], np.float32)  # → (1, 0); cos = .6
    # TokLIP: nn.MSELoss of unit vectors = mean over D of the squared difference = (2 − 2cos)/D.
    np.testing.assert_allclose(Dl.embedding_mse(s, t), (0.16 + 0.64) / 2, rtol=1e-6)
    np.testing.assert_allclose(Dl.embedding_mse(s, t, normalize=False), (1.0 + 16.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(Dl.cosine_distance(s, t), 0.4, rtol=1e-6)
    np.testing.assert_allclose(Dl.mse_minus_cos(s, t), 8.5 - 0.6, rtol=1e-6)


def test_teacher_gets_no_gradient():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    s, t = jax.random.normal(k1, (3, 5)), jax.random.normal(k2, (3, 5))
    fns = (Dl.embedding_mse, Dl.cosine_distance, Dl.mse_minus_cos)
    grads = jax.jit(lambda s, t: [jax.grad(fn, argnums=(0, 1))(s, t) for fn in fns])(s, t)
    for gs, gt in grads:
        assert float(jnp.max(jnp.abs(gt))) == 0.0 and float(jnp.max(jnp.abs(gs))) > 0.0


def test_mse_minus_cos_matches_dualtoken_torch_reduction():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 3, 5)).astype(np.float32)
    t = rng.normal(size=(2, 3, 5)).astype(np.float32)
    s[0, 1] = 1e-9  # near-zero token: F.cosine_similarity's per-norm eps clamp
    ts, tt = torch.from_numpy(s), torch.from_numpy(t)
    want = torch.nn.MSELoss()(ts, tt) - torch.nn.functional.cosine_similarity(ts, tt, dim=-1).mean()
    np.testing.assert_allclose(Dl.mse_minus_cos(s, t), want.item(), rtol=1e-6, atol=1e-7)
    # TokLIP's reduction is the same nn.MSELoss, of F.normalize'd pooled embeddings.
    n = torch.nn.functional.normalize
    want = torch.nn.MSELoss()(n(ts[:, 0], dim=-1), n(tt[:, 0], dim=-1))
    np.testing.assert_allclose(Dl.embedding_mse(s[:, 0], t[:, 0]), want.item(), rtol=1e-6)


def test_token_losses_with_mask():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(2, 4, 3)).astype(np.float32)
    t = rng.normal(size=(2, 4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
    sel_s, sel_t = s[mask], t[mask]  # the 3 counted tokens
    np.testing.assert_allclose(Dl.token_mse(s, t, mask), np.mean((sel_s - sel_t) ** 2), rtol=1e-6)
    cos = np.sum(sel_s * sel_t, -1) / np.linalg.norm(sel_s, axis=-1) / np.linalg.norm(sel_t, axis=-1)
    np.testing.assert_allclose(Dl.token_cosine_distance(s, t, mask), np.mean(1 - cos), rtol=1e-5)
    # No mask = every token; an all-false mask gives 0 with finite (zero) gradients.
    np.testing.assert_allclose(Dl.token_mse(s, t), np.mean((s - t) ** 2), rtol=1e-6)
    none = np.zeros_like(mask)
    value, g = jax.jit(jax.value_and_grad(
        lambda x: Dl.token_mse(x, t, none) + Dl.token_cosine_distance(x, t, none)))(s)
    assert float(value) == 0.0 and float(jnp.max(jnp.abs(g))) == 0.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same shape"):
        Dl.mse(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        Dl.embedding_mse(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"\[batch, length, dim\]"):
        Dl.token_mse(np.zeros((2, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="mask shape"):
        Dl.token_cosine_distance(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), np.ones((2, 4), bool))


def test_masked_per_device_matches_global():
    """Devices hold different numbers of counted tokens; pmean of per-device loss/grads is still global."""
    mesh = make_mesh((1, -1, 1))
    b, length, d_in, d = 16, 3, 5, 4
    k = jax.random.split(jax.random.PRNGKey(2), 3)
    w = jax.random.normal(k[0], (d_in, d))
    x = jax.random.normal(k[1], (b, length, d_in))
    teacher = jax.random.normal(k[2], (b, length, d))
    mask = jnp.asarray(np.arange(b * length).reshape(b, length) % 5 < 2)

    def loss(w, x, teacher, mask, axis_name):
        s = x @ w
        return (Dl.token_mse(s, teacher, mask, axis_name=axis_name)
                + Dl.token_cosine_distance(s, teacher, mask, axis_name=axis_name)
                + Dl.mse_minus_cos(s, teacher, mask=mask, axis_name=axis_name))

    def per_device(w, x, teacher, mask):
        out = jax.value_and_grad(loss)(w, x, teacher, mask, BATCH_AXES)
        return jax.lax.pmean(out, BATCH_AXES)

    rows = [batch_sharding(mesh, n) for n in (3, 3, 2)]
    args = (w, x, teacher, mask)
    with jax.set_mesh(mesh):
        want = jax.jit(jax.value_and_grad(loss), static_argnums=4,
                       in_shardings=(replicated(mesh), *rows))(*args, None)
        got = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(),) + (P(BATCH_AXES),) * 3,
                                    out_specs=P(), check_vma=False))(*args)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=0)
