"""Command-line entry points shared by train.py and eval.py (absl flags + ml-collections configs)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxunified import config_overrides

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vqgan.py:shapes", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate (eval.py).")
# Multi-process training (jaxunified.parallel.distributed): every process gets the same command plus
# its own --process_id. Unset flags fall back to the environment; none at all on a TPU pod slice or
# SLURM lets JAX detect them; none anywhere else is a single-process run. eval.py runs in one process.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process run (default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of a multi-process run (default: $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0..num_processes-1 (default: $JAX_PROCESS_ID).")


def _setup(multiprocess: bool = False):
    from absl import logging as absl_logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    # orbax/tfds log every save and shard at INFO through absl; keep the console to our own lines.
    absl_logging.set_verbosity(absl_logging.WARNING)
    # Platform plugins (e.g. an installed libtpu) must not grab the CPU-only run.
    if os.environ.get("JAX_PLATFORMS") is None and not _has_accelerator_env():
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jaxunified import cpu_flags

    cpu_flags.apply()
    given = [f"--{f.name}" for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID) if f.value is not None]
    if not multiprocess:
        if given:
            raise app.UsageError(f"eval.py runs in a single process; drop {', '.join(given)} (it restores "
                                 "checkpoints written by any number of processes)")
        return
    from jaxunified.parallel import distributed

    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:  # inconsistent flags/environment: say which, without a traceback
        raise app.UsageError(str(e)) from e


def _has_accelerator_env() -> bool:
    if any(k in os.environ for k in ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "CUDA_VISIBLE_DEVICES")):
        return True
    # A Cloud TPU VM (its chips are /dev/accel* or /dev/vfio/N): JAX asks the metadata server for the
    # pod slice's hosts, which a multi-host run without --coordinator_address relies on.
    import glob

    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _require(flag, name):
    if flag.value is None:
        raise app.UsageError(f"--{name} is required")


@contextlib.contextmanager
def _failed_process_exits():
    """In a multi-process run a process whose work raised prints the traceback and exits with status 1
    at once: at exit JAX waits at a shutdown barrier for every process (minutes, when the error is
    a peer that died), which only keeps the job from being restarted."""
    try:
        yield
    except (Exception, KeyboardInterrupt):
        import jax

        if not jax.distributed.is_initialized():
            raise
        logging.getLogger("jaxunified").exception("process %d failed; exiting without JAX's shutdown barrier",
                                                  jax.process_index())
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def _train(argv):
    del argv
    _require(_CONFIG, "config")
    _require(_WORKDIR, "workdir")
    _setup(multiprocess=True)
    from jaxunified.train.loop import train

    with _failed_process_exits():
        train(config_overrides.apply_taken(_CONFIG.value), _WORKDIR.value)


def _eval(argv):
    del argv
    _require(_CONFIG, "config")
    _require(_WORKDIR, "workdir")
    _setup()
    from jaxunified.train.evaluate import evaluate_run

    metrics = evaluate_run(config_overrides.apply_taken(_CONFIG.value), _WORKDIR.value, _SPLIT.value)
    print(json.dumps(metrics, indent=1, sort_keys=True))


def _run(fn):
    config_overrides.take_from_argv()
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
