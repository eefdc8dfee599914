"""TokLIP: golden parity from codes, causality (also under remat/scan), prefixes, images == codes,
converter coverage on released-layout checkpoints, reference parameter counts at real sizes."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunified import convert
from jaxunified.convert import toklip as C
from jaxunified.convert.common import CheckpointMismatchError, read_state_dict
from jaxunified.models import toklip as T
from jaxunified.nn.transformer import stack_layers
from tests import helpers

# ---------------------------------------------------------------------------------------------
# The reference layout, written out by hand from the reference architecture (timm
# VisionTransformer + AttentionPoolLatent, open_clip TextTransformer, LlamaGen/taming VQ), so the
# converter and the parameter counts are checked against something independent of our modules.


def _lin(s, name, out, inp, bias=True):
    s[name + ".weight"] = (out, inp)
    if bias:
        s[name + ".bias"] = (out,)


def _norm(s, name, c):
    s[name + ".weight"] = (c,)
    s[name + ".bias"] = (c,)


def timm_trunk_shapes(width, depth, mlp, num_tokens, patch, code_dim):
    s, w = {}, width
    s["patch_embed.proj.weight"] = (w, 3, patch, patch)
    s["patch_embed.proj.bias"] = (w,)
    s["pos_embed"] = (1, num_tokens, w)
    for i in range(depth):
        b = f"blocks.{i}."
        _norm(s, b + "norm1", w)
        _lin(s, b + "attn.qkv", 3 * w, w)
        _lin(s, b + "attn.proj", w, w)
        _norm(s, b + "norm2", w)
        _lin(s, b + "mlp.fc1", mlp, w)
        _lin(s, b + "mlp.fc2", w, mlp)
    _norm(s, "norm", w)
    s["attn_pool.latent"] = (1, 1, w)
    _lin(s, "attn_pool.q", w, w)
    _lin(s, "attn_pool.kv", 2 * w, w)
    _lin(s, "attn_pool.proj", w, w)
    _norm(s, "attn_pool.norm", w)
    _lin(s, "attn_pool.mlp.fc1", mlp, w)
    _lin(s, "attn_pool.mlp.fc2", w, mlp)
    _lin(s, "vq_table", 4 * w, code_dim)
    _lin(s, "vq_mapping", w, 4 * w)
    return {"visual.trunk." + k: v for k, v in s.items()}


def open_clip_text_shapes(vocab, ctx, width, depth, mlp, embed):
    s, w = {"token_embedding.weight": (vocab, width), "positional_embedding": (ctx, width)}, width
    for i in range(depth):
        b = f"transformer.resblocks.{i}."
        _norm(s, b + "ln_1", w)
        s[b + "attn.in_proj_weight"] = (3 * w, w)
        s[b + "attn.in_proj_bias"] = (3 * w,)
        _lin(s, b + "attn.out_proj", w, w)
        _norm(s, b + "ln_2", w)
        _lin(s, b + "mlp.c_fc", mlp, w)
        _lin(s, b + "mlp.c_proj", w, mlp)
    _norm(s, "ln_final", w)
    _lin(s, "text_projection", embed, w)
    return {"text." + k: v for k, v in s.items()}


def taming_vq_shapes(ch, ch_mult, nrb, z, embed_dim, n_embed):
    """taming/IBQ VQModel names (``encoder.down.{i}.block.{j}``); attention at the lowest level."""
    s, levels = {}, len(ch_mult)

    def conv(name, o, i, k):
        s[name + ".weight"] = (o, i, k, k)
        s[name + ".bias"] = (o,)

    def res(name, i, o):
        _norm(s, name + ".norm1", i)
        conv(name + ".conv1", o, i, 3)
        _norm(s, name + ".norm2", o)
        conv(name + ".conv2", o, o, 3)
        if i != o:
            conv(name + ".nin_shortcut", o, i, 1)

    def attn(name, c):
        _norm(s, name + ".norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    def mid(side, c):
        res(f"{side}.mid.block_1", c, c)
        attn(f"{side}.mid.attn_1", c)
        res(f"{side}.mid.block_2", c, c)

    conv("encoder.conv_in", ch, 3, 3)
    c = ch
    for i, m in enumerate(ch_mult):
        for j in range(nrb):
            res(f"encoder.down.{i}.block.{j}", c, ch * m)
            c = ch * m
            if i == levels - 1:
                attn(f"encoder.down.{i}.attn.{j}", c)
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder", c)
    _norm(s, "encoder.norm_out", c)
    conv("encoder.conv_out", z, c, 3)
    c = ch * ch_mult[-1]
    conv("decoder.conv_in", c, z, 3)
    mid("decoder", c)
    for i in reversed(range(levels)):
        for j in range(nrb + 1):
            res(f"decoder.up.{i}.block.{j}", c, ch * ch_mult[i])
            c = ch * ch_mult[i]
            if i == levels - 1:
                attn(f"decoder.up.{i}.attn.{j}", c)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    _norm(s, "decoder.norm_out", c)
    conv("decoder.conv_out", 3, c, 3)
    conv("quant_conv", embed_dim, z, 1)
    conv("post_quant_conv", z, embed_dim, 1)
    s["quantize.embedding.weight"] = (n_embed, embed_dim)
    return s


def released_shapes(cfg: T.TokLIPConfig, vq_names="llamagen"):
    """Every model tensor of a released TokLIP checkpoint for ``cfg`` (buffers excluded)."""
    v, q, t = cfg.vision, cfg.vq, cfg.text
    s = timm_trunk_shapes(v.width, v.depth, v.mlp_dim, v.num_patches, v.patch_size, q.embed_dim)
    vq = taming_vq_shapes(q.ch, q.ch_mult, q.num_res_blocks, q.z_channels, q.embed_dim, q.codebook_size)
    if vq_names == "llamagen":
        vq = {C.taming_to_llamagen(k, len(q.ch_mult)): x for k, x in vq.items()}
    s.update({"visual.trunk.vq." + k: x for k, x in vq.items()})
    if t is not None:
        s.update(open_clip_text_shapes(t.vocab_size, t.max_len, t.width, t.depth, t.mlp_dim, t.proj_dim))
        s["logit_scale"] = ()
    return s


# ---------------------------------------------------------------------------------------------
# Golden


@pytest.fixture(scope="module")
def golden(golden_dir):
    model, variables = convert.load("toklip", golden_dir / "toklip_tiny.safetensors", variant="tiny",
                                    config=golden_dir / "toklip_tiny.json")
    return model, variables, dict(np.load(golden_dir / "toklip_tiny.npz"))


def test_golden_parity_from_codes(golden):
    # The official code (fused attention, no grad checkpointing) applies the causal mask before the
    # softmax, as we always do; no switch is needed for parity.
    model, variables, ref = golden
    codes = jnp.asarray(ref["codes"], jnp.int32)
    out = jax.jit(lambda v, c: model.apply(v, codes=c, method=T.TokLIP.encode))(variables, codes)
    quant = model.apply(variables, out["codes"], method=T.TokLIP.codebook_vectors)
    np.testing.assert_allclose(np.asarray(quant), ref["quant"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out["features"]), ref["features"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out["pooled"]), ref["pooled"], atol=1e-4, rtol=0)
    # The reference's own entry point: its quantiser output (codebook vectors) straight into the MLP.
    q = model.apply(variables, jnp.asarray(ref["quant"]), method=T.TokLIP.encode_quant)
    np.testing.assert_allclose(np.asarray(q["last_hidden"]), ref["features"], atol=1e-4, rtol=0)
    # A bidirectional encoder does not reproduce it: the golden really is causal.
    bidir = T.TokLIP(dataclasses.replace(model.cfg, vision=dataclasses.replace(model.cfg.vision, causal=False)))
    f = bidir.apply(variables, codes=codes, method=T.TokLIP.encode)["features"]
    assert np.abs(np.asarray(f) - ref["features"]).max() > 1e-2


def _scanned(model, variables, remat=True):
    cfg = model.cfg
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, scan=True, remat=remat))
    p = variables["params"]
    vision = {**p["vision"], "encoder": stack_layers(p["vision"]["encoder"], cfg.vision.depth)}
    return T.TokLIP(cfg), {"params": {**p, "vision": vision}}


def _chunked(model, variables, chunks):
    cfg = model.cfg
    return T.TokLIP(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, causal_chunks=chunks))), variables


def test_causality_under_remat_and_scan(golden):
    """Changing code j changes no feature at positions < j, in every encoder form (the reference
    loses its mask under gradient checkpointing; blockwise causal attention skips later keys
    outright), and the features match the golden there too."""
    model, variables, ref = golden
    codes = jnp.asarray(ref["codes"], jnp.int32).reshape(2, -1)
    L = codes.shape[1]
    forms = [(model, variables), _scanned(model, variables, remat=True), _chunked(model, variables, 4),
             _scanned(*_chunked(model, variables, 2), remat=True)]
    js = (0, 5, L - 1)
    # One batch: the codes, then a copy with code j changed for each j.
    batch = jnp.concatenate([codes] + [codes.at[:, j].set((codes[:, j] + 1234) % 16384) for j in js])
    for m, v in forms:
        f = jax.jit(lambda v, c, m=m: m.apply(v, codes=c, method=T.TokLIP.encode)["features"])(v, batch)
        base, changed = f[:2], f[2:].reshape(len(js), 2, L, -1)
        np.testing.assert_allclose(np.asarray(base).reshape(ref["features"].shape), ref["features"], atol=1e-4)
        for new, j in zip(changed, js):
            np.testing.assert_allclose(np.asarray(new[:, :j]), np.asarray(base[:, :j]), atol=1e-5)  # float rounding varies by CPU
            assert np.abs(np.asarray(new[:, j]) - np.asarray(base[:, j])).max() > 0
        # The backward pass too (remat recomputes the forward there): an early feature's gradient
        # w.r.t. later codes' embeddings is exactly zero.
        g = jax.jit(jax.grad(lambda q, v, m=m: m.apply(v, q, method=T.TokLIP.encode_quant)["last_hidden"][:, 3].sum()))(
            jnp.asarray(ref["quant"]), v)
        assert np.abs(np.asarray(g[:, 4:])).max() == 0 and np.abs(np.asarray(g[:, :4])).max() > 0


def test_prefix_features_equal_full_sequence(golden):
    model, variables, ref = golden
    codes = jnp.asarray(ref["codes"], jnp.int32).reshape(2, -1)
    run = jax.jit(lambda v, c: model.apply(v, codes=c, method=T.TokLIP.encode_tokens))
    full_codes, full = run(variables, codes)
    _, prefix = run(variables, codes[:, :7])
    np.testing.assert_allclose(np.asarray(prefix), np.asarray(full[:, :7]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(full_codes), np.asarray(codes))
    low = model.apply(variables, codes, method=T.TokLIP.codebook_vectors)
    both = T.concat_tokens(low, full)
    assert both.shape == (2, 16, 8 + 32)
    np.testing.assert_allclose(np.asarray(both[..., :8]), ref["quant"], atol=1e-6)
    table = jnp.arange(16384 * 3, dtype=jnp.float32).reshape(16384, 3)
    assert T.concat_tokens(T.lookup_embeddings(table, codes), full).shape == (2, 16, 35)
    with pytest.raises(ValueError, match="exceed"):
        model.apply(variables, codes=jnp.zeros((1, 17), jnp.int32), method=T.TokLIP.encode)


def test_causal_stem_stays_causal_and_prefix_exact():
    """The optional raster-causal conv stem (not in TokLIP): every code j changes exactly the
    features at positions ≥ j, a raster prefix encodes to the full sequence's features, and the
    stem's receptive field reaches the row above (a neighbour the MLP alone cannot see)."""
    cfg = T.get_config("tiny", vq=dict(codebook_size=64), causal_stem=((8, 5), (8, 3)))
    model = T.TokLIP(cfg)
    codes = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    variables = model.init(jax.random.key(0), codes=codes, method=T.TokLIP.encode)
    batch = jnp.concatenate([codes] + [codes.at[:, j].set((codes[:, j] + 1) % 64) for j in range(16)])
    run = jax.jit(lambda v, c: model.apply(v, codes=c, method=T.TokLIP.encode)["features"])
    f = np.asarray(run(variables, batch))
    base, changed = f[:2], f[2:].reshape(16, 2, 16, -1)
    for j, new in enumerate(changed):
        np.testing.assert_array_equal(new[:, :j], base[:, :j])
        assert np.abs(new[:, j] - base[:, j]).max() > 0
    # A 7-token program sums in another order than the 16-token one: float32 rounding, ~1e-6 at |x| ≈ 1.
    np.testing.assert_allclose(np.asarray(run(variables, codes[:, :7])), base[:, :7], atol=1e-5)
    # Below the ViT: the stem's output at (1, 1) depends on (0, 2), the row above, right of it.
    emb = jax.jit(lambda v, c: model.apply(v, c, (4, 4), method=T.TokLIP.embed_codes))
    shifted = codes.at[:, 2].set((codes[:, 2] + 1) % 64)
    d = np.abs(np.asarray(emb(variables, shifted) - emb(variables, codes)))
    assert d[:, 5].max() > 0 and d[:, :2].max() == 0


