"""Qwen2 decoder LM: HF parity through convert, released parameter counts, KV cache, padding."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxunified import convert
from jaxunified.convert.common import CheckpointMismatchError
from jaxunified.models import lm
from jaxunified.sample.lm import generate_text, left_pad

# Sizes of the released checkpoints (sum of every tensor in their safetensors; VL: the text part).
RELEASED = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-vl-3b": 3_085_938_688,
    "qwen2.5-vl-7b": 7_615_616_512,
}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, golden_dir):
    d = tmp_path_factory.mktemp("qwen2")
    shutil.copy(golden_dir / "hf_qwen2_tiny.safetensors", d / "model.safetensors")
    shutil.copy(golden_dir / "hf_qwen2_tiny.json", d / "config.json")
    return d


@pytest.fixture(scope="module")
def tiny(hf_folder):
    return convert.load("hf_qwen2", hf_folder)


def _check_golden(model, variables, ref):
    out = model.apply(variables, jnp.asarray(ref["input_ids"]), return_hidden=True)
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=1e-4)
    assert len(out["hidden_states"]) == 4
    for i, h in enumerate(out["hidden_states"]):
        np.testing.assert_allclose(h, ref[f"hidden_{i}"], atol=1e-4)


@pytest.mark.parametrize("scan", [True, False])
def test_golden_every_hidden_state_and_logits(hf_folder, golden_dir, scan):
    model, variables = convert.load("hf_qwen2", hf_folder, scan_layers=scan)
    _check_golden(model, variables, np.load(golden_dir / "hf_qwen2_tiny.npz"))


def test_sharded_folder_older_config_layout(tmp_path, golden_dir):
    """A two-shard index and the pre-``rope_parameters`` config (``rope_theta`` at the top)."""
    sd = load_file(golden_dir / "hf_qwen2_tiny.safetensors")
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((golden_dir / "hf_qwen2_tiny.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, variables = convert.load("hf_qwen2", tmp_path)
    assert model.config.rope_theta == 1e6
    _check_golden(model, variables, np.load(golden_dir / "hf_qwen2_tiny.npz"))


@pytest.mark.parametrize("newer", [False, True])
def test_qwen25_vl_layouts_take_text_skip_visual(tmp_path, golden_dir, newer, caplog):
    sd = load_file(golden_dir / "hf_qwen2_tiny.safetensors")
    if newer:  # transformers >= 4.52: model.language_model.*, model.visual.*
        sd = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
              for k, v in sd.items()}
        sd["model.visual.blocks.0.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
    else:
        sd["visual.patch_embed.proj.weight"] = np.zeros((3, 3), np.float32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    base = json.loads((golden_dir / "hf_qwen2_tiny.json").read_text())
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "rope_parameters")
    cfg = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "tie_word_embeddings": False,
           "vision_config": {"depth": 2}}
    if newer:
        cfg["text_config"] = {k: base[k] for k in text_keys}
    else:
        cfg.update({k: base[k] for k in text_keys})
        cfg["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("INFO"):
        model, variables = convert.load("hf_qwen2", tmp_path)
    assert "vision-tower" in caplog.text
    _check_golden(model, variables, np.load(golden_dir / "hf_qwen2_tiny.npz"))


def test_mismatch_names_the_keys(tmp_path, golden_dir):
    sd = load_file(golden_dir / "hf_qwen2_tiny.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.extra.weight"] = np.zeros(2, np.float32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    shutil.copy(golden_dir / "hf_qwen2_tiny.json", tmp_path / "config.json")
    with pytest.raises(CheckpointMismatchError) as e:
        convert.load("hf_qwen2", tmp_path, scan_layers=False)
    assert "layers_1/mlp/up/kernel" in str(e.value) and "model.layers.0.extra.weight" in str(e.value)


def test_released_parameter_counts():
    for name, n in RELEASED.items():
        assert lm.count_params(lm.VARIANTS[name]) == n, name


def test_inputs_embeds_equals_ids_and_bf16_gives_float32_logits(tiny):
    model, variables = tiny
    ids = jnp.asarray([[3, 9, 27, 81, 4]])
    table = variables["params"]["embed"]["embedding"]
    a = model.apply(variables, ids)["logits"]
    b = model.apply(variables, inputs_embeds=table[ids])["logits"]
    np.testing.assert_array_equal(a, b)
    bf = lm.DecoderLM(lm.dataclasses.replace(model.config, dtype="bfloat16"))
    c = bf.apply(variables, ids)["logits"]
    assert c.dtype == jnp.float32
    np.testing.assert_allclose(c, a, atol=0.1)


def test_tied_embeddings_reuse_the_table():
    cfg = lm.variant("tiny", tie_embeddings=True)
    params = lm.DecoderLM(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    assert "lm_head" not in params
    assert lm.count_params(cfg) == lm.count_params(lm.variant("tiny")) - 128 * 64


def test_remat_keeps_gradients():
    ids = jnp.asarray([[1, 5, 7, 2, 9, 11]])
    grads = []
    for remat in ("none", "full", "dots"):
        model = lm.DecoderLM(lm.variant("tiny", remat=remat))
        params = model.init(jax.random.key(1), ids)["params"]
        grads.append(jax.grad(lambda p: model.apply({"params": p}, ids)["logits"].sum())(params))
    for g in grads[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads[0], g)


def _decode_logits(model, params, ids, valid, steps_tokens):
    """Prefill then one-token steps through sample.lm's step function; logits per step."""
    from jaxunified.sample.lm import prefill_and_step

    first, cache, step = prefill_and_step(model, params, ids, valid, len(steps_tokens) + 1)
    out = [first]
    for n, tok in enumerate(steps_tokens, start=1):
        logits, cache = step(tok, cache, n)
        out.append(logits)
    return out


