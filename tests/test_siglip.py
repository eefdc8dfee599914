"""SigLIP towers: HF golden parity, scan == unrolled, causal mask, real sizes, errors."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunified import convert
from jaxunified.convert.common import CheckpointMismatchError, read_state_dict
from jaxunified.convert.siglip import config_from_hf, convert_state_dict
from jaxunified.nn.attention import MultiHeadAttention, causal_mask
from jaxunified.models import siglip as S
from jaxunified.nn.transformer import stack_layers, unstack_layers


@pytest.fixture(scope="module")
def golden(golden_dir):
    hf = json.loads((golden_dir / "hf_siglip_tiny.json").read_text())
    model, variables = convert.load("hf_siglip", golden_dir / "hf_siglip_tiny.safetensors", config=hf)
    return hf, model, variables, dict(np.load(golden_dir / "hf_siglip_tiny.npz"))


def test_hf_siglip_golden_parity(golden):
    _, model, variables, ref = golden
    images = jnp.asarray(ref["pixel_values"]).transpose(0, 2, 3, 1)
    out = model.apply(variables, images, jnp.asarray(ref["input_ids"]), return_hidden=True)
    got = {
        "vision_last_hidden": out["vision"]["last_hidden"],
        "vision_pooled": out["vision"]["pooled"],
        "text_last_hidden": out["text"]["last_hidden"],
        "text_pooled": out["text"]["pooled"],
        "image_embeds": out["image_embeds"],
        "text_embeds": out["text_embeds"],
        "logits_per_image": out["logits_per_image"],
    }
    for i, h in enumerate(out["vision"]["hidden_states"]):
        got[f"vision_hidden_{i}"] = h
    assert set(k for k in ref if k not in ("pixel_values", "input_ids")) <= set(got)
    for k, v in got.items():
        np.testing.assert_allclose(np.asarray(v), ref[k], atol=1e-4, rtol=0, err_msg=k)


def test_pair_logits_are_the_golden_diagonal_and_resize_other_image_sizes(golden):
    _, model, variables, ref = golden
    images = jnp.asarray(ref["pixel_values"]).transpose(0, 2, 3, 1)
    n = min(images.shape[0], ref["input_ids"].shape[0])
    pair = model.apply(variables, images[:n], jnp.asarray(ref["input_ids"][:n]), method=S.SigLIP.pair_logits)
    np.testing.assert_allclose(np.asarray(pair), np.diag(ref["logits_per_image"])[:n], atol=1e-4, rtol=0)
    size = model.cfg.vision.image_size
    big = jax.image.resize(images[:n], (n, 2 * size, 2 * size, images.shape[3]), "bilinear")
    again = model.apply(variables, big, jnp.asarray(ref["input_ids"][:n]), method=S.SigLIP.pair_logits)
    back = jax.image.resize(big, images[:n].shape, "bilinear")  # what a preprocessor would feed the tower
    want = model.apply(variables, back, jnp.asarray(ref["input_ids"][:n]), method=S.SigLIP.pair_logits)
    np.testing.assert_allclose(np.asarray(again), np.asarray(want), atol=1e-5)


def test_scanned_and_remat_towers_match_unrolled(golden):
    hf, _, variables, ref = golden
    cfg = config_from_hf(hf, vision=dict(scan=True, remat=True), text=dict(scan=True))
    model = S.SigLIP(cfg)
    params = variables["params"]
    p = {**params, "vision": {**params["vision"], "encoder": stack_layers(params["vision"]["encoder"], 2)},
         "text": {**params["text"], "encoder": stack_layers(params["text"]["encoder"], 2)}}
    images = jnp.asarray(ref["pixel_values"]).transpose(0, 2, 3, 1)
    out = model.apply({"params": p}, images, jnp.asarray(ref["input_ids"]), return_hidden=True)
    np.testing.assert_allclose(np.asarray(out["logits_per_image"]), ref["logits_per_image"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["vision"]["hidden_states"][1]), ref["vision_hidden_1"], atol=1e-4)
    back = unstack_layers(p["vision"]["encoder"], 2)
    np.testing.assert_array_equal(back["layers_1"]["mlp"]["fc1"]["kernel"],
                                  params["vision"]["encoder"]["layers_1"]["mlp"]["fc1"]["kernel"])


def test_converter_stacks_for_scanned_config(golden_dir, golden):
    hf, _, variables, _ = golden
    sd = read_state_dict(golden_dir / "hf_siglip_tiny.safetensors")
    cfg = config_from_hf(hf, vision=dict(scan=True))
    v = convert_state_dict(sd, cfg)
    k = v["params"]["vision"]["encoder"]["layers"]["attn"]["query"]["kernel"]
    assert k.shape == (2, 32, 4, 8)
    np.testing.assert_array_equal(k[1], variables["params"]["vision"]["encoder"]["layers_1"]["attn"]["query"]["kernel"])


def test_converter_reports_bad_keys(golden_dir, golden):
    hf = golden[0]
    sd = read_state_dict(golden_dir / "hf_siglip_tiny.safetensors")
    sd.pop("vision_model.post_layernorm.weight")
    sd["vision_model.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointMismatchError, match="post_ln/scale") as e:
        convert_state_dict(sd, config_from_hf(hf))
    assert "vision_model.extra.weight" in str(e.value)
    bad = json.loads(json.dumps(hf))
    bad["vision_config"]["intermediate_size"] = 48
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        convert_state_dict(read_state_dict(golden_dir / "hf_siglip_tiny.safetensors"), config_from_hf(bad))


def test_blockwise_causal_attention_equals_dense_and_rejects_non_causal_masks():
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    dense = MultiHeadAttention(4)
    variables = dense.init(jax.random.key(1), x)
    # Causal, and causal with padded keys (a [B, 1, L, L] mask built inside jit is not checkable).
    valid = jnp.arange(16)[None, :] < jnp.array([[16], [11]])
    masks = [causal_mask(16), jnp.logical_and(causal_mask(16), valid[:, None, None, :])]
    for mask in masks:
        def loss(v, x, chunks, mask=mask):
            return (MultiHeadAttention(4, causal_chunks=chunks).apply(v, x, mask=mask) ** 2).sum()

        ref_out = dense.apply(variables, x, mask=mask)
        ref_grad = jax.grad(loss, argnums=(0, 1))(variables, x, 1)
        for chunks in (2, 4, 16):
            out = MultiHeadAttention(4, causal_chunks=chunks).apply(variables, x, mask=mask)
            np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-6, rtol=0)
            grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(variables, x, chunks)
            for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    chunked = MultiHeadAttention(4, causal_chunks=4)
    with pytest.raises(ValueError, match="causal"):  # a full mask lets early queries see later keys
        chunked.apply(variables, x, mask=np.ones((1, 1, 16, 16), bool))
    with pytest.raises(ValueError, match="causal"):  # a key-only (padding) mask
        chunked.apply(variables, x, mask=valid[:, None, None, :])
    with pytest.raises(ValueError, match="divides"):
        MultiHeadAttention(4, causal_chunks=3).apply(variables, x, mask=causal_mask(16))
    # No mask: dense attention, whatever causal_chunks says.
    np.testing.assert_allclose(np.asarray(chunked.apply(variables, x)), np.asarray(dense.apply(variables, x)),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="causal_chunks"):
        S.get_config("tiny", vision=dict(causal=True, causal_chunks=0), with_text=False)


def test_causal_mask_blocks_future_tokens():
    cfg = S.get_config("tiny", vision=dict(causal=True), with_text=False)
    tower = S.VisionTower(cfg.vision)
    x = jax.random.normal(jax.random.key(0), (1, 16, 32))
    variables = tower.init(jax.random.key(1), token_embeds=x)
    base = tower.apply(variables, token_embeds=x)["last_hidden"]
    j = 9
    changed = tower.apply(variables, token_embeds=x.at[:, j].add(3.0))["last_hidden"]
    diff = np.abs(np.asarray(changed - base)).max(axis=-1)[0]
    assert diff[:j].max() == 0.0 and diff[j:].min() > 0
    # Without the mask every position sees the change.
    full = tower.apply(variables, token_embeds=x.at[:, j].add(3.0), causal=False)["last_hidden"]
    ref = tower.apply(variables, token_embeds=x, causal=False)["last_hidden"]
    assert np.abs(np.asarray(full - ref)).max(axis=-1)[0, :j].min() > 0


def test_posemb_resizes_for_other_resolutions():
    cfg = S.get_config("tiny", with_text=False)
    tower = S.VisionTower(cfg.vision)
    variables = tower.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    out = tower.apply(variables, jnp.zeros((2, 48, 48, 3)), return_hidden=True)
    assert out["hidden_states"][0].shape == (2, 36, 32)
    assert out["pooled"].shape == (2, 32)


@pytest.mark.parametrize(
    "name,res,expected",
    [
        # HF google/siglip2-so400m-patch16-384 / siglip-so400m-patch14-384 / siglip-base-patch16-224.
        ("So400m/16", 384, 1_136_039_602),
        ("So400m/14", 384, 877_960_498),
        ("B/16", 224, 203_155_970),
    ],
)
def test_real_variant_sizes(name, res, expected):
    assert S.num_params(S.get_config(name, image_size=res)) == expected


def test_real_size_by_formula():
    """So400m/16-384 counted key by key from the HF SiglipModel layout, independently of the module."""
    D, M, L, V, T, P, N = 1152, 4304, 27, 256000, 64, 16, 576
    layer = 4 * D + 4 * (D * D + D) + (D * M + M) + (M * D + D)
    vision = (3 * P * P * D + D) + N * D + L * layer + 2 * D + (D + 3 * D * D + 3 * D + D * D + D + 2 * D + D * M + M + M * D + D)
    text = V * D + T * D + L * layer + 2 * D + (D * D + D)
    assert S.num_params(S.get_config("So400m/16", image_size=384)) == vision + text + 2


def test_clear_errors():
    cfg = S.get_config("tiny")
    model = S.SigLIP(cfg)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), jnp.int32))
    with pytest.raises(ValueError, match="NHWC"):
        model.apply(variables, jnp.zeros((1, 3, 32, 32)), jnp.zeros((1, 16), jnp.int32))
    with pytest.raises(ValueError, match="max_len"):
        model.apply(variables, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="unknown SigLIP variant"):
        S.get_config("H/14")
    enc = S.get_config("tiny", vision=dict(scan=True)).vision
    tower = S.VisionTower(enc)
    v = tower.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="scan=False"):
        tower.apply(v, jnp.zeros((1, 16, 32)), 0, 1, method=S.VisionTower.encode)


def test_logical_axes_shard_heads_and_embed():
    cfg = S.get_config("tiny")
    abstract = S.abstract_variables(cfg)["params"]
    q = abstract["vision"]["encoder"]["layers_0"]["attn"]["query"]["kernel"]
    assert isinstance(q, nn.LogicallyPartitioned) and q.names == ("embed", "heads", "kv")
    assert abstract["text"]["token_embedding"].names == ("vocab", "embed")


def test_vision_only_config_ignores_text_keys(golden_dir, golden):
    hf = golden[0]
    cfg = config_from_hf({"vision_config": hf["vision_config"]})
    v = convert_state_dict(read_state_dict(golden_dir / "hf_siglip_tiny.safetensors"), cfg)
    assert "text" not in v["params"] and "vision" in v["params"]


def test_conv_stem_feeds_the_patch_conv():
    # Two 3x3 convs (stride 1, 2) then a 2x2 patch conv: the same 8x8 grid as a 4 px patch conv.
    cfg = S.get_config("shapes-S", vision=dict(stem=((32, 1), (64, 2))), with_text=False).vision
    tower = S.VisionTower(cfg)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    params = tower.init(jax.random.key(1), x)["params"]
    shapes = jax.tree.map(jnp.shape, nn.unbox(params))
    assert shapes["stem_0"]["kernel"] == (3, 3, 3, 32) and shapes["stem_1"]["kernel"] == (3, 3, 32, 64)
    assert shapes["patch_embed"]["kernel"] == (2, 2, 64, cfg.width)
    out = tower.apply({"params": params}, x)
    assert out["last_hidden"].shape == (2, 64, cfg.width) and out["pooled"].shape == (2, cfg.width)
    # The stem sees pixels beyond its patch: a change at pixel (0, 4) (patch column 1) reaches
    # patch 0's token; a plain 4 px patch conv keeps it out.
    def first_token(t, p, im):
        return t.apply({"params": p}, im, method=lambda m, im: m.patchify(im)[0])[:, 0]

    y = x.at[:, 0, 4].add(1.0)
    assert float(jnp.abs(first_token(tower, params, y) - first_token(tower, params, x)).max()) > 0
    plain = S.VisionTower(S.get_config("shapes-S", with_text=False).vision)
    p_plain = plain.init(jax.random.key(1), x)["params"]
    assert float(jnp.abs(first_token(plain, p_plain, y) - first_token(plain, p_plain, x)).max()) == 0
    with pytest.raises(ValueError, match="must divide patch_size"):
        S.get_config("shapes-S", vision=dict(stem=((32, 3),)), with_text=False)


def test_text_padding_mask_keeps_pads_out_of_the_words():
    cfg = S.get_config("tiny", text=dict(pad_id=0, mask_padding=True)).text
    tower = S.TextTower(cfg)
    tokens = jnp.array([[5, 7, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)[:, : cfg.max_len]
    params = nn.unbox(tower.init(jax.random.key(0), tokens)["params"])
    bumped = {**params, "token_embedding": params["token_embedding"].at[0].add(
        jax.random.normal(jax.random.key(1), (cfg.width,)))}  # change only the pad row

    def words(p, c):
        return S.TextTower(c).apply({"params": p}, tokens)["last_hidden"][:, :3]

    np.testing.assert_array_equal(words(params, cfg), words(bumped, cfg))
    plain = dataclasses.replace(cfg, mask_padding=False)  # SigLIP's own form: words attend to pads
    assert float(jnp.abs(words(params, plain) - words(bumped, plain)).max()) > 1e-4
