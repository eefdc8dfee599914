r"""Benchmarks that print figures: plan a TPU run from a laptop, and time the real step here.

    # Per-device HBM, FLOPs and collectives of the real train step on a TPU topology (needs the libtpu
    # wheel, not a TPU: pip install "jax[tpu]==0.10.2"); runs on CPU:
    python -m jaxunified.bench aot --config configs/vqgan.py:imagenet --topology v5e:4x4
    python -m jaxunified.bench aot --config configs/vqgan.py:star --topology v5e:8x8 --config.mesh_shape='(1,-1,1)'

    # steps/s, images/s, FLOPs/step and MFU of the jitted train step on the local devices:
    python -m jaxunified.bench step --config configs/vqgan.py:shapes --steps 20

    # generated tokens/s, KV-cache sampler vs recompute (batch 8, CFG, 256 image tokens):
    python -m jaxunified.bench sample --models GPT-B,qwen2.5-0.5b

    # the measured matmul peak of this device (the MFU denominator):
    python -m jaxunified.bench peak --dtype bfloat16

    # side by side with the PyTorch reference on this CPU (needs torch; LlamaGen's checkout for VQ
    # configs, transformers for SigLIP ones): train step and inference pass, both sides in alternating
    # rounds (--rounds, medians), and the ratios
    python -m jaxunified.bench torch --config configs/vqgan.py:imagenet --batch_size 2 --steps 3 \
        --warmup 1 --reference <FoundationVision/LlamaGen checkout>
    python -m jaxunified.bench torch --config configs/siglip.py:B16 --steps 5

Each command prints human-readable lines and, last, one JSON line with the same figures.
The same functions are importable: :func:`bench_step` (:class:`StepTimer` to time in rounds),
:func:`measure_matmul_peak`, and
``jaxunified.train.compile.compile_train_step``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from jaxunified import config_overrides
from jaxunified.parallel import hlo_cost

# ---------------------------------------------------------------------------------------------
# matmul peak


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {prefix}{unit}"
    return f"{x:.4g} {unit}"


def _sync(x):
    import jax

    return jax.block_until_ready(x)


def measure_matmul_peak(dtype: Any = "float32", size: int | None = None, trials: int = 5, device=None,
                        min_trial_seconds: float = 0.2) -> dict[str, Any]:
    """Best-of-``trials`` FLOP/s of a square ``size``×``size`` matmul in ``dtype`` on one device.

    Without ``size`` it grows from 512 (doubling) until one matmul takes ≥ 20 ms, up to 4096 on CPU
    and 16384 on accelerators. Each trial dispatches enough back-to-back matmuls to last about
    ``min_trial_seconds`` and is timed to ``block_until_ready``.
    """
    import jax
    import jax.numpy as jnp

    device = device or jax.local_devices()[0]
    dtype = jnp.dtype(dtype)
    cap = 4096 if device.platform == "cpu" else 16384
    f = jax.jit(lambda a, b: a @ b)

    def operands(n):
        ka, kb = jax.random.split(jax.random.PRNGKey(0))
        a = jax.device_put(jax.random.normal(ka, (n, n), jnp.float32).astype(dtype), device)
        b = jax.device_put(jax.random.normal(kb, (n, n), jnp.float32).astype(dtype), device)
        return a, b

    def once(a, b):
        t = time.perf_counter()
        _sync(f(a, b))
        return time.perf_counter() - t

    n = int(size) if size else 512
    a, b = operands(n)
    once(a, b)  # compile
    t1 = once(a, b)
    while not size and t1 < 0.02 and n < cap:
        n *= 2
        a, b = operands(n)
        once(a, b)
        t1 = once(a, b)
    reps = max(1, min(1000, int(math.ceil(min_trial_seconds / max(t1, 1e-6)))))
    best = float("inf")
    for _ in range(int(trials)):
        t = time.perf_counter()
        out = None
        for _ in range(reps):
            out = f(a, b)
        _sync(out)
        best = min(best, (time.perf_counter() - t) / reps)
    flops = 2.0 * n**3
    return {
        "device": device.device_kind,
        "platform": device.platform,
        "dtype": dtype.name,
        "size": n,
        "seconds": best,
        "flops_per_sec": flops / best,
        "tflops": flops / best / 1e12,
    }


# ---------------------------------------------------------------------------------------------
# the real train step


@dataclasses.dataclass
class StepBench:
    config: str
    num_devices: int
    device_kind: str
    global_batch: int
    steps: int
    seconds: float
    steps_per_sec: float
    images_per_sec: float
    flops_per_step: float  # the compiled step's matmul FLOPs (parallel.hlo_cost), summed over devices
    achieved_tflops: float  # flops_per_step × steps/s, all devices together
    peak_tflops: float  # measured matmul peak of one device, in compute_dtype
    mfu: float  # achieved / (num_devices × peak)
    compute_dtype: str
    compile_seconds: float
    loss: float
    # the task's inference pass (Task.forward) on the same batch; None where the task has none
    forward_seconds: float | None = None
    forward_images_per_sec: float | None = None
    forward_flops: float | None = None
    forward_mfu: float | None = None

    def summary(self) -> str:
        fwd = []
        if self.forward_seconds is not None:
            fwd = [f"forward         {self.forward_images_per_sec:.2f} images/s ({1e3 * self.forward_seconds:.1f} ms, "
                   f"{_si(self.forward_flops, 'FLOP')}), MFU {100 * self.forward_mfu:.1f}%"]
        return "\n".join([
            f"config          {self.config} on {self.num_devices} x {self.device_kind}, "
            f"global batch {self.global_batch}",
            f"compile         {self.compile_seconds:.1f} s",
            f"speed           {self.steps_per_sec:.3f} steps/s, {self.images_per_sec:.1f} images/s "
            f"({self.steps} steps in {self.seconds:.2f} s, warm-up excluded)",
            f"FLOPs           {_si(self.flops_per_step, 'FLOP')} per step (matmul, every loop iteration)",
            f"achieved        {_si(self.achieved_tflops * 1e12, 'FLOP/s')}",
            f"matmul peak     {_si(self.peak_tflops * 1e12, 'FLOP/s')} per device ({self.compute_dtype}, measured)",
            f"MFU             {100 * self.mfu:.1f}%   (final loss {self.loss:.4g})",
            *fwd,
        ])


def compute_dtype(trainer) -> str:
    """The compute dtype a config asks for: ``config[.model[.overrides]].{compute_,}dtype``, else the
    ``dtype`` of the task's model config (e.g. ``VQGANConfig.dtype``), else float32."""
    import jax.numpy as jnp

    cfg = trainer.config
    for scope in (cfg, cfg.get("model") or {}, (cfg.get("model") or {}).get("overrides") or {}):
        for key in ("compute_dtype", "dtype"):
            v = scope.get(key) if hasattr(scope, "get") else None
            if v:
                return jnp.dtype(v).name
    for v in vars(trainer.task).values():
        if dataclasses.is_dataclass(v) and not isinstance(v, type) and hasattr(v, "dtype"):
            return jnp.dtype(v.dtype).name
    return "float32"


