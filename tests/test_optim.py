import jax
import jax.numpy as jnp
import ml_collections as mlc

from jaxunified.train.optim import FROZEN, make_optimizer, schedule


def _cfg(**kw):
    c = mlc.ConfigDict(dict(name="adamw", lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                            warmup_steps=2, total_steps=10, schedule="cosine", clip_norm=1.0))
    c.update(kw)
    return c


def test_frozen_subtree_has_no_state_and_no_update():
    params = {"student": {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}, "teacher": {"w": jnp.ones((64, 64))}}
    labels = lambda p: {k: jax.tree.map(lambda _: ("train" if k == "student" else FROZEN), v) for k, v in p.items()}
    tx = make_optimizer(_cfg(), labels)
    state = tx.init(params)
    sizes = [x.size for x in jax.tree.leaves(state) if hasattr(x, "size")]
    # Adam moments exist for the 20 student numbers only, never for the 4096 teacher numbers.
    assert sum(sizes) < 2 * 20 + 10
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert float(jnp.abs(updates["teacher"]["w"]).max()) == 0.0
    assert float(jnp.abs(updates["student"]["w"]).max()) == 0.0  # warmup step 0 has lr 0
    _, state = tx.update(grads, state, params)
    updates, _ = tx.update(grads, state, params)
    assert float(jnp.abs(updates["student"]["w"]).max()) > 0.0


def test_weight_decay_skips_1d_params():
    params = {"w": jnp.ones((3, 3)), "b": jnp.ones((3,))}
    tx = make_optimizer(_cfg(warmup_steps=0, clip_norm=None, weight_decay=1.0, lr=1.0))
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(jnp.abs(updates["b"]).max()) == 0.0
    assert float(jnp.abs(updates["w"]).max()) > 0.0


def test_warmup_then_cosine():
    s = schedule(_cfg())
    assert float(s(0)) == 0.0
    assert abs(float(s(2)) - 1e-2) < 1e-9
    assert float(s(10)) < 1e-6
