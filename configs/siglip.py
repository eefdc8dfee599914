r"""SigLIP / SigLIP2 two-tower training (sigmoid loss by default, softmax CLIP loss as an option).

Presets (the argument after the colon):

* ``shapes`` — the built-in pipeline's teacher: both towers from scratch on 32 px shapes captions:
      python train.py --config configs/siglip.py:shapes --workdir runs/siglip_shapes
      python eval.py  --config configs/siglip.py:shapes --workdir runs/siglip_shapes
  6 min 39 s on 2 CPU cores (1200 steps at 3.2 steps/s, with compile and the final eval; target < 10
  minutes). Final eval: zero-shot colour 100%, shape 94.0%, count 83.6% (CLIP prompt-ensemble
  scoring: 99.5 / 63.8 / 42.8%), text→image R@1 68.7% (R@5 95.1%), image→text R@1 65.9%.
* ``tiny`` (also ``runlocal``) — seconds-long smoke run used by the tests.
* ``B16`` — SigLIP-B/16 at 224 px with 64 text tokens (byte tokenizer), batch 8, sigmoid loss,
  from scratch: the CPU train-step benchmark against the PyTorch towers:
      python -m jaxunified.bench torch --config configs/siglip.py:B16 --steps 5
* ``finetune`` — continue training a converted HF checkpoint on image–caption shards:
      python train.py --config configs/siglip.py:finetune --workdir runs/siglip_finetune \
          --config.model.init_from=<folder with config.json + model.safetensors> \
          --config.data.path=<folder or WebDataset shards> --config.data.text.path=<SentencePiece .model>
  ``--config.model.freeze='("text",)'`` locks the text tower (LiT).

Any field can be overridden: ``--config.loss.kind=softmax``; an unknown key is an error.
"""

import importlib.util
import pathlib

import ml_collections as mlc

# Executed by path (config_flags, runs.load_config): load the shared base beside this file the same way.
_spec = importlib.util.spec_from_file_location("_jaxunified_config_common",
                                               pathlib.Path(__file__).resolve().with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _base() -> mlc.ConfigDict:
    c = common.base("siglip")  # step_form "per_device": the loss's shard_map form
    c.data.eval_batch_size = 200
    c.data.text = common.text()

    c.model = mlc.ConfigDict()
    c.model.variant = "shapes-S"
    c.model.image_size = 0  # 0 = the variant's default
    c.model.init_from = ""
    # Log of the initial logit scale (from scratch); None = the loss's default (sigmoid: ln 10,
    # softmax: CLIP's ln(1 / 0.07)).
    c.model.init_logit_scale = common.optional(float)
    c.model.freeze = ()
    # Tower field overrides (VisionConfig/TextConfig), e.g. dict(scan=True, remat=True, dtype="bfloat16").
    c.model.vision = mlc.ConfigDict()
    c.model.text = mlc.ConfigDict()

    c.loss = mlc.ConfigDict()
    c.loss.kind = "sigmoid"  # "sigmoid" (SigLIP) | "softmax" (CLIP, learnable scale clamped at ln 100)

    c.optim.warmup_steps = 50
    c.optim.lr_mult = mlc.ConfigDict()  # per-tower peak-lr factors, e.g. {"text": 0.1}
    return c


def get_config(arg: str = "shapes") -> mlc.ConfigDict:
    c = _base()
    if arg == "shapes":
        # Softmax loss, a conv stem, one token per word, shape-swapped hard-negative captions, masked
        # pad keys and a 5× lower text learning rate.
        c.total_steps = 1200
        c.checkpoint_every = 400
        c.data.batch_size = 64
        c.data.text = common.shapes_text()
        c.loss.kind = "softmax"
        c.optim.lr = 2e-3
        c.optim.warmup_steps = 100
        c.optim.lr_mult = mlc.ConfigDict({"text": 0.2})
        c.model.text = mlc.ConfigDict(dict(depth=2, max_len=16, mask_padding=True))
        c.model.vision = mlc.ConfigDict(dict(stem=((32, 1), (64, 2))))
    elif arg in ("tiny", "runlocal"):
        common.smoke(c)
        c.model.vision = mlc.ConfigDict(dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8))
        c.model.text = mlc.ConfigDict(dict(width=32, depth=1, mlp_dim=64, num_heads=2, proj_dim=32))
    elif arg == "B16":
        c.data.resolution = 224
        c.data.batch_size = 8
        c.data.text.max_len = 64
        c.model.variant = "B/16"
    elif arg == "finetune":
        c.total_steps = 10_000
        c.log_every = 100
        c.checkpoint_every = 1000
        c.data.name = "webdataset"
        c.data.resolution = 384
        c.data.batch_size = 1024
        c.data.worker_count = 8
        c.data.text.update(common.SIGLIP2_TEXT)
        c.model.variant = "So400m/16"
        c.model.vision = mlc.ConfigDict(dict(scan=True, remat=True))
        c.model.text = mlc.ConfigDict(dict(scan=True, remat=True))
        c.optim.lr = 1e-5
        c.optim.warmup_steps = 500
        c.eval.num_examples = 5000
    else:
        raise ValueError(f"unknown siglip preset {arg!r}; use shapes, tiny, B16 or finetune")
    return c
