r"""Understanding: a decoder LM reads a shapes image as tokens (a frozen vision model through a
trainable projector), then a question, and answers in words (task ``mllm``; data/shapes_chat.py).

Presets (the argument after the colon):

* ``shapes`` — SigLIP patch states as the visual input (the LLaVA baseline):
      python train.py --config configs/siglip.py:shapes --workdir runs/siglip_shapes
      python train.py --config configs/mllm.py:shapes   --workdir runs/mllm_shapes
  Target: ≤ 20 minutes on 2 CPU cores; caption attribute accuracy ≥ 90%, for this and the TokLIP and
  DualToken presets (every shapes preset draws captions three times as often as each question kind,
  ``data.task_weights``).
  Measured: 16 min 34 s for the train command on 2 cores (1800 steps at 1.5–2.2 steps/s after under
  a minute building the cache of vision vectors; final eval included). eval_test.json (500 test
  images, greedy): caption attribute accuracy 0.90–0.91 (two runs; exact caption 0.56–0.58); QA
  count 0.99, colour 0.79–0.80, shape 0.73–0.82, relation 0.53, yes/no 0.49–0.72; rewrites of
  indirect names 1.00.
* ``shapes_vq`` — the shapes VQ's codebook rows of the image's codes (discrete visual tokens):
      python train.py --config configs/vqgan.py:shapes8  --workdir runs/vqgan_shapes8
      python train.py --config configs/mllm.py:shapes_vq --workdir runs/mllm_shapes_vq
* ``shapes_toklip`` / ``shapes_dualtoken`` — TokLIP's code embeddings ⊕ causal features (over the 8×8
  codes, ``runs/toklip_shapes8``), DualToken's pixel ⊕ semantic code sums (``runs/dualtoken_shapes``):
      python train.py --config configs/toklip.py:shapes8        --workdir runs/toklip_shapes8
      python train.py --config configs/mllm.py:shapes_toklip    --workdir runs/mllm_shapes_toklip
      python train.py --config configs/mllm.py:shapes_dualtoken --workdir runs/mllm_shapes_dualtoken
  Measured (TokLIP): 15 min 7 s for the train command on 2 cores at 2.1–2.5 steps/s, 24 min 25 s on a
  slow day at 1.1–1.9 (1800 steps, cache build and final eval included); caption attribute accuracy
  0.91 (exact 0.56); QA count 0.98, colour 0.75, shape 0.85, relation 0.55, yes/no 0.85; rewrites 1.00.
  Measured (DualToken, after ``dualtoken:shapes``, 7 min 48 s): 16 min 14 s for the train command on
  2 cores (1800 steps at 1.3–2.4 steps/s, cached vectors; final eval included); caption attribute
  accuracy 0.90 (exact 0.56); QA count 1.00, colour 0.79, shape 0.81, relation 0.57, yes/no 0.87;
  rewrites 1.00.
* ``7b`` — a LLaVA-style stage at released sizes (SigLIP So400m/14 at 384 px, frozen, into
  Qwen2.5-7B; bf16, remat), for planning a pod run:
      python -m jaxunified.bench aot --config configs/mllm.py:7b --topology v5p-128
  The vision tower is shapes here; training needs ``--config.vision.source.path`` (HF SigLIP folder).
  The LM starts from random weights and the conversations are the shapes chat vocabulary's.
* ``tiny`` (also ``runlocal``) — a seconds-long smoke run with an untrained vision model (tests).
"""

import importlib.util
import pathlib

import ml_collections as mlc

