"""Qwen2.5-VL's multimodal RoPE: the angle layouts of HF's two mRoPE functions, equal ids giving
plain 1-D RoPE, Qwen2-VL's image position ids and their shift, and an mRoPE MLLM whose cached
decode and padded prompts reproduce the full forward."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunified import convert
from jaxunified.models import lm, mllm
from jaxunified.nn import rope
from jaxunified.sample.lm import cache_layout, generate_text, left_pad, prefill_and_step


def _hf_tables(pos, dim, theta, sections, interleaved):
    """HF's construction, transcribed: per-axis angle tables [3, B, T, dim/2], then
    ``apply_multimodal_rotary_pos_emb``'s chunk i % 3 of the sections (Qwen2/2.5-VL) or
    ``apply_interleaved_mrope``'s strided overwrite (Qwen3-VL)."""
    freqs = pos[..., None].astype(np.float32) * rope.inv_frequencies(dim, theta)  # float32, as HF
    if interleaved:
        out = freqs[0].copy()
        for axis, offset in ((1, 1), (2, 2)):
            idx = slice(offset, sections[axis] * 3, 3)
            out[..., idx] = freqs[axis][..., idx]
    else:
        chunks = np.split(freqs, np.cumsum(sections)[:-1], axis=-1)
        out = np.concatenate([c[i % 3] for i, c in enumerate(chunks)], axis=-1)
    return np.cos(out), np.sin(out)


@pytest.mark.parametrize("sections,interleaved", [((16, 24, 24), False), ((2, 3, 3), False), ((24, 20, 20), True),
                                                  ((6, 5, 5), True)])
def test_tables_follow_hfs_section_layouts(sections, interleaved):
    dim = 2 * sum(sections)
    pos = np.random.default_rng(0).integers(0, 300, (3, 2, 7))
    cos, sin = rope.rope_mrope(jnp.asarray(np.moveaxis(pos, 0, -1)), dim, 1e6, sections, interleaved)
    hc, hs = _hf_tables(pos, dim, 1e6, sections, interleaved)
    np.testing.assert_allclose(cos, hc, atol=2e-6)
    np.testing.assert_allclose(sin, hs, atol=2e-6)


@pytest.mark.parametrize("interleaved", [False, True])
def test_equal_ids_are_plain_1d_rope(interleaved):
    p = jnp.arange(11)[None]
    cos, sin = rope.rope_mrope(jnp.stack([p] * 3, -1), 32, 1e4, (6, 5, 5), interleaved)
    c1, s1 = rope.rope_1d(p, 32, 1e4)
    np.testing.assert_array_equal(cos, c1)
    np.testing.assert_array_equal(sin, s1)


def test_bad_sections_and_positions_are_errors():
    with pytest.raises(ValueError, match="summing"):
        rope.mrope_axes(16, (4, 6, 5))
    with pytest.raises(ValueError, match="do not fit"):
        rope.mrope_axes(16, (2, 7, 7), interleaved=True)
    with pytest.raises(ValueError, match="summing"):
        lm.variant("tiny", mrope_section=(2, 2, 2))
    model = lm.DecoderLM(lm.variant("tiny"))
    ids = jnp.zeros((1, 4), jnp.int32)
    params = model.init(jax.random.key(0), ids)
    with pytest.raises(ValueError, match="mrope_section"):
        model.apply(params, ids, positions=jnp.zeros((1, 4, 3), jnp.int32))
    with pytest.raises(ValueError, match="mrope_section"):
        mllm.MLLMConfig(lm.variant("tiny"), 4, 4, image_grid=(2, 2))
    with pytest.raises(ValueError, match="rows, cols"):
        mllm.MLLMConfig(lm.variant("tiny", mrope_section=(2, 3, 3)), 4, 6, image_grid=(2, 2))


def test_image_ids_and_shift_are_qwen2_vls():
    """transformers 4.51's ``Qwen2_5_VLForConditionalGeneration.get_rope_index`` for 3 text tokens,
    a 2 × 3 image (t = 1, merge 1) and 3 more: these ids, rope delta −3."""
    ids, shift = mllm.mrope_positions(jnp.arange(12)[None], jnp.array([3]), (2, 3), jnp.array([True]))
    np.testing.assert_array_equal(np.asarray(ids[0]).T, [[0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8],
                                                         [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8],
                                                         [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]])
    assert int(shift[0]) == -3
    # a left-padded row (positions start at its first real token) and a text-only row
    flat = jnp.asarray([[0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9], list(range(12))])
    ids, shift = mllm.mrope_positions(flat, jnp.array([5, 3]), (2, 3), jnp.array([True, False]))
    np.testing.assert_array_equal(np.asarray(ids[0, 5:, 2]), [3, 4, 5, 3, 4, 5, 6])
    np.testing.assert_array_equal(np.asarray(ids[1]), np.stack([np.arange(12)] * 3, -1))
    assert list(np.asarray(shift)) == [-3, 0]


