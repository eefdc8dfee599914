"""What a task module provides to the shared loop, the helpers every task shares, and the registry."""

from __future__ import annotations

import importlib
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.data import cache
from jaxunified.data.pipeline import build_dataset
from jaxunified.train.planning import placeholder

# task name -> "module:Class". Looked up by name so that a task taking a sub-model from another
# task's run (train.runs.load_run) never imports that task's module.
TASKS = {
    "vqgan": "jaxunified.train.vqgan:VQGANTask",
    "siglip": "jaxunified.train.siglip:SigLIPTask",
    "dualtoken": "jaxunified.train.dualtoken:DualTokenTask",
    "toklip": "jaxunified.train.toklip:TokLIPTask",
    "ar": "jaxunified.train.ar:ARTask",
    "mllm": "jaxunified.train.mllm:MLLMTask",
    "star": "jaxunified.train.star:STARTask",
}


class Task:
    """Base class. A task builds its models, initial variables, gradients and eval; never the loop.

    Subclasses implement:
      * ``init_variables(rng, batch) -> (params, collections)``: dicts keyed by sub-model name;
        leaves may be logically-partitioned boxes.
      * ``grad_fn(params, collections, batch, rng, step, axis_name) -> (grads, collections, metrics)``:
        gradients for every param leaf (zeros for frozen ones are fine; the optimizer ignores them).
        When ``axis_name`` is set the function runs per device inside ``shard_map`` and must
        reduce anything that needs the global batch (EMA stats, BN stats, adaptive weights) itself;
        the loop averages the returned gradients and metrics.
      * ``evaluate(state, split, workdir, step) -> dict`` for eval.py and periodic eval.
      * ``export(params, collections) -> (module, variables)``: the run's model as another run
        uses it (``train.runs.load_run``), and ``model_config(config)``: that module's config.
    and may override ``param_labels`` (optimizer groups; ``"frozen"`` = not trained), ``group_lr``
    and ``forward`` (the model's inference pass, what ``bench step`` times beside the train step).
    """

    def __init__(self, config, mesh):
        self.config = config
        self.mesh = mesh

    @classmethod
    def model_config(cls, config):
        raise NotImplementedError(f"{cls.__name__} does not export a model config")

    def export(self, params, collections):
        raise NotImplementedError(f"{type(self).__name__} does not export a model")

    def dummy_batch(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def train_batch_example(self) -> dict[str, np.ndarray]:
        """A host batch shaped like the training split's (what the train step is compiled for):
        ``dummy_batch`` unless the task trains on a cache of frozen outputs (``data.cache_dir``)."""
        return self.dummy_batch()

    @staticmethod
    def cache_fields(fns: dict):
        """``(frozen, batch) -> {name: array}`` from a cache's field functions ``{name: (frozen, batch)
        -> array}``: what ``precompute_cache`` jits and ``cached_fields_example`` shapes."""
        return lambda frozen, batch: {k: f(frozen, batch) for k, f in fns.items()}

    # Tasks that train on a cache of frozen outputs define ``_cache_fns()`` ({field: (frozen, batch) ->
    # array}) and ``_frozen_host()`` (the frozen variables as host arrays), and read these batch fields
    # (TokLIP's cache, written per field from given weights, has its own precompute_cache).
    cache_inputs: tuple[str, ...] = ("image", "tokens")

    def precompute_cache(self, split: str, path, batch_size: int = 256):
        """Runs the frozen parts once over ``split`` and writes the cached fields to ``path``: training
        then reads them instead of running the frozen parts per step. Returns ``path``."""
        return self.write_cache_fields(self._cache_fns(), self._frozen_host(), split, path, inputs=self.cache_inputs,
                                       batch_size=batch_size)

    def cached_batch_example(self, batch) -> dict[str, np.ndarray]:
        """Zeros shaped like the cached fields of ``batch`` (``cached_fields_example`` of this task's cache)."""
        return self.cached_fields_example(self._cache_fns(), self._frozen_host(), batch)

    def write_cache_fields(self, fns: dict, frozen, split: str, path, inputs: tuple[str, ...] = ("image", "tokens"),
                           batch_size: int = 256):
        """Runs ``cache_fields(fns)`` jitted over ``split`` in order and writes the fields to ``path``
        (``data.cache.write_cache``); ``frozen`` (host arrays) is an argument, not a constant of the
        compiled function. Returns ``path``."""
        step = jax.jit(self.cache_fields(fns))
        cache.write_cache(lambda b: step(frozen, b), self.config.data, split, path, inputs=inputs, batch_size=batch_size)
        return path

    @classmethod
    def cached_fields_example(cls, fns: dict, frozen, batch) -> dict[str, np.ndarray]:
        """Zeros shaped like what ``cache_fields(fns)`` writes for ``batch``, by ``jax.eval_shape`` (so
        the compiled step and ``precompute_cache`` read their shapes from the same functions)."""
        fields = jax.eval_shape(cls.cache_fields(fns), frozen, batch)
        return {k: np.zeros(v.shape, v.dtype) for k, v in fields.items()}

    def init_variables(self, rng, batch):
        raise NotImplementedError

    def param_labels(self, params) -> Any:
        return None

    def group_lr(self) -> dict[str, float]:
        return {}

    def grad_fn(self, params, collections, batch, rng, step, axis_name=None):
        raise NotImplementedError

    def forward(self, params, collections, batch):
        """The trained model's inference pass over ``batch`` (no loss, no gradient); None when the task
        has no single forward to time."""
        return None

    def build_dataset(self, split: str):
        """The run's host batches for ``split``; tasks with cached inputs (TokLIP codes) override it."""
        return build_dataset(self.config.data, split, self.mesh)

    def cached_train_dataset(self, split: str, prefix: str, key_fn, build=None, **fields):
        """``split``'s batches from a cache of frozen outputs in ``data.cache_dir`` (training only;
        other splits, or no cache_dir, read the data). The cache is named by ``key_fn()`` (a digest
        of the frozen weights, so only computed here); a missing one is built by ``build(path, key)``
        when ``data.build_cache`` (by default ``precompute_cache(split, path)``), else an error.
        ``fields`` go to ``cache.cached_dataset``."""
        cache_dir = self.config.data.get("cache_dir") or ""
        if split != "train" or not cache_dir:
            return build_dataset(self.config.data, split, self.mesh, fields.get("extra_transforms", ()))
        key = key_fn()
        path = cache.cache_path(cache_dir, split, key, prefix=prefix)
        self.ensure_cache(path, (lambda: self.precompute_cache(split, path)) if build is None else
                          (lambda: build(path, key)), "precompute_cache")
        return cache.cached_dataset(self.config.data, split, self.mesh, path, **fields)

    def ensure_cache(self, path, build, builder: str):
        """Runs ``build()`` when the cache at ``path`` is missing and ``data.build_cache``; a missing
        cache without it is an error naming the task's ``builder`` method. Returns ``path``."""
        if not pathlib.Path(path).exists():
            if not self.config.data.get("build_cache", False):
                raise FileNotFoundError(f"no cache at {path}; build it with {type(self).__name__}.{builder} "
                                        "or set data.build_cache=True")
            build()
        return path

    def evaluate(self, state, split: str, workdir, step: int) -> dict:
        raise NotImplementedError

    def eval_num_examples(self) -> int | None:
        """``config.eval.num_examples``; 0 or unset is the whole split (None)."""
        return int(self.config.eval.get("num_examples", 0)) or None


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    mod, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def kwargs(node) -> dict:
    """A config node as dataclass keyword arguments: lists (JSON round trips) → tuples, ``dtype`` names → dtypes."""
    d = node.to_dict() if hasattr(node, "to_dict") else dict(node or {})
    out = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
    if "dtype" in out:
        out["dtype"] = jnp.dtype(out["dtype"])
    return out


def eval_params(state):
    """The weights evaluation uses: the EMA copy when the run keeps one."""
    return state.ema_params if state.ema_params else state.params


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def fill_boxes(boxed, values, what: str):
    """Loaded ``values`` (a plain tree) wearing the logical-partitioning boxes of ``boxed`` (init's
    output), so they shard like the module's own params; structure and shapes must match, dtypes
    follow ``boxed``."""
    if jax.tree.structure(nn.meta.unbox(boxed)) != jax.tree.structure(values):
        raise ValueError(f"{what} does not have the model's parameter structure; check the model config")

    def put(box, v):
        if isinstance(v, jax.ShapeDtypeStruct):  # a shapes-only frozen part (train.planning)
            v = placeholder(v)
        v = jnp.asarray(v)
        target = box.value if _is_box(box) else box
        if v.shape != target.shape:
            raise ValueError(f"{what}: shape {v.shape} where the model has {target.shape}")
        v = v.astype(target.dtype)
        return box.replace_boxed(v) if _is_box(box) else v

    return jax.tree.map(put, boxed, values, is_leaf=_is_box)


def host_variables(module, rng, *args, **kw) -> dict:
    """``module.init`` run once, unboxed and host-resident (random frozen parts of smoke tests)."""
    return jax.device_get(nn.meta.unbox(jax.jit(lambda r: module.init(r, *args, **kw))(rng)))