def test_input_errors(golden):
    model, variables, ref = golden
    with pytest.raises(ValueError, match="exactly one"):
        model.apply(variables, method=T.TokLIP.encode)
    with pytest.raises(ValueError, match="integer"):
        model.apply(variables, codes=jnp.zeros((1, 4, 4)), method=T.TokLIP.encode)
    with pytest.raises(ValueError, match="patch_size"):
        T.get_config("tiny", vision=dict(patch_size=8))
    with pytest.raises(ValueError, match="unknown TokLIP variant"):
        T.get_config("M")


# ---------------------------------------------------------------------------------------------
# Converter on released-layout checkpoints


def test_taming_names_and_vq16_layout(golden_dir):
    """The hand-written taming generator, renamed, is exactly LlamaGen VQ-16's real key set."""
    real = json.loads((golden_dir / "llamagen_vq16_real.keys.json").read_text())
    real.pop("quantize.codebook_used")
    mine = taming_vq_shapes(128, (1, 1, 2, 2, 4), 2, 256, 8, 16384)
    renamed = {C.taming_to_llamagen(k, 5): tuple(v) for k, v in mine.items()}
    assert renamed == {k: tuple(v) for k, v in real.items()}


@pytest.fixture(scope="module")
def released_tiny(tmp_path_factory):
    torch = pytest.importorskip("torch")
    cfg = T.get_config("tiny")
    sd = helpers.fake_state_dict(released_shapes(cfg))
    sd["visual.trunk.vq.quantize.codebook_used"] = np.zeros(65536, np.float32)
    path = tmp_path_factory.mktemp("toklip") / "TokLIP_tiny.pt"
    torch.save({"epoch": 3, "name": "toklip",
                "state_dict": {"module." + k: torch.from_numpy(v) for k, v in sd.items()},
                "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []}}, str(path))
    return cfg, sd, path


def test_released_checkpoint_maps_every_tensor(released_tiny, caplog):
    cfg, sd, path = released_tiny
    with caplog.at_level("INFO", logger="jaxunified.convert.toklip"):
        model, variables = convert.load("toklip", path, variant="tiny")
    assert "patch_embed.proj.weight" in caplog.text
    ignored = C.ignored_keys(read_state_dict(path))
    assert ignored == ["visual.trunk.patch_embed.proj.bias", "visual.trunk.patch_embed.proj.weight",
                       "visual.trunk.vq.quantize.codebook_used"]
    n_ckpt = sum(v.size for k, v in sd.items() if k not in ignored)
    assert T.count(variables["params"]) == n_ckpt == T.num_params(cfg)["total"]
    p = variables["params"]
    w = sd["visual.trunk.blocks.1.attn.qkv.weight"]  # rows q | k | v, heads contiguous
    np.testing.assert_array_equal(p["vision"]["encoder"]["layers_1"]["attn"]["value"]["kernel"],
                                  w[64:].T.reshape(32, 4, 8))
    np.testing.assert_array_equal(p["vision"]["head"]["attn"]["value"]["bias"],
                                  sd["visual.trunk.attn_pool.kv.bias"][32:].reshape(4, 8))
    np.testing.assert_array_equal(p["tokenizer"]["encoder"]["conv_in"]["kernel"],
                                  sd["visual.trunk.vq.encoder.conv_in.weight"].transpose(2, 3, 1, 0))
    # From images: the frozen VQ tokenizes, and the result equals running from those codes.
    images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), minval=-1, maxval=1)
    tokens = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % cfg.text.vocab_size
    out = jax.jit(lambda v, x, t: model.apply(v, x, tokens=t))(variables, images, tokens)
    again = model.apply(variables, codes=out["codes"], method=T.TokLIP.encode)
    np.testing.assert_allclose(np.asarray(again["pooled"]), np.asarray(out["pooled"]), atol=1e-6)
    assert out["codes"].shape == (2, 16) and out["logits_per_image"].shape == (2, 2)


