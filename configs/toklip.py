r"""TokLIP: a causal token encoder over frozen VQ codes, trained by contrast + distillation.

Arguments after the colon pick a preset:

* ``shapes`` — the built-in pipeline. Needs the shapes tokenizer and teacher first:
      python train.py --config configs/vqgan.py:shapes  --workdir runs/vqgan_shapes
      python train.py --config configs/siglip.py:shapes --workdir runs/siglip_shapes
      python train.py --config configs/toklip.py:shapes --workdir runs/toklip_shapes
      python eval.py  --config configs/toklip.py:shapes --workdir runs/toklip_shapes
  The student copies the teacher's vision tower (position embedding resized to the 16×16 code
  grid) and learns the code MLP and a raster-causal conv stem (``model.causal_stem``, not in
  TokLIP; ``()`` gives the reference model); eval_test.json gives zero-shot colour/shape/count and
  image↔text R@1/R@5 for the student and (``teacher_*``) for its teacher. Target: ≤ 10 minutes on
  2 CPU cores, zero-shot colour and shape within 5 points of the teacher; measured: colour equal,
  shape 1.8 points under, in 6.4 minutes (details at the preset).
* ``tiny`` — a seconds-long smoke run with an untrained tokenizer and teacher (tests).
* ``S`` / ``L`` / ``XL`` — the released recipe (256 / 384 / 512 px; VQ-16, VQ-16, IBQ-262144):
  SigLIP2 So400m/16 teacher and init from ``--config.teacher.path`` (an HF SiglipModel folder with
  ``--config.teacher.kind=hf_siglip``, or the open_clip ``.pt`` TokLIP's covert.py writes with
  ``kind=open_clip``), the tokenizer from ``--config.tokenizer.path`` (LlamaGen ``vq_ds16_t2i.pt``;
  for XL an IBQ checkpoint), CC12M WebDataset shards at ``--config.data.path``, the Gemma
  SentencePiece model at ``--config.data.text.path``. AdamW lr 1e-5, β (0.9, 0.95), ε 1e-6,
  weight decay 0.1 (not on biases, norms, 1-D parameters or the logit scale), 782 warmup steps,
  cosine to 0 over 32 epochs of 10,968,539 samples; softmax CLIP + 1000 × MSE. Sized for a TPU
  v5p-64-class slice at global batch 1024 (the reference's per-GPU batch was 16/32; its GPU count
  is unpublished).

Any field can be overridden: ``--config.loss.kind=sigmoid``; an unknown key is an error.
"""

import math

import ml_collections as mlc


