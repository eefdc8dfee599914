"""Command-line entry points shared by train.py and eval.py (absl flags + ml-collections configs)."""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vqgan.py:shapes", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate (eval.py).")


def _setup():
    from absl import logging as absl_logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    # orbax/tfds log every save and shard at INFO through absl; keep the console to our own lines.
    absl_logging.set_verbosity(absl_logging.WARNING)
    # Platform plugins (e.g. an installed libtpu) must not grab the CPU-only run.
    if os.environ.get("JAX_PLATFORMS") is None and not _has_accelerator_env():
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jaxunified import cpu_flags

    cpu_flags.apply()


def _has_accelerator_env() -> bool:
    return any(k in os.environ for k in ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "CUDA_VISIBLE_DEVICES"))


def _require(flag, name):
    if flag.value is None:
        raise app.UsageError(f"--{name} is required")


def _train(argv):
    del argv
    _require(_CONFIG, "config")
    _require(_WORKDIR, "workdir")
    _setup()
    from jaxunified.train.loop import train

    train(_CONFIG.value, _WORKDIR.value)


def _eval(argv):
    del argv
    _require(_CONFIG, "config")
    _require(_WORKDIR, "workdir")
    _setup()
    from jaxunified.train.evaluate import evaluate_run

    metrics = evaluate_run(_CONFIG.value, _WORKDIR.value, _SPLIT.value)
    print(json.dumps(metrics, indent=1, sort_keys=True))


def _run(fn):
    try:
        app.run(fn)
    except (AttributeError, KeyError) as e:
        # ml-collections reports an overridden key that the config lacks this way, during flag parsing.
        overriding = "--config." in " ".join(sys.argv)
        if overriding and ("Did you mean" in str(e) or "Could not override" in str(e)):
            msg = str(e).replace("\\n", " ").replace("\\'", "").strip("'\" ")
            sys.exit(f"error: bad --config override: unknown key {msg} (the fields are listed in the config file)")
        raise


def main_train():
    _run(_train)


def main_eval():
    _run(_eval)
