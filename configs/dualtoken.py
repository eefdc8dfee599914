r"""DualToken tokenizer training (task ``dualtoken``): a SigLIP tower with a residual-quantised pixel
branch (reconstruction) and semantic branch (distillation from the frozen original tower).

Presets (the argument after the colon):

* ``shapes`` — the built-in pipeline's dual tokenizer on 32 px shapes, started from the shapes SigLIP
  teacher (``model.siglip_workdir``):
      python train.py --config configs/siglip.py:shapes    --workdir runs/siglip_shapes
      python train.py --config configs/dualtoken.py:shapes --workdir runs/dualtoken_shapes
      python eval.py  --config configs/dualtoken.py:shapes --workdir runs/dualtoken_shapes
  Target: at most 15 minutes on 2 CPU cores. Measured: 9 min 21 s wall for the whole command (compile
  and final eval included; another job sharing the cores part of the time), peak RSS 2.1 GB.
  eval_test.json: PSNR 27.1 dB, SSIM 0.86; codebook usage over all depths (``usage_{pix,sem}_all``)
  100% (pixel and semantic); zero-shot colour / shape / count 100 / 94.2 / 85.5% and text→image R@1
  71.6% through the semantic path (``zs_*``, ``i2t_r*``) vs 100 / 94.6 / 85.3% and 73.5% for the
  original tower (``teacher_*``).
  No LPIPS weights ship with the repository: the perceptual term is off unless ``--config.loss.lpips_path``.
* ``tiny`` (also ``runlocal``) — seconds-long smoke run used by the tests: random tiny tower, every loss
  term on (GAN with adaptive weight, contrastive).
* ``so400m`` — the released recipe: SigLIP2 So400m/14 at 384 px, pixel and semantic RQ 16384 × 32,
  depth 8, the reference's stage-1 loss weights:
      python train.py --config configs/dualtoken.py:so400m --workdir runs/dualtoken_so400m \
          --config.model.siglip_init_from=<HF folder with config.json + model.safetensors> \
          --config.loss.lpips_path=<LPIPS weights> --config.data.path=<image–caption shards>
  The reference trains 20 epochs over 10M CC12M images. bf16 tower compute with block remat fits the
  paper's global batch of 256 on a v5e-64 (``python -m jaxunified.bench aot --config
  configs/dualtoken.py:so400m --topology v5e-64``: 15.57 GiB per chip, 4 images each).

Any field can be overridden: ``--config.model.stage=2``; an unknown key is an error.
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
    # step_form "per_device": shard_map with psum'ed codebook EMA, SyncBN, per-device contrastive.
    c = common.base("dualtoken")
    c.data.batch_size = 32
    c.data.eval_batch_size = 200
    # Caption tokens for the contrastive term and zero-shot evaluation; they must be the text
    # tower's own (the task checks them against a siglip_workdir's config).
    c.data.text = common.text(negatives=False)

    c.model = mlc.ConfigDict()
    c.model.variant = ""  # a released size (models.dualtoken.VARIANTS); "" builds from the fields below
    c.model.init_from = ""  # an official DualToken checkpoint to start the tokenizer from
    c.model.init_from_overrides = mlc.ConfigDict()
    # Where the initial tower and the frozen teacher come from (the first one set wins):
    c.model.siglip_workdir = ""  # a trained `siglip` run
    c.model.siglip_config = ""  # its config spec, if the workdir has no config.json
    c.model.siglip_init_from = ""  # an HF SigLIP folder (config.json + safetensors)
    c.model.siglip_variant = ""  # a random tower (tests)
    c.model.siglip_preset = ""  # the config that trains siglip_workdir's run (planning only, before it exists)
    c.model.image_size = 0
    c.model.vision = mlc.ConfigDict()  # tower overrides, e.g. dict(remat=True, dtype="bfloat16")
    c.model.text = mlc.ConfigDict()
    c.model.layer_recon = 6
    c.model.layer_sem = 26
    c.model.layer_shortcut = 4  # 0: no shortcut
    c.model.weight_shortcut = 0.6
    c.model.pix_rq = mlc.ConfigDict(dict(codebook_size=16384, embed_dim=32, depth=8, ema_schedule="per_depth",
                                         ema_decay=0.99, restart=True))
    c.model.sem_rq = mlc.ConfigDict(dict(codebook_size=16384, embed_dim=32, depth=8, ema_schedule="per_step",
                                         ema_decay=0.99, restart=True))
    c.model.decoder = mlc.ConfigDict(dict(ch=128, ch_mult=(1, 1, 4, 4, 8), num_res_blocks=2, z_channels=1024,
                                          norm_groups=32))
    c.model.decoder_latent_shape = (24, 24)  # () keeps the token grid
    # The reference's freezing. 0: embeddings and layers 1..layer_sem frozen (its loss keeps only the
    # pooled term, loss.sem_token_weight=0 loss.sem_pooled_weight=5, and no GAN); 1: all but the text
    # tower and logit scale/bias; 2: embeddings, layers 1..layer_shortcut and the pixel branch frozen,
    # pixel codebook not updated (it trains the semantic side alone: pixel, perceptual, GAN and
    # pixel-commit weights 0).
    c.model.stage = 1
    c.model.train_text = False
    c.model.train_logits = False

    c.loss = common.gan_loss()
    c.loss.sem_weight = 1.0
    c.loss.sem_token_weight = 5.0  # (MSE − cos) of zq_sem vs the teacher's layer-layer_sem tokens
    c.loss.sem_pooled_weight = 1.0  # (MSE − cos) of the pooled outputs
    c.loss.commit_pix_weight = 5.0
    c.loss.commit_sem_weight = 5.0
    c.loss.pixel_weight = 5.0
    c.loss.perceptual_weight = 1.0
    c.loss.disc_weight = 0.75
    c.loss.hinge_slope = 0.01  # DualToken writes the D hinge with leaky_relu (slope 0.01)
    c.loss.disc_loss_weight = 0.75
    c.loss.adaptive_weight = True
    c.loss.adaptive_min = 0.3
    c.loss.adaptive_max = 10.0
    c.loss.contrastive_weight = 0.0
    c.loss.contrastive_kind = "sigmoid"

    c.disc = common.discriminator()
    c.disc.negative_slope = 0.2

    # The reference: AdamW lr 7.2e-5, betas (0.5, 0.9), warmup 10k, no clipping.
    c.optim.lr = 7.2e-5
    c.optim.disc_lr = common.optional(float)
    c.optim.b1 = 0.5
    c.optim.b2 = 0.9
    c.optim.warmup_steps = 10_000
    c.optim.clip_norm = common.optional(float)
    return c


def _small_tokenizer(c: mlc.ConfigDict, codebook_size: int, depth: int) -> None:
    """Layer taps and sizes for a 4-layer, width-96 tower with an 8×8 token grid (32 px, patch 4)."""
    c.model.layer_shortcut = 1
    c.model.layer_recon = 2
    c.model.layer_sem = 3
    for rq, schedule in ((c.model.pix_rq, "per_depth"), (c.model.sem_rq, "per_step")):
        rq.codebook_size = codebook_size
        rq.embed_dim = 16
        rq.depth = depth
        rq.ema_schedule = schedule
    # Narrow full-resolution levels: 2 CPU cores are compute-bound on the 32×32 3×3 convs.
    c.model.decoder = mlc.ConfigDict(dict(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=64, norm_groups=8))
    c.model.decoder_latent_shape = ()


def get_config(arg: str = "shapes") -> mlc.ConfigDict:
    c = _base()
    if arg == "shapes":
        c.total_steps = 600
        c.log_every = 25
        c.checkpoint_every = 200
        c.model.siglip_workdir = "runs/siglip_shapes"
        c.model.siglip_preset = common.SHAPES_RUNS["runs/siglip_shapes"]
        # The teacher's caption tokens; DualToken's losses take no hard negatives.
        c.data.text = common.shapes_text(hard_negatives=0)
        _small_tokenizer(c, codebook_size=256, depth=4)
        c.loss.perceptual_weight = 0.0
        c.loss.disc_start = 300
        c.disc.ndf = 16
        c.disc.n_layers = 2
        c.optim.lr = 2e-3
        c.optim.warmup_steps = 50
        c.optim.end_lr_factor = 0.05
        c.optim.weight_decay = 0.0
        c.optim.clip_norm = 1.0
    elif arg in ("tiny", "runlocal"):
        common.smoke(c)
        c.model.siglip_variant = "shapes-S"
        c.model.vision = mlc.ConfigDict(dict(width=32, depth=3, mlp_dim=64, num_heads=2, patch_size=8))
        c.model.text = mlc.ConfigDict(dict(width=32, depth=1, mlp_dim=64, num_heads=2, proj_dim=32))
        c.model.layer_shortcut = 1
        c.model.layer_recon = 1
        c.model.layer_sem = 2
        for rq in (c.model.pix_rq, c.model.sem_rq):
            rq.codebook_size = 32
            rq.embed_dim = 8
            rq.depth = 2
        c.model.decoder = mlc.ConfigDict(dict(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16,
                                              norm_groups=4))
        c.model.decoder_latent_shape = ()
        c.loss.perceptual_weight = 0.0
        c.loss.contrastive_weight = 0.1
        c.disc.ndf = 8
        c.disc.n_layers = 1
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 0
    elif arg == "so400m":
        c.total_steps = 800_000
        c.log_every = 100
        c.eval_every = 20_000
        c.checkpoint_every = 5_000
        c.data.name = "webdataset"
        c.data.resolution = 384
        c.data.batch_size = 256  # the paper: 32 per GPU × 8
        c.data.worker_count = 8
        c.data.text.update(common.SIGLIP2_TEXT)
        c.model.variant = "So400m/14-384"
        c.model.vision = mlc.ConfigDict(dict(remat=True, dtype="bfloat16"))
        c.eval.num_examples = 10_000
    else:
        raise ValueError(f"unknown dualtoken preset {arg!r}; use shapes, tiny or so400m")
    return c