def test_mllm_task_takes_mrope_image_positions_only_when_asked():
    from jaxunified.train import mllm as M
    from tests import helpers

    over = {"model.overrides.mrope_section": (2, 2, 4), "model.overrides.num_heads": 2}
    seq = M.MLLMTask.model_config(helpers.tiny_config("mllm", **over))
    assert seq.lm.mrope_section == (2, 2, 4) and seq.image_grid == ()
    cfg = M.MLLMTask.model_config(helpers.tiny_config("mllm", **over, **{"model.image_positions": "mrope"}))
    side = int(np.sqrt(cfg.num_image_tokens))
    assert cfg.image_grid == (side, side)
    with pytest.raises(ValueError, match="mrope_section"):
        M.MLLMTask.model_config(helpers.tiny_config("mllm", **{"model.image_positions": "mrope"}))


def test_qwen25_vl_config_reads_the_sections(tmp_path, golden_dir):
    shutil.copy(golden_dir / "hf_qwen2_tiny.safetensors", tmp_path / "model.safetensors")
    cfg = json.loads((golden_dir / "hf_qwen2_tiny.json").read_text())
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, _ = convert.load("hf_qwen2", tmp_path)
    assert model.config.mrope_section == (2, 3, 3) and not model.config.mrope_interleaved
    assert lm.VARIANTS["qwen2.5-vl-7b"].mrope_section == (16, 24, 24)


@pytest.fixture(scope="module", params=[False, True], ids=["contiguous", "interleaved"])
def vl(request):
    cfg = mllm.MLLMConfig(lm.variant("tiny", mrope_section=(2, 3, 3) if not request.param else (3, 3, 2),
                                     mrope_interleaved=request.param, rope_theta=100.0),
                          vision_dim=5, num_image_tokens=6, image_start=2, image_grid=(2, 3))
    model = mllm.MLLM(cfg)
    vision = jax.random.normal(jax.random.key(1), (2, 6, 5))
    params = model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32), vision[:1])["params"]
    return model, params, vision


def test_image_positions_change_the_logits_and_text_rows_do_not_see_them(vl):
    model, params, vision = vl
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)), jnp.int32)
    out = model.apply({"params": params}, ids, vision)
    plain = mllm.MLLM(mllm.MLLMConfig(model.config.lm, 5, 6, 2)).apply({"params": params}, ids, vision)["logits"]
    np.testing.assert_allclose(out["logits"][:, :3], plain[:, :3], atol=1e-6)  # the prefix up to the first slot
    assert np.abs(np.asarray(out["logits"][:, 3:] - plain[:, 3:])).max() > 1e-3
    text = model.apply({"params": params}, ids, vision, has_image=jnp.array([False, False]))["logits"]
    alone = lm.DecoderLM(model.config.lm).apply({"params": params["lm"]}, ids)["logits"]
    np.testing.assert_allclose(text, alone, atol=1e-6)


def test_cached_decode_of_padded_prompts_reproduces_the_full_forward(vl):
    model, params, vision = vl
    rng = np.random.default_rng(1)
    prompts = [[3, 9] + [0] * 6 + list(rng.integers(0, 128, n)) for n in (2, 5)]
    cont = rng.integers(0, 128, (2, 3)).astype(np.int32)
    ids, valid = left_pad(prompts, bucket=4)
    _, pads, _ = cache_layout(jnp.asarray(valid), 1)
    inputs = {"vision": vision, "image_start": pads[:, 0] + 2}
    first, cache, step = prefill_and_step(model, params, jnp.asarray(ids), jnp.asarray(valid), 4, inputs)
    outs = [first]
    for n in range(1, 4):
        logits, cache = step(jnp.asarray(cont[:, n - 1]), cache, n)
        outs.append(logits)
    for b, p in enumerate(prompts):
        alone = model.apply({"params": params}, jnp.asarray([p + list(cont[b])]), vision[b:b + 1])["logits"][0]
        for i, logits in enumerate(outs):
            np.testing.assert_allclose(logits[b], alone[len(p) - 1 + i], atol=1e-5)
    tokens, _ = generate_text(model, params, prompts, max_new_tokens=3, prefill_inputs=inputs)
    for b, p in enumerate(prompts):
        seq = list(p)
        for _ in range(3):
            seq.append(int(jnp.argmax(model.apply({"params": params}, jnp.asarray([seq]),
                                                  vision[b:b + 1])["logits"][0, -1])))
        assert list(tokens[b]) == seq[len(p):]
