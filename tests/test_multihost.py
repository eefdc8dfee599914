"""Multi-process training on one machine: two ``train.py`` processes with one CPU device each, joined
through ``--coordinator_address/--num_processes/--process_id`` (gloo collectives over localhost).

* the global batch of a step is the same, row for row, on any number of processes (each process
  reads its block of it), so two processes × 1 device end with the parameters of one process × 2
  devices (the VQGAN step is not invariant to the order of rows: restarts pick rows by index);
* both processes write each checkpoint (own data-iterator position, own array shards) and one
  process restores it;
* a SIGTERM to one process makes both save the same step and exit 0; a process SIGKILLed after a
  checkpoint takes the job down, and relaunching both resumes from that checkpoint and ends with
  the parameters of the uninterrupted run.

The subprocesses' output goes to ``<workdir>.p<i>.log`` and is shown when a check fails; every wait
has a timeout, so a hung collective fails the test instead of hanging it.
"""

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from jaxunified.data import pipeline
from jaxunified.parallel import distributed
from jaxunified.train import loop as looplib
from jaxunified.train.checkpoint import Checkpointer
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL, EVERY = 6, 2
# SGD keeps float-rounding differences (other devices sum other rows) rounding-sized; no GAN term
# (its adaptive weight amplifies them, and the discriminator only adds compile time here).
OVERRIDES = {"total_steps": TOTAL, "checkpoint_every": EVERY, "log_every": 2, "final_eval": False,
             "optim.name": "sgd", "optim.lr": 0.1, "loss.disc_weight": 0.0, "loss.adaptive_weight": False}
RUN_TIMEOUT = 300  # seconds for one launch (start-up and compile included); a hang fails, not blocks


def _config():
    return helpers.tiny_config("vqgan", **OVERRIDES)


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in distributed.ENV.values()}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}" if devices > 1 else "",
               # As in conftest: the non-partitionable threefry compiles random init ~3x faster; every
               # run here uses it, so they all start from the same parameters.
               JAX_THREEFRY_PARTITIONABLE="0",
               # The tests' compilation cache: relaunches load process 0's programs (JAX writes only
               # process 0's, and process 1's cache keys differ, so process 1 always compiles).
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    env.update(extra)
    return env


def _args(workdir) -> list[str]:
    return ["--config", f"{ROOT / 'configs/vqgan.py'}:tiny", "--workdir", str(workdir),
            f"--config.data.data_dir={helpers.TEST_DATA_DIR}", *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]


# train.py with test hooks: every process prints the step it starts from; process 1 interrupts
# itself at a known step (JAXUNIFIED_TEST_ACTION): "term": SIGTERM before its first step; "kill":
# SIGKILL once the first checkpoint this launch writes is committed (before the next step), as a
# crashed host would.
_WORKER = r"""
import os, pathlib, signal, sys, time
from jaxunified.train import loop

action, every = os.environ.get("JAXUNIFIED_TEST_ACTION"), int(os.environ.get("JAXUNIFIED_TEST_EVERY", "1"))
ckdir = pathlib.Path(sys.argv[sys.argv.index("--workdir") + 1]) / "checkpoints"

def committed():
    return [int(p.name) for p in ckdir.glob("*") if p.name.isdigit()] if ckdir.is_dir() else []

real = loop.Trainer.make_step

def make_step(self, batch):
    fn = real(self, batch)
    start = max(committed(), default=0)
    target = (start // every + 1) * every
    calls = [0]

    def step(state, b):
        i, calls[0] = calls[0], calls[0] + 1
        if i == 0:
            import jax
            print(f"test hook: process {jax.process_index()} starts at step {int(state.step)}", file=sys.stderr,
                  flush=True)
        if action == "term" and i == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the notice reaches process 0 while it waits for this one at step 1
        if action == "kill" and start + i == target:
            deadline = time.time() + 120
            while target not in committed() and time.time() < deadline:
                time.sleep(0.05)
            print(f"test hook: checkpoint {target} committed; SIGKILL to process 1", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(state, b)
    return step

loop.Trainer.make_step = make_step
sys.argv[0] = "train.py"
from jaxunified.cli import main_train
main_train()
"""


def _log(workdir, i) -> pathlib.Path:
    return workdir.parent / f"{workdir.name}.p{i}.log"


def _logs(workdir, n=2) -> str:
    out = []
    for i in range(n):
        path = _log(workdir, i)
        text = path.read_text(errors="replace") if path.exists() else "(no log)"
        out.append(f"----- {path.name} (last 4000 chars) -----\n{text[-4000:]}")
    return "\n".join(out)