def test_kv_cache_reproduces_full_sequence_step_by_step(tiny):
    model, variables = tiny
    seq = np.asarray([[5, 17, 99, 3, 42, 8, 61, 77, 12, 30]], np.int32)
    full = model.apply(variables, jnp.asarray(seq))["logits"]
    prompt = 4
    steps = [jnp.asarray(seq[:, prompt + i]) for i in range(seq.shape[1] - prompt - 1)]
    outs = _decode_logits(model, variables["params"], jnp.asarray(seq[:, :prompt]), jnp.ones((1, prompt), bool), steps)
    for i, logits in enumerate(outs):
        np.testing.assert_allclose(logits, full[:, prompt - 1 + i], atol=1e-5)


def test_padded_prompts_of_different_lengths_match_each_alone(tiny):
    model, variables = tiny
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(0, 128, n)) for n in (3, 7, 5)]
    cont = rng.integers(0, 128, (3, 4)).astype(np.int32)
    ids, valid = left_pad(rows, bucket=8)
    outs = _decode_logits(model, variables["params"], jnp.asarray(ids), jnp.asarray(valid),
                          [jnp.asarray(cont[:, i]) for i in range(3)])
    for b, row in enumerate(rows):
        alone = model.apply(variables, jnp.asarray([row + list(cont[b])]))["logits"][0]
        for i, logits in enumerate(outs):
            np.testing.assert_allclose(logits[b], alone[len(row) - 1 + i], atol=1e-5)


def test_greedy_generation_is_the_argmax_chain_and_stops_at_eos(tiny):
    model, variables = tiny
    prompts = [[5, 17, 99], [8, 1, 2, 3, 4, 60]]
    tokens, lengths = generate_text(model, variables["params"], prompts, max_new_tokens=6)
    for b, p in enumerate(prompts):
        seq = list(p)
        for _ in range(6):
            seq.append(int(jnp.argmax(model.apply(variables, jnp.asarray([seq]))["logits"][0, -1])))
        assert list(tokens[b]) == seq[len(p):]
    assert list(lengths) == [6, 6]
    eos = int(tokens[0, 2])
    tokens2, lengths2 = generate_text(model, variables["params"], prompts, max_new_tokens=6, eos_id=eos, pad_id=-1)
    first = list(tokens[0]).index(eos)
    assert lengths2[0] == first + 1 and list(tokens2[0, :first + 1]) == list(tokens[0, :first + 1])
    assert (tokens2[0, first + 1:] == -1).all()


def test_cache_windows_give_the_same_text_and_eos_stops(tiny):
    model, variables = tiny
    prompts = [[5, 17, 99], [8, 1, 2, 3, 4, 60]]
    full, _ = generate_text(model, variables["params"], prompts, max_new_tokens=7)
    eos = int(full[0, 2])
    for windows in (3, 7):
        tokens, _ = generate_text(model, variables["params"], prompts, max_new_tokens=7, cache_windows=windows)
        np.testing.assert_array_equal(tokens, full)
        a = generate_text(model, variables["params"], prompts, max_new_tokens=7, eos_id=eos, cache_windows=windows)
        b = generate_text(model, variables["params"], prompts, max_new_tokens=7, eos_id=eos)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="windows"):
        generate_text(model, variables["params"], prompts, max_new_tokens=7, cache_windows=0)


def test_guided_generation_runs_cond_and_uncond_rows_as_one_batch(tiny):
    from jaxunified.sample.strategies import Guidance

    model, variables = tiny
    prompts, uncond = [[5, 17, 99, 4]], [[5, 0, 0, 4]]
    plain, _ = generate_text(model, variables["params"], prompts, max_new_tokens=3)
    same, _ = generate_text(model, variables["params"], prompts, max_new_tokens=3, guidance=Guidance(1.0),
                            uncond_prompts=prompts)
    np.testing.assert_array_equal(plain, same)
    guided, _ = generate_text(model, variables["params"], prompts, max_new_tokens=1, guidance=Guidance(3.0),
                              uncond_prompts=uncond)
    c = model.apply(variables, jnp.asarray(prompts))["logits"][0, -1]
    u = model.apply(variables, jnp.asarray(uncond))["logits"][0, -1]
    assert guided[0, 0] == int(jnp.argmax(u + 3.0 * (c - u)))
