r"""Text-to-image: a LlamaGen-style GPT over a frozen VQ tokenizer's codes, conditioned on a frozen
text encoder's caption token states (the role Flan-T5 plays in LlamaGen), with caption dropout
for classifier-free guidance.

Presets (the argument after the colon):

* ``shapes`` — the built-in pipeline's first images from text, on 32 px shapes (8×8 codes):
      python train.py --config configs/vqgan.py:shapes8 --workdir runs/vqgan_shapes8
      python train.py --config configs/siglip.py:shapes --workdir runs/siglip_shapes
      python train.py --config configs/ar.py:shapes     --workdir runs/ar_shapes
      python eval.py  --config configs/ar.py:shapes     --workdir runs/ar_shapes
  Target: ≤ 20 minutes on 2 CPU cores; shapes-GenEval single object ≥ 0.90, colours ≥ 0.80, overall ≥ 0.50.
  Measured: 19 min 50 s to 27 min 2 s for the train command on 2 cores (1900 steps at 1.8 to
  1.1 steps/s, the machine's speed on five days, after about a minute building the cache of
  simplified codes and caption states; final eval included), 2 min 50 s for eval. eval_test.json
  (1000 test captions, CFG 2, top-k 3, the best of 8 draws per caption by the SigLIP's score): GenEval
  overall 0.54–0.56 — single object 0.95–0.97, two objects 0.34–0.35, counting 0.68–0.69, colours
  0.96–0.98, position 0.11, colour attribution 0.23–0.24; the first draws alone (``plain_*``, what
  ``--config.sample.best_of=1`` gives) 0.40–0.41 overall, single object 0.73–0.80, colours 0.82–0.88.
  Val loss 0.84–0.88, token accuracy 72–73%.
* ``xl`` — LlamaGen's t2i GPT-XL (775M) over VQ-16's 16×16 codes at 256 px, conditioned on a SigLIP2
  So400m/16 text tower's 64 caption states (where LlamaGen reads Flan-T5-XL's 120); bf16, remat, for
  planning a pod run:
      python -m jaxunified.bench aot --config configs/ar.py:xl --topology v5e-64
  Training needs ``--config.data.path`` (WebDataset shards), ``--config.tokenizer.path`` (LlamaGen's
  ``vq_ds16_t2i.pt``), ``--config.text_encoder.path`` (HF SigLIP2 folder) and ``--config.data.text.path``.
* ``tiny`` (also ``runlocal``) — a seconds-long smoke run with an untrained tokenizer and text tower (tests).

Sampling for eval (``sample.*``): CFG scale, temperature, top-k, top-p, LlamaGen's
``cfg_interval``, ``best_of`` (draws per caption, the SigLIP's pick); ``eval.prompts_file`` (one
caption per line) replaces the split's captions.
Any field can be overridden: ``--config.sample.cfg_scale=3``; an unknown key is an error, except in
an ``overrides`` block, which takes any field of its model's dataclass (``--config.model.overrides.dtype=bfloat16``).
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
    c = common.base("ar")
    c.data.eval_batch_size = 250
    c.data.text = common.text(**common.SHAPES_WORDS)  # the text tower's tokenizer, no hard negatives
    # Precomputed codes and caption states of the training split (keyed by the frozen weights).
    c.data.cache_dir = ""
    c.data.build_cache = False

    # The frozen VQ (train/frozen.py): "workdir" (a vqgan run), "llamagen_vq" / "star_vq" (path) or "random".
    c.tokenizer = common.frozen_part("runs/vqgan_shapes8", "shapes-S8")
    # > 0: the GPT trains on simplified codes (quant/simplify.py): background synonyms replaced by the
    # background code wherever the decoded image moves by at most this much (max abs, [-1, 1] pixels).
    c.tokenizer.simplify_tol = 0.0

    # The frozen text encoder: a SigLIP's text tower ("workdir": a siglip run; "hf_siglip"; "random"),
    # or with family "lm" a decoder LM ("workdir": an mllm run's LM; "hf_qwen2"; "star": its base) whose
    # tokenizer data.text must be (the shapes mllm's: tokenizer "shapes_chat").
    c.text_encoder = common.frozen_part("runs/siglip_shapes", "shapes-S", siglip=True)
    c.text_encoder.family = "siglip"
    # Which token states condition the GPT: 0 the tower's output (post-LN); -k the k-th last hidden state
    # (an LM's list, as HF's, ends with the final-normed output: there -1 is 0 and -2 the second-last block's).
    c.text_encoder.select_layer = 0
    # Also the tower's output at its pooled position as one more condition token (SDXL's pooled text embedding).
    c.text_encoder.append_pooled = False

    # The GPT (models/llamagen_gpt.py): a variant plus field overrides; vocabulary, image-token
    # count, condition length and width come from the frozen parts.
    c.model = mlc.ConfigDict()
    c.model.variant = "GPT-B"
    c.model.overrides = mlc.ConfigDict()
    # > 0: that fraction of the teacher-forced input codes are swapped for other codes of the batch
    # (targets unchanged), so training sees the mistakes sampling feeds back.
    c.model.input_noise = 0.0

    c.loss = mlc.ConfigDict()
    c.loss.label_smoothing = 0.0
    # Caption contrast (train/ar.py; shapes captions): negative_rows rows a step, with a hard negative
    # of these kinds, add negative_weight · softplus(NLL(true caption) − NLL(negative)).
    c.loss.negative_kinds = ()
    c.loss.negative_rows = 0
    c.loss.negative_weight = 1.0

    # LlamaGen's t2i recipe: AdamW lr 1e-4, wd 0.05, betas (0.9, 0.95), clip 1.0.
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.05
    c.optim.clip_norm = 1.0

    c.sample = mlc.ConfigDict()
    c.sample.cfg_scale = 7.5
    c.sample.cfg_interval = -1
    c.sample.temperature = 1.0
    c.sample.top_k = 1000
    c.sample.top_p = 1.0
    c.sample.seed = 0
    # > 1: draw this many samples per caption and keep the one the frozen SigLIP (the text encoder's
    # two towers) scores highest — DALL·E's CLIP reranking; eval then also reports the first draws (plain_*).
    c.sample.best_of = 1

    c.eval.num_samples = 0  # captions sampled at eval (0 = as many as eval.num_examples)
    c.eval.prompts_file = ""
    c.eval.grid_per_category = 16
    # Shapes captions: how often the GPT's likelihood prefers the true caption to a one-edit hard
    # negative of each kind (data.shapes.NEGATIVE_KINDS; eval_*.json "prefers_caption_over_<kind>").
    c.eval.negative_kinds = ()
    return c


def get_config(arg: str = "shapes") -> mlc.ConfigDict:
    c = _base()
    if arg == "shapes":
        c.total_steps = 1900
        c.checkpoint_every = 500
        c.data.batch_size = 64
        c.data.cache_dir = "~/.cache/jaxunified/ar"
        c.data.build_cache = True
        c.tokenizer.simplify_tol = 0.2
        # The shapes tower pools its last position, so its output layer is trained there only.
        c.text_encoder.select_layer = -2
        # cond_rope "zero" and no caption_layers are LlamaGen's (condition keys carry no content score;
        # caption tokens are embedded one by one).
        c.model.overrides = mlc.ConfigDict(dict(dim=128, n_layer=6, n_head=4, multiple_of=64, class_dropout_prob=0.1,
                                                token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
                                                cond_rope="zero", caption_layers=0))
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 100
        c.optim.weight_decay = 0.05
        c.sample.cfg_scale = 2.0
        c.sample.top_k = 3
        c.sample.temperature = 1.0
        c.sample.best_of = 8
        c.eval.num_examples = 1000
        c.eval.negative_kinds = common.NEGATIVE_KINDS
        # YNNPACK matmuls: 1.4× the train step at width 128 on 2 CPU cores (no gain at ViT-B widths)
        c.xla_cpu_options = mlc.ConfigDict({"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"})
    elif arg == "xl":
        c.total_steps = 400_000
        c.log_every = 100
        c.checkpoint_every = 5_000
        c.data.name = "webdataset"
        c.data.resolution = 256
        c.data.batch_size = 256
        c.data.text = common.text(negatives=False, **common.SIGLIP2_TEXT)
        c.tokenizer.update(kind="llamagen_vq", workdir="", variant="VQ-16")
        c.text_encoder.update(kind="hf_siglip", workdir="", variant="So400m/16", image_size=256)
        c.model.variant = "GPT-XL"
        c.model.overrides = mlc.ConfigDict(dict(dtype="bfloat16", scan_layers=True, remat="full"))
        c.eval.num_examples = 1000
    elif arg in ("tiny", "runlocal"):
        common.smoke(c)
        c.tokenizer.kind = "random"
        c.tokenizer.overrides = mlc.ConfigDict(dict(ch=8, ch_mult=(1, 2, 2), z_channels=8, norm_groups=4,
                                                    codebook_size=32))
        c.text_encoder.kind = "random"
        c.text_encoder.vision = mlc.ConfigDict(dict(width=16, depth=1, mlp_dim=32, num_heads=2))
        c.text_encoder.text = mlc.ConfigDict(dict(width=16, depth=1, mlp_dim=32, num_heads=2, proj_dim=16))
        c.model.overrides = mlc.ConfigDict(dict(dim=32, n_layer=2, n_head=2, multiple_of=16))
        c.optim.lr = 1e-3
        c.sample.top_k = 0
        c.sample.cfg_scale = 2.0
        c.eval.num_examples = 16
        c.eval.grid_per_category = 4
    else:
        raise ValueError(f"unknown ar preset {arg!r}; use shapes, xl or tiny")
    return c