def _launch(workdir, *, hook_action=None) -> list[subprocess.Popen]:
    """Both processes of a 2-process run (process 1 with the test hook when ``hook_action``)."""
    port = _free_port()
    procs = []
    for i in range(2):
        dist = ["--num_processes=2", f"--process_id={i}", f"--coordinator_address=localhost:{port}"]
        if hook_action is None:
            cmd = [sys.executable, str(ROOT / "train.py")]
            env = _env(1)
        else:
            cmd = [sys.executable, "-c", _WORKER]
            env = _env(1, JAXUNIFIED_TEST_EVERY=str(EVERY), **({"JAXUNIFIED_TEST_ACTION": hook_action} if i == 1 else {}))
        with open(_log(workdir, i), "a") as log:
            log.write(f"===== launch {time.strftime('%X')}: {' '.join(cmd[:2])} ... {' '.join(dist)}\n")
            log.flush()
            procs.append(subprocess.Popen(cmd + _args(workdir) + dist, cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
    return procs


def _wait(procs, workdir, timeout=RUN_TIMEOUT) -> list[int]:
    """Exit statuses of ``procs``; past ``timeout`` all are killed and the test fails with their logs."""
    deadline = time.time() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.time(), 1)) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"run did not finish in {timeout} s (a hung collective?)\n{_logs(workdir)}")


def _run_two(workdir):
    rcs = _wait(_launch(workdir), workdir)
    assert rcs == [0, 0], _logs(workdir)


def _run_one(workdir, devices=2):
    with open(_log(workdir, 0), "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *_args(workdir)], cwd=ROOT,
                                env=_env(devices), stdout=log, stderr=subprocess.STDOUT)
    assert _wait([proc], workdir) == [0], _logs(workdir)


