"""What the config families share (the Flax examples' ``configs/default.py`` pattern): a family's
``_base()`` starts from ``base(task)`` and sets only its deltas.

Config files are executed by path (``config_flags.DEFINE_config_file`` and
``jaxunified.train.runs.load_config``), so ``import common`` would not resolve: a family loads this
file by path beside its own ``__file__``. It needs ``ml_collections`` only, never ``jaxunified``.
"""

import ml_collections as mlc

# The shapes captions' tokenizer (the teacher's, configs/siglip.py:shapes): one token per word of the
# caption grammar, plurals as stem + suffix; the longest caption is 10 words + 2 plural suffixes.
SHAPES_WORDS = dict(tokenizer="sentencepiece", path="builtin:shapes_words", max_len=16)
# SigLIP2's captions on web data: a Gemma SentencePiece model (--config.data.text.path), canonicalised.
SIGLIP2_TEXT = dict(tokenizer="sentencepiece", max_len=64, canonicalize=True, eos="sticky")
NEGATIVE_KINDS = ("shape", "color", "count", "relation", "swap")


def optional(field_type: type) -> mlc.FieldReference:
    """A field that is None by default and accepts a ``field_type`` override."""
    return mlc.FieldReference(None, field_type=field_type)


def base(task: str) -> mlc.ConfigDict:
    """Run fields, the 32 px shapes data, AdamW with a cosine schedule over ``total_steps``, eval."""
    c = mlc.ConfigDict()
    c.task = task
    c.seed = 0
    # Mesh axes (data, fsdp, tensor); -1 takes the remaining devices. Default: pure FSDP.
    c.mesh_shape = (1, -1, 1)
    c.logical_rules = mlc.FieldReference(None, field_type=object)  # None, "fsdp" / "fsdp_tp" / "data", or pairs
    # "global": one jitted step over global arrays; "per_device": the same step under shard_map
    # with explicit collectives (the pmap pattern).
    c.step_form = "global"
    # XLA DebugOptions for compiling the train step when it runs on CPU (on top of jaxunified/cpu_flags.py;
    # enum values by their proto names), e.g. {"xla_cpu_experimental_ynn_fusion_type":
    # "LIBRARY_FUSION_TYPE_DOT"}: YNNPACK matmuls, faster at small widths.
    c.xla_cpu_options = mlc.ConfigDict()
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
    c.data.seed = 0
    c.data.shuffle = True
    c.data.num_epochs = optional(int)
    c.data.worker_count = 0

    c.optim = mlc.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 0
    c.optim.schedule = "cosine"
    c.optim.end_lr_factor = 0.0
    c.optim.total_steps = c.get_ref("total_steps")
    c.optim.clip_norm = 1.0
    c.optim.ema_decay = optional(float)

    c.eval = mlc.ConfigDict()
    c.eval.num_examples = 0  # 0 = the whole split
    return c


# The built-in chain's runs and the presets that train them: a block names its run's preset so a plan
# (``bench aot``/``bench step``) of a later stage knows the run's shapes before the run exists.
SHAPES_RUNS = {
    "runs/vqgan_shapes": "configs/vqgan.py:shapes",
    "runs/vqgan_shapes8": "configs/vqgan.py:shapes8",
    "runs/siglip_shapes": "configs/siglip.py:shapes",
    "runs/toklip_shapes": "configs/toklip.py:shapes",
    "runs/toklip_shapes8": "configs/toklip.py:shapes8",
    "runs/dualtoken_shapes": "configs/dualtoken.py:shapes",
    "runs/mllm_shapes": "configs/mllm.py:shapes",
}


def frozen_part(workdir: str, variant: str, *, siglip: bool = False) -> mlc.ConfigDict:
    """A frozen sub-model block (train/frozen.py): ``kind`` "workdir" (the run in ``workdir``, its
    ``config`` spec optional), a checkpoint kind with ``path`` (+ ``overrides``), or "random"
    (``variant`` + ``overrides``; smoke tests). ``preset``: the config that trains the run (planning
    only, before it exists). SigLIP blocks add ``image_size`` and per-tower ``vision``/``text`` overrides."""
    b = mlc.ConfigDict()
    b.kind = "workdir"
    b.workdir = workdir
    b.config = ""
    b.preset = SHAPES_RUNS.get(workdir, "")
    b.path = ""
    b.variant = variant
    b.overrides = mlc.ConfigDict()
    if siglip:
        b.image_size = 0
        b.vision = mlc.ConfigDict()
        b.text = mlc.ConfigDict()
    return b


def text(*, negatives: bool = True, **fields) -> mlc.ConfigDict:
    """The caption tokenizer block (``data.text``): bytes by default; ``fields`` replace defaults."""
    t = mlc.ConfigDict()
    t.tokenizer = "byte"
    t.path = ""
    t.max_len = 56  # longest shapes caption: 51 bytes
    t.canonicalize = False
    t.eos = "no"
    if negatives:
        # K > 0: K grammar-made hard-negative captions per image (shapes only; NegCLIP-style).
        t.hard_negatives = 0
        t.negative_kinds = NEGATIVE_KINDS
    t.update(fields)
    return t


def shapes_text(hard_negatives: int = 2) -> mlc.ConfigDict:
    """The shapes teacher's captions (configs/siglip.py:shapes), with shape-swapped hard negatives."""
    return text(**SHAPES_WORDS, hard_negatives=hard_negatives, negative_kinds=("shape",))


def smoke(c: mlc.ConfigDict, *, total_steps: int = 4, checkpoint_every: int = 2) -> None:
    """The ``tiny`` presets' run: a few steps over 256 / 64 shapes at batch 16, no progress bar."""
    c.total_steps = total_steps
    c.log_every = 2
    c.checkpoint_every = checkpoint_every
    c.data.num_train = 256
    c.data.num_test = 64
    c.data.batch_size = 16
    if "eval_batch_size" in c.data:
        c.data.eval_batch_size = 32
    c.progress = False


def gan_loss() -> mlc.ConfigDict:
    """The reconstruction + PatchGAN terms train/gan.py reads (tokenizer tasks): L2 only by default."""
    loss = mlc.ConfigDict()
    loss.pixel = "l2"
    loss.pixel_weight = 1.0
    loss.perceptual_weight = 0.0
    loss.lpips_path = ""  # LPIPS weights (converted from LlamaGen's cache/vgg.pth)
    loss.vgg_path = ""
    loss.disc_weight = 0.0
    loss.disc_start = 0
    loss.disc_loss = "hinge"
    loss.gen_loss = "hinge"
    loss.adaptive_weight = False
    loss.adaptive_max = 1e4
    return loss


def discriminator() -> mlc.ConfigDict:
    """The PatchGAN (models.discriminator)."""
    return mlc.ConfigDict(dict(ndf=64, n_layers=3))