def _base() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.task = "toklip"
    c.seed = 0
    c.mesh_shape = (1, -1, 1)
    c.logical_rules = mlc.FieldReference(None, field_type=list)
    c.step_form = "global"
    c.total_steps = 1000
    c.log_every = 50
    c.eval_every = 0
    c.final_eval = True
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.progress = True

    c.data = mlc.ConfigDict()
    c.data.name = "shapes"
    c.data.data_dir = "~/.cache/jaxunified/datasets"
    c.data.path = ""
    c.data.captions_file = ""
    c.data.resolution = 32
    c.data.num_train = 20000
    c.data.num_test = 1000
    c.data.batch_size = 128
    c.data.eval_batch_size = 200
    c.data.seed = 0
    c.data.shuffle = True
    c.data.num_epochs = mlc.FieldReference(None, field_type=int)
    c.data.worker_count = 0
    # Precomputed codes / teacher / text embeddings (train.toklip.precompute_cache); "" = from pixels.
    c.data.cache_dir = ""
    c.data.build_cache = False  # True: the run builds a missing cache (keyed by the frozen weights) first
    c.data.text = mlc.ConfigDict()
    # The teacher's tokenizer (configs/siglip.py:shapes): one token per word of the caption grammar.
    c.data.text.tokenizer = "sentencepiece"
    c.data.text.path = "builtin:shapes_words"
    c.data.text.max_len = 16
    c.data.text.canonicalize = False
    c.data.text.eos = "no"
    # K > 0: K grammar-made hard-negative captions per image in the contrastive loss (shapes only;
    # encoded by the frozen text tower each step, never cached).
    c.data.text.hard_negatives = 0
    c.data.text.negative_kinds = ("shape", "color", "count", "relation", "swap")

    # The frozen VQ: kind "workdir" (a vqgan run: workdir + its config spec, "" = the config.json
    # the run wrote, so later preset edits never mismatch its checkpoint), "llamagen_vq" /
    # "star_vq" / "ibq" (path), or "random" (variant + overrides; smoke tests).
    c.tokenizer = mlc.ConfigDict()
    c.tokenizer.kind = "workdir"
    c.tokenizer.workdir = "runs/vqgan_shapes"
    c.tokenizer.config = ""
    c.tokenizer.path = ""
    c.tokenizer.variant = "shapes-S"
    c.tokenizer.overrides = mlc.ConfigDict()

    # The frozen SigLIP teacher (its text tower is the student's): kind "workdir" (a siglip run),
    # "hf_siglip" / "open_clip" (path; open_clip also needs variant + image_size), or "random".
    c.teacher = mlc.ConfigDict()
    c.teacher.kind = "workdir"
    c.teacher.workdir = "runs/siglip_shapes"
    c.teacher.config = ""  # as tokenizer.config
    c.teacher.path = ""
    c.teacher.variant = "shapes-S"
    c.teacher.image_size = 0
    c.teacher.vision = mlc.ConfigDict()
    c.teacher.text = mlc.ConfigDict()

    c.model = mlc.ConfigDict()
    c.model.init = "teacher"  # student ViT from the teacher's vision tower, or "random"
    c.model.init_logit_scale = mlc.FieldReference(None, field_type=float)  # None: the teacher's, clamped
    c.model.vision = mlc.ConfigDict()  # student VisionConfig overrides, e.g. dict(scan=True, remat=True)
    # ((features, kernel), ...) raster-causal convs between the code MLP and the ViT (not in TokLIP;
    # models/toklip.py TokLIPConfig.causal_stem). () is the reference model.
    c.model.causal_stem = ()

    c.loss = mlc.ConfigDict()
    c.loss.kind = "softmax"  # TokLIP: softmax CLIP, no bias; "sigmoid": SigLIP's loss (bias from the teacher)
    c.loss.contrastive_weight = 1.0
    c.loss.distill_weight = 1000.0

    c.optim = mlc.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 1e-5
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = 782
    c.optim.schedule = "cosine"
    c.optim.end_lr_factor = 0.0
    c.optim.total_steps = c.get_ref("total_steps")
    c.optim.clip_norm = mlc.FieldReference(None, field_type=float)  # the reference does not clip
    c.optim.ema_decay = mlc.FieldReference(None, field_type=float)

    c.eval = mlc.ConfigDict()
    c.eval.num_examples = 0
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
    if arg == "shapes":
        # Measured against the shapes SigLIP teacher (zero-shot colour 100%, shape 96.7%, count 84%,
        # t2i / i2t R@1 71 / 70%). The reference model (causal_stem=()) matches colour (99.8%) but reads
        # the 16×16 codes like a bag of per-code features: shape 31%, t2i / i2t R@1 27 / 14% (500 × 32).
        # Supervised 6-way shape probes on these codes locate the gap: a 3-layer conv net on the
        # codebook vectors 92% (raster-causal 5×5 convs 87%), the student ViT 25-27% whatever its init,
        # mask or position embedding. Four raster-causal 3×3 convs (32 channels) between the MLP and the
        # ViT close it (three 5×5 convs of 32 or 64 ch: no better, slower; six 3×3 or lr 2e-3: slower).
        # Learning is bound by optimizer steps more than by samples, and a CPU step costs the same per
        # sample from batch 8 to 32, so small batches win: at 16k samples shape is 70.7% at 32 × 500,
        # 86.4% at 16 × 1000, 94.9% at 8 × 2000 (16 × 1400: 93.9%; 32 × 1000: 96.2% in 20 min).
        # Blockwise causal attention (causal_chunks=4) takes a quarter off each step.
        # This preset (8 × 2000): colour 100%, shape 94.9%, count 88.2%, t2i / i2t R@1 70.4 / 64.9%,
        # 6.4 min for the whole command on 2 cores with the cache built (~6 steps/s).
        c.total_steps = 2000
        c.log_every = 50
        c.checkpoint_every = 1000
        c.data.batch_size = 8
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 20
        c.optim.weight_decay = 1e-4
        c.model.init_logit_scale = math.log(30.0)
        c.model.causal_stem = ((32, 3),) * 4
        c.model.vision = mlc.ConfigDict(dict(causal_chunks=4))
        # As for the teacher: captions with one shape word swapped, scored by the frozen text tower.
        c.data.text.hard_negatives = 2
        c.data.text.negative_kinds = ("shape",)
        # The VQ, teacher and text tower are frozen and shapes has no augmentation: run them once
        # over the training split (cached under a digest of their weights) and train on the codes.
        c.data.cache_dir = "~/.cache/jaxunified/toklip"
        c.data.build_cache = True
    elif arg in ("tiny", "runlocal"):
        c.total_steps = 4
        c.log_every = 2
        c.checkpoint_every = 2
        c.data.num_train = 256
        c.data.num_test = 64
        c.data.batch_size = 16
        c.data.eval_batch_size = 32
        c.tokenizer.kind = "random"
        c.tokenizer.overrides = mlc.ConfigDict(dict(ch=8, ch_mult=(1, 2), z_channels=8, norm_groups=4,
                                                    codebook_size=64))
        c.teacher.kind = "random"
        c.teacher.vision = mlc.ConfigDict(dict(width=32, depth=1, mlp_dim=64, num_heads=2))
        c.teacher.text = mlc.ConfigDict(dict(width=32, depth=1, mlp_dim=64, num_heads=2, proj_dim=32))
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 1
        c.eval.num_examples = 0
        c.progress = False
    elif arg in _REAL:
        res, tok = _REAL[arg]
        c.data.name = "webdataset"
        c.data.resolution = res
        c.data.batch_size = 1024
        c.data.eval_batch_size = 1024
        c.data.worker_count = 8
        c.data.text.tokenizer = "sentencepiece"
        c.data.text.max_len = 64
        c.data.text.canonicalize = True
        c.data.text.eos = "sticky"
        c.tokenizer.kind = tok
        c.tokenizer.workdir = ""
        c.tokenizer.config = ""
        c.teacher.kind = "hf_siglip"
        c.teacher.workdir = ""
        c.teacher.config = ""
        c.teacher.variant = "So400m/16"
        c.teacher.image_size = res
        c.model.vision = mlc.ConfigDict(dict(scan=True, remat=True, dtype="bfloat16"))
        c.total_steps = 32 * 10_968_539 // c.data.batch_size
        c.log_every = 100
        c.checkpoint_every = 5000
        c.eval_every = 20_000
        c.eval.num_examples = 5000
        c.eval.teacher = False
    else:
        raise ValueError(f"unknown toklip preset {arg!r}; use shapes, tiny, S, L or XL")
    return c
