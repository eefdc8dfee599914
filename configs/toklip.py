r"""TokLIP: a causal token encoder over frozen VQ codes, trained by contrast + distillation.

Presets (the argument after the colon):

* ``shapes`` — the built-in pipeline's student of the shapes teacher, over the shapes tokenizer's codes:
      python train.py --config configs/vqgan.py:shapes  --workdir runs/vqgan_shapes
      python train.py --config configs/siglip.py:shapes --workdir runs/siglip_shapes
      python train.py --config configs/toklip.py:shapes --workdir runs/toklip_shapes
      python eval.py  --config configs/toklip.py:shapes --workdir runs/toklip_shapes
  Target: ≤ 10 minutes on 2 CPU cores, zero-shot colour and shape within 5 points of the teacher.
  Measured: 11 min 3 s for the whole command on 2 cores, building the cache first (≈ 3.5 steps/s,
  another job sharing the cores); eval_test.json (student; ``teacher_*`` for its teacher): zero-shot
  colour 100% (equal), shape 89.5% (5.1 points under the teacher's 94.6%), count 87.7%, t2i / i2t
  R@1 66.0 / 60.0%.
* ``shapes8`` — the same over the 8×8 codes of ``vqgan.py:shapes8``: 64 tokens an image, the teacher's
  own patch grid (the visual input of ``configs/mllm.py:shapes_toklip``):
      python train.py --config configs/toklip.py:shapes8 --workdir runs/toklip_shapes8
  Target: ≤ 20 minutes on 2 CPU cores.
  Measured: 14 min 21 s for the train command on 2 cores (14000 steps at 18–23 steps/s, a slow day;
  cache build included); eval_test.json: zero-shot colour 99.6% (teacher 100%), shape 91.5% (teacher
  97.6%), count 84.3% (teacher 83.5%), t2i / i2t R@1 67.5 / 61.5%.
* ``tiny`` (also ``runlocal``) — a seconds-long smoke run with an untrained tokenizer and teacher (tests).
* ``S`` / ``B`` / ``L`` / ``XL`` — the released recipe (256 / 256 / 384 / 512 px; VQ-16, VQ-16, VQ-16,
  IBQ-262144) on CC12M, from a SigLIP2 So400m/16 teacher:
      python train.py --config configs/toklip.py:L --workdir runs/toklip_L \
          --config.teacher.path=<HF SiglipModel folder> --config.tokenizer.path=<LlamaGen vq_ds16_t2i.pt> \
          --config.data.path=<CC12M WebDataset shards> --config.data.text.path=<Gemma SentencePiece .model>
  (``--config.teacher.kind=open_clip`` for the ``.pt`` TokLIP's covert.py writes; XL takes an IBQ
  checkpoint). Sized for a TPU v5p-64-class slice at global batch 1024.

Any field can be overridden: ``--config.loss.kind=sigmoid``; an unknown key is an error.
"""

import importlib.util
import math
import pathlib

import ml_collections as mlc