def _random_batch(example: dict, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {}
    for k, v in example.items():
        v = np.asarray(v)
        if np.issubdtype(v.dtype, np.floating):
            out[k] = rng.uniform(-1.0, 1.0, v.shape).astype(v.dtype)
        elif v.dtype == np.uint8:
            out[k] = rng.integers(0, 256, v.shape, dtype=np.uint8)
        else:
            out[k] = v.copy()
    return out


def _flops(compiled, num_devices: int) -> float:
    # XLA's cost_analysis() counts a scanned layer stack's body once; this reads every iteration.
    # SPMD: the compiled module is one device's program; every device runs the same one.
    cost = hlo_cost.compiled_cost(compiled)
    if cost.warning:
        print(f"note: {cost.warning}", file=sys.stderr)
    return cost.flops * num_devices


class StepTimer:
    """``config``'s jitted train step and inference pass, compiled once on ``devices`` (default: all
    local devices) and fed random inputs of the real batch shape, to be timed in as many rounds as
    wanted (``bench torch`` alternates its rounds with the reference's, so a machine whose speed
    drifts within the minute slows both sides alike). Frozen sub-models (VQ, teacher, base LM) are
    random weights of their real shapes (``train.planning.shapes_only``): throughput needs no
    checkpoint or earlier run. Close it (or use it as a context manager) to drop its work folder."""

    def __init__(self, config, devices=None):
        import jax

        from jaxunified.train import planning
        from jaxunified.train.loop import Trainer

        self._tmp = tempfile.TemporaryDirectory(prefix="jaxunified_bench_")
        with planning.shapes_only(fill="random"):
            self.trainer = Trainer(config, workdir=self._tmp.name, devices=devices)
            self.state = self.trainer.init_state()
        self.num_devices = self.trainer.mesh.devices.size
        host = _random_batch(self.trainer.task.train_batch_example(), int(config.get("seed", 0)))
        self.global_batch = int(next(iter(host.values())).shape[0])
        self.batch = jax.device_put(host, self.trainer.batch_shardings(host))
        step = self.trainer.make_step(self.batch)
        t0 = time.perf_counter()
        with jax.set_mesh(self.trainer.mesh):
            self.compiled = step.lower(self.state, self.batch).compile()
        self.compile_seconds = time.perf_counter() - t0
        self.flops = _flops(self.compiled, self.num_devices)
        self.compute_dtype = compute_dtype(self.trainer)
        self.metrics, self._forward = None, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._tmp.cleanup()

    def step(self, steps: int, warmup: int = 0) -> float:
        """Seconds per train step: ``warmup`` untimed steps, then ``steps`` dispatched back to back and
        timed to ``block_until_ready`` of the final state, like the training loop runs them."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        for _ in range(max(0, int(warmup))):
            self.state, self.metrics = self.compiled(self.state, self.batch)
        _sync((self.state, self.metrics) if warmup else self.state)
        t0 = time.perf_counter()
        for _ in range(int(steps)):
            self.state, self.metrics = self.compiled(self.state, self.batch)
        _sync((self.state, self.metrics))
        return (time.perf_counter() - t0) / int(steps)

    @property
    def loss(self) -> float:
        import jax

        return float(jax.device_get((self.metrics or {}).get("loss", float("nan"))))

    def forward(self, steps: int) -> float | None:
        """Seconds per call of the task's inference pass with the state's current weights (compiled
        and warmed up on the first call), or None when the task defines none."""
        import jax

        from jaxunified.train.loop import with_axis_rules

        trainer, state = self.trainer, self.state
        if self._forward is False:
            def fwd(params, collections, b):
                return trainer.task.forward(params, collections, b)

            with jax.set_mesh(trainer.mesh):
                if jax.eval_shape(fwd, state.params, state.collections, self.batch) is None:
                    self._forward = None
                else:
                    self._forward = jax.jit(with_axis_rules(fwd, trainer.rules)).lower(
                        state.params, state.collections, self.batch).compile()
                    self.forward_flops = _flops(self._forward, self.num_devices)
                    _sync(self._forward(state.params, state.collections, self.batch))
        if self._forward is None:
            return None
        t0 = time.perf_counter()
        for _ in range(int(steps)):
            out = self._forward(state.params, state.collections, self.batch)
        _sync(out)
        return (time.perf_counter() - t0) / int(steps)

    def result(self, step_seconds: float, steps: int, forward_seconds: float | None, peak: dict | None = None,
               name: str = "") -> "StepBench":
        """The figures of a step timed at ``step_seconds`` (over ``steps`` steps) and an inference pass
        at ``forward_seconds``; ``peak`` as in :func:`bench_step`."""
        if peak is None:
            peak = measure_matmul_peak(self.compute_dtype, device=self.trainer.mesh.devices.flat[0])
        sps, gb = 1.0 / step_seconds, self.global_batch
        achieved = self.flops * sps
        peak_all = self.num_devices * peak["flops_per_sec"]
        fwd = {}
        if forward_seconds is not None:
            fwd = dict(forward_seconds=forward_seconds, forward_images_per_sec=gb / forward_seconds,
                       forward_flops=self.forward_flops,
                       forward_mfu=self.forward_flops / forward_seconds / peak_all if peak_all else float("nan"))
        return StepBench(config=name, num_devices=self.num_devices,
                         device_kind=self.trainer.mesh.devices.flat[0].device_kind, global_batch=gb,
                         steps=int(steps), seconds=step_seconds * steps, steps_per_sec=sps, images_per_sec=gb * sps,
                         flops_per_step=self.flops, achieved_tflops=achieved / 1e12, peak_tflops=peak["tflops"],
                         mfu=achieved / peak_all if peak_all else float("nan"), compute_dtype=self.compute_dtype,
                         compile_seconds=self.compile_seconds, loss=self.loss, **fwd)


def bench_step(config, steps: int = 20, warmup: int = 2, peak: dict | None = None, name: str = "",
               devices=None) -> StepBench:
    """Times ``config``'s jitted train step (:class:`StepTimer`): ``warmup`` steps after compilation
    excluded, then ``steps`` timed back to back; then the inference pass (one warm-up call, ``steps``
    timed). ``peak`` is a :func:`measure_matmul_peak` result to reuse (measured here when omitted).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    with StepTimer(config, devices) as timer:
        step_s = timer.step(steps, warmup)
        fwd_s = timer.forward(steps)
        return timer.result(step_s, steps, fwd_s, peak, name)


# ---------------------------------------------------------------------------------------------
# sampling


def bench_sample(model_name: str, batch: int = 8, tokens: int = 256, cfg_scale: float = 4.0, prompt_len: int = 16,
                 recompute_points: int = 6, seed: int = 0, dtype: str = "float32",
                 windows: int | None = None) -> dict[str, Any]:
    """Generated tokens/s of the KV-cache sampler vs recomputing the sequence, random weights.

    ``model_name``: a LlamaGen GPT variant (``GPT-B``…, class-conditional, 2-D RoPE over a
    √tokens grid) or a decoder-LM variant (``qwen2.5-0.5b``…, a ``prompt_len``-token prompt).
    CFG (``cfg_scale`` > 1) doubles the rows as the samplers do; top-k 1000 categorical draws.
    ``dtype`` bfloat16 stores the weights and runs the matmuls in bf16 (``sample.decode.cast_weights``).
    ``windows``: the samplers' ``cache_windows`` (None: ``sample.decode.auto_windows``).
    ``recompute_points`` 0 skips the recompute estimate.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxunified.sample import timing
    from jaxunified.sample.decode import auto_windows, cast_weights
    from jaxunified.sample.strategies import Categorical, Guidance

    guidance = Guidance(cfg_scale) if cfg_scale > 1.0 else None
    rows = batch * (2 if guidance else 1)
    strategy = Categorical(top_k=1000)
    key = jax.random.key(seed)
    if model_name.lower().startswith("gpt"):
        from jaxunified.models import llamagen_gpt as gpt_lib
        from jaxunified.sample.llamagen import sample_images

        grid = int(round(math.sqrt(tokens)))
        cfg = gpt_lib.variant(model_name, block_size=grid * grid, dtype=dtype)
        model = gpt_lib.LlamaGenGPT(cfg)
        cond = jnp.arange(batch, dtype=jnp.int32) % cfg.num_classes
        variables = jax.jit(lambda k: model.init(k, cond[:1], jnp.zeros((1, 1), jnp.int32)))(key)
        # The head starts at zero (LlamaGen's init), which would make every draw uniform.
        variables = nn.meta.unbox(variables)
        variables["params"]["output"] = 0.02 * jax.random.normal(key, variables["params"]["output"].shape)
        variables = cast_weights(variables, dtype)
        decode = lambda: sample_images(model, variables, cond, num_tokens=grid * grid, strategy=strategy,  # noqa: E731
                                       key=key, guidance=guidance, cache_windows=windows)
        conds = jnp.concatenate([cond, jnp.full_like(cond, cfg.num_classes)]) if guidance else cond
        fwd = jax.jit(lambda v, c, t: model.apply(v, c, t))
        forward = lambda n: fwd(variables, conds, jnp.zeros((rows, n), jnp.int32))  # noqa: E731
        start, stop, n_params = 0, grid * grid, _count(variables["params"])
    else:
        from jaxunified.models import lm as lm_lib
        from jaxunified.sample.lm import generate_text

        cfg = lm_lib.variant(model_name, dtype=dtype)
        model = lm_lib.DecoderLM(cfg)
        params = cast_weights(jax.jit(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32)))(key)["params"], dtype)
        prompts = [[1 + (i + j) % 1000 for j in range(prompt_len)] for i in range(batch)]
        uncond = [[0] * prompt_len for _ in range(batch)] if guidance else None
        decode = lambda: generate_text(model, params, prompts, max_new_tokens=tokens, strategy=strategy,  # noqa: E731
                                       key=key, guidance=guidance, uncond_prompts=uncond, cache_windows=windows)
        fwd = jax.jit(lambda p, ids: model.apply({"params": p}, ids)["logits"][:, -1])
        forward = lambda n: fwd(params, jnp.zeros((rows, n), jnp.int32))  # noqa: E731
        start, stop, n_params = prompt_len, prompt_len + tokens, _count(params)
    t0 = time.perf_counter()
    cached = timing.time_decode(decode)
    first_call = time.perf_counter() - t0 - cached
    recompute = (timing.time_recompute(forward, max(start, 1), stop, points=recompute_points)
                 if recompute_points else float("nan"))
    n_tokens = batch * tokens
    return {"model": model_name, "params": n_params, "dtype": jnp.dtype(dtype).name, "batch": batch, "tokens": tokens,
            "cfg": guidance is not None, "cache_windows": auto_windows(tokens, windows),
            "kv_cache_seconds": cached, "kv_cache_tokens_per_sec": n_tokens / cached,
            "recompute_seconds_est": recompute, "recompute_tokens_per_sec_est": n_tokens / recompute,
            "speedup": recompute / cached, "compile_seconds": first_call,
            "device": jax.local_devices()[0].device_kind}


def _count(params) -> int:
    import flax.linen as nn
    import jax

    return int(sum(x.size for x in jax.tree.leaves(nn.meta.unbox(params))))


# ---------------------------------------------------------------------------------------------
# command line


def _json_line(d: dict) -> str:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    return json.dumps({k: clean(v) for k, v in d.items()}, sort_keys=True, default=str)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    F = flags.FLAGS
    if "config" not in F:  # jaxunified.cli may have defined it already in this process
        config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vqgan.py:imagenet", lock_config=True)
    if "topology" not in F:
        flags.DEFINE_string("topology", None, "aot: TPU topology, e.g. v5e:4x4, v5p:2x2x2, v6e:2x4, v5e-64")
        flags.DEFINE_integer("num_slices", 1, "aot: number of slices (multi-slice over DCN)")
        flags.DEFINE_integer("batch_size", None, "aot/step/torch: global batch size (default: config.data.batch_size)")
        flags.DEFINE_integer("steps", 20, "step/torch: timed steps")
        flags.DEFINE_integer("warmup", 2, "step/torch: untimed steps after compilation")
        flags.DEFINE_integer("rounds", 3, "torch: alternating rounds of our step and the reference's (medians)")
        flags.DEFINE_string("dtype", None,
                            "peak/step: matmul dtype for the peak (default: the config's compute dtype, else float32); "
                            "sample: weight and matmul dtype (default float32)")
        flags.DEFINE_integer("size", None, "peak: matmul size (default: grown until one matmul takes >= 20 ms)")
        flags.DEFINE_list("models", ["GPT-B", "qwen2.5-0.5b"], "sample: GPT / LM variants to time")
        flags.DEFINE_integer("tokens", 256, "sample: generated tokens per row")
        flags.DEFINE_float("cfg_scale", 4.0, "sample: classifier-free guidance scale (1 = off)")
        flags.DEFINE_integer("windows", None, "sample: growing KV-cache prefixes (default: sample.decode.auto_windows)")
        flags.DEFINE_integer("recompute_points", 6, "sample: lengths timed for the recompute estimate (0: skip it)")
        flags.DEFINE_string("reference", "", "torch: the reference code's checkout (LlamaGen for vqgan configs)")
    return F


_USAGE = "usage: python -m jaxunified.bench {aot,step,peak,sample,torch} [flags]; see the module docstring"


def _config_name() -> str:
    for a in sys.argv:
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    if "--config" in sys.argv:
        i = sys.argv.index("--config")
        if i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return ""


def _main(argv):
    from absl import app

    F = _define_flags()
    if len(argv) != 2 or argv[1] not in ("aot", "step", "peak", "sample", "torch"):
        raise app.UsageError(_USAGE)
    cmd = argv[1]
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

    if cmd == "peak":
        r = measure_matmul_peak(F.dtype or "float32", size=F.size)
        print(f"matmul peak     {_si(r['flops_per_sec'], 'FLOP/s')} "
              f"({r['dtype']} {r['size']}x{r['size']} on {r['device']}, "
              f"best of 5, {1e3 * r['seconds']:.2f} ms per matmul)")
        print(_json_line({"command": "peak", **r}))
        return

    if cmd == "sample":
        for m in F.models:
            r = bench_sample(m, batch=F.batch_size or 8, tokens=F.tokens, cfg_scale=F.cfg_scale,
                             dtype=F.dtype or "float32", windows=F.windows, recompute_points=F.recompute_points)
            print(f"{m:14s} {r['params'] / 1e6:.0f}M params ({r['dtype']}), batch {r['batch']}, {r['tokens']} tokens, "
                  f"cfg {'on' if r['cfg'] else 'off'}, {r['cache_windows']} cache windows: "
                  f"KV cache {r['kv_cache_tokens_per_sec']:.1f} tok/s "
                  f"({r['kv_cache_seconds']:.2f} s), recompute ≈ {r['recompute_tokens_per_sec_est']:.1f} tok/s "
                  f"({r['recompute_seconds_est']:.1f} s) → {r['speedup']:.1f}×")
            print(_json_line({"command": "sample", **r}))
        return

    if F.config is None:
        raise app.UsageError("--config is required")
    config = config_overrides.apply_taken(F.config)
    name = _config_name()

    if cmd == "aot":
        if not F.topology:
            raise app.UsageError("--topology is required, e.g. --topology v5e:4x4")
        from jaxunified.train import compile as aot_compile

        try:
            report = aot_compile.compile_train_step(config, F.topology, batch_size=F.batch_size, num_slices=F.num_slices)
        except (RuntimeError, ValueError) as e:
            sys.exit(f"error: {e}")
        print(f"config          {name}")
        print(report.summary())
        print(_json_line({"command": "aot", "config": name, **report.to_dict()}))
        return

    # step (and torch: the same step beside the reference's)
    from jaxunified.train.compile import with_batch_size

    cfg = with_batch_size(config, F.batch_size)
    peak = measure_matmul_peak(F.dtype) if F.dtype else None
    if cmd == "step":
        r = bench_step(cfg, steps=F.steps, warmup=F.warmup, peak=peak, name=name)
        print(r.summary())
        print(_json_line({"command": "step", **dataclasses.asdict(r)}))
        return
    from jaxunified import bench_torch

    if F.rounds < 1:
        raise app.UsageError("--rounds must be >= 1")
    try:
        cfg = bench_torch.matched_config(cfg)
        ref = bench_torch.ReferenceTimer(cfg, F.reference)
    except (ImportError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    with StepTimer(cfg) as ours:
        r, rounds = torch_rounds(ours, ref, F.rounds, F.steps, F.warmup, peak, name)
    print(r.summary())
    info = ref.info()
    print(f"reference       {info['reference']} ({info['params'] / 1e6:.1f}M params, torch {info['torch']}, "
          f"{info['threads']} threads); {bench_torch.matched_changes(cfg)}")
    med = {k: statistics.median(v) for k in rounds[0] if None not in (v := [x[k] for x in rounds])}
    for part, label in (("step", "train step"), ("forward", "forward")):
        if f"ratio_{part}" in med:
            print(f"{label:15s} torch {med['torch_' + part]:.3f} s, ours {med['ours_' + part]:.3f} s → ours "
                  f"{med['ratio_' + part]:.2f}× torch's speed (median of {len(rounds)} alternating rounds: "
                  + ", ".join(f"{x['ratio_' + part]:.2f}×" for x in rounds) + ")")
    print(_json_line({"command": "torch", **dataclasses.asdict(r), "reference": info, "rounds": rounds,
                      "medians": med, "speedup": {f"{p}_seconds": med[f"ratio_{p}"] for p in ("step", "forward")
                                                  if f"ratio_{p}" in med}}))


def torch_rounds(ours: StepTimer, ref, rounds: int, steps: int, warmup: int, peak: dict | None = None, name: str = ""):
    """Our step and the reference's (``bench_torch.ReferenceTimer``) timed in ``rounds`` alternating
    rounds — each round times both steps, then both inference passes, the side that goes first
    swapping every round — after ``warmup`` untimed steps of each. Returns (our :class:`StepBench`
    at the median seconds, each round's seconds and ratios)."""
    if warmup:
        ours.step(warmup)
        ref.step(warmup)
        ref.forward(warmup)
    out = []
    for i in range(int(rounds)):
        sides = (("ours", ours), ("torch", ref))[::1 if i % 2 == 0 else -1]
        x = {f"{name}_step": side.step(steps) for name, side in sides}
        x.update({f"{name}_forward": side.forward(steps) for name, side in sides})
        for part in ("step", "forward"):
            x[f"ratio_{part}"] = x[f"torch_{part}"] / x[f"ours_{part}"] if x[f"ours_{part}"] else None
        out.append(x)
    fwd = [x["ours_forward"] for x in out]
    r = ours.result(statistics.median(x["ours_step"] for x in out), steps,
                    None if fwd[0] is None else statistics.median(fwd), peak, name)
    return r, out


def main():
    # `aot` compiles for compile-only TPU devices; keep the run itself off any local accelerator plugin
    # (an installed libtpu would otherwise try to claim a TPU that is not there).
    if len(sys.argv) > 1 and sys.argv[1] == "aot":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jaxunified import cpu_flags

    cpu_flags.apply()
    from absl import app

    _define_flags()
    config_overrides.take_from_argv()
    try:
        app.run(_main)
    except (AttributeError, KeyError) as e:
        # ml-collections reports an override of a key the config lacks this way, while parsing flags.
        bad = [a.split("=")[0] for a in sys.argv if a.startswith("--config.")]
        if bad and ("Did you mean" in str(e) or "override" in str(e) or str(e).strip("'\"") in " ".join(bad)):
            msg = " ".join(str(e).replace("\\n", " ").replace("\\", "").replace("'", "").replace('"', "").split())
            sys.exit(f"error: bad --config override ({', '.join(bad)}): unknown key {msg}; "
                     "the fields are listed in the config file")
        raise


if __name__ == "__main__":
    main()
