r"""STAR's text-to-image stage: stacked decoder layers, an adapter and an image head learn to generate
a frozen VQ's codes on top of a frozen understanding LM (task ``star``; models/star.py).

Presets (the argument after the colon):

* ``shapes`` — on the shapes ``mllm`` model's LM, generating the shapes VQ's 8×8 codes:
      python train.py --config configs/vqgan.py:shapes8 --workdir runs/vqgan_shapes8
      python train.py --config configs/siglip.py:shapes --workdir runs/siglip_shapes
      python train.py --config configs/mllm.py:shapes   --workdir runs/mllm_shapes
      python train.py --config configs/star.py:shapes   --workdir runs/star_shapes
  Target: ≤ 20 minutes on 2 CPU cores; shapes-GenEval overall ≥ the ``ar`` preset's (0.40–0.41).
  Measured: 15 min 30 s for the train command on 2 cores (1450 steps at 1.4–2.0 steps/s, the cache of
  simplified codes already built — about a minute when it is not; final eval included). eval (1000
  test captions, CFG 2, top-k 3): val loss 1.16, token accuracy 64% (simplified codes, noisy inputs in
  training), GenEval overall 0.33 — single object 0.71, colours 0.79, counting 0.33, two objects
  0.09, position 0.03, colour attribution 0.03 (below the target; the decoded targets,
  ``ceiling_*``, score 0.91). Reasoning mode on 300 indirectly named objects ("a plus sign the color
  of grass"): the frozen base rewrites all of them right, GenEval 0.70 with the rewrite vs 0.11 from
  the indirect prompt.
* ``shapes_edit`` — stage 3 from the ``shapes`` run: three rows in four are edits of the scene
  (recolour, remove, add, move, resize one object), the instruction first, then the source image
  as VQ tokens:
      python train.py --config configs/star.py:shapes_edit --workdir runs/star_shapes_edit
  Target: ≤ 20 minutes on 2 CPU cores; edit success ≥ 60%.
  Measured: 19 min 21 s to 24 min 34 s for the train command on 2 cores (the machine's speed on
  three days: 650 steps at 0.53–0.90 steps/s; 2 min building the cache of the training edits when it
  is missing; final eval 4–5 min). 490 test edits, greedy, CFG 2: edit success 0.22 (recolour 0.40,
  remove 0.42, add 0.19, move 0.03, resize 0.02), below the target; the edited scenes' decoded
  targets pass 0.79 (``edit_ceiling``). Teacher-forced, 81% of the edited codes are right (96% of
  the codes equal to the source's, 45% of those the edit changes) and 6% of rows entirely;
  GenEval after the stage 0.28.
* ``7b`` — STAR-7B stage 2 at its released sizes (14 stacked layers on the frozen Qwen2.5-VL-7B text
  base, STAR-VQ at 384 px: 576 codes, adapter depth 4; bf16, remat), for planning a pod run:
      python -m jaxunified.bench aot --config configs/star.py:7b --topology v5p-128
  The base and VQ are shapes here; training needs ``--config.base.path`` (HF Qwen2.5-VL folder) and
  ``--config.tokenizer.path`` (STAR's VQ ``.pt``). Prompts are the shapes chat vocabulary's.
* ``tiny`` (also ``runlocal``) — a seconds-long smoke run with an untrained base and tokenizer (tests).

Sampling for eval (``sample.*``): STAR's CFG scale, temperature, top-k, top-p.
"""

import importlib.util
import pathlib

import ml_collections as mlc

