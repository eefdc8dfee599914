r"""VQGAN tokenizer training (LlamaGen / STAR-VQ family).

Presets (the argument after the colon):

* ``shapes`` — the built-in pipeline's tokenizer on 32 px shapes:
      python train.py --config configs/vqgan.py:shapes --workdir runs/vqgan_shapes
      python eval.py  --config configs/vqgan.py:shapes --workdir runs/vqgan_shapes
  3 min 28 s for the train command on 2 CPU cores (600 steps at ≈ 3.9 steps/s; dataset build, compile
  and final eval included), 12 s for eval. eval_test.json: PSNR 35.9 dB (target ≥ 26), SSIM 0.973,
  codebook usage 100% (target ≥ 50%).
* ``shapes8`` — the same at 4× downsampling, 8×8 codes from 256 entries (the tokenizer of
  ``configs/ar.py:shapes``):
      python train.py --config configs/vqgan.py:shapes8 --workdir runs/vqgan_shapes8
  Target: ≤ 10 minutes on 2 CPU cores, and codes a small GPT can model.
  Measured: 9 min 45 s on 2 CPU cores (6000 steps at ≈ 12 steps/s). Final eval: PSNR 36.2 dB, SSIM
  0.987, codebook usage 23% (perplexity 21); shapes-GenEval of its 1000 test reconstructions 0.91
  overall, single object 0.97.
* ``tiny`` (also ``runlocal``) — seconds-long smoke run used by the tests.
* ``imagenet`` — LlamaGen's VQ-16 recipe (256 px, L2 + LPIPS + PatchGAN from step 20k, ≈ 400k steps):
      python train.py --config configs/vqgan.py:imagenet --workdir runs/vqgan_imagenet \
          --config.data.path=<image folder or WebDataset shards> --config.loss.lpips_path=<LPIPS weights>
  About 1 day on a TPU v5e-64 pod slice; rFID ≈ 2.2 expected. Fits a v5e:4x4 slice at the global
  batch of 128 (``python -m jaxunified.bench aot --config configs/vqgan.py:imagenet --topology v5e:4x4``:
  9.57 GiB per chip, data-parallel weights, no weight gathers; with FSDP weights it did not fit).
* ``star`` — STAR-VQ (65536 × 512, 384 px) with the same recipe; its weights usually come from
  ``jaxunified.convert.load("star_vq", ...)`` instead. FSDP with block remat: 16.6 GiB per chip on
  v5e:8x8 (2 images per chip), just over a v5e's 15.75 GiB; plan it on more chips or on v5p.

Any field can be overridden: ``--config.optim.lr=2e-4``; an unknown key is an error.
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
    c = common.base("vqgan")
    c.keep_checkpoints = 3
    c.data.batch_size = 64

    c.model = mlc.ConfigDict()
    c.model.variant = "shapes-S"
    c.model.overrides = mlc.ConfigDict()

    c.loss = common.gan_loss()
    c.loss.codebook_weight = 1.0
    c.disc = common.discriminator()

    c.optim.name = "adam"
    c.optim.lr = 1e-4
    c.optim.disc_lr = common.optional(float)
    c.optim.weight_decay = 0.0
    return c


def get_config(arg: str = "shapes") -> mlc.ConfigDict:
    c = _base()
    if arg in ("shapes", "shapes8"):
        c.total_steps = 600
        c.checkpoint_every = 200
        c.data.batch_size = 16
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 100
        c.optim.end_lr_factor = 0.05
        if arg == "shapes8":  # coarser codes need longer: GenEval of its reconstructions 0.30 at 600 steps,
            c.model.variant = "shapes-S8"  # 0.73 at 2000 (small stars, crosses, triangles blur), 0.91 at 6000
            c.total_steps = 6000
    elif arg in ("tiny", "runlocal"):
        common.smoke(c, total_steps=6, checkpoint_every=3)
        c.model.overrides = mlc.ConfigDict(dict(ch=16, ch_mult=(1, 2), z_channels=16, codebook_size=64))
        c.optim.lr = 1e-3
        c.loss.disc_weight = 0.5
        c.loss.adaptive_weight = True
        c.disc.ndf = 8
        c.disc.n_layers = 2
    elif arg in ("imagenet", "star"):
        c.total_steps = 400_000
        c.log_every = 100
        c.eval_every = 10_000
        c.checkpoint_every = 5_000
        c.data.name = "folder"
        c.data.resolution = 256 if arg == "imagenet" else 384
        c.data.batch_size = 128
        c.data.worker_count = 8
        c.model.variant = "VQ-16" if arg == "imagenet" else "STAR-VQ"
        # Sharding and remat (measured with `python -m jaxunified.bench aot ... --topology v5e:4x4`):
        # VQ-16's 89 M parameters (with LPIPS and the PatchGAN) replicate cheaply, so its weights stay
        # whole on every chip ("data" rules table: 1.2 GiB of train state per chip, gradients
        # all-reduced, no weight gathers): 9.6 GiB per chip at 8 images. FSDP needs more than the
        # 15.75 GiB usable there (its compiled step loops each conv over rotating kernel shards, each
        # loop with its own f32 output buffer). STAR-VQ (1.06 B parameters: its 2048-channel levels)
        # keeps FSDP.
        # Block remat (model.overrides.remat: none | dots | full): VQ-16 none (with FSDP, "full" and
        # "dots" made it bigger, 16.9 / 15.9 GiB, than none, which leaves XLA's own rematerialisation
        # free); STAR-VQ "full" (v5e:8x8, 2 images per chip: 16.6 GiB per chip against 21.0 GiB of
        # temporaries without, so it fits neither way there: give it more chips or v5p's HBM).
        c.model.overrides = mlc.ConfigDict(dict(remat="none" if arg == "imagenet" else "full"))
        if arg == "imagenet":
            c.logical_rules = "data"  # a rules table of jaxunified.parallel.mesh.RULE_TABLES
        c.loss.perceptual_weight = 1.0
        c.loss.disc_weight = 0.5
        c.loss.disc_start = 20_000
        c.optim.schedule = "constant"
        c.optim.ema_decay = 0.9999
        c.eval.num_examples = 10_000
    else:
        raise ValueError(f"unknown vqgan preset {arg!r}; use shapes, shapes8, tiny, imagenet or star")
    return c