def test_taming_named_tokenizer_and_bad_keys(released_tiny, tmp_path):
    cfg, sd, _ = released_tiny
    taming = helpers.fake_state_dict(released_shapes(cfg, vq_names="taming"), seed=1)
    v = C.convert_state_dict(taming, cfg)
    np.testing.assert_array_equal(  # decoder.up.{i} is LlamaGen's conv_blocks.{L-1-i}
        v["params"]["tokenizer"]["decoder"]["conv_blocks_4"]["res_0"]["conv1"]["kernel"],
        taming["visual.trunk.vq.decoder.up.0.block.0.conv1.weight"].transpose(2, 3, 1, 0))
    scanned = C.convert_state_dict(sd, T.get_config("tiny", vision=dict(scan=True), text=dict(scan=True)))["params"]
    np.testing.assert_array_equal(scanned["text"]["encoder"]["layers"]["mlp"]["fc2"]["kernel"][1],
                                  sd["text.transformer.resblocks.1.mlp.c_proj.weight"].T)
    bad = dict(sd)
    bad.pop("visual.trunk.attn_pool.latent")
    bad["visual.trunk.head.weight"] = np.zeros((3, 32), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        C.convert_state_dict(bad, cfg)
    assert "vision/head/probe" in str(e.value) and "visual.trunk.head.weight" in str(e.value)
    short = {k: v for k, v in sd.items() if not k.startswith("visual.trunk.vq.")}
    with pytest.raises(CheckpointMismatchError, match="vq_path"):
        C.convert_state_dict(short, cfg)


def test_open_clip_text_tower_matches_torch(released_tiny):
    """Our text tower on converted open_clip weights == open_clip's TextTransformer math in torch."""
    torch = pytest.importorskip("torch")
    cfg, sd, _ = released_tiny
    model = T.TokLIP(cfg)
    variables = C.convert_state_dict(sd, cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.text.vocab_size, (2, cfg.text.max_len))
    ours = model.apply(variables, jnp.asarray(tokens, jnp.int32), normalize=False, method=T.TokLIP.encode_text)

    t = {k[len("text."):]: torch.from_numpy(v) for k, v in sd.items() if k.startswith("text.")}
    W, H = cfg.text.width, cfg.text.num_heads
    ln = lambda x, n: torch.nn.functional.layer_norm(x, (W,), t[n + ".weight"], t[n + ".bias"], 1e-6)  # noqa: E731
    lin = lambda x, n: torch.nn.functional.linear(x, t[n + ".weight"], t[n + ".bias"])  # noqa: E731
    x = t["token_embedding.weight"][torch.from_numpy(tokens)] + t["positional_embedding"][: tokens.shape[1]]
    for i in range(cfg.text.depth):
        b = f"transformer.resblocks.{i}."
        mha = torch.nn.MultiheadAttention(W, H, batch_first=True)
        mha.load_state_dict({"in_proj_weight": t[b + "attn.in_proj_weight"], "in_proj_bias": t[b + "attn.in_proj_bias"],
                             "out_proj.weight": t[b + "attn.out_proj.weight"], "out_proj.bias": t[b + "attn.out_proj.bias"]})
        y = ln(x, b + "ln_1")
        x = x + mha(y, y, y, need_weights=False)[0]
        h = torch.nn.functional.gelu(lin(ln(x, b + "ln_2"), b + "mlp.c_fc"), approximate="tanh")
        x = x + lin(h, b + "mlp.c_proj")
    ref = lin(ln(x, "ln_final")[:, -1], "text_projection")
    np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Real sizes


@pytest.mark.parametrize("variant, total", [("S", 1_212_905_404), ("L", 1_213_274_044), ("XL", 1_316_946_100)])
def test_reference_parameter_counts(variant, total):
    """eval_shape of TokLIP-S/-L/-XL == every tensor of the reference model (hand-written layout),
    less the never-called conv patch embedding."""
    cfg = T.get_config(variant, vision=dict(scan=True), text=dict(scan=True))  # scan: fast to trace
    ref = released_shapes(cfg, vq_names="taming" if variant == "XL" else "llamagen")
    ref_total = sum(int(np.prod(s)) for s in ref.values())
    patch = sum(int(np.prod(s)) for k, s in ref.items() if "patch_embed" in k)
    ours = T.num_params(cfg)
    assert ref_total == total
    assert ours["total"] + patch == ref_total
    trunk = sum(int(np.prod(s)) for k, s in ref.items() if k.startswith("visual.trunk.") and ".vq." not in k)
    assert ours["vision"] + ours["adapter"] == trunk - patch
    assert ours["tokenizer"] == (71_883_403 if variant != "XL" else ours["tokenizer"])
