"""DualToken tokenizer: golden parity with the official RQVAESiglipModel, code paths, real-size shapes."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxunified import convert
from jaxunified.convert.common import CheckpointMismatchError
from jaxunified.convert.dualtoken import config_from_reference, convert_state_dict
from jaxunified.models import dualtoken as dt
from jaxunified.models import siglip as siglip_lib
from jaxunified.quant.rq import RQConfig

ATOL = 1e-4


def _nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def golden(golden_dir):
    model, variables = convert.load("dualtoken", golden_dir / "dualtoken_tiny.safetensors")
    ref = dict(np.load(golden_dir / "dualtoken_tiny.npz"))
    tokens = jnp.asarray(ref["input_ids"], jnp.int32)
    out = jax.jit(lambda v, x, t: model.apply(v, x, t))(variables, _nhwc(ref["image"]), tokens)
    return model, variables, ref, out


def test_golden_parity(golden):
    model, _, ref, out = golden
    assert model.cfg.pix_rq.ema_schedule == "per_depth" and model.cfg.sem_rq.ema_schedule == "per_step"
    for k in ("code_pix", "code_sem"):
        assert out[k].dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(out[k]), ref[k])
    # hidden_states = (embeddings, layer 1, …): through layer_sem the original tower's, above it
    # the layers run on the quantised semantic features.
    assert len(out["hidden_states"]) == 5
    for i, h in enumerate(out["hidden_states"]):
        np.testing.assert_allclose(np.asarray(h), ref[f"hidden_{i}"], atol=ATOL)
    for k in ("zq_sem", "pooled", "image_embeds", "text_embeds"):
        np.testing.assert_allclose(np.asarray(out[k]), ref[k], atol=ATOL)
    np.testing.assert_allclose(np.asarray(out["recon"]).transpose(0, 3, 1, 2), ref["recon"], atol=ATOL)
    np.testing.assert_allclose(float(out["commit_pix"]), float(ref["commit_pix"]), atol=ATOL)
    np.testing.assert_allclose(float(out["commit_sem"]), float(ref["commit_sem"]), atol=ATOL)


def test_code_paths_agree_with_the_forward(golden):
    """Decoding codes, the semantic path from codes, and the LLM embedding all reuse the forward's math."""
    model, v, ref, out = golden
    code_pix, code_sem = out["code_pix"], out["code_sem"]
    run = lambda method, *a: jax.jit(lambda v, *a: model.apply(v, *a, method=method))(v, *a)  # noqa: E731
    recon = run("decode_codes", code_pix)
    np.testing.assert_allclose(np.asarray(recon), np.asarray(out["recon"]), atol=ATOL)
    sem = run("semantic_from_codes", code_sem)
    np.testing.assert_allclose(np.asarray(sem["pooled"]), ref["pooled"], atol=ATOL)

    emb = run("code_embeddings", code_pix, code_sem)
    d = model.cfg.pix_rq.embed_dim
    chex.assert_shape(emb, (2, 4, 4, 2 * d))
    cb_pix = v["codebook"]["quantizer_pix"]["embedding"]
    cb_sem = v["codebook"]["quantizer_sem"]["embedding"]
    np.testing.assert_allclose(np.asarray(emb[..., :d]), np.asarray(cb_pix)[np.asarray(code_pix)].sum(-2), atol=1e-6)
    np.testing.assert_allclose(np.asarray(emb[..., d:]), np.asarray(cb_sem)[np.asarray(code_sem)].sum(-2), atol=1e-6)
    # The quantised pixel latent the decoder sees is the code-sum embedding.
    zq_pix = np.asarray(out["zq_pix"]).reshape(emb[..., :d].shape)
    np.testing.assert_allclose(zq_pix, np.asarray(emb[..., :d]), atol=1e-5)
    with pytest.raises(ValueError, match="share the token grid"):
        model.apply(v, code_pix, code_sem[:, :2], method="code_embeddings")


def test_projection_attention_directions():
    """Down-projections attend bidirectionally, up-projections causally in raster order."""
    x = jax.random.normal(jax.random.key(0), (1, 9, 16))
    for out_dim, causal in ((4, False), (64, True)):
        proj = dt.AttnProjection(out_dim, 4, causal)
        v = jax.jit(proj.init)(jax.random.key(1), x)
        flipped = x.at[:, -1].set(-x[:, -1])  # not a constant shift, which LayerNorm would hide
        y0, y1 = jax.jit(jax.vmap(proj.apply, (None, 0)))(v, jnp.stack([x, flipped]))
        chex.assert_shape(y0, (1, 9, out_dim))
        early_changed = not np.allclose(np.asarray(y0[:, :-1]), np.asarray(y1[:, :-1]))
        assert early_changed != causal