_spec = importlib.util.spec_from_file_location("_jaxunified_config_common",
                                               pathlib.Path(__file__).resolve().with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _base() -> mlc.ConfigDict:
    c = common.base("star")
    c.data.max_prompt_len = 16  # <|im_start|> user + the longest caption (10 words) + 4 chat tokens
    # > 0: that fraction of training rows are edits (data/shapes_edit.py): the source image's codes,
    # the instruction, and the edited scene as the target (stage 3, instruction tuning).
    c.data.edit_fraction = 0.0
    # Edits also give the base the source as its understanding tokens (the base's mllm run's vision
    # model and projector; STAR's ViT block after the VQ block): + that many tokens + 2 delimiters.
    c.data.edit_understanding = False
    # "image_first" (STAR's: source blocks, then the instruction) or "instruction_first": the causal
    # model then reads the source knowing the edit (data/shapes_chat.py: edit_ids).
    c.data.edit_order = "image_first"
    # > 0 (with cache_dir): the training edits are drawn once, that many per scene, and their target
    # codes cached; 0 draws a new edit per row and encodes its target in the step.
    c.data.edits_per_scene = 0
    c.data.eval_batch_size = 250
    # Precomputed (simplified) codes of the training split, keyed by the frozen VQ (and with
    # edits_per_scene the training edits' instructions and target codes).
    c.data.cache_dir = ""
    c.data.build_cache = False

    # The frozen VQ (train/frozen.py): "workdir" (a vqgan run), "star_vq" / "llamagen_vq" (path) or "random".
    c.tokenizer = common.frozen_part("runs/vqgan_shapes8", "shapes-S8")
    # > 0: generation targets are simplified codes (quant/simplify.py), as in configs/ar.py.
    c.tokenizer.simplify_tol = 0.0
    # > 0: an edit's target takes the source's code wherever the edited image decodes within this
    # (max abs, [-1, 1] pixels) of its own codes (train/star.py: copy_aligned).
    c.tokenizer.edit_copy_tol = 0.0

    # The frozen understanding base: "workdir" (an mllm run's LM), "hf_qwen2" / "star" (path) or "random".
    c.base = common.frozen_part("runs/mllm_shapes", "tiny")

    c.model = mlc.ConfigDict()
    c.model.num_stacked = 4
    c.model.adapter_depth = 2
    c.model.init_stacked = "base_top"  # or "random"
    c.model.init_from = ""  # a previous stage's star run: its stacked layers, adapter and head
    # The parts that learn; the others keep their weights. Without the adapter no gradient flows
    # through the frozen base, so the step skips the base's backward pass.
    c.model.train = ("stacked", "adapter", "head")
    c.model.prompt_dropout = 0.1
    # "sequential" (STAR's) or "shared": an edit's output image takes the source image block's RoPE
    # positions, so each code to copy sits one position ahead of the token predicting it.
    c.model.edit_positions = "sequential"
    # An edit's codes that differ from its source's weigh this many times the copied ones in the
    # loss: the copy is learned first and the instructed change is a small part of every row.
    c.model.edit_change_weight = 1.0
    # > 0: that fraction of the teacher-forced input codes are swapped for other codes of the batch
    # (targets unchanged), so training sees the mistakes sampling feeds back.
    c.model.input_noise = 0.0
    c.model.lm_overrides = mlc.ConfigDict()  # LMConfig fields for both decoders, e.g. dtype

    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.05

    c.sample = mlc.ConfigDict()
    c.sample.cfg_scale = 2.0
    c.sample.temperature = 1.0
    c.sample.top_k = 3
    c.sample.top_p = 1.0
    c.sample.seed = 0

    c.eval.num_examples = 1000
    c.eval.num_samples = 0
    c.eval.num_edits = 0  # test scenes edited and scored by data/shapes_edit.check_edit
    # Sampling for the edits (temperature 0: greedy), apart from generation's ``sample``.
    c.eval.edit_sample = mlc.ConfigDict(dict(cfg_scale=2.0, temperature=1.0, top_k=3, top_p=1.0))
    c.eval.num_reasoning = 0  # test objects prompted indirectly, plain vs reasoning mode
    c.eval.grid_per_category = 16
    return c


def get_config(arg: str = "shapes") -> mlc.ConfigDict:
    c = _base()
    if arg in ("shapes", "shapes_edit"):
        c.total_steps = 1450
        c.checkpoint_every = 500
        c.data.batch_size = 64
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 100
        c.eval.num_reasoning = 300
        c.tokenizer.simplify_tol = 0.2  # as configs/ar.py:shapes
        # a quarter of the input codes swapped (exposure bias): without it a sampled object takes the
        # right colour, then its later codes drift into the commonest shape
        c.model.input_noise = 0.25
        c.data.cache_dir = "~/.cache/jaxunified/star"
        c.data.build_cache = True
        c.xla_cpu_options = mlc.ConfigDict({"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"})
        if arg == "shapes_edit":
            c.model.init_from = "runs/star_shapes"
            c.data.edit_fraction = 0.75
            c.data.max_prompt_len = 80  # + the source image's 64 codes and its delimiters
            c.total_steps = 650
            c.eval.num_edits = 500
            c.eval.edit_sample.temperature = 0.0  # greedy: an edit copies most of its source exactly
            c.model.input_noise = 0.0  # measured without; an edit copies most of its source
            c.data.edits_per_scene = 1  # targets encoded once, not in every step
            # the source is read knowing the edit: edit success 0.07 -> 0.22 (STAR's image-first order)
            c.data.edit_order = "instruction_first"
            # The adapter keeps its stage-2 weights: the step then runs no backward pass through the base.
            c.model.train = ("stacked", "head")
    elif arg == "7b":
        c.data.resolution = 384
        c.data.batch_size = 128  # 2 images per v5p-128 chip
        c.data.max_prompt_len = 128
        c.tokenizer.update(kind="star_vq", workdir="", variant="STAR-VQ")
        c.base.update(kind="hf_qwen2", workdir="", variant="qwen2.5-vl-7b")
        c.model.num_stacked = 14
        c.model.adapter_depth = 4
        c.model.lm_overrides = mlc.ConfigDict(dict(dtype="bfloat16", remat="full"))
        c.eval.num_reasoning = 0
    elif arg in ("tiny", "runlocal"):
        common.smoke(c)
        c.tokenizer.kind = "random"
        c.tokenizer.overrides = mlc.ConfigDict(dict(ch=8, ch_mult=(1, 2, 2), z_channels=8, norm_groups=4,
                                                    codebook_size=32))
        c.base.kind = "random"
        c.base.overrides = mlc.ConfigDict(dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64))
        c.model.num_stacked = 1
        c.data.edit_fraction = 0.5
        c.data.max_prompt_len = 80
        c.eval.num_examples = 16
        c.eval.num_edits = 8
        c.eval.num_reasoning = 8
        c.eval.grid_per_category = 4
    else:
        raise ValueError(f"unknown star preset {arg!r}; use shapes, shapes_edit, 7b or tiny")
    return c
