"""VQGAN model: shapes, conv_out recomputation, decode paths, configs, remat/bf16, EMA training forward."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunified.models.vqgan import (
    VARIANTS,
    VQGAN,
    VQGANConfig,
    abstract_variables,
    get_config,
    num_params,
    vqgan_conv_out,
)
from jaxunified.quant.vq import VQConfig

TINY = VQGANConfig(
    ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, attn_num_heads=2,
    vq=VQConfig(codebook_size=32, embed_dim=4, l2_norm=True),
)


def random_variables(cfg, seed=0):
    """Random weights built on the abstract shapes. A jitted ``model.init`` works too, but its
    threefry initialisers take tens of seconds to compile on a 2-core CPU."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "cluster_size":
            return np.zeros(s.shape, np.float32)
        x = rng.standard_normal(s.shape).astype(np.float32)
        if name == "scale":
            return 1 + 0.1 * x
        if name == "kernel":
            return x / np.float32(np.sqrt(np.prod(s.shape[:-1])))
        return np.float32(0.1) * x

    v = jax.tree_util.tree_map_with_path(leaf, abstract_variables(cfg))
    if cfg.vq.update == "ema":
        v["codebook"]["quantize"]["embed_sum"] = v["codebook"]["quantize"]["embedding"]
    return v


@pytest.fixture(scope="module")
def tiny():
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    model = VQGAN(TINY)
    variables = random_variables(TINY, 1)
    out = jax.jit(model.apply)(variables, x)
    return model, variables, x, out


def test_forward_outputs(tiny):
    model, variables, x, out = tiny
    assert set(out) == {
        "recon", "codes", "quant", "pre_quant", "vq_loss", "commit_loss", "entropy_loss",
        "usage", "perplexity", "dec_features",
    }
    chex.assert_shape(out["recon"], (2, 16, 16, 3))
    chex.assert_shape(out["codes"], (2, 8, 8))
    chex.assert_shape([out["quant"], out["pre_quant"]], (2, 8, 8, 4))
    chex.assert_shape(out["dec_features"], (2, 16, 16, 32))
    assert out["codes"].dtype == jnp.int32 and out["recon"].dtype == jnp.float32
    for k in ("vq_loss", "commit_loss", "entropy_loss", "usage", "perplexity"):
        chex.assert_shape(out[k], ())
    # The module tree mirrors the PyTorch key names.
    p = variables["params"]
    assert p["decoder"]["conv_out"]["kernel"].shape == (3, 3, 32, 3)
    assert set(p["encoder"]["conv_blocks_1"]) == {"res_0", "attn_0"}
    assert set(p["encoder"]["conv_blocks_0"]) == {"res_0", "downsample"}
    assert set(p["decoder"]["conv_blocks_0"]) == {"res_0", "res_1", "attn_0", "attn_1", "upsample"}
    assert set(p["decoder"]["mid_1"]) == {"norm", "q", "k", "v", "proj_out"}


def test_conv_out_recomputes_recon(tiny):
    _, variables, _, out = tiny
    recon = jax.jit(vqgan_conv_out)(variables["params"], out["dec_features"])
    np.testing.assert_allclose(np.asarray(recon), np.asarray(out["recon"]), atol=1e-6)
    # The whole variables dict is accepted too.
    np.testing.assert_allclose(
        np.asarray(jax.jit(vqgan_conv_out)(variables, out["dec_features"])), np.asarray(out["recon"]), atol=1e-6
    )


