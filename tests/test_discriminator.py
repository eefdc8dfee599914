"""PatchGAN discriminator: shapes at real size, init, torch parity (train/eval BN), SyncBN under shard_map."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from jaxunified.models.discriminator import NLayerDiscriminator, PatchGANConfig
from jaxunified.parallel.mesh import make_mesh

TINY = PatchGANConfig(ndf=8, n_layers=2)


def _abstract(module, x):
    return nn.meta.unbox(jax.eval_shape(lambda a: module.init(jax.random.key(0), a, train=False), x))


# Parameters come from numpy: jax.random compiles slowly on CPU (seconds per shape).
def _np_variables(module, shape, seed=0):
    abstract = _abstract(module, jax.ShapeDtypeStruct(shape, jnp.float32))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32), abstract["params"])
    for name, bn in params.items():
        if name.startswith("norm"):
            bn["scale"] = (1.0 + 0.1 * rng.standard_normal(bn["scale"].shape)).astype(np.float32)
    out = {"params": params}
    if "batch_stats" in abstract:
        out["batch_stats"] = jax.tree.map(
            lambda a: np.zeros(a.shape, np.float32), abstract["batch_stats"]
        )
        for s in out["batch_stats"].values():
            s["var"] = np.ones_like(s["var"])
    return out


def test_real_size_shapes_and_axes():
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    m = NLayerDiscriminator()
    boxed = jax.eval_shape(lambda a: m.init(jax.random.key(0), a, train=False), x)
    assert boxed["params"]["conv1"]["kernel"].names == (None, None, "conv_in", "conv_out")
    assert boxed["params"]["norm1"]["scale"].names == ("norm",)
    params = nn.meta.unbox(boxed["params"])
    shapes = {k: {n: v.shape for n, v in d.items()} for k, d in params.items()}
    assert shapes == {
        "conv0": {"kernel": (4, 4, 3, 64), "bias": (64,)},
        "conv1": {"kernel": (4, 4, 64, 128)},
        "norm1": {"scale": (128,), "bias": (128,)},
        "conv2": {"kernel": (4, 4, 128, 256)},
        "norm2": {"scale": (256,), "bias": (256,)},
        "conv3": {"kernel": (4, 4, 256, 512)},
        "norm3": {"scale": (512,), "bias": (512,)},
        "conv4": {"kernel": (4, 4, 512, 1), "bias": (1,)},
    }
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(params)) == 2_765_633
    out = jax.eval_shape(lambda v, a: m.apply(v, a, train=False), nn.meta.unbox(boxed), x)
    assert out.shape == (2, 30, 30, 1) and out.dtype == jnp.float32


def test_init_distribution():
    m = NLayerDiscriminator(PatchGANConfig(ndf=16, n_layers=2))
    # rbg keys compile far faster on CPU than threefry; the distribution is what matters here.
    v = jax.jit(lambda x: m.init(jax.random.key(0, impl="rbg"), x, train=False))(jnp.zeros((1, 16, 16, 3)))
    v = nn.meta.unbox(v)
    k = np.asarray(v["params"]["conv2"]["kernel"])  # 4·4·32·64 samples
    assert abs(k.mean()) < 2e-3 and abs(k.std() - 0.02) < 1e-3
    s = np.asarray(v["params"]["norm1"]["scale"])
    assert abs(s.mean() - 1.0) < 0.02 and 0.005 < s.std() < 0.04
    np.testing.assert_array_equal(v["params"]["norm1"]["bias"], 0.0)
    np.testing.assert_array_equal(v["batch_stats"]["norm1"]["var"], 1.0)


def test_no_batchnorm_variant():
    m = NLayerDiscriminator(PatchGANConfig(ndf=8, n_layers=2, use_batchnorm=False))
    abstract = _abstract(m, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert "batch_stats" not in abstract
    assert all("bias" in p for p in abstract["params"].values())
    v = _np_variables(m, (1, 32, 32, 3))
    out = jax.jit(functools.partial(m.apply, train=True))(v, jnp.zeros((1, 32, 32, 3)))
    chex.assert_shape(out, (1, 6, 6, 1))


def _torch_model(torch, cfg, v):
    """The pix2pix PatchGAN layer list, built in torch from our numpy parameters (OIHW)."""
    tnn = torch.nn
    p = v["params"]
    layers, cin = [], 3
    for n in range(cfg.n_layers + 2):
        cout = 1 if n == cfg.n_layers + 1 else cfg.ndf * min(2**n, 8)
        stride = 2 if n < cfg.n_layers else 1
        conv = tnn.Conv2d(cin, cout, 4, stride, 1, bias="bias" in p[f"conv{n}"])
        conv.weight.data = torch.from_numpy(np.transpose(np.asarray(p[f"conv{n}"]["kernel"]), (3, 2, 0, 1)).copy())
        if conv.bias is not None:
            conv.bias.data = torch.from_numpy(np.asarray(p[f"conv{n}"]["bias"]).copy())
        layers.append(conv)
        if 1 <= n <= cfg.n_layers:
            bn = tnn.BatchNorm2d(cout)
            bn.weight.data = torch.from_numpy(np.asarray(p[f"norm{n}"]["scale"]).copy())
            bn.bias.data = torch.from_numpy(np.asarray(p[f"norm{n}"]["bias"]).copy())
            layers.append(bn)
        if n <= cfg.n_layers:
            layers.append(tnn.LeakyReLU(0.2))
        cin = cout
    return tnn.Sequential(*layers)


def test_matches_torch_train_and_eval():
    torch = pytest.importorskip("torch")
    m = NLayerDiscriminator(TINY)
    v = _np_variables(m, (4, 32, 32, 3))
    x = np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    tm = _torch_model(torch, TINY, v).train()
    with torch.no_grad():
        ref = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    out, upd = jax.jit(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    bn1 = tm[3]
    np.testing.assert_allclose(upd["batch_stats"]["norm1"]["mean"], bn1.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    # PyTorch folds the *unbiased* batch variance into running_var, Flax the biased one: undo n/(n-1).
    n = 4 * 8 * 8  # norm1 sees 8×8 maps of 4 images
    torch_biased = 0.9 + (bn1.running_var.numpy() - 0.9) * (n - 1) / n
    np.testing.assert_allclose(upd["batch_stats"]["norm1"]["var"], torch_biased, rtol=1e-5)

    # Eval mode normalises with the running statistics: load Flax's into torch and compare.
    v_eval = {"params": v["params"], "batch_stats": upd["batch_stats"]}
    for i, name in ((3, "norm1"), (6, "norm2")):
        tm[i].running_mean.copy_(torch.from_numpy(np.array(upd["batch_stats"][name]["mean"])))
        tm[i].running_var.copy_(torch.from_numpy(np.array(upd["batch_stats"][name]["var"])))
    with torch.no_grad():
        ref_eval = tm.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    out_eval = jax.jit(lambda v, x: m.apply(v, x, train=False))(v_eval, x)
    np.testing.assert_allclose(out_eval, ref_eval, rtol=1e-4, atol=1e-5)


def test_sync_batchnorm_under_shard_map_equals_global_batch():
    n_dev = jax.device_count()
    assert n_dev == 8
    x = np.random.default_rng(2).uniform(-1, 1, (2 * n_dev, 16, 16, 3)).astype(np.float32)
    shape = x.shape
    v = _np_variables(NLayerDiscriminator(TINY), shape)

    glob = NLayerDiscriminator(TINY)
    ref, ref_upd = jax.jit(lambda v, x: glob.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)

    synced = NLayerDiscriminator(PatchGANConfig(ndf=8, n_layers=2, bn_axis_name="data"))
    mesh = make_mesh((-1, 1, 1))

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P()))
    def per_device(v, x):
        out, upd = synced.apply(v, x, train=True, mutable=["batch_stats"])
        return out, upd["batch_stats"]

    out, stats = per_device(v, x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(stats, ref_upd["batch_stats"], rtol=1e-5, atol=1e-6)

    # Without the axis name each device normalises with its own 2 images: a different function.
    unsynced = jax.jit(
        jax.shard_map(
            lambda v, x: glob.apply(v, x, train=True, mutable=["batch_stats"])[0],
            mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"),
        )
    )(v, x)
    assert float(jnp.max(jnp.abs(unsynced - ref))) > 1e-3
