"""Multi-process (multi-host) start-up: ``jax.distributed.initialize`` from flags or the environment.

Every process of a multi-host run calls :func:`initialize` once, before JAX starts its backends
(``train.py`` does, from ``--coordinator_address``/``--num_processes``/``--process_id``; ``eval.py``
runs in one process). Each setting comes from its argument, else from the environment:

* ``coordinator_address`` (``JAX_COORDINATOR_ADDRESS``): ``host:port`` of process 0, which serves there;
* ``num_processes`` (``JAX_NUM_PROCESSES``): how many processes the run has;
* ``process_id`` (``JAX_PROCESS_ID``): this process, ``0 <= process_id < num_processes``;
* ``local_device_ids`` (``JAX_LOCAL_DEVICE_IDS``, read by JAX): optional, this process's GPUs.

Then:

* all three given (``num_processes`` > 1): the distributed runtime starts with them;
* none given: on a Cloud TPU pod slice (GCE or GKE), or a SLURM or Open MPI job, of more than one
  process JAX detects all three itself; anywhere else this is a single-process run and nothing
  happens;
* some given: on any cluster JAX recognises (those, and Kubernetes) it fills in the rest, elsewhere
  it is an error naming the missing ones; ``num_processes=1`` is a single-process run.

On CPU the processes exchange collectives over TCP (gloo), so a multi-process run works on one
machine (the tests start two on localhost) or across machines without accelerators.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Sequence

log = logging.getLogger(__name__)

ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
FLAGS = {k: f"--{k}" for k in ENV}


def _from_env(name: str, value):
    if value is not None and value != "":
        return value
    env = os.environ.get(ENV[name], "").strip()
    return env or None


def _as_int(name: str, value) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{FLAGS[name]} / ${ENV[name]} must be an integer, got {value!r}") from None


def resolve(coordinator_address: str | None = None, num_processes: int | str | None = None,
            process_id: int | str | None = None) -> dict:
    """The three settings after the environment fills what the arguments leave unset (None = unset);
    checks the ones given against each other."""
    out = {
        "coordinator_address": _from_env("coordinator_address", coordinator_address),
        "num_processes": _as_int("num_processes", _from_env("num_processes", num_processes)),
        "process_id": _as_int("process_id", _from_env("process_id", process_id)),
    }
    n, pid, addr = out["num_processes"], out["process_id"], out["coordinator_address"]
    if n is not None and n < 1:
        raise ValueError(f"--num_processes / $JAX_NUM_PROCESSES must be at least 1, got {n}")
    if pid is not None and pid < 0:
        raise ValueError(f"--process_id / $JAX_PROCESS_ID must be >= 0, got {pid}")
    if n is not None and pid is not None and pid >= n:
        raise ValueError(f"--process_id={pid} must be below --num_processes={n} (processes are numbered 0..{n - 1})")
    if addr is not None and not re.fullmatch(r".+:\d+", str(addr)):
        raise ValueError(f"--coordinator_address / $JAX_COORDINATOR_ADDRESS must be host:port, got {addr!r}")
    return out


# Clusters a run with no settings at all joins by itself (when they hold more than one process); others
# (Kubernetes, mpi4py) only fill in what a partly given run leaves unset, as jax.distributed does.
AUTO_CLUSTERS = ("gcetpu", "gketpu", "slurm", "ompi")


def detected_cluster(only: Sequence[str] | None = None):
    """The cluster environment JAX would bootstrap from (a ``jax._src.clusters.ClusterEnv`` subclass:
    Cloud TPU, GKE, SLURM, Open MPI, ...), or None; ``only`` limits the probe to those names.
    Opt-in methods (mpi4py) are not probed, as ``jax.distributed.initialize`` does not."""
    try:
        from jax._src import clusters
    except ImportError:  # a JAX without the private module: only what the user gives is used
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False) or (only is not None and env.name not in only):
            continue
        try:
            if env.is_env_present():
                return env
        except Exception as e:  # a probe that cannot run here (no metadata server, no k8s API)
            log.debug("cluster probe %s failed: %s", env.__name__, e)
    return None


def _cluster_processes(env) -> int:
    try:
        return int(env.get_process_count())
    except Exception as e:
        log.warning("%s detected but its process count is unknown (%s); running as a single process", env.name, e)
        return 1


def enable_cpu_collectives() -> None:
    """Cross-process collectives for the CPU backend (gloo over TCP) unless another one (mpi) is
    already chosen. JAX reads this when it creates the CPU client, so it must precede that."""
    import jax

    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | int | None = None) -> bool:
    """Joins this process to a multi-process run (see the module docstring for where each setting
    comes from). Returns True when the distributed runtime is up (also when it already was),
    False for a single-process run, where nothing is done. Call it before any JAX computation."""
    import jax

    if jax.distributed.is_initialized():
        return True
    s = resolve(coordinator_address, num_processes, process_id)
    given = {k: v for k, v in s.items() if v is not None}
    if s["num_processes"] == 1:
        if s["process_id"] not in (None, 0):
            raise ValueError(f"--process_id={s['process_id']} with --num_processes=1; the only process is 0")
        return False
    cluster = None
    if not given:
        cluster = detected_cluster(AUTO_CLUSTERS)
        if cluster is None or _cluster_processes(cluster) <= 1:
            return False  # a single-process run
    elif len(given) < 3:
        cluster = detected_cluster()
        if cluster is None:
            missing = [f"{FLAGS[k]} (${ENV[k]})" for k in ENV if k not in given]
            have = ", ".join(f"{FLAGS[k]}={v}" for k, v in given.items())
            raise ValueError(
                f"a multi-process run needs all of --coordinator_address, --num_processes and --process_id; "
                f"got {have} but not {', '.join(missing)} (no cluster environment that JAX could fill them "
                "from was detected). Give all three, or none for a single-process run.")
    enable_cpu_collectives()
    if cluster is not None:
        log.info("joining the multi-process run: %s detected; JAX fills in %s", cluster.name,
                 [k for k in ENV if k not in given] or "nothing")
    else:
        log.info("joining the multi-process run at %s as process %d of %d", s["coordinator_address"],
                 s["process_id"], s["num_processes"])
    jax.distributed.initialize(
        coordinator_address=s["coordinator_address"], num_processes=s["num_processes"],
        process_id=s["process_id"], local_device_ids=local_device_ids)
    log.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


__all__ = ["AUTO_CLUSTERS", "ENV", "detected_cluster", "enable_cpu_collectives", "initialize", "resolve"]