_spec = importlib.util.spec_from_file_location("_jaxunified_config_common",
                                               pathlib.Path(__file__).resolve().with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _base() -> mlc.ConfigDict:
    c = common.base("mllm")
    c.data.max_len = 96  # 64 image slots + the longest question and caption answer
    c.data.eval_batch_size = 250
    # How often each conversation kind is drawn for a training image (relative; 0 = never).
    c.data.task_weights = mlc.ConfigDict({k: 1.0 for k in ("caption", "count", "color", "shape", "relation", "yes_no",
                                                           "rewrite")})

    # The frozen visual input: kind "siglip" (source: a SigLIP block) or "vq" (source: a VQ block).
    c.vision = mlc.ConfigDict()
    c.vision.kind = "siglip"
    c.vision.source = common.frozen_part("runs/siglip_shapes", "shapes-S", siglip=True)
    c.vision.select_layer = 0  # siglip: 0 the output (post-LN); -2 the penultimate layer (LLaVA-1.5)

    # The LM (models/lm.py): a variant plus overrides; the vocabulary is the shapes chat vocabulary.
    c.model = mlc.ConfigDict()
    c.model.variant = "tiny"
    c.model.overrides = mlc.ConfigDict()
    c.model.projector_depth = 2
    # "mrope": the image tokens take Qwen2-VL's (t, h, w) ids (needs overrides.mrope_section); "sequence": 1-D.
    c.model.image_positions = "sequence"
    # The frozen vision model's vectors of the training split, computed once (keyed by its weights).
    c.data.cache_dir = ""
    c.data.build_cache = False

    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.05
    c.eval.num_examples = 500
    return c


def get_config(arg: str = "shapes") -> mlc.ConfigDict:
    c = _base()
    if arg in ("shapes", "shapes_vq", "shapes_toklip", "shapes_dualtoken"):
        c.total_steps = 1800
        c.checkpoint_every = 500
        c.data.batch_size = 64
        # remat "dots": the scanned layers' backward recomputes the cheap ops instead of stacking their
        # outputs per layer, which XLA:CPU's scan pays for in buffer writes (about 1.2× the step here).
        c.model.overrides = mlc.ConfigDict(dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                                mlp_dim=384, tie_embeddings=True, remat="dots"))
        c.optim.lr = 2e-3
        c.optim.warmup_steps = 100
        c.data.cache_dir = "~/.cache/jaxunified/mllm"
        c.data.build_cache = True
        c.data.task_weights.caption = 3.0  # a caption names every attribute; the single questions name one each
        c.xla_cpu_options = mlc.ConfigDict({"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"})
        if arg == "shapes_vq":
            c.vision.kind = "vq"
            c.vision.source = common.frozen_part("runs/vqgan_shapes8", "shapes-S8")
        if arg == "shapes_toklip":  # over the 8×8 codes: 64 visual tokens, as SigLIP's and DualToken's
            c.vision.kind = "toklip"
            c.vision.source = common.frozen_part("runs/toklip_shapes8", "")
        if arg == "shapes_dualtoken":
            c.vision.kind = "dualtoken"
            c.vision.source = common.frozen_part("runs/dualtoken_shapes", "")
    elif arg == "7b":
        c.data.resolution = 384
        c.data.batch_size = 256
        c.data.max_len = 1024  # SigLIP So400m/14's 729 patch tokens + 295 text tokens
        c.vision.source.update(kind="hf_siglip", workdir="", variant="So400m/14", image_size=384)
        c.vision.source.vision = mlc.ConfigDict(dict(scan=True, remat=True, dtype="bfloat16"))
        c.vision.source.text = mlc.ConfigDict()
        c.model.variant = "qwen2.5-7b"
        c.model.overrides = mlc.ConfigDict(dict(vocab_size=152064, dtype="bfloat16", remat="full"))
        c.eval.num_examples = 500
    elif arg in ("tiny", "runlocal"):
        common.smoke(c)
        c.vision.source.kind = "random"
        c.vision.source.vision = mlc.ConfigDict(dict(width=16, depth=1, mlp_dim=32, num_heads=2))
        c.vision.source.text = mlc.ConfigDict(dict(width=16, depth=1, mlp_dim=32, num_heads=2, proj_dim=16))
        c.model.overrides = mlc.ConfigDict(dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                                mlp_dim=64))
        c.eval.num_examples = 16
    else:
        raise ValueError(f"unknown mllm preset {arg!r}; use shapes, shapes_vq, shapes_toklip, shapes_dualtoken "
                         "7b or tiny")
    return c
