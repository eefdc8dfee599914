"""STAR: golden parity through convert.load("star"), the CFG decode, caches, variants, errors."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxunified import convert
from jaxunified.models import lm as lm_lib
from jaxunified.models import star as star_lib
from jaxunified.models import vqgan as vqgan_lib
from jaxunified.models.star import STAR
from jaxunified.sample import star as star_sample
from jaxunified.sample.strategies import Categorical, Guidance

ATOL = 1e-4


def _args(golden_dir):
    j = json.loads((golden_dir / "star_tiny.json").read_text())
    vq = {k: v for k, v in j["vq"].items() if k not in ("cls", "note")}
    return j, dict(base_config=j["qwen_config"], vq_overrides=vq)


@pytest.fixture(scope="module")
def golden(golden_dir):
    j, args = _args(golden_dir)
    model, variables = convert.load("star", golden_dir / "star_tiny.safetensors", **args)
    return j, model, variables, dict(np.load(golden_dir / "star_tiny.npz"))


def test_teacher_forced_hidden_states_and_logits(golden):
    _, model, variables, ref = golden
    ids = jnp.asarray(ref["cfg_input_ids"])
    codes = jnp.asarray(np.tile(ref["image_codes"][None], (2, 1)), jnp.int32)
    out = jax.jit(lambda v: model.apply(v, ids, codes, return_hidden=True))(variables)
    np.testing.assert_allclose(model.apply(variables, codes[0], method=STAR.embed_images), ref["image_embeds"],
                               atol=ATOL)
    np.testing.assert_allclose(np.stack(out["base_hidden_states"]), ref["base_hidden_states"], atol=ATOL)
    np.testing.assert_allclose(out["base_last_hidden"], ref["base_last_hidden"], atol=ATOL)
    np.testing.assert_allclose(np.stack(out["stacked_hidden_states"]), ref["stacked_hidden_states"], atol=ATOL)
    np.testing.assert_allclose(out["pixel_logits"], ref["pixel_logits"], atol=ATOL)
    np.testing.assert_allclose(out["image_logits"], ref["image_logits"], atol=ATOL)
    cond, uncond = np.asarray(out["image_logits"])
    np.testing.assert_allclose(uncond + 3.0 * (cond - uncond), ref["image_logits_cfg"], atol=ATOL)


def test_cfg_decode_reproduces_the_golden_codes_step_logits_and_image(golden):
    j, model, variables, ref = golden
    prompt = [int(x) for x in ref["input_ids"]]
    fim = j["special_token_ids"]["<|fim_pad|>"]
    assert star_sample.uncond_ids(prompt, fim) == ref["cfg_input_ids"][1].tolist()
    codes = star_sample.generate_images(model, variables, [prompt], num_tokens=16, guidance=Guidance(3.0),
                                        fim_pad_id=fim)
    np.testing.assert_array_equal(np.asarray(codes)[0], ref["gen_codes"])
    # top-k 1 through the categorical path is the same argmax
    codes_k1 = star_sample.generate_images(model, variables, [prompt], num_tokens=16, guidance=Guidance(3.0),
                                           fim_pad_id=fim, strategy=Categorical(top_k=1), key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(codes_k1)[0], ref["gen_codes"])
    codes_w = star_sample.generate_images(model, variables, [prompt], num_tokens=16, guidance=Guidance(3.0),
                                          fim_pad_id=fim, cache_windows=3)
    np.testing.assert_array_equal(np.asarray(codes_w)[0], ref["gen_codes"])
    image = model.apply(variables, codes.reshape(1, 4, 4), method=STAR.decode_image)
    np.testing.assert_allclose(image, ref["gen_image_nhwc"], atol=ATOL)

    ids, valid = star_sample.left_pad([prompt, star_sample.uncond_ids(prompt, fim)])
    first, cache, step = star_sample.prefill_and_step(model, variables, jnp.asarray(ids), jnp.asarray(valid), 16)
    step = jax.jit(step)
    logits = [first]
    for n in range(1, 16):
        fed = jnp.full((2,), int(ref["gen_codes"][n - 1]), jnp.int32)
        out, cache = step(fed, cache, n)
        logits.append(out)
    logits = np.stack(logits)
    np.testing.assert_allclose(logits, ref["gen_step_logits"], atol=ATOL)
    np.testing.assert_allclose(logits[:, 1] + 3.0 * (logits[:, 0] - logits[:, 1]), ref["gen_cfg_logits"], atol=ATOL)


def _tiny_config():
    base = lm_lib.variant("tiny", vocab_size=64, num_layers=3)
    vq = vqgan_lib.get_config("STAR-VQ", ch=8, ch_mult=(1, 2), z_channels=8, attn_num_heads=1, norm_groups=4,
                              codebook_size=40, embed_dim=4, num_res_blocks=1, decoder_num_res_blocks=1)
    return star_lib.STARConfig(base, num_stacked=2, vq=vq, adapter_depth=2)


@pytest.fixture(scope="module")
def tiny():
    config = _tiny_config()
    variables = star_lib.init_variables(config, jax.random.key(1))
    params = nn.meta.unbox(variables["params"])
    # a random head and stacked copy so the test reads real differences between rows and layers
    params = star_lib.init_stacked_from_base(config, params)
    return STAR(config), {**nn.meta.unbox(variables), "params": params}


def test_kv_caches_reproduce_the_full_forward_with_padded_prompts(tiny):
    model, variables = tiny
    prompts = [[5, 9, 11, 3, 7, 2], [4, 8, 2]]
    codes = np.array([[3, 17, 25, 1, 9], [30, 2, 2, 14, 6]], np.int32)
    ids, valid = star_sample.left_pad(prompts, bucket=4)
    first, cache, step = star_sample.prefill_and_step(model, variables, jnp.asarray(ids), jnp.asarray(valid), 5)
    step = jax.jit(step)
    stepped = [first]
    for n in range(1, 5):
        out, cache = step(jnp.asarray(codes[:, n - 1]), cache, n)
        stepped.append(out)
    stepped = np.stack(stepped, axis=1)
    for row, prompt in enumerate(prompts):
        full = model.apply(variables, jnp.asarray([prompt]), jnp.asarray(codes[row:row + 1]))["image_logits"]
        np.testing.assert_allclose(stepped[row], np.asarray(full)[0], atol=1e-5)


def test_sampled_rows_do_not_depend_on_their_batch(tiny):
    model, variables = tiny
    strategy = Categorical(top_k=10)
    a, b = [5, 9, 11, 3, 7, 2], [4, 8, 2, 6, 1]
    keys = jax.random.split(jax.random.key(0), 2)
    both = star_sample.generate_images(model, variables, [a, b], num_tokens=6, strategy=strategy,
                                       guidance=Guidance(2.0), key=jax.random.key(0), fim_pad_id=63)
    alone = star_sample._sample(model, variables, *map(jnp.asarray, star_sample.left_pad(
        [b, star_sample.uncond_ids(b, 63)])), keys[1:], num_tokens=6, strategy=strategy, guidance=Guidance(2.0))
    np.testing.assert_array_equal(np.asarray(both)[1], np.asarray(alone)[0])


def test_stacked_layers_start_as_the_base_top_layers(tiny):
    model, variables = tiny
    p = variables["params"]
    np.testing.assert_array_equal(p["stacked"]["layers"]["mlp"]["up"]["kernel"],
                                  p["base"]["layers"]["mlp"]["up"]["kernel"][1:])
    np.testing.assert_array_equal(p["stacked"]["final_norm"]["scale"], p["base"]["final_norm"]["scale"])
    assert "embed" not in p["stacked"] and "lm_head" not in p["stacked"]


def test_released_variants_stacked_parameter_counts():
    c3, c7 = star_lib.count_params(star_lib.VARIANTS["star-3b"]), star_lib.count_params(star_lib.VARIANTS["star-7b"])
    # STAR's "1.2B" / "3B" stacked parameters: 16 layers of Qwen2.5-VL-3B, 14 of 7B (+ their norm)
    assert c3["stacked"] == 1_233_233_920 and c7["stacked"] == 3_262_812_672
    assert c3["head"] == 2048 * 65536 + 65536 and c7["head"] == 3584 * 65536 + 65536
    assert c3["adapter"] == 512 * 2048 + 2048 + 2048 * 2048 + 2048
    assert c7["adapter"] == 512 * 3584 + 3584 + 3 * (3584 * 3584 + 3584)
    assert c3["base"] == lm_lib.count_params(lm_lib.VARIANTS["qwen2.5-vl-3b"])
    assert c7["base"] == lm_lib.count_params(lm_lib.VARIANTS["qwen2.5-vl-7b"])


def test_base_folder_and_vq_file_fill_what_the_star_file_lacks(tmp_path, golden_dir, golden):
    j, args = _args(golden_dir)
    _, _, variables, _ = golden
    sd = load_file(str(golden_dir / "star_tiny.safetensors"))
    base = tmp_path / "qwen"
    base.mkdir()
    save_file({k[4:]: v for k, v in sd.items() if k.startswith("llm.")}, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps(j["qwen_config"]))
    save_file({k[14:]: v for k, v in sd.items() if k.startswith("pixel_encoder.")}, str(tmp_path / "vq.safetensors"))
    # the STAR file holds the trained parts only, plus a base tensor it overrides
    own = {k: v for k, v in sd.items() if k.startswith(("stacked_ar.", "pixel_adapter.", "pixel_output_head."))}
    own["llm.model.norm.weight"] = sd["llm.model.norm.weight"] + 1
    save_file(own, str(tmp_path / "star.safetensors"))
    _, got = convert.load("star", tmp_path / "star.safetensors", base=base, vq=tmp_path / "vq.safetensors",
                          vq_overrides=args["vq_overrides"])
    flat_got, flat_ref = (convert.common.flatten(v) for v in (got, variables))
    assert set(flat_got) == set(flat_ref)
    for k in flat_ref:
        want = flat_ref[k] + (1 if k == "params/base/final_norm/scale" else 0)
        np.testing.assert_array_equal(flat_got[k], want, err_msg=k)


def test_mismatch_names_the_keys(tmp_path, golden_dir):
    _, args = _args(golden_dir)
    sd = load_file(str(golden_dir / "star_tiny.safetensors"))
    del sd["pixel_output_head.bias"]
    sd["pixel_output_head.extra"] = sd["pixel_output_head.weight"]
    sd["something.else"] = np.zeros(3, np.float32)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(convert.CheckpointMismatchError, match=r"(?s)params/head/bias.*something\.else"):
        convert.load("star", tmp_path / "bad.safetensors", **args)
    with pytest.raises(FileNotFoundError, match="base_config|config"):
        convert.load("star", tmp_path / "bad.safetensors", vq_overrides=args["vq_overrides"])


def test_shared_positions_put_each_output_code_at_its_source_codes_position():
    from jaxunified.models.star import sequence_positions

    pad, img, n = 0, 7, 3
    # row 0: 2 left pads, <vs> 3 source slots <ve>, an instruction, <vs>; row 1: a text-to-image prompt
    ids = jnp.array([[pad, pad, 5, img, img, img, 6, 9, 9, 5],
                     [pad, 3, 3, 3, 3, 3, 3, 3, 3, 5]])
    valid = ids != pad
    prompt_pos = jnp.maximum(jnp.arange(10)[None] - jnp.argmax(valid, axis=1)[:, None], 0)
    pos = np.asarray(sequence_positions(ids, prompt_pos, n, source_id=img))
    src = pos[0, 3:6]
    np.testing.assert_array_equal(pos[0, 10:], src)  # output code j where source code j sits
    assert pos[0, 9] == src[0] - 1  # the prompt's <vs> where the source block's <vs> sits
    np.testing.assert_array_equal(pos[1, 1:], np.arange(12))  # no source: sequential
    np.testing.assert_array_equal(np.asarray(sequence_positions(ids, prompt_pos, n))[0, 2:], np.arange(11))
