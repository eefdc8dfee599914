"""The PyTorch side of ``python -m jaxunified.bench torch``: the reference implementation of a
config's model, timed the way :class:`jaxunified.bench.StepTimer` times ours, on the same CPU, in
rounds that alternate with ours (``bench.torch_rounds``).

* ``vqgan`` configs: LlamaGen's own ``tokenizer/tokenizer_image/vq_model.py`` (``VQModel``), imported
  from a LlamaGen checkout given as ``reference``; loss = L2 + its codebook terms (the LPIPS and
  PatchGAN terms need torchvision weights on that side, so ``matched_config`` switches them off ours;
  LlamaGen's quantizer also computes its entropy term at ratio 0, a cost ours skips).
* ``siglip`` configs: Hugging Face ``transformers``' ``SiglipModel`` (SDPA attention) built from our
  tower config; loss = the sigmoid loss over the batch.

Both: random weights and inputs of the batch our step gets, Adam(W) with the config's gradient
clipping (no weight EMA on either side), as many torch threads as XLA:CPU has cores, warm-up steps
excluded, then the inference pass (``no_grad``) timed the same way. Settings the reference cannot
express (bf16, remat, frozen towers, other quantizers or losses) are refused rather than compared
unlike for unlike. torch and the reference code are optional imports; nothing here runs unless asked.
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
    """A copy of ``config`` whose train step does the reference step's work: its loss terms, no weight EMA."""
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.optim.ema_decay = None
        if family(cfg) == "vqgan":
            cfg.loss.perceptual_weight = 0.0
            cfg.loss.disc_weight = 0.0
    return cfg


def matched_changes(config) -> str:
    """What :func:`matched_config` changed on our side, for the printout."""
    extra = "LPIPS and PatchGAN off, " if family(config) == "vqgan" else ""
    return f"ours with {extra}no weight EMA (to match the reference)"


def _torch():
    try:
        import torch
    except ImportError as e:  # not a project dependency: only this comparison and .pt imports use it
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
    """``vq_model.ModelArgs`` fields for our ``VQGANConfig``; what ``ModelArgs`` cannot set must be
    LlamaGen's own value."""
    import numpy as np

    fixed = dict(ch=128, num_res_blocks=2, decoder_num_res_blocks=3, attn_num_heads=1, norm_groups=32,
                 in_channels=3, out_channels=3, remat="none")
    fixed_vq = dict(update="grad", restart=False, simvq=False, entropy_temperature=0.01)
    wrong = {k: getattr(cfg, k) for k, v in fixed.items() if getattr(cfg, k) != v}
    wrong.update({f"vq.{k}": getattr(cfg.vq, k) for k, v in fixed_vq.items() if getattr(cfg.vq, k) != v})
    if np.dtype(cfg.dtype) != np.float32:
        wrong["dtype"] = str(np.dtype(cfg.dtype))
    if wrong:
        raise ValueError(f"LlamaGen's VQModel builds {fixed} with a {fixed_vq} float32 quantizer; "
                         f"this config has {wrong}")
    return dict(codebook_size=cfg.vq.codebook_size, codebook_embed_dim=cfg.vq.embed_dim,
                codebook_l2_norm=bool(cfg.vq.l2_norm), commit_loss_beta=float(cfg.vq.beta),
                entropy_loss_ratio=float(cfg.vq.entropy_loss_ratio), encoder_ch_mult=list(cfg.ch_mult),
                decoder_ch_mult=list(cfg.ch_mult), z_channels=cfg.z_channels)


def hf_siglip_config(cfg, image_size: int | None = None) -> dict[str, Any]:
    """``transformers.SiglipConfig`` keyword arguments for our ``SigLIPConfig`` (the reverse of
    ``convert.siglip.config_from_hf`` for the shape-defining fields) at ``image_size`` (default the
    tower's: ours resizes its position table to the data's resolution, HF's is built at it)."""
    import numpy as np

    from jaxunified.convert.siglip import hf_act

    v, t = cfg.vision, cfg.text
    if t is None:
        raise ValueError("bench torch times the two-tower SigLIP step; this config has no text tower")
    if v.pool != "map" or v.stem or v.causal or t.mask_padding:
        raise ValueError("HF SiglipModel has a MAP head, a plain patch conv, bidirectional attention and no "
                         f"padding mask; this config has pool={v.pool!r}, stem={v.stem!r}, causal={v.causal}, "
                         f"mask_padding={t.mask_padding}")
    odd = {}
    for name, tower in (("vision", v), ("text", t)):
        if tower.remat:
            odd[f"{name}.remat"] = tower.remat
        if np.dtype(tower.dtype) != np.float32:
            odd[f"{name}.dtype"] = str(np.dtype(tower.dtype))
    if odd:
        raise ValueError(f"the HF towers run float32 without remat; this config has {odd}")
    return dict(
        vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                           num_attention_heads=v.num_heads, image_size=int(image_size or v.image_size),
                           patch_size=v.patch_size, num_channels=v.num_channels, layer_norm_eps=v.ln_eps,
                           hidden_act=hf_act(v.act)),
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                         num_hidden_layers=t.depth, num_attention_heads=t.num_heads,
                         max_position_embeddings=t.max_len, projection_size=t.proj_dim, layer_norm_eps=t.ln_eps,
                         pad_token_id=t.pad_id, hidden_act=hf_act(t.act)),
        attn_implementation="sdpa")


