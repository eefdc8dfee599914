"""``bench torch``: the PyTorch reference side of the CPU comparison (config mapping, loading the
reference code from a checkout, the timed step) — with a stand-in LlamaGen checkout (the tests do
not download the reference code)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from jaxunified import bench_torch
from jaxunified.train.runs import load_config
from jaxunified.train.siglip import model_config as siglip_model_config
from jaxunified.train.vqgan import VQGANTask

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The interface bench_torch uses of LlamaGen's vq_model.py: ModelArgs(**fields), VQModel(args) whose
# forward returns (dec, (vq_loss, commit_loss, entropy_loss, usage)) and whose quantizer keeps a
# codebook_used Parameter it writes in place.
FAKE_VQ_MODEL = textwrap.dedent('''
    import dataclasses, torch, torch.nn as nn

    @dataclasses.dataclass
    class ModelArgs:
        codebook_size: int = 16384
        codebook_embed_dim: int = 8
        codebook_l2_norm: bool = True
        commit_loss_beta: float = 0.25
        entropy_loss_ratio: float = 0.0
        encoder_ch_mult: list = None
        decoder_ch_mult: list = None
        z_channels: int = 256

    class Quantizer(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("codebook_used", nn.Parameter(torch.zeros(4)))  # as LlamaGen does

    class VQModel(nn.Module):
        def __init__(self, args):
            super().__init__()
            # what bench_torch.llamagen_args gives for VQ-16
            assert (args.encoder_ch_mult, args.z_channels, args.codebook_embed_dim) == ([1, 1, 2, 2, 4], 256, 8)
            assert (args.commit_loss_beta, args.entropy_loss_ratio) == (0.25, 0.0)
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.quantize = Quantizer()

        def forward(self, x):
            if self.training:
                self.quantize.codebook_used[:-1] = self.quantize.codebook_used[1:].clone()
            dec = self.conv(x)
            return dec, (dec.square().mean(), 0.25 * dec.abs().mean(), 0.0 * dec.mean(), 0.0)
''')


def _vq16(**data):
    c = load_config(str(ROOT / "configs/vqgan.py:imagenet"))
    with c.unlocked():
        c.data.update(data)
    return c


def _checkout(tmp_path) -> pathlib.Path:
    path = tmp_path / "LlamaGen" / bench_torch.LLAMAGEN_VQ
    path.parent.mkdir(parents=True)
    path.write_text(FAKE_VQ_MODEL)
    return tmp_path / "LlamaGen"


def test_llamagen_args_are_vq16s_and_other_shapes_are_refused():
    args = bench_torch.llamagen_args(VQGANTask.model_config(_vq16()))
    assert args == dict(codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True, commit_loss_beta=0.25,
                        entropy_loss_ratio=0.0, encoder_ch_mult=[1, 1, 2, 2, 4], decoder_ch_mult=[1, 1, 2, 2, 4],
                        z_channels=256)
    tiny = load_config(str(ROOT / "configs/vqgan.py:tiny"))
    with pytest.raises(ValueError, match="LlamaGen's VQModel builds"):
        bench_torch.llamagen_args(VQGANTask.model_config(tiny))
    bf16 = _vq16()
    with bf16.unlocked():
        bf16.model.overrides = {"dtype": "bfloat16"}
    with pytest.raises(ValueError, match="'dtype': 'bfloat16'"):
        bench_torch.llamagen_args(VQGANTask.model_config(bf16))


def test_hf_siglip_config_has_our_tower_shapes():
    hf = bench_torch.hf_siglip_config(siglip_model_config(load_config(str(ROOT / "configs/siglip.py:B16"))))
    v, t = hf["vision_config"], hf["text_config"]
    assert (v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"], v["num_attention_heads"]) == (768, 3072, 12, 12)
    assert (v["image_size"], v["patch_size"]) == (224, 16)
    assert (t["hidden_size"], t["num_hidden_layers"], t["max_position_embeddings"], t["vocab_size"]) == (768, 12, 64, 32000)
    assert v["hidden_act"] == t["hidden_act"] == "gelu_pytorch_tanh" and hf["attn_implementation"] == "sdpa"


def test_siglip_runs_the_reference_cannot_match_are_refused(tmp_path):
    for key, value in (("loss.kind", "softmax"), ("model.freeze", ("text",))):
        c = load_config(str(ROOT / "configs/siglip.py:B16"))
        with c.unlocked():
            node, leaf = c, key.split(".")
            for k in leaf[:-1]:
                node = node[k]
            node[leaf[-1]] = value
        with pytest.raises(ValueError, match=key):
            bench_torch.build(c)


def test_reference_step_and_forward_are_timed_from_the_checkout(tmp_path):
    pytest.importorskip("torch")
    torch = pytest.importorskip("torch")
    cfg = bench_torch.matched_config(_vq16(resolution=8, batch_size=2))
    threads = torch.get_num_threads()
    r = bench_torch.bench(cfg, _checkout(tmp_path), steps=2, warmup=1, threads=1)
    assert r["step_seconds"] > 0 and r["forward_seconds"] > 0 and r["threads"] == 1
    assert r["params"] == 3 * 3 * 9 + 3  # the stand-in's conv: the usage buffer is not a weight
    assert torch.get_num_threads() == threads  # restored for the rest of the process


def test_our_side_drops_the_terms_the_reference_lacks():
    cfg = _vq16()
    ours = bench_torch.matched_config(cfg)
    assert (ours.loss.perceptual_weight, ours.loss.disc_weight, ours.optim.ema_decay) == (0.0, 0.0, None)
    assert cfg.loss.disc_weight > 0 and cfg.optim.ema_decay == 0.9999  # the caller's config is left alone
    assert "LPIPS and PatchGAN off" in bench_torch.matched_changes(cfg)


def test_a_missing_checkout_or_an_uncovered_task_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkout of FoundationVision/LlamaGen"):
        bench_torch.load_llamagen_vq(tmp_path)
    with pytest.raises(ValueError, match="no PyTorch reference for task 'ar'"):
        bench_torch.family(load_config(str(ROOT / "configs/ar.py:tiny")))


def test_cli_reports_a_missing_checkout(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "jaxunified.bench", "torch", "--config", "configs/vqgan.py:imagenet",
                        "--batch_size", "1", f"--reference={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0
    assert "error:" in p.stderr and "vq_model.py not found" in p.stderr, p.stderr[-2000:]


def test_rounds_alternate_the_two_sides_and_report_medians():
    from jaxunified import bench

    calls = []

    class Side:
        def __init__(self, name, step_s, forward_s):
            self.name, self.step_s, self.forward_s = name, iter(step_s), iter(forward_s)

        def step(self, steps, warmup=0):
            calls.append((self.name, "step", steps))
            return next(self.step_s)

        def forward(self, steps, warmup=0):
            calls.append((self.name, "forward", steps))
            return next(self.forward_s)

        def result(self, step_s, steps, forward_s, peak=None, name=""):
            return step_s, steps, forward_s

    ours = Side("ours", [None, 1.0, 3.0, 2.0], [0.5, 0.25, 1.0])  # its forward warms itself up
    ref = Side("torch", [None, 2.0, 9.0, 4.0], [None, 1.0, 1.0, 1.0])  # first values: the warm-up calls
    r, rounds = bench.torch_rounds(ours, ref, rounds=3, steps=2, warmup=1)
    assert [sorted(x) for x in rounds] == [sorted(rounds[0])] * 3
    assert calls[:3] == [("ours", "step", 1), ("torch", "step", 1), ("torch", "forward", 1)]
    ab = [("ours", "step", 2), ("torch", "step", 2), ("ours", "forward", 2), ("torch", "forward", 2)]
    ba = [ab[1], ab[0], ab[3], ab[2]]  # the side that goes first swaps every round
    assert calls[3:] == ab + ba + ab
    assert r == (2.0, 2, 0.5)  # our medians
    assert [x["ratio_step"] for x in rounds] == [2.0, 3.0, 2.0]
    assert [x["ratio_forward"] for x in rounds] == [2.0, 4.0, 1.0]
