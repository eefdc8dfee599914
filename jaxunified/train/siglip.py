"""Task ``siglip``: two-tower image–text training (sigmoid or softmax loss) and its evaluation.

From scratch on shapes captions (the built-in pipeline's teacher) or fine-tuned from a converted
HF checkpoint (``model.init_from``: a folder with config.json + safetensors). In the per-device
step form the loss exchanges embeddings with named-axis collectives (``losses.contrastive``);
in the global form XLA inserts them. ``model.freeze`` lists top-level parts kept fixed
("text" gives LiT-style locked-text tuning); they carry no optimizer state.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.data.text import make_tokenizer
from jaxunified.losses import contrastive
from jaxunified.models import siglip as siglip_lib
from jaxunified.train.optim import FROZEN
from jaxunified.train.task import Task

log = logging.getLogger(__name__)


def _plain(d) -> dict:
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d or {})
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}


def model_config(cfg) -> siglip_lib.SigLIPConfig:
    """The SigLIPConfig a run's ``config.model`` describes (variant + tower overrides, or init_from's config.json)."""
    m = cfg.model
    vision, text = _plain(m.get("vision")), _plain(m.get("text"))
    if "dtype" in vision:
        vision["dtype"] = jnp.dtype(vision["dtype"])
    if "dtype" in text:
        text["dtype"] = jnp.dtype(text["dtype"])
    init_from = m.get("init_from") or ""
    if init_from:
        import json
        import pathlib

        from jaxunified.convert.siglip import config_from_hf

        hf = json.loads((pathlib.Path(init_from).expanduser() / "config.json").read_text())
        mc = config_from_hf(hf, vision=vision, text=text)
    else:
        mc = siglip_lib.get_config(m.variant, image_size=m.get("image_size") or None, vision=vision, text=text)
    loss = cfg.loss.kind
    if loss == "softmax" and not m.get("init_from"):  # CLIP's temperature 0.07, no bias
        mc = dataclasses.replace(mc, init_logit_scale=float(np.log(1 / 0.07)), init_logit_bias=0.0)
    if m.get("init_logit_scale") is not None and not m.get("init_from"):
        mc = dataclasses.replace(mc, init_logit_scale=float(m.init_logit_scale))
    return mc


def siglip_loss(kind: str, zimg, ztxt, params, axis_name=None, negatives=None):
    """The configured contrastive loss on raw (unnormalised) embeddings; returns (loss, metrics).

    ``negatives``: embeddings of hard-negative captions [M, D] (``data.text.hard_negatives``)."""
    if kind == "sigmoid":
        return contrastive.sigmoid_loss(zimg, ztxt, params["logit_scale"], params["logit_bias"],
                                        negatives=negatives, axis_name=axis_name)
    if kind == "softmax":
        return contrastive.clip_loss(zimg, ztxt, params["logit_scale"], negatives=negatives, axis_name=axis_name)
    raise ValueError(f"loss.kind={kind!r}; use 'sigmoid' or 'softmax'")


class SigLIPTask(Task):
    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.model_cfg = model_config(config)
        self.model = siglip_lib.SigLIP(self.model_cfg)
        self.tokenizer = make_tokenizer(config.data.text)
        if self.tokenizer.max_len > self.model_cfg.text.max_len:
            raise ValueError(
                f"data.text.max_len={self.tokenizer.max_len} exceeds the text tower's max_len {self.model_cfg.text.max_len}"
            )
        if self.tokenizer.vocab_size > self.model_cfg.text.vocab_size:
            raise ValueError(
                f"the {type(self.tokenizer).__name__} has {self.tokenizer.vocab_size} ids but the text tower "
                f"only {self.model_cfg.text.vocab_size}; set model.text.vocab_size"
            )

    def dummy_batch(self):
        r = int(self.config.data.resolution)
        b = int(self.config.data.batch_size)
        batch = {"image": np.zeros((b, r, r, 3), np.float32), "tokens": np.zeros((b, self.tokenizer.max_len), np.int32)}
        k = int(self.config.data.text.get("hard_negatives", 0) or 0)
        if k:
            batch["neg_tokens"] = np.zeros((b, k, self.tokenizer.max_len), np.int32)
        return batch

    def init_variables(self, rng, batch):
        init_from = self.config.model.get("init_from") or ""
        if init_from:
            from jaxunified.convert.siglip import convert_state_dict
            from jaxunified.convert.common import read_state_dict

            params = convert_state_dict(read_state_dict(init_from), self.model_cfg)["params"]
            return {"siglip": params}, {}
        x = jnp.asarray(batch["image"][:1])
        t = jnp.asarray(batch["tokens"][:1])
        return {"siglip": self.model.init(rng, x, t)["params"]}, {}

    def _lr_mult(self) -> dict[str, float]:
        mult = self.config.optim.get("lr_mult") or {}
        mult = mult.to_dict() if hasattr(mult, "to_dict") else dict(mult)
        bad = sorted(set(mult) - {"vision", "text"})
        if bad:
            raise ValueError(f"optim.lr_mult keys {bad}: only 'vision' and 'text' take a multiplier")
        return {k: float(v) for k, v in mult.items()}

    def param_labels(self, params):
        frozen = set(self.config.model.get("freeze") or ())
        mult = self._lr_mult()

        def group(k):
            return FROZEN if k in frozen else (k if k in mult else "model")

        return {
            "siglip": {k: jax.tree.map(lambda _, k=k: group(k), v) for k, v in params["siglip"].items()}
        }

    def group_lr(self):
        """``optim.lr_mult`` ({"vision" | "text": factor}) scales a tower's peak learning rate."""
        return {k: float(self.config.optim.lr) * m for k, m in self._lr_mult().items()}

    def embed(self, params, images, tokens):
        def fn(m, x, t):
            return m.encode_image(x, normalize=False), m.encode_text(t, normalize=False)

        return self.model.apply({"params": params}, images, tokens, method=fn)

    def grad_fn(self, params, collections, batch, rng, step, axis_name=None):
        kind = self.config.loss.kind

        tokens, negatives = batch["tokens"], batch.get("neg_tokens")
        if negatives is not None:  # one text-tower call for captions and their hard negatives
            tokens = jnp.concatenate([tokens, negatives.reshape(-1, negatives.shape[-1])])

        def loss_fn(p):
            zimg, ztxt = self.embed(p, batch["image"], tokens)
            b = zimg.shape[0]
            return siglip_loss(kind, zimg, ztxt[:b], p, axis_name, negatives=None if negatives is None else ztxt[b:])

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params["siglip"])
        metrics = {**metrics, "loss": loss}
        return {"siglip": grads}, collections, metrics

    # ---- evaluation ----
    def encoders(self, params):
        @jax.jit
        def enc_img(batch):
            return self.model.apply({"params": params}, batch["image"], method=siglip_lib.SigLIP.encode_image)

        @jax.jit
        def enc_txt(tokens):
            return self.model.apply({"params": params}, tokens, method=siglip_lib.SigLIP.encode_text)

        return enc_img, enc_txt

    def evaluate(self, state, split, workdir, step) -> dict:
        from jaxunified.eval.image_text import evaluate_image_text

        params = (state.ema_params or state.params)["siglip"]
        enc_img, enc_txt = self.encoders(params)
        limit = int(self.config.eval.get("num_examples", 0)) or None
        return evaluate_image_text(enc_img, enc_txt, self.tokenizer, self.config.data, split, self.mesh,
                                   num_examples=limit)


def load_siglip_from_workdir(workdir, config=None) -> tuple[siglip_lib.SigLIPConfig, Any]:
    """A trained ``siglip`` run's model config and parameters (EMA when kept), host-resident.

    ``config``: the run's config (a ConfigDict or a spec like ``"configs/siglip.py:shapes"``);
    default the ``config.json`` the run wrote.
    """
    from jaxunified.train.restore import load_config, read_run_config, restore_params

    if config is None:
        config = read_run_config(workdir)
    elif isinstance(config, str):
        config = load_config(config)
    params, _ = restore_params(workdir, config)
    return model_config(config), params["siglip"]