def test_resize_and_pool_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = np.random.RandomState(0).randn(2, 27, 27, 5).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(24, 24), mode="bilinear")
    got = dt.resize_grid(jnp.asarray(x), (24, 24))
    np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    y = np.random.RandomState(1).randn(3, 7, 10).astype(np.float32)
    want = F.adaptive_avg_pool1d(torch.from_numpy(y), 4).numpy()
    np.testing.assert_allclose(y @ dt.adaptive_avg_pool_matrix(10, 4), want, atol=1e-6)


def test_real_config_shapes():
    """The released So400m/14-384 tokenizer, built abstractly (jax.eval_shape, no memory)."""
    cfg = dt.get_config("So400m/14-384")
    shapes = dt.abstract_variables(cfg)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    p = shapes["params"]
    assert count(p) == 1_347_264_469
    assert count(p["siglip"]["vision"]) == 428_225_600
    assert count(p) - count(p["siglip"]) == 211_255_971  # projections, post-quant block, decoder
    chex.assert_shape(shapes["codebook"]["quantizer_pix"]["embedding"], (16384, 32))
    chex.assert_shape(p["post_quant_conv"]["nin_shortcut"]["kernel"], (1, 1, 1152, 1024))
    chex.assert_shape(p["prequant_sem"]["attn"]["qkv"]["kernel"], (1152, 3, 36, 32))
    chex.assert_shape(p["postquant_sem"]["attn"]["qkv"]["kernel"], (32, 3, 36, 32))

    model = dt.DualToken(cfg)
    images, tokens = dt.dummy_inputs(cfg, 2, abstract=True)
    out = jax.eval_shape(lambda v, x, t: model.apply(v, x, t), shapes, images, tokens)
    chex.assert_shape([out["code_pix"], out["code_sem"]], (2, 27, 27, 8))
    chex.assert_shape(out["zq_sem"], (2, 729, 1152))
    chex.assert_shape(out["recon"], (2, 384, 384, 3))
    chex.assert_shape(out["logits_per_image"], (2, 2))
    emb = jax.eval_shape(
        lambda v, a, b: model.apply(v, a, b, method="code_embeddings"), shapes, out["code_pix"], out["code_sem"]
    )
    chex.assert_shape(emb, (2, 27, 27, 64))


def test_config_errors():
    tiny = siglip_lib.get_config("tiny")
    rq = RQConfig(codebook_size=8, embed_dim=8, depth=2)
    with pytest.raises(ValueError, match="scan=False"):
        dt.DualTokenConfig(siglip=siglip_lib.get_config("tiny", vision=dict(scan=True)), pix_rq=rq, sem_rq=rq)
    with pytest.raises(ValueError, match="layer_sem=26 is outside"):
        dt.DualTokenConfig(siglip=tiny, pix_rq=rq, sem_rq=rq, layer_recon=1, layer_shortcut=None)
    with pytest.raises(ValueError, match="embed_dim=12 must divide"):
        dt.DualTokenConfig(siglip=tiny, pix_rq=dataclasses.replace(rq, embed_dim=12), sem_rq=rq,
                           layer_recon=1, layer_sem=2, layer_shortcut=1)
    with pytest.raises(ValueError, match="unknown DualToken variant"):
        dt.get_config("So400m/99")


def test_converter_errors(golden_dir):
    ref = json.loads((golden_dir / "dualtoken_tiny.json").read_text())
    cfg = config_from_reference(ref)
    sd = load_file(str(golden_dir / "dualtoken_tiny.safetensors"))
    # A wrapper prefix (RQVAESIGLIPTransformer's ``rqvaesiglip.``) is found and stripped.
    v = convert_state_dict({f"rqvaesiglip.{k}": a for k, a in sd.items()}, cfg)
    chex.assert_shape(v["params"]["decoder"]["conv_blocks_0"]["attn_1"]["q"]["kernel"], (64, 64))

    broken = dict(sd)
    del broken["decoder.up.4.attn.1.q.weight"]
    broken["decoder.up.9.block.0.conv1.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        convert_state_dict(broken, cfg)
    assert "conv_blocks_0/attn_1/q/kernel" in str(e.value) and "missing" in str(e.value)

    no_tower = {k: v for k, v in ref.items() if k != "siglip"}
    with pytest.raises(ValueError, match="cannot tell the SigLIP tower"):
        config_from_reference(no_tower)
    released = config_from_reference({"rqvaesiglip": {**no_tower, "hidden_size": 1152,
                                      "pretrained_model": "/x/siglip2-so400m-patch14-384"}})
    assert released.siglip.vision.width == 1152 and released.grid == 27
    with pytest.raises(ValueError, match="attn_resolutions"):
        config_from_reference({**ref, "ddconfig": {**ref["ddconfig"], "attn_resolutions": [8]}})
    # Without the text tower, text keys are skipped rather than reported.
    model, v = convert.load("dualtoken", golden_dir / "dualtoken_tiny.safetensors", with_text=False)
    assert "text" not in v["params"]["siglip"] and model.cfg.siglip.text is None