def test_decode_paths_agree(tiny):
    model, variables, _, out = tiny
    from_codes = jax.jit(lambda v, c: model.apply(v, c, method="decode_codes"))(variables, out["codes"])
    from_quant = jax.jit(lambda v, q: model.apply(v, q, method="decode"))(variables, out["quant"])
    np.testing.assert_allclose(np.asarray(from_codes), np.asarray(out["recon"]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(from_quant), np.asarray(out["recon"]), atol=1e-6)


def test_gradients_reach_encoder_through_ste(tiny):
    model, variables, x, _ = tiny

    def loss(params):
        o = model.apply({"params": params}, x)
        return jnp.mean((o["recon"] - x) ** 2) + o["vq_loss"] + o["commit_loss"]

    g = jax.jit(jax.grad(loss))(variables["params"])
    assert float(jnp.abs(g["encoder"]["conv_in"]["kernel"]).max()) > 0
    assert float(jnp.abs(g["quantize"]["embedding"]).max()) > 0


def test_remat_keeps_params_and_outputs(tiny):
    model, variables, x, out = tiny
    cfg = dataclasses.replace(TINY, remat=True)
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract_variables(cfg), variables)
    remat_out = jax.jit(VQGAN(cfg).apply)(variables, x)
    np.testing.assert_allclose(np.asarray(remat_out["recon"]), np.asarray(out["recon"]), atol=1e-5)


def test_bf16_compute_keeps_f32_params(tiny):
    model, variables, x, out = tiny
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract_variables(cfg), variables)  # params stay f32
    bf_out = jax.jit(VQGAN(cfg).apply)(variables, x)
    assert bf_out["recon"].dtype == jnp.float32 and bf_out["pre_quant"].dtype == jnp.float32
    assert bf_out["dec_features"].dtype == jnp.bfloat16
    assert bool(jnp.isfinite(bf_out["recon"]).all())
    # conv_out recomputation follows the features' dtype, so it still reproduces recon exactly.
    np.testing.assert_array_equal(
        np.asarray(jax.jit(vqgan_conv_out)(variables, bf_out["dec_features"])), np.asarray(bf_out["recon"])
    )


def test_ema_quantiser_trains_its_codebook_collection():
    cfg = dataclasses.replace(TINY, vq=dataclasses.replace(TINY.vq, update="ema", restart=True))
    model = VQGAN(cfg)
    x = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3), minval=-1, maxval=1)
    v = random_variables(cfg, 3)
    assert "quantize" not in v["params"]
    assert set(v["codebook"]["quantize"]) == {"embedding", "cluster_size", "embed_sum"}
    step = jax.jit(lambda v, x, k: model.apply(v, x, train=True, mutable=["codebook"], rngs={"quant": k}))
    out, upd = step(v, x, jax.random.key(4))
    assert float(out["vq_loss"]) == 0.0
    assert not np.allclose(np.asarray(upd["codebook"]["quantize"]["cluster_size"]), 0.0)


def test_get_config_variants_and_overrides():
    assert set(VARIANTS) >= {"VQ-16", "VQ-8", "STAR-VQ", "shapes-S", "shapes-M"}
    c = get_config("VQ-16", codebook_size=1024, remat=True, ch_mult=[1, 2])
    assert c.vq.codebook_size == 1024 and c.vq.embed_dim == 8 and c.remat and c.ch_mult == (1, 2)
    assert c.decoder_num_res_blocks == 3
    star = get_config("STAR-VQ")
    assert (star.ch, star.ch_mult, star.z_channels, star.attn_num_heads) == (256, (1, 2, 2, 4, 8), 512, 8)
    assert (star.vq.codebook_size, star.vq.embed_dim, star.vq.l2_norm) == (65536, 512, False)
    with pytest.raises(ValueError, match="valid variants: VQ-16"):
        get_config("VQ-32")
    with pytest.raises(ValueError, match="valid fields: .*ch_mult"):
        get_config("VQ-16", chmult=(1, 2))


def test_shapes_variants_are_small():
    for name in ("shapes-S", "shapes-M"):
        cfg = get_config(name)
        assert cfg.downsample_factor in (2, 4, 8) and num_params(cfg) < 5_000_000


def test_bad_image_shapes_are_clear_errors(tiny):
    model, variables, x, _ = tiny
    with pytest.raises(ValueError, match="NHWC"):
        model.apply(variables, x.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="divisible"):
        model.apply(variables, x[:, :15, :15])