# Executed by path (config_flags, runs.load_config): load the shared base beside this file the same way.
_spec = importlib.util.spec_from_file_location("_jaxunified_config_common",
                                               pathlib.Path(__file__).resolve().with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _base() -> mlc.ConfigDict:
    c = common.base("toklip")
    c.data.eval_batch_size = 200
    # Precomputed codes / teacher / text embeddings (TokLIPTask.precompute_cache); "" = from pixels.
    c.data.cache_dir = ""
    c.data.build_cache = False  # True: the run builds a missing cache (keyed by the frozen weights) first
    # The teacher's tokenizer; hard negatives are encoded by the frozen text tower each step, never cached.
    c.data.text = common.text(**common.SHAPES_WORDS)

    # The frozen VQ: kind "workdir" (a vqgan run: workdir + its config spec, "" = the config.json
    # the run wrote, so later preset edits never mismatch its checkpoint), "llamagen_vq" /
    # "star_vq" / "ibq" (path), or "random" (variant + overrides; smoke tests).
    c.tokenizer = mlc.ConfigDict()
    c.tokenizer.kind = "workdir"
    c.tokenizer.workdir = "runs/vqgan_shapes"
    c.tokenizer.config = ""
    c.tokenizer.preset = common.SHAPES_RUNS["runs/vqgan_shapes"]  # planning only, before the run exists
    c.tokenizer.path = ""
    c.tokenizer.variant = "shapes-S"
    c.tokenizer.overrides = mlc.ConfigDict()

    # The frozen SigLIP teacher (its text tower is the student's): kind "workdir" (a siglip run),
    # "hf_siglip" / "open_clip" (path; open_clip also needs variant + image_size), or "random".
    c.teacher = mlc.ConfigDict()
    c.teacher.kind = "workdir"
    c.teacher.workdir = "runs/siglip_shapes"
    c.teacher.config = ""  # as tokenizer.config
    c.teacher.preset = common.SHAPES_RUNS["runs/siglip_shapes"]
    c.teacher.path = ""
    c.teacher.variant = "shapes-S"
    c.teacher.image_size = 0
    c.teacher.vision = mlc.ConfigDict()
    c.teacher.text = mlc.ConfigDict()

    c.model = mlc.ConfigDict()
    c.model.init = "teacher"  # student ViT from the teacher's vision tower, or "random"
    c.model.init_logit_scale = common.optional(float)  # None: the teacher's, clamped
    c.model.vision = mlc.ConfigDict()  # student VisionConfig overrides, e.g. dict(scan=True, remat=True)
    # ((features, kernel), ...) raster-causal convs between the code MLP and the ViT (not in TokLIP;
    # models/toklip.py TokLIPConfig.causal_stem). () is the reference model.
    c.model.causal_stem = ()

    c.loss = mlc.ConfigDict()
    c.loss.kind = "softmax"  # TokLIP: softmax CLIP, no bias; "sigmoid": SigLIP's loss (bias from the teacher)
    c.loss.contrastive_weight = 1.0
    c.loss.distill_weight = 1000.0

    # The reference: AdamW lr 1e-5, ε 1e-6, wd 0.1 (not on biases, norms, 1-D parameters or the logit
    # scale), 782 warmup steps, no clipping.
    c.optim.lr = 1e-5
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = 782
    c.optim.clip_norm = common.optional(float)

    c.eval.teacher = True  # also report the teacher's metrics (teacher_*) for comparison
    return c


_REAL = {  # preset → (resolution, tokenizer kind)
    "S": (256, "llamagen_vq"),
    "B": (256, "llamagen_vq"),
    "L": (384, "llamagen_vq"),
    "XL": (512, "ibq"),
}


def get_config(arg: str = "shapes") -> mlc.ConfigDict:
    c = _base()
    if arg in ("shapes", "shapes8"):
        c.total_steps = 2000
        c.checkpoint_every = 1000
        c.data.batch_size = 8  # steps bind learning more than samples, and a CPU step costs the same per sample
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 20
        c.optim.weight_decay = 1e-4
        c.model.init_logit_scale = math.log(30.0)
        c.model.causal_stem = ((32, 3),) * 4
        c.model.vision = mlc.ConfigDict(dict(causal_chunks=4))  # blockwise causal attention
        c.data.text = common.shapes_text()  # as for the teacher
        # The VQ, teacher and text tower are frozen and shapes has no augmentation: run them once
        # over the training split (cached under a digest of their weights) and train on the codes.
        c.data.cache_dir = "~/.cache/jaxunified/toklip"
        c.data.build_cache = True
        if arg == "shapes8":  # 8×8 codes: the teacher's own 64-patch grid, the mllm's visual-token budget
            c.tokenizer.update(workdir="runs/vqgan_shapes8", preset=common.SHAPES_RUNS["runs/vqgan_shapes8"],
                               variant="shapes-S8")
            # a quarter of the tokens per step: zero-shot shape 0.54 at 2000 steps; the mllm reading these
            # tokens is capped by their shape information (caption attributes 0.87 at 8000 steps, 0.91 at 14000)
            c.total_steps = 14000
            c.checkpoint_every = 7000
    elif arg in ("tiny", "runlocal"):
        common.smoke(c)
        c.tokenizer.kind = "random"
        c.tokenizer.overrides = mlc.ConfigDict(dict(ch=8, ch_mult=(1, 2), z_channels=8, norm_groups=4,
                                                    codebook_size=64))
        c.teacher.kind = "random"
        c.teacher.vision = mlc.ConfigDict(dict(width=32, depth=1, mlp_dim=64, num_heads=2))
        c.teacher.text = mlc.ConfigDict(dict(width=32, depth=1, mlp_dim=64, num_heads=2, proj_dim=32))
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 1
    elif arg in _REAL:
        res, tok = _REAL[arg]
        c.data.name = "webdataset"
        c.data.resolution = res
        c.data.batch_size = 1024  # the reference: 16/32 per GPU, GPU count unpublished
        c.data.eval_batch_size = 1024
        c.data.worker_count = 8
        c.data.text.update(common.SIGLIP2_TEXT)
        c.tokenizer.kind = tok
        c.tokenizer.workdir = ""
        c.teacher.kind = "hf_siglip"
        c.teacher.workdir = ""
        c.teacher.variant = "So400m/16"
        c.teacher.image_size = res
        c.model.vision = mlc.ConfigDict(dict(scan=True, remat=True, dtype="bfloat16"))
        c.total_steps = 32 * 10_968_539 // c.data.batch_size  # 32 epochs of CC12M's 10,968,539 samples
        c.log_every = 100
        c.checkpoint_every = 5000
        c.eval_every = 20_000
        c.eval.num_examples = 5000
        c.eval.teacher = False
    else:
        raise ValueError(f"unknown toklip preset {arg!r}; use shapes, tiny, S, L or XL")
    return c