def _latest(workdir):
    ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", async_save=False)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def _restore(workdir, step=None):
    """(step, params, collections) of a checkpoint, restored by this (single) process on its own mesh."""
    config = _config()
    trainer = looplib.Trainer(config, workdir)
    ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", async_save=False)
    try:
        state = ckpt.restore(trainer.layout.target, step=step)
    finally:
        ckpt.close()
    return int(state.step), jax.device_get(state.params), jax.device_get(state.collections)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The uninterrupted 2-process run every test compares against (its timing is printed with -s)."""
    pipeline.make_source(_config().data, "train")  # build the shapes data once, before the processes start
    workdir = tmp_path_factory.mktemp("multihost") / "two"
    t0 = time.time()
    _run_two(workdir)
    print(f"\n2-process run of {TOTAL} steps: {time.time() - t0:.1f} s")
    return workdir


# ---- settings and data order (no subprocess) ----


def test_distributed_settings_are_checked(monkeypatch):
    for var in distributed.ENV.values():
        monkeypatch.delenv(var, raising=False)
    class OneHost:  # e.g. a single-host Cloud TPU VM
        name = "gcetpu"

        @staticmethod
        def get_process_count():
            return 1

    monkeypatch.setattr(distributed, "detected_cluster", lambda only=None: OneHost)
    assert distributed.initialize() is False  # nothing given, a 1-process cluster: a single-process run
    monkeypatch.setattr(distributed, "detected_cluster", lambda only=None: None)
    assert distributed.initialize() is False  # nothing given, no cluster: a single-process run
    assert distributed.initialize(num_processes=1) is False
    with pytest.raises(ValueError, match="--process_id=2 must be below --num_processes=2"):
        distributed.initialize("localhost:1234", 2, 2)
    with pytest.raises(ValueError, match=r"not --coordinator_address \(\$JAX_COORDINATOR_ADDRESS\), --process_id"):
        distributed.initialize(num_processes=2)
    with pytest.raises(ValueError, match="host:port"):
        distributed.initialize("localhost", 2, 0)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "two")
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID must be an integer, got 'two'"):
        distributed.initialize("localhost:1234")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    with pytest.raises(ValueError, match="--process_id=3 must be below --num_processes=2"):
        distributed.initialize("localhost:1234")
    assert not jax.distributed.is_initialized()


def test_cli_names_missing_distributed_flags(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *_args(tmp_path / "w"), "--num_processes=2",
                        "--process_id=1"], cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "--coordinator_address" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


class _Source:
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return {"id": np.int32(i)}

    def __repr__(self):
        return "_Source(40)"


def test_processes_read_their_block_of_the_single_process_global_batch(monkeypatch):
    """Each step, the local batches of P processes, concatenated in process order, are the global
    batch one process reads, row for row (also after a resume from a saved iterator position); a
    one-pass read (evaluation) covers every record once but the last < P."""
    def batches(process, count, steps=12, state=None, batch=8, **kw):
        monkeypatch.setattr(jax, "process_index", lambda: process)
        monkeypatch.setattr(jax, "process_count", lambda: count)
        it = iter(pipeline.make_loader(_Source(), batch, seed=3, normalize=False, **kw))
        if state is not None:
            it.set_state(state)
        out = [b["id"] for _, b in zip(range(steps), it)]
        return out, it.get_state()

    single, _ = batches(0, 1)
    for count in (2, 4):
        local = [batches(p, count)[0] for p in range(count)]
        for step, want in enumerate(single):
            np.testing.assert_array_equal(np.concatenate([local[p][step] for p in range(count)]), want)
    head, state = batches(1, 2, steps=5)
    tail, _ = batches(1, 2, steps=7, state=state)
    np.testing.assert_array_equal(np.stack(head + tail), np.stack(batches(1, 2)[0]))

    once = dict(shuffle=False, num_epochs=1, drop_remainder=False, steps=99, batch=6)
    local = [batches(p, 3, **once)[0] for p in range(3)]
    np.testing.assert_array_equal(np.concatenate([local[p][0] for p in range(3)]), np.arange(6))
    seen = np.concatenate([np.concatenate(b) for b in local])
    assert len(seen) == len(set(seen.tolist())) == 39  # 40 records: 6 full batches, then 4 dealt to 3


# ---- two real processes ----


@pytest.mark.slow
def test_two_processes_match_one_process_and_share_checkpoints(two_process_run, tmp_path):
    workdir = two_process_run
    # Both processes wrote every checkpoint: each its data-iterator position, together one train state.
    for step in range(EVERY, TOTAL + 1, EVERY):
        data = workdir / "checkpoints" / str(step) / "data"
        assert sorted(p.name for p in data.glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]
    # Only process 0 wrote metrics (one row per logged step) and the config.
    rows = [line for line in (workdir / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert len(rows) == TOTAL // 2 and (workdir / "config.json").exists()

    t0 = time.time()
    _run_one(tmp_path / "one", devices=2)
    print(f"\n1-process 2-device run of {TOTAL} steps: {time.time() - t0:.1f} s")
    s2, p2, c2 = _restore(workdir)  # the 2-process checkpoint, restored by one process over 8 devices
    s1, p1, c1 = _restore(tmp_path / "one")
    assert s1 == s2 == TOTAL
    chex.assert_trees_all_close(p2, p1, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(c2, c1, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_preempted_and_killed_processes_resume(two_process_run, tmp_path):
    workdir = tmp_path / "b"

    # 1. SIGTERM to process 1 only: both processes save the same step and exit cleanly.
    t0 = time.time()
    rcs = _wait(_launch(workdir, hook_action="term"), workdir)
    assert rcs == [0, 0], _logs(workdir)
    saved = _latest(workdir)
    assert saved is not None and 0 < saved < TOTAL, (saved, _logs(workdir))
    for i in range(2):
        assert f"saved step {saved}, exiting" in _log(workdir, i).read_text(), _logs(workdir)
    assert sorted(p.name for p in (workdir / "checkpoints" / str(saved) / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]

    # 2. Relaunch; process 1 is SIGKILLed right after the next checkpoint. Process 0's next collective
    # fails, and it exits (status 1) without waiting at JAX's shutdown barrier for the dead process.
    procs = _launch(workdir, hook_action="kill")
    try:
        assert _wait(procs[1:], workdir) == [-signal.SIGKILL], _logs(workdir)
        t_kill = time.time()
        # Far below JAX's shutdown-barrier wait (minutes), far above a clean exit on 2 cores shared with
        # another pytest worker (process 0 may still be compiling when its peer dies).
        rc0 = _wait(procs[:1], workdir, timeout=150)[0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"\nprocess 0 exited {time.time() - t_kill:.1f} s after process 1 was killed, status {rc0}")
    assert rc0 == 1, _logs(workdir)
    killed_at = _latest(workdir)
    assert killed_at == (saved // EVERY + 1) * EVERY < TOTAL, (killed_at, _logs(workdir))

    # 3. Relaunch both: resume from that checkpoint and end where the uninterrupted run ended.
    rcs = _wait(_launch(workdir, hook_action="none"), workdir)
    assert rcs == [0, 0], _logs(workdir)
    print(f"interrupted 2-process runs (3 launches): {time.time() - t0:.1f} s")
    for i in range(2):
        last = _log(workdir, i).read_text().rsplit("===== launch", 1)[1]
        assert f"process {i} starts at step {killed_at}" in last, _logs(workdir)
    sa, pa, ca = _restore(two_process_run)
    sb, pb, cb = _restore(workdir)
    assert sa == sb == TOTAL
    chex.assert_trees_all_close(pb, pa, atol=1e-6)
    chex.assert_trees_all_close(cb, ca, atol=1e-6)
