"""The shared loop's invariants on the tiny VQGAN config: sharded == single device, resume == uninterrupted,
NaN stops with the step named, SIGTERM saves and exits, bad overrides are clear errors."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from jaxunified.data.pipeline import build_dataset
from jaxunified.train import loop as looplib
from jaxunified.train.checkpoint import Checkpointer
from tests import helpers
from tests.helpers import one_step

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**kw):
    return helpers.tiny_config("vqgan", **kw)


@pytest.mark.parametrize("form", ["global", "per_device"])
def test_sharded_step_equals_single_device(form):
    # SGD keeps the update linear in the gradient. Adam would turn float noise in gradients that are
    # zero in exact arithmetic (conv biases right before a one-channel-per-group GroupNorm) into
    # ±lr-sized steps, which says nothing about the sharding.
    config = tiny_config(step_form=form, **{"optim.name": "sgd", "optim.lr": 0.1})
    one = looplib.Trainer(config, "/tmp/unused", devices=jax.devices()[:1])
    batch_np = next(iter(build_dataset(config.data, "train", one.mesh)))
    batch_np = {k: v for k, v in batch_np.items() if k == "image"}
    ref = one_step(tiny_config(step_form="global", **{"optim.name": "sgd", "optim.lr": 0.1}), jax.devices()[:1], batch_np)
    got = one_step(config, jax.devices(), batch_np)
    assert len(jax.devices()) == 8
    chex.assert_trees_all_close(got[0], ref[0], atol=2e-5, rtol=2e-4)
    chex.assert_trees_all_close(got[1], ref[1], atol=2e-5, rtol=2e-4)
    for k in ("loss", "rec_loss", "d_loss", "d_weight", "usage", "grad_norm"):
        np.testing.assert_allclose(got[2][k], ref[2][k], rtol=1e-4, atol=1e-6)


def test_cpu_compiler_options_reach_the_step_and_keep_its_result():
    """``config.xla_cpu_options`` compiles the CPU step with other XLA options (YNNPACK matmuls here):
    the step still runs and gives the same update to float rounding; a bad value names the option."""
    sgd = {"optim.name": "sgd", "optim.lr": 0.1}
    config = tiny_config(**sgd)
    trainer = looplib.Trainer(config, "/tmp/unused", devices=jax.devices()[:1])
    batch_np = next(iter(build_dataset(config.data, "train", trainer.mesh)))
    batch_np = {k: v for k, v in batch_np.items() if k == "image"}
    ynn = {"xla_cpu_options": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}}
    with_options = tiny_config(**sgd, **ynn)
    assert looplib.Trainer(with_options, "/tmp/unused", devices=jax.devices()[:1]).compiler_options() == \
        ynn["xla_cpu_options"]
    assert trainer.compiler_options() is None
    got = one_step(with_options, jax.devices()[:1], batch_np)
    ref = one_step(config, jax.devices()[:1], batch_np)
    chex.assert_trees_all_close(got[0], ref[0], atol=2e-5, rtol=2e-4)
    bad = tiny_config(**sgd, xla_cpu_options={"xla_cpu_experimental_ynn_fusion_type": "fast"})
    with pytest.raises(Exception, match="xla_cpu_experimental_ynn_fusion_type"):
        one_step(bad, jax.devices()[:1], batch_np)


def _final_params(workdir, config):
    trainer = looplib.Trainer(config, workdir)
    ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", async_save=False)
    state = ckpt.restore(trainer.layout.target)
    ckpt.close()
    return int(state.step), jax.device_get(state.params), jax.device_get(state.collections)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted tiny run shared by the resume and eval tests."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    config = tiny_config(total_steps=6, checkpoint_every=2)
    looplib.Trainer(config, workdir).run()
    return config, workdir


def test_eval_writes_metrics_json_and_grid(tiny_run):
    import json

    from jaxunified.train.evaluate import evaluate_run

    config, workdir = tiny_run
    metrics = evaluate_run(config, workdir)
    saved = json.loads((workdir / "eval_test.json").read_text())
    assert saved == pytest.approx(metrics)
    assert saved["step"] == 6 and saved["num_examples"] == 64
    assert 0 < saved["psnr"] < 60 and -1 <= saved["ssim"] <= 1
    assert 0 < saved["codebook_usage"] <= 1 and saved["codebook_perplexity"] >= 1
    assert list(workdir.glob("recon_test_*.png"))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6]
    assert list((workdir / "tb").glob("events.*"))


def test_crash_and_rerun_equals_uninterrupted(tmp_path, monkeypatch, tiny_run):
    config, workdir_a = tiny_run

    real_make_step = looplib.Trainer.make_step
    calls = {"n": 0}

    def crashing_make_step(self, batch):
        fn = real_make_step(self, batch)

        def wrapped(*a):
            calls["n"] += 1
            if calls["n"] == 4:  # dies during step 4, after the step-2 checkpoint
                raise RuntimeError("simulated crash")
            return fn(*a)

        return wrapped

    monkeypatch.setattr(looplib.Trainer, "make_step", crashing_make_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        looplib.Trainer(config, tmp_path / "b").run()
    monkeypatch.setattr(looplib.Trainer, "make_step", real_make_step)
    assert Checkpointer(tmp_path / "b" / "checkpoints").latest_step() == 2
    looplib.Trainer(config, tmp_path / "b").run()

    sa, pa, ca = _final_params(workdir_a, config)
    sb, pb, cb = _final_params(tmp_path / "b", config)
    assert sa == sb == 6
    chex.assert_trees_all_close(pa, pb, atol=1e-6)
    chex.assert_trees_all_close(ca, cb, atol=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(total_steps=6, checkpoint_every=2, log_every=1)
    trainer = looplib.Trainer(config, tmp_path)
    real = trainer.task.grad_fn

    def poisoned(params, collections, batch, rng, step, axis_name=None):
        grads, colls, metrics = real(params, collections, batch, rng, step, axis_name)
        metrics["loss"] = jax.numpy.where(step >= 4, jax.numpy.nan, metrics["loss"])
        return grads, colls, metrics

    trainer.task.grad_fn = poisoned
    with pytest.raises(looplib.NonFiniteLossError, match="at step 5"):
        trainer.run()
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 4


def _train_cmd(workdir, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/vqgan.py") + ":tiny",
            "--workdir", str(workdir), f"--config.data.data_dir={tiny_config().data.data_dir}", *extra]


def _env():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = ""  # the subprocess runs on one CPU device; 8 fake ones only slow it down
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_bad_override_is_a_clear_error(tmp_path):
    r = subprocess.run(_train_cmd(tmp_path, "--config.optim.lrr=1"), capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert r.returncode != 0
    assert "lrr" in r.stderr and "lr" in r.stderr


def _interrupt(workdir, extra, sig, after_step):
    """Starts the command, sends ``sig`` once checkpoint ``after_step`` exists, returns (rc, stderr)."""
    proc = subprocess.Popen(_train_cmd(workdir, *extra), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ckdir = workdir / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckdir / str(after_step)).exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow
def test_terminated_then_killed_command_rerun_equals_uninterrupted(tmp_path):
    """SIGTERM saves and exits 0; SIGKILL loses only the steps since the last checkpoint; the same
    command, re-run, ends with the parameters of a run that was never interrupted."""
    extra = ["--config.total_steps=40", "--config.checkpoint_every=5", "--config.log_every=5"]
    subprocess.run(_train_cmd(tmp_path / "a", *extra), check=True, env=_env(), timeout=600, capture_output=True)

    rc, err = _interrupt(tmp_path / "b", extra, signal.SIGTERM, after_step=10)
    latest = Checkpointer(tmp_path / "b" / "checkpoints").latest_step()
    assert rc == 0, err[-2000:]
    assert "received signal" in err and latest is not None and 10 <= latest < 40

    rc, _ = _interrupt(tmp_path / "b", extra, signal.SIGKILL, after_step=25)
    assert rc == -signal.SIGKILL
    assert Checkpointer(tmp_path / "b" / "checkpoints").latest_step() < 40, "finished before the kill"

    subprocess.run(_train_cmd(tmp_path / "b", *extra), check=True, env=_env(), timeout=600, capture_output=True)
    config = tiny_config(total_steps=40)
    sa, pa, ca = _final_params(tmp_path / "a", config)
    sb, pb, cb = _final_params(tmp_path / "b", config)
    assert sa == sb == 40
    chex.assert_trees_all_close(pa, pb, atol=1e-6)
    chex.assert_trees_all_close(ca, cb, atol=1e-6)
