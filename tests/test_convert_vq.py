"""LlamaGen / STAR-VQ weight import: golden parity, real-size key maps, .pt files, clear errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxunified import convert
from jaxunified.convert.common import CheckpointMismatchError
from jaxunified.convert.vq import config_from_overrides, convert_state_dict, to_torch_state_dict
from jaxunified.models.vqgan import get_config, num_params
from tests import helpers

ATOL = 1e-4


def _json_args(golden_dir, name):
    args = json.loads((golden_dir / f"{name}.json").read_text())
    args.pop("layout", None)  # a note about the arrays, not a constructor argument
    return args


def _nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def golden_outputs(golden_dir):
    """Loads both tiny goldens through ``jaxunified.convert.load`` and runs them once."""
    results = {}
    for name, kind in (("llamagen_vq_tiny", "llamagen_vq"), ("star_vq_tiny", "star_vq")):
        model, variables = convert.load(kind, golden_dir / f"{name}.safetensors", **_json_args(golden_dir, name))
        ref = dict(np.load(golden_dir / f"{name}.npz"))
        out = jax.jit(model.apply)(variables, _nhwc(ref["image"]))
        from_codes = None
        if "decoded_from_codes" in ref:
            from_codes = jax.jit(lambda v, c: model.apply(v, c, method="decode_codes"))(
                variables, jnp.asarray(ref["codes"], jnp.int32)
            )
        results[name] = (model, variables, ref, out, from_codes)
    return results


@pytest.mark.parametrize("name", ["llamagen_vq_tiny", "star_vq_tiny"])
def test_golden_parity(golden_outputs, name):
    model, _, ref, out, from_codes = golden_outputs[name]
    np.testing.assert_allclose(_nchw(out["pre_quant"]), ref["pre_quant"], atol=ATOL)
    np.testing.assert_array_equal(np.asarray(out["codes"]), ref["codes"])
    np.testing.assert_allclose(_nchw(out["quant"]), ref["quant"], atol=ATOL)
    np.testing.assert_allclose(_nchw(out["recon"]), ref["decoded"], atol=ATOL)
    if name == "llamagen_vq_tiny":
        assert model.cfg.vq.l2_norm and model.cfg.attn_num_heads == 1
        np.testing.assert_allclose(_nchw(from_codes), ref["decoded_from_codes"], atol=ATOL)
        np.testing.assert_allclose(float(out["vq_loss"]), float(ref["vq_loss"]), atol=ATOL)
        np.testing.assert_allclose(float(out["commit_loss"]), float(ref["commit_loss"]), atol=ATOL)
    else:
        assert not model.cfg.vq.l2_norm and model.cfg.attn_num_heads == 2


def reference_key_shapes(ch, ch_mult, z_channels, num_res_blocks, decoder_num_res_blocks, codebook_size, embed_dim):
    """Every key and shape of the PyTorch ``VQModel`` state dict, written out from its structure."""
    keys = {}

    def conv(name, o, i, k):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (o, i, k, k), (o,)

    def norm(name, c):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (c,), (c,)

    def res(name, i, o):
        norm(f"{name}.norm1", i)
        conv(f"{name}.conv1", o, i, 3)
        norm(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o, 3)
        if i != o:
            conv(f"{name}.nin_shortcut", o, i, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    def mid(prefix, c):
        res(f"{prefix}.mid.0", c, c)
        attn(f"{prefix}.mid.1", c)
        res(f"{prefix}.mid.2", c, c)

    last = len(ch_mult) - 1
    conv("encoder.conv_in", ch, 3, 3)
    c = ch
    for i, m in enumerate(ch_mult):
        for j in range(num_res_blocks):
            res(f"encoder.conv_blocks.{i}.res.{j}", c, ch * m)
            c = ch * m
            if i == last:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", c)
        if i != last:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", c, c, 3)
    mid("encoder", c)
    norm("encoder.norm_out", c)
    conv("encoder.conv_out", z_channels, c, 3)

    c = ch * ch_mult[-1]
    conv("decoder.conv_in", c, z_channels, 3)
    mid("decoder", c)
    for k, i in enumerate(reversed(range(len(ch_mult)))):
        for j in range(decoder_num_res_blocks):
            res(f"decoder.conv_blocks.{k}.res.{j}", c, ch * ch_mult[i])
            c = ch * ch_mult[i]
            if i == last:
                attn(f"decoder.conv_blocks.{k}.attn.{j}", c)
        if i != 0:
            conv(f"decoder.conv_blocks.{k}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", 3, c, 3)

    keys["quantize.embedding.weight"] = (codebook_size, embed_dim)
    keys["quantize.codebook_used"] = (65536 if codebook_size < 65536 else codebook_size + 1,)
    conv("quant_conv", embed_dim, z_channels, 1)
    conv("post_quant_conv", z_channels, embed_dim, 1)
    return keys


def _real_vq16_shapes(golden_dir):
    raw = json.loads((golden_dir / "llamagen_vq16_real.keys.json").read_text())
    return {k: tuple(v) for k, v in raw.items()}


def _count(shapes):
    return sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith("codebook_used"))


VQ16 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), z_channels=256, num_res_blocks=2, decoder_num_res_blocks=3,
            codebook_size=16384, embed_dim=8)
STAR = dict(ch=256, ch_mult=(1, 2, 2, 4, 8), z_channels=512, num_res_blocks=2, decoder_num_res_blocks=3,
            codebook_size=65536, embed_dim=512)


def test_key_structure_matches_the_real_and_tiny_checkpoints(golden_dir):
    assert reference_key_shapes(**VQ16) == _real_vq16_shapes(golden_dir)
    tiny = {k: v.shape for k, v in load_file(str(golden_dir / "llamagen_vq_tiny.safetensors")).items()}
    a = _json_args(golden_dir, "llamagen_vq_tiny")
    assert reference_key_shapes(
        a["ch"], a["ch_mult"], a["z_channels"], a["num_res_blocks"], a["decoder_num_res_blocks"],
        a["codebook_size"], a["codebook_embed_dim"],
    ) == tiny


def test_vq16_real_keys_all_map(golden_dir):
    shapes = _real_vq16_shapes(golden_dir)
    cfg = get_config("VQ-16")
    variables = convert_state_dict(helpers.fake_state_dict(shapes, seed=None), cfg)
    n_loaded = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
    assert n_loaded == _count(shapes) == num_params(cfg)


def test_star_vq_real_size_param_count_and_keys():
    shapes = reference_key_shapes(**STAR)
    cfg = get_config("STAR-VQ")
    assert num_params(cfg) == _count(shapes)
    assert shapes["quantize.codebook_used"] == (65537,)
    variables = convert_state_dict(helpers.fake_state_dict(shapes, seed=None), cfg)
    assert variables["params"]["quantize"]["embedding"].shape == (65536, 512)


def test_pt_round_trip(golden_dir, golden_outputs, tmp_path):
    torch = pytest.importorskip("torch")
    sd = load_file(str(golden_dir / "llamagen_vq_tiny.safetensors"))
    path = tmp_path / "vq.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "steps": 7}, path)
    model, variables = convert.load("llamagen_vq", path, **_json_args(golden_dir, "llamagen_vq_tiny"))
    _, want, *_ = golden_outputs["llamagen_vq_tiny"]
    jax.tree.map(np.testing.assert_array_equal, variables, want)


def test_to_torch_state_dict_inverts_the_mapping(golden_dir, golden_outputs):
    sd = load_file(str(golden_dir / "star_vq_tiny.safetensors"))
    model, variables, *_ = golden_outputs["star_vq_tiny"]
    back = to_torch_state_dict(model.cfg, variables)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape, k
        if not k.endswith("codebook_used"):
            np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_mismatched_checkpoint_lists_every_bad_key(golden_dir):
    sd = dict(load_file(str(golden_dir / "llamagen_vq_tiny.safetensors")))
    del sd["decoder.conv_out.bias"]
    sd["encoder.conv_blocks.0.res.0.conv3.weight"] = np.zeros((32, 32, 3, 3), np.float32)
    sd["decoder.norm_out.weight"] = np.zeros((31,), np.float32)
    sd["quantize.extra_buffer"] = np.zeros((3,), np.float32)
    cfg = config_from_overrides("VQ-16", **_json_args(golden_dir, "llamagen_vq_tiny"))
    with pytest.raises(CheckpointMismatchError) as e:
        convert_state_dict(sd, cfg)
    msg = str(e.value)
    for needle in ("params/decoder/conv_out/bias", "res_0/conv3/kernel", "params/decoder/norm_out/scale",
                   "(31,)", "quantize.extra_buffer"):
        assert needle in msg, (needle, msg)
    # The wrong variant is reported the same way, naming the fix.
    with pytest.raises(CheckpointMismatchError, match="variant"):
        convert.load("llamagen_vq", golden_dir / "llamagen_vq_tiny.safetensors")


def test_overrides_accept_reference_names_and_reject_unknown(golden_dir):
    cfg = config_from_overrides(
        "VQ-16", encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2], codebook_embed_dim=4,
        codebook_l2_norm=False, commit_loss_beta=0.5, codebook_show_usage=True, dropout_p=0.0,
    )
    assert cfg.ch_mult == (1, 2) and cfg.vq.embed_dim == 4 and not cfg.vq.l2_norm and cfg.vq.beta == 0.5
    with pytest.raises(ValueError, match="differ"):
        config_from_overrides("VQ-16", encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 4])
    with pytest.raises(ValueError, match="valid fields"):
        convert.load("star_vq", golden_dir / "star_vq_tiny.safetensors", channels=32)
    with pytest.raises(FileNotFoundError):
        convert.load("star_vq", golden_dir / "missing.safetensors")


def test_ema_layout_load_keeps_the_codebook(golden_dir, golden_outputs):
    args = _json_args(golden_dir, "llamagen_vq_tiny")
    model, variables = convert.load("llamagen_vq", golden_dir / "llamagen_vq_tiny.safetensors", update="ema", **args)
    assert "quantize" not in variables["params"]
    cb = variables["codebook"]["quantize"]
    np.testing.assert_array_equal(cb["embed_sum"], cb["embedding"])
    _, _, ref, out, _ = golden_outputs["llamagen_vq_tiny"]
    codes = jax.jit(lambda v, x: model.apply(v, x, method="encode")[1])(variables, _nhwc(ref["image"]))
    np.testing.assert_array_equal(np.asarray(codes), ref["codes"])
