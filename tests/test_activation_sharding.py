"""Activation sharding: the rules tables (weights and activations named apart), ``nn.sharding.constrain``
(a no-op off a mesh), and the VQGAN / SigLIP activations staying split over the batch on a mesh."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxunified.models import siglip as siglip_lib
from jaxunified.models import vqgan as vqgan_lib
from jaxunified.nn.sharding import FEATURE_MAP_AXES, HEAD_AXES, MLP_AXES, TOKEN_AXES, constrain
from jaxunified.parallel import aot
from jaxunified.parallel import mesh as meshlib

needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(), reason='needs libtpu: pip install "jax[tpu]==0.10.2" (requirements-test.txt)'
)

KERNEL = ("embed", "mlp")  # a dense kernel [D, F]
QKV_KERNEL = ("embed", "heads", "kv")  # [D, H, Dh]


# ---- the rules tables ----


@pytest.mark.parametrize("table, kernel, qkv_kernel, tokens, heads, mlp", [
    # pure FSDP: weights over 'fsdp' on their embed dim, 'tensor' unused; activations over the batch
    ("fsdp", P("fsdp", None), P("fsdp", None, None), P("fsdp", None, None), P("fsdp", None, None, None),
     P("fsdp", None, None)),
    # FSDP + tensor parallel: the head / MLP dims of weights and activations over 'tensor'
    ("fsdp_tp", P("fsdp", "tensor"), P("fsdp", "tensor", None), P("fsdp", None, None),
     P("fsdp", None, "tensor", None), P("fsdp", None, "tensor")),
    # data parallel only: weights replicated, activations still over the batch
    ("data", P(None, None), P(None, None, None), P("fsdp", None, None), P("fsdp", None, None, None),
     P("fsdp", None, None)),
])
def test_rule_tables_map_weights_and_activations(table, kernel, qkv_kernel, tokens, heads, mlp):
    mesh = meshlib.make_mesh((1, 4, 2))
    rules = meshlib.rules_from_config(table)
    spec = lambda names, shape: meshlib.logical_to_spec(names, shape, mesh, rules)  # noqa: E731
    assert spec(KERNEL, (64, 128)) == kernel
    assert spec(QKV_KERNEL, (64, 4, 16)) == qkv_kernel
    assert spec(TOKEN_AXES, (16, 8, 64)) == tokens
    assert spec(HEAD_AXES, (16, 8, 4, 16)) == heads
    assert spec(MLP_AXES, (16, 8, 128)) == mlp
    # conv feature maps split over the batch only; conv kernels over their output channels unless "data"
    assert spec(FEATURE_MAP_AXES, (16, 32, 32, 64)) == P("fsdp", None, None, None)
    assert spec((None, None, "conv_in", "conv_out"), (3, 3, 64, 128)) == (
        P(None, None, None, None) if table == "data" else P(None, None, None, "fsdp"))


def test_tables_name_every_activation_and_default_is_fsdp_tp():
    names = {n for n, _ in meshlib.RULE_TABLES["fsdp_tp"]}
    for table in meshlib.RULE_TABLES.values():
        assert {n for n, _ in table} == names  # the same names everywhere: only the mesh axes differ
    assert {"activation_batch", "activation_embed", "activation_channels", "embed", "conv_out"} <= names
    assert meshlib.rules_from_config(None) == meshlib.DEFAULT_RULES == meshlib.RULE_TABLES["fsdp_tp"]


def test_rules_from_config_pairs_and_clear_errors():
    pairs = [["embed", None], ["activation_batch", ["data", "fsdp"]], ["mlp", "tensor"]]
    rules = meshlib.rules_from_config(pairs)
    assert rules[:3] == (("embed", None), ("activation_batch", ("data", "fsdp")), ("mlp", "tensor"))
    # activation names a list leaves out keep their defaults (flax would replicate them otherwise)
    assert dict(rules)["activation_heads"] == "tensor" and dict(rules)["activation_embed"] is None
    assert "heads" not in dict(rules)  # a weight name left out stays unsplit
    with pytest.raises(ValueError, match=r"'fsdp_dp' is not a rules table; use one of 'fsdp', 'fsdp_tp', 'data'"):
        meshlib.rules_from_config("fsdp_dp")
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        meshlib.rules_from_config([("embed", "model")])
    with pytest.raises(ValueError, match="not a .logical name, mesh axes. pair"):
        meshlib.rules_from_config([("embed",)])


def test_config_picks_a_table_by_name():
    from jaxunified.train.state import abstract_state
    from tests import helpers

    cfg = helpers.tiny_config("siglip")
    with cfg.unlocked():  # a config holding a table name (configs/common.py types the field)
        del cfg["logical_rules"]
        cfg.logical_rules = "data"
    layout = abstract_state(cfg, meshlib.make_mesh((1, -1, 1)))
    specs = [s.spec for s in jax.tree.leaves(layout.shardings.params)]
    assert specs and all(a is None for spec in specs for a in spec), specs
    cfg.logical_rules = "fsdp"
    layout = abstract_state(cfg, meshlib.make_mesh((1, -1, 1)))
    assert any("fsdp" in s.spec for s in jax.tree.leaves(layout.shardings.params))


# ---- constrain ----


def test_constrain_is_a_noop_off_a_mesh():
    x = jnp.ones((16, 4, 4, 8))
    assert constrain(x, FEATURE_MAP_AXES) is x
    jaxpr = jax.make_jaxpr(lambda x: constrain(x, FEATURE_MAP_AXES))(x)
    assert "sharding_constraint" not in str(jaxpr)
    with jax.set_mesh(meshlib.make_mesh((1, 1, 1), jax.devices()[:1])):  # one device: nothing to split
        assert "sharding_constraint" not in str(jax.make_jaxpr(lambda x: constrain(x, FEATURE_MAP_AXES))(x))
    with pytest.raises(ValueError, match="do not match the 4-d shape"):
        constrain(x, TOKEN_AXES)


def test_constrain_on_a_mesh_splits_the_batch_and_follows_flax_rules():
    mesh = meshlib.make_mesh((1, -1, 1))
    f = jax.jit(lambda x: constrain(x * 2.0, FEATURE_MAP_AXES))
    with jax.set_mesh(mesh):
        text = f.lower(jnp.ones((16, 4, 4, 3))).as_text()
        assert re.search(r'sharding_constraint .*\[\{"fsdp"\}, \{\}, \{\}, \{\}\]', text), text
        assert f(jnp.ones((16, 4, 4, 3))).sharding.spec == P("fsdp")
        # a batch that does not split (init's one example) leaves the partitioner free: no constraint
        assert "sharding_constraint" not in f.lower(jnp.ones((3, 4, 4, 3))).as_text()
        # a configured table (flax's rules context, as the trainer sets it) replaces the default
        rules = meshlib.rules_from_config([("activation_batch", None), ("activation_height", "fsdp")])
        with nn.logical_axis_rules(rules):
            text = f.lower(jnp.ones((16, 8, 4, 3))).as_text()
        assert re.search(r'sharding_constraint .*\[\{\}, \{"fsdp"\}, \{\}, \{\}\]', text), text


def test_constrain_inside_shard_map_is_a_noop():
    mesh = meshlib.make_mesh((1, -1, 1))
    body = lambda x: constrain(x, FEATURE_MAP_AXES) * 2.0  # noqa: E731
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("fsdp"), out_specs=P("fsdp")))
    x = jnp.arange(16 * 2 * 2 * 3, dtype=jnp.float32).reshape(16, 2, 2, 3)
    with jax.set_mesh(mesh):
        np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(x) * 2.0)


# ---- models on a mesh ----


def _per_device_shapes(compiled_text: str, rank: int) -> list[tuple[int, ...]]:
    shapes = re.findall(r"f32\[(\d+(?:,\d+){%d})\]" % (rank - 1), compiled_text)
    return [tuple(int(d) for d in s.split(",")) for s in shapes]


def _sharded_vs_plain(model, variables, args, loss, n=8):
    """loss and grads of ``model`` on one device and FSDP-sharded over ``n``; returns both and the compiled text."""
    grad = jax.value_and_grad(lambda p, *a: loss(model.apply({"params": p}, *a)))
    want = jax.jit(grad)(variables["params"], *args)
    mesh = meshlib.make_mesh((1, n, 1), jax.devices()[:n])
    boxed = jax.eval_shape(lambda: variables)
    shardings = meshlib.tree_shardings(boxed, mesh, meshlib.DEFAULT_RULES)["params"]
    batch = [meshlib.batch_sharding(mesh, a.ndim) for a in args]
    with jax.set_mesh(mesh):
        step = jax.jit(grad, in_shardings=(shardings, *batch))
        lowered = step.lower(variables["params"], *args)
        got = step(variables["params"], *args)
    return want, got, lowered.as_text(), lowered.compile().as_text()


def test_vqgan_activations_stay_batch_split_and_match_one_device():
    cfg = vqgan_lib.get_config("shapes-S", ch=16, ch_mult=(1, 2), z_channels=16, codebook_size=64,
                               update="grad", restart=False)
    model = vqgan_lib.VQGAN(cfg)
    x = jax.random.uniform(jax.random.key(1), (16, 16, 16, 3), minval=-1, maxval=1)
    variables = model.init(jax.random.key(0), x[:1])
    boxed_names = jax.tree.leaves(variables, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert any(isinstance(v, nn.LogicallyPartitioned) for v in boxed_names)
    variables = nn.meta.unbox(variables)
    (want_l, want_g), (got_l, got_g), lowered, compiled = _sharded_vs_plain(
        model, variables, (x,), lambda out: jnp.mean((out["recon"]) ** 2) + out["commit_loss"])
    assert lowered.count("sdy.sharding_constraint") >= 10
    assert '[{"fsdp"}, {}, {}, {}]' in lowered
    np.testing.assert_allclose(got_l, want_l, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), got_g, want_g)
    # the per-device program holds 2 of the 16 images: no full-batch feature map anywhere
    maps = [s for s in _per_device_shapes(compiled, 4) if s[1:3] in ((16, 16), (8, 8)) and s[-1] >= 16]
    assert maps and all(s[0] == 2 for s in maps), sorted(set(maps))


def test_siglip_tokens_stay_batch_split():
    cfg = siglip_lib.get_config("shapes-S", vision=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8),
                                text=dict(width=32, depth=1, mlp_dim=64, num_heads=2, proj_dim=32, max_len=8))
    model = siglip_lib.SigLIP(cfg)
    images = jax.random.uniform(jax.random.key(1), (16, 32, 32, 3), minval=-1, maxval=1)
    tokens = jax.random.randint(jax.random.key(2), (16, 8), 0, 10)
    variables = nn.meta.unbox(model.init(jax.random.key(0), images[:1], tokens[:1]))
    (want_l, _), (got_l, _), lowered, compiled = _sharded_vs_plain(
        model, variables, (images, tokens), lambda out: jnp.mean(out["logits_per_image"] ** 2))
    assert re.search(r'sharding_constraint .*\[\{"fsdp"\}, \{\}, \{\}\]\> : tensor<16x16x32', lowered)
    np.testing.assert_allclose(got_l, want_l, rtol=1e-5)
    tokens_3d = [s for s in _per_device_shapes(compiled, 3) if s[1:] == (16, 32)]
    assert tokens_3d and all(s[0] == 2 for s in tokens_3d), sorted(set(tokens_3d))


# ---- the pod preset, lowered for its TPU topology (no TPU compiler) ----


@needs_libtpu
def test_vq16_imagenet_lowering_constrains_feature_maps_to_the_batch():
    from jaxunified.train import compile as aot_compile
    from tests import helpers

    cfg = helpers.load_config("configs/vqgan.py:imagenet")
    low = aot_compile.lower_train_step(cfg, "v5e:4x4")
    text = low.lowered.as_text()
    # the full-resolution feature maps [128, 256, 256, 128] are split over the 16 fsdp devices
    big = re.findall(r'sharding_constraint %\S+ <@mesh, (\[[^\]]*\])> : tensor<128x256x256x128x', text)
    assert big and set(big) == {'[{"fsdp"}, {}, {}, {}]'}, set(big)


def test_vqgan_remat_policies_by_name():
    assert vqgan_lib.get_config("VQ-16", remat=True).remat == "full"
    assert vqgan_lib.get_config("VQ-16").remat == "none"
    cfg = vqgan_lib.get_config("shapes-S", ch=16, ch_mult=(1, 2), z_channels=16, codebook_size=64, remat="dots")
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1, maxval=1)
    plain = dataclasses.replace(cfg, remat="none")
    variables = vqgan_lib.VQGAN(plain).init(jax.random.key(0), x)
    loss = lambda cfg: lambda v: jnp.mean(vqgan_lib.VQGAN(cfg).apply(v, x)["recon"] ** 2)  # noqa: E731
    chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # noqa: E731
    jax.tree.map(chex_close, jax.grad(loss(cfg))(variables), jax.grad(loss(plain))(variables))
    with pytest.raises(ValueError, match="choose one of none, full, dots"):
        vqgan_lib.get_config("VQ-16", remat="some")
