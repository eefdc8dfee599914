"""Task ``siglip``: two-tower image–text training (sigmoid or softmax loss) and its evaluation.

From scratch on shapes captions (the built-in pipeline's teacher) or fine-tuned from a converted
HF checkpoint (``model.init_from``: a folder with config.json + safetensors). In the per-device
step form the loss exchanges embeddings with named-axis collectives (``losses.contrastive``);
in the global form XLA inserts them. ``model.freeze`` lists top-level parts kept fixed
("text" gives LiT-style locked-text tuning); they carry no optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.convert.common import read_state_dict
from jaxunified.convert.siglip import config_from_hf, convert_state_dict
from jaxunified.data.pipeline import as_float_images
from jaxunified.eval.image_text import encoder_pair, evaluate_image_text
from jaxunified.losses import contrastive
from jaxunified.models import siglip as siglip_lib
from jaxunified.train import frozen as frozen_parts
from jaxunified.train import planning
from jaxunified.train.optim import FROZEN
from jaxunified.train.task import Task, eval_params, kwargs


def model_config(cfg) -> siglip_lib.SigLIPConfig:
    """The SigLIPConfig a run's ``config.model`` describes (variant + tower overrides, or init_from's config.json)."""
    m = cfg.model
    vision, text = kwargs(m.get("vision")), kwargs(m.get("text"))
    init_from = m.get("init_from") or ""
    if init_from and not planning.is_shapes_only():  # a plan takes the shapes of model.variant
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


class SigLIPTask(Task):
    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.model_cfg = model_config(config)
        self.model = siglip_lib.SigLIP(self.model_cfg)
        self.text_tokenizer = tok = frozen_parts.text_tokenizer(config.data.text)
        if tok.max_len > self.model_cfg.text.max_len:
            raise ValueError(
                f"data.text.max_len={tok.max_len} exceeds the text tower's max_len {self.model_cfg.text.max_len}"
            )
        if tok.vocab_size > self.model_cfg.text.vocab_size:
            raise ValueError(
                f"the {type(tok).__name__} has {tok.vocab_size} ids but the text tower "
                f"only {self.model_cfg.text.vocab_size}; set model.text.vocab_size"
            )

    @classmethod
    def model_config(cls, config) -> siglip_lib.SigLIPConfig:
        return model_config(config)

    def export(self, params, collections):
        return self.model, {"params": params["siglip"]}

    def dummy_batch(self):
        r = int(self.config.data.resolution)
        b = int(self.config.data.batch_size)
        batch = {"image": np.zeros((b, r, r, 3), np.uint8), "tokens": np.zeros((b, self.text_tokenizer.max_len), np.int32)}
        k = int(self.config.data.text.get("hard_negatives", 0) or 0)
        if k:
            batch["neg_tokens"] = np.zeros((b, k, self.text_tokenizer.max_len), np.int32)
        return batch

    def init_variables(self, rng, batch):
        init_from = self.config.model.get("init_from") or ""
        if init_from and not planning.is_shapes_only():
            params = convert_state_dict(read_state_dict(init_from), self.model_cfg)["params"]
            return {"siglip": params}, {}
        x = as_float_images(jnp.asarray(batch["image"][:1]))
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

        return self.model.apply({"params": params}, as_float_images(images), tokens, method=fn)

    def forward(self, params, collections, batch):
        return self.embed(params["siglip"], batch["image"], batch["tokens"])

    def grad_fn(self, params, collections, batch, rng, step, axis_name=None):
        kind = self.config.loss.kind

        tokens, negatives = batch["tokens"], batch.get("neg_tokens")
        if negatives is not None:  # one text-tower call for captions and their hard negatives
            tokens = jnp.concatenate([tokens, negatives.reshape(-1, negatives.shape[-1])])

        def loss_fn(p):
            zimg, ztxt = self.embed(p, batch["image"], tokens)
            b = zimg.shape[0]
            return contrastive.contrastive_loss(kind, zimg, ztxt[:b], p, axis_name=axis_name,
                                                negatives=None if negatives is None else ztxt[b:])

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params["siglip"])
        metrics = {**metrics, "loss": loss}
        return {"siglip": grads}, collections, metrics

    # ---- evaluation ----
    def encoders(self, params):
        def image(p, batch):
            return self.model.apply({"params": p}, as_float_images(batch["image"]),
                                    method=siglip_lib.SigLIP.encode_image)

        def text(p, tokens):
            return self.model.apply({"params": p}, tokens, method=siglip_lib.SigLIP.encode_text)

        return encoder_pair(image, text, params)

    def evaluate(self, state, split, workdir, step) -> dict:
        return evaluate_image_text(self.encoders(eval_params(state)["siglip"]), self.text_tokenizer, self.config.data,
                                   split, self.mesh, num_examples=self.eval_num_examples())
