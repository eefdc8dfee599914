r"""VQGAN tokenizer training (LlamaGen / STAR-VQ family).

Arguments after the colon pick a preset:

* ``shapes`` — the built-in pipeline's tokenizer, 32 px shapes, 2-core CPU:
      python train.py --config configs/vqgan.py:shapes --workdir runs/vqgan_shapes
      python eval.py  --config configs/vqgan.py:shapes --workdir runs/vqgan_shapes
  About 4 minutes of training on 2 idle CPU cores (≈ 600 steps at 2.5-4 steps/s); expected test PSNR ≈ 32 dB
  (≥ 26 dB), codebook usage ≈ 99% (≥ 50%).
* ``tiny`` — seconds-long smoke run used by the tests (also ``runlocal``).
* ``imagenet`` — LlamaGen VQ-16 recipe (256 px, batch 128, Adam 1e-4 β (0.9, 0.95), L2 + LPIPS +
  PatchGAN from step 20k, 40 epochs ≈ 400k steps) on an image folder / WebDataset shards given by
  ``--config.data.path``; LPIPS weights from ``--config.loss.lpips_path`` (converted from
  LlamaGen's ``cache/vgg.pth``). Sized for a TPU v5e-64 pod slice (≈ 1 day); rFID ≈ 2.2 expected.
* ``star`` — STAR-VQ (65536 × 512, 384 px) with the same recipe; weights usually come from
  ``jaxunified.convert.load("star_vq", ...)`` instead.

Any field can be overridden: ``--config.optim.lr=2e-4``; an unknown key is an error.
"""

import ml_collections as mlc


def _base() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.task = "vqgan"
    c.seed = 0
    # Mesh axes (data, fsdp, tensor); -1 takes the remaining devices. Default: pure FSDP.
    c.mesh_shape = (1, -1, 1)
    c.logical_rules = mlc.FieldReference(None, field_type=list)
    # "global": one jitted step over global arrays; "per_device": the same step under shard_map
    # with gradients pmean'ed (the pmap pattern).
    c.step_form = "global"
    c.total_steps = 1000
    c.log_every = 50
    c.eval_every = 0
    c.final_eval = True
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.progress = True

    c.data = mlc.ConfigDict()
    c.data.name = "shapes"
    c.data.data_dir = "~/.cache/jaxunified/datasets"
    c.data.path = ""
    c.data.captions_file = ""
    c.data.resolution = 32
    c.data.num_train = 20000
    c.data.num_test = 1000
    c.data.batch_size = 64
    c.data.seed = 0
    c.data.shuffle = True
    c.data.num_epochs = mlc.FieldReference(None, field_type=int)
    c.data.worker_count = 0

    c.model = mlc.ConfigDict()
    c.model.variant = "shapes-S"
    c.model.overrides = mlc.ConfigDict()

    c.loss = mlc.ConfigDict()
    c.loss.pixel = "l2"
    c.loss.pixel_weight = 1.0
    c.loss.codebook_weight = 1.0
    c.loss.perceptual_weight = 0.0
    c.loss.lpips_path = ""
    c.loss.vgg_path = ""
    c.loss.disc_weight = 0.0
    c.loss.disc_start = 0
    c.loss.disc_loss = "hinge"
    c.loss.gen_loss = "hinge"
    c.loss.adaptive_weight = False
    c.loss.adaptive_max = 1e4

    c.disc = mlc.ConfigDict()
    c.disc.ndf = 64
    c.disc.n_layers = 3

    c.optim = mlc.ConfigDict()
    c.optim.name = "adam"
    c.optim.lr = 1e-4
    c.optim.disc_lr = mlc.FieldReference(None, field_type=float)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 0
    c.optim.schedule = "cosine"
    c.optim.end_lr_factor = 0.0
    c.optim.total_steps = c.get_ref("total_steps")
    c.optim.clip_norm = 1.0
    c.optim.ema_decay = mlc.FieldReference(None, field_type=float)

    c.eval = mlc.ConfigDict()
    c.eval.num_examples = 0  # 0 = the whole split
    return c


def get_config(arg: str = "shapes") -> mlc.ConfigDict:
    c = _base()
    if arg == "shapes":
        # Tuning runs on 2 CPU cores: ~32 dB test PSNR and ~99% codebook usage after 400-600 steps.
        c.total_steps = 600
        c.log_every = 50
        c.checkpoint_every = 200
        c.data.batch_size = 16
        c.model.variant = "shapes-S"
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 100
        c.optim.end_lr_factor = 0.05
    elif arg in ("tiny", "runlocal"):
        c.total_steps = 6
        c.log_every = 2
        c.checkpoint_every = 3
        c.data.num_train = 256
        c.data.num_test = 64
        c.data.batch_size = 16
        c.model.variant = "shapes-S"
        c.model.overrides = mlc.ConfigDict(dict(ch=16, ch_mult=(1, 2), z_channels=16, codebook_size=64))
        c.optim.lr = 1e-3
        c.loss.disc_weight = 0.5
        c.loss.adaptive_weight = True
        c.disc.ndf = 8
        c.disc.n_layers = 2
        c.eval.num_examples = 0
        c.progress = False
    elif arg in ("imagenet", "star"):
        c.total_steps = 400_000
        c.log_every = 100
        c.eval_every = 10_000
        c.checkpoint_every = 5_000
        c.mesh_shape = (1, -1, 1)
        c.data.name = "folder"
        c.data.resolution = 256 if arg == "imagenet" else 384
        c.data.batch_size = 128
        c.data.worker_count = 8
        c.model.variant = "VQ-16" if arg == "imagenet" else "STAR-VQ"
        c.loss.perceptual_weight = 1.0
        c.loss.disc_weight = 0.5
        c.loss.disc_start = 20_000
        c.optim.lr = 1e-4
        c.optim.schedule = "constant"
        c.optim.ema_decay = 0.9999
        c.eval.num_examples = 10_000
    else:
        raise ValueError(f"unknown vqgan preset {arg!r}; use shapes, tiny, imagenet or star")
    return c
