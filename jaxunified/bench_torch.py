"""The PyTorch side of ``python -m jaxunified.bench torch``: the reference implementation of a
config's model, timed the way :func:`jaxunified.bench.bench_step` times ours, on the same CPU.

* ``vqgan`` configs: LlamaGen's own ``tokenizer/tokenizer_image/vq_model.py`` (``VQModel``), imported
  from a LlamaGen checkout given as ``reference``; loss = L2 + its codebook terms (the LPIPS and
  PatchGAN terms need torchvision weights on that side, so ``matched_config`` switches them off ours).
* ``siglip`` configs: Hugging Face ``transformers``' ``SiglipModel`` (SDPA attention) built from our
  tower config; loss = the sigmoid loss over the batch.

Both: random weights and inputs of the config's shapes, Adam(W), ``torch.set_num_threads`` = the
cores XLA:CPU uses, warm-up steps excluded, then the inference pass (``no_grad``) timed the same way.
torch and the reference code are optional imports; nothing here runs unless asked.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import time
from typing import Any

LLAMAGEN_VQ = pathlib.Path("tokenizer/tokenizer_image/vq_model.py")


def family(config) -> str:
    """The task of ``config`` this module has a reference for ("vqgan" or "siglip")."""
    task = str(config.get("task", ""))
    if task not in ("vqgan", "siglip"):
        raise ValueError(f"no PyTorch reference for task {task!r}; bench torch covers vqgan and siglip configs")
    return task


def matched_config(config):
    """A copy of ``config`` whose train step has the reference step's loss terms."""
    cfg = config.copy_and_resolve_references()
    if family(cfg) == "vqgan":
        with cfg.unlocked():
            cfg.loss.perceptual_weight = 0.0
            cfg.loss.disc_weight = 0.0
    return cfg


def _torch():
    try:
        import torch
    except ImportError as e:  # optional dependency
        raise ImportError("bench torch needs PyTorch: pip install torch==2.13.0") from e
    return torch


def load_llamagen_vq(reference: str | os.PathLike):
    """LlamaGen's ``vq_model`` module from a checkout of FoundationVision/LlamaGen."""
    path = pathlib.Path(reference).expanduser() / LLAMAGEN_VQ
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --reference must be a checkout of FoundationVision/LlamaGen")
    spec = importlib.util.spec_from_file_location("llamagen_vq_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llamagen_args(cfg) -> dict[str, Any]:
    """``vq_model.ModelArgs`` fields for our ``VQGANConfig``; the reference fixes the rest."""
    fixed = dict(ch=128, num_res_blocks=2, decoder_num_res_blocks=3, attn_num_heads=1, norm_groups=32,
                 in_channels=3, out_channels=3)
    wrong = {k: getattr(cfg, k) for k, v in fixed.items() if getattr(cfg, k) != v}
    if wrong:
        raise ValueError(f"LlamaGen's VQModel builds {fixed}; this config has {wrong}")
    return dict(codebook_size=cfg.vq.codebook_size, codebook_embed_dim=cfg.vq.embed_dim,
                codebook_l2_norm=bool(cfg.vq.l2_norm), encoder_ch_mult=list(cfg.ch_mult),
                decoder_ch_mult=list(cfg.ch_mult), z_channels=cfg.z_channels)


def hf_siglip_config(cfg) -> dict[str, Any]:
    """``transformers.SiglipConfig`` keyword arguments for our ``SigLIPConfig`` (the reverse of
    ``train.siglip.config_from_hf`` for the shape-defining fields)."""
    v, t = cfg.vision, cfg.text
    if t is None:
        raise ValueError("bench torch times the two-tower SigLIP step; this config has no text tower")
    if v.pool != "map" or v.stem or v.causal:
        raise ValueError("HF SiglipModel has a MAP head, a plain patch conv and bidirectional attention; "
                         f"this config has pool={v.pool!r}, stem={v.stem!r}, causal={v.causal}")
    return dict(
        vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                           num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
                           num_channels=v.num_channels, layer_norm_eps=v.ln_eps),
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                         num_hidden_layers=t.depth, num_attention_heads=t.num_heads,
                         max_position_embeddings=t.max_len, projection_size=t.proj_dim, layer_norm_eps=t.ln_eps,
                         pad_token_id=t.pad_id))


def _time(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def bench(config, reference: str = "", steps: int = 3, warmup: int = 1, threads: int | None = None,
          seed: int = 0) -> dict[str, Any]:
    """Seconds per train step and per inference pass of the reference model of ``config`` at its
    ``data.batch_size``: ``{"step_seconds", "forward_seconds", "params", "reference", "threads"}``."""
    torch = _torch()
    task = family(config)
    threads = int(threads or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    b, r = int(config.data.batch_size), int(config.data.resolution)
    if task == "vqgan":
        from jaxunified.train.vqgan import VQGANTask

        vq = load_llamagen_vq(reference)
        model = vq.VQModel(vq.ModelArgs(**llamagen_args(VQGANTask.model_config(config))))
        if hasattr(model.quantize, "codebook_used"):  # a usage buffer it updates in place, not a weight
            model.quantize.codebook_used.requires_grad_(False)
        x = torch.rand(b, 3, r, r) * 2 - 1
        inputs, name = (x,), f"LlamaGen {LLAMAGEN_VQ}"

        def loss_fn(out):
            dec, (vq_loss, commit, entropy, _) = out
            return ((dec - x) ** 2).mean() + sum(t for t in (vq_loss, commit, entropy) if t is not None)

        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    else:
        try:
            import transformers
        except ImportError as e:
            raise ImportError("bench torch for siglip configs needs transformers (pip install transformers)") from e
        from jaxunified.train.siglip import model_config

        hf = transformers.SiglipConfig(**hf_siglip_config(model_config(config)))
        hf._attn_implementation = "sdpa"
        model = transformers.SiglipModel(hf)
        t = hf.text_config
        inputs = {"pixel_values": torch.rand(b, 3, r, r) * 2 - 1,
                  "input_ids": torch.randint(0, t.vocab_size, (b, t.max_position_embeddings))}
        name = f"transformers {transformers.__version__} SiglipModel"
        labels = 2 * torch.eye(b) - 1

        def loss_fn(out):
            return -torch.nn.functional.logsigmoid(labels * out.logits_per_text).sum() / b

        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run():
        return model(*inputs) if isinstance(inputs, tuple) else model(**inputs)

    def step():
        loss = loss_fn(run())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    step_s = _time(step, steps, warmup)
    model.eval()
    with torch.no_grad():
        forward_s = _time(run, steps, warmup)
    return {"reference": name, "step_seconds": step_s, "forward_seconds": forward_s, "threads": threads,
            "params": int(sum(p.numel() for p in model.parameters())), "torch": torch.__version__,
            "python": sys.version.split()[0]}


__all__ = ["bench", "family", "hf_siglip_config", "llamagen_args", "load_llamagen_vq", "matched_config"]