def _time(fn, steps: int, warmup: int = 0) -> float:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def build(config, reference: str = "", seed: int = 0) -> dict[str, Any]:
    """The reference model of ``config`` at its data batch: ``{"model", "inputs", "loss_fn", "name"}``.
    Raises ImportError / FileNotFoundError / ValueError before anything runs when it cannot be built
    like for like."""
    task = family(config)
    if task == "siglip":
        _check_siglip_run(config)
    vq = load_llamagen_vq(reference) if task == "vqgan" else None  # the checkout is checked before torch loads
    torch = _torch()
    torch.manual_seed(seed)
    b, r = int(config.data.batch_size), int(config.data.resolution)
    if task == "vqgan":
        from jaxunified.train.vqgan import VQGANTask

        model = vq.VQModel(vq.ModelArgs(**llamagen_args(VQGANTask.model_config(config))))
        # LlamaGen registers an nn.Parameter as its usage buffer and overwrites it in place every train
        # step, which autograd refuses on a leaf that requires grad.
        if hasattr(model.quantize, "codebook_used"):
            model.quantize.codebook_used.requires_grad_(False)
        x = torch.rand(b, 3, r, r) * 2 - 1

        def loss_fn(out):
            dec, (vq_loss, commit, entropy, _) = out
            return ((dec - x) ** 2).mean() + sum(t for t in (vq_loss, commit, entropy) if t is not None)

        return dict(model=model, inputs=((x,), {}), loss_fn=loss_fn, name=f"LlamaGen {LLAMAGEN_VQ}")
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"bench torch for siglip configs needs transformers, which did not import: {e}") from e
    from jaxunified.train.siglip import model_config

    hf = transformers.SiglipConfig(**hf_siglip_config(model_config(config), image_size=r))
    model = transformers.SiglipModel(hf)
    ids = torch.randint(0, hf.text_config.vocab_size, (b, int(config.data.text.max_len)))
    labels = 2 * torch.eye(b) - 1

    def loss_fn(out):
        return -torch.nn.functional.logsigmoid(labels * out.logits_per_text).sum() / b

    return dict(model=model, inputs=((), {"pixel_values": torch.rand(b, 3, r, r) * 2 - 1, "input_ids": ids}),
                loss_fn=loss_fn, name=f"transformers {transformers.__version__} SiglipModel")


def _check_siglip_run(config) -> None:
    odd = {}
    if config.loss.kind != "sigmoid":
        odd["loss.kind"] = config.loss.kind
    if int(config.data.text.get("hard_negatives", 0) or 0):
        odd["data.text.hard_negatives"] = config.data.text.hard_negatives
    if tuple(config.model.get("freeze", ()) or ()):
        odd["model.freeze"] = tuple(config.model.freeze)
    if odd:
        raise ValueError(f"the reference step trains both towers on the batch's own captions with the sigmoid "
                         f"loss; this config has {odd}")


class ReferenceTimer:
    """The reference model of ``config`` (``built`` by :func:`build` when given) with its Adam(W)
    step, to be timed in rounds like :class:`jaxunified.bench.StepTimer`. Each call runs on
    ``threads`` torch threads (default: the cores of this process's CPU affinity, the pool XLA:CPU
    sizes itself by) and restores torch's thread count afterwards."""

    def __init__(self, config, reference: str = "", threads: int | None = None, seed: int = 0,
                 built: dict[str, Any] | None = None):
        parts = built or build(config, reference, seed)
        self.torch = torch = _torch()
        self.model, (args, kwargs), loss_fn = parts["model"], parts["inputs"], parts["loss_fn"]
        self.name = parts["name"]
        self.threads = int(threads or len(os.sched_getaffinity(0)))
        clip = config.optim.get("clip_norm")
        opt = (torch.optim.Adam if family(config) == "vqgan" else torch.optim.AdamW)(self.model.parameters(), lr=1e-4)
        model = self.model

        def step():
            loss = loss_fn(model(*args, **kwargs))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
            opt.step()

        def forward():
            with torch.no_grad():
                return model(*args, **kwargs)

        self._step, self._forward = step, forward

    def _timed(self, fn, train: bool, steps: int, warmup: int) -> float:
        before = self.torch.get_num_threads()
        self.torch.set_num_threads(self.threads)
        try:
            self.model.train(train)
            return _time(fn, steps, warmup)
        finally:
            self.torch.set_num_threads(before)

    def step(self, steps: int, warmup: int = 0) -> float:
        """Seconds per train step after ``warmup`` untimed ones."""
        return self._timed(self._step, True, steps, warmup)

    def forward(self, steps: int, warmup: int = 0) -> float:
        """Seconds per inference pass (``no_grad``, eval mode) after ``warmup`` untimed ones."""
        return self._timed(self._forward, False, steps, warmup)

    def info(self) -> dict[str, Any]:
        return {"reference": self.name, "threads": self.threads, "torch": self.torch.__version__,
                "params": int(sum(p.numel() for p in self.model.parameters())), "python": sys.version.split()[0]}


def bench(config, reference: str = "", steps: int = 3, warmup: int = 1, threads: int | None = None,
          seed: int = 0, built: dict[str, Any] | None = None) -> dict[str, Any]:
    """Seconds per train step and per inference pass of the reference model of ``config`` (one round
    of :class:`ReferenceTimer`): ``{"step_seconds", "forward_seconds", "params", "reference", "threads"}``."""
    ref = ReferenceTimer(config, reference, threads, seed, built)
    return {**ref.info(), "step_seconds": ref.step(steps, warmup), "forward_seconds": ref.forward(steps, warmup)}


__all__ = ["ReferenceTimer", "bench", "build", "family", "hf_siglip_config", "llamagen_args", "load_llamagen_vq", "matched_changes", "matched_config"]
