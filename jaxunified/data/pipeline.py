"""Grain input pipelines: a random-access source → per-process numpy batches → global ``jax.Array``s.

Host side (``make_loader``): a ``grain.DataLoader`` with an ``IndexSampler`` (global shuffle,
epochs, seed) sharded over JAX processes, so each process reads ``global_batch_size /
process_count`` examples per step: its block of the step's global batch, which is the same, row
for row, whatever the number of processes. Batches are dicts of numpy arrays; images stay uint8 until
the final ``normalize_images`` batch transform; string fields (captions) are object arrays.

Device side (``to_global``): each numeric field becomes one global ``jax.Array`` whose leading
axis is sharded over the mesh's batch axes. Strings never leave the host.

The training loop's entry point is ``build_dataset(cfg, split, mesh)``: an iterator of host
batches of a fixed shape, checkpointable through Orbax beside the train state::

    it = build_dataset(cfg.data, "train", mesh)
    batch = to_global(next(it), mesh)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=grain_checkpoint_args(it)))
    mngr.restore(step, args=ocp.args.Composite(state=..., data=grain_checkpoint_args(it, restore=True)))
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxunified.data.shapes_text import HardNegativeCaptions
from jaxunified.data.text import TokenizeCaptions, make_tokenizer
from jaxunified.parallel.mesh import BATCH_AXES, batch_sharding, num_batch_shards

DATASET_NAMES = ("shapes", "folder", "webdataset")


# ----------------------------------------------------------------------------------------------
# Host batches


def normalize_images(batch: dict, key: str = "image") -> dict:
    """uint8 [0, 255] → float32 [-1, 1] for ``batch[key]``; other fields untouched."""
    out = dict(batch)
    out[key] = np.asarray(batch[key], np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    return out


def as_float_images(x):
    """On device: uint8 [0, 255] or float [-1, 1] → float32 [-1, 1] (a step takes either)."""
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 127.5 - 1.0
    return x.astype(jnp.float32)


class NormalizeImages(grain.transforms.Map):
    """``normalize_images`` as a grain transform (runs last, on whole batches)."""

    def map(self, element):
        return normalize_images(element)


class _DropSkipped(grain.transforms.Filter):
    # Sources return None for records they could not decode (on_error="skip").
    def filter(self, element) -> bool:
        return element is not None


def stack_examples(examples: Sequence[Any]) -> Any:
    """Batches a list of example dicts: arrays/numbers are stacked, strings become object arrays."""
    first = examples[0]
    if isinstance(first, Mapping):
        return {k: stack_examples([e[k] for e in examples]) for k in first}
    if isinstance(first, (str, bytes)):
        out = np.empty(len(examples), dtype=object)  # np.array would make fixed-width '<U' arrays
        out[:] = list(examples)
        return out
    return np.stack([np.asarray(e) for e in examples])


def make_loader(
    source: Any,
    global_batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    transforms: Sequence[Any] = (),
    worker_count: int = 0,
    read_threads: int | None = None,
    shard_by_process: bool = True,
    normalize: bool = True,
) -> grain.DataLoader:
    """A checkpointable grain ``DataLoader`` of per-process batches (``global_batch_size / process_count`` rows).

    ``transforms`` are grain transforms applied to single examples before batching (e.g. text
    tokenisation, augmentation). ``normalize`` appends ``NormalizeImages`` after batching.
    ``num_epochs=None`` repeats forever. ``read_threads``: grain's reader threads (None = its
    default of 16 with a 500-record read-ahead, meant for remote disks; 0 reads in the calling
    thread — 2× faster on local array_record files, where polling the read-ahead dominated).
    ``shard_by_process=False`` makes every process read the whole source in the same order —
    only for single-process runs or replicated evaluation.
    Iterators support ``get_state()``/``set_state()``; see ``grain_checkpoint_args`` for Orbax.
    """
    n = len(source)
    if n == 0:
        raise ValueError(f"data source {source!r} is empty; point the data config at a non-empty dataset")
    processes = jax.process_count() if shard_by_process else 1
    if global_batch_size <= 0 or global_batch_size % processes:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the {processes} JAX processes"
        )
    shard_options = (
        grain.sharding.ShardByJaxProcess(drop_remainder=True) if shard_by_process else grain.sharding.NoSharding()
    )
    # Several processes read one global record order (the sampler is not sharded), each its own block
    # of every global batch (_BatchBlocks), so a run sees the same global batches, row for row, on any
    # number of processes. One process keeps grain's own sharded sampler (the same order), whose repr
    # its checkpoints hold.
    sampler = grain.samplers.IndexSampler(
        num_records=n,
        shard_options=shard_options if processes == 1 else grain.sharding.NoSharding(),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=int(seed),
    )
    if processes > 1:
        sampler = _BatchBlocks(sampler, global_batch_size, processes)
    operations = [
        _DropSkipped(),
        *transforms,
        grain.transforms.Batch(global_batch_size // processes, drop_remainder=drop_remainder, batch_fn=stack_examples),
    ]
    if normalize:
        operations.append(NormalizeImages())
    if worker_count:
        from absl import flags

        # grain's worker processes read absl flags; outside an absl app they are never parsed
        # and grain fails at the first batch. Their defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    read = {} if read_threads is None else {
        "read_options": grain.ReadOptions(num_threads=int(read_threads), prefetch_buffer_size=4 * int(read_threads))}
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=worker_count,
        shard_options=shard_options,
        **read,
    )


class _BatchBlocks:
    """A sampler that hands process ``p`` of ``P`` the ``p``-th block of each global batch.

    grain's loader for shard ``p`` of ``P`` reads sampler positions ``p, p + P, p + 2P, ...``; this
    maps the ``k``-th of them (row ``j`` of local batch ``s``) to position ``s·B + p·B/P + j`` of the
    wrapped, unsharded sampler. Concatenated in process order — what ``to_global`` does — the local
    batches of step ``s`` are then rows ``s·B ... s·B + B - 1`` of the one global order, as a single
    process reads them. A finite sampler's last, partial global batch is dealt out in turn (its
    last ``< P`` records are dropped, as any sharding does). This holds for ``worker_count=0``; with
    grain worker processes each worker batches its own stride of a process's stream, so the rows
    (and possibly the records) of a step can differ from a single process's.
    """

    def __init__(self, sampler, global_batch_size: int, processes: int):
        self.sampler, self.batch, self.processes = sampler, int(global_batch_size), int(processes)
        self.local = self.batch // self.processes
        self.full_batches = len(sampler) // self.batch

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, index: int):
        k, p = divmod(index, self.processes)
        step, j = divmod(k, self.local)
        if step < self.full_batches:
            return self.sampler[step * self.batch + p * self.local + j]
        tail = k - self.full_batches * self.local
        return self.sampler[self.full_batches * self.batch + tail * self.processes + p]

    def __repr__(self) -> str:
        return f"_BatchBlocks({self.sampler!r}, global_batch_size={self.batch}, processes={self.processes})"


# ----------------------------------------------------------------------------------------------
# Global arrays


def _is_host_only(x: np.ndarray) -> bool:
    return x.dtype.kind in "OSUV"


def to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process numpy batch → dict of global ``jax.Array``s sharded over ``BATCH_AXES``.

    Every process passes its own rows; the global batch is their concatenation in process order.
    String/object fields (captions) are dropped — read them from the host batch. 64-bit fields
    are narrowed to 32 bits unless ``jax_enable_x64`` is on, as ``jnp.asarray`` would.
    """
    shards = num_batch_shards(mesh)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Mapping):
            out[key] = to_global(value, mesh)
            continue
        value = np.asarray(value)
        if _is_host_only(value):
            continue
        if value.ndim == 0:
            raise ValueError(f"batch field {key!r} is a scalar; every field needs a leading batch axis")
        rows = value.shape[0] * jax.process_count()
        if rows % shards:
            raise ValueError(
                f"batch field {key!r} has {rows} rows in total, which the mesh's {shards} data-parallel "
                f"shards (axes {BATCH_AXES}) cannot split evenly; make the global batch size a multiple of {shards}"
            )
        if not jax.config.jax_enable_x64 and value.dtype.itemsize == 8 and value.dtype.kind in "iuf":
            value = value.astype(value.dtype.kind + "4")
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    return out


def fixed_size_chunks(total: int, size: int):
    """``(start, index [size], n)`` over ``range(total)`` in order: each chunk's indices, the last
    chunk padded by repeating its final index, so every chunk runs through one compiled shape;
    ``n`` of them are real."""
    for start in range(0, total, size):
        n = min(size, total - start)
        yield start, np.concatenate([np.arange(start, start + n), np.full(size - n, start + n - 1)]), n


def _leading_rows(batch: Mapping[str, Any]) -> int:
    value = next(iter(batch.values()))
    return _leading_rows(value) if isinstance(value, Mapping) else len(value)


def _pad(value: Any, rows: int) -> Any:
    if isinstance(value, Mapping):
        return {k: _pad(v, rows) for k, v in value.items()}
    value = np.asarray(value)
    if len(value) == rows:
        return value
    fill = np.zeros((rows - len(value),) + value.shape[1:], value.dtype)
    if value.dtype == object:
        fill[...] = ""
    return np.concatenate([value, fill])


def _pad_rows(batch: Mapping[str, Any], rows: int) -> dict:
    """Pads every field to ``rows`` along axis 0 and adds ``mask`` (False on padding rows)."""
    have = _leading_rows(batch)
    out = {k: _pad(v, rows) for k, v in batch.items()}
    out["mask"] = np.arange(rows) < have
    return out


class DataIterator:
    """What ``build_dataset`` returns: host batches (numpy, this process's rows) of a fixed shape.

    Every batch has an extra ``mask`` bool field: a final partial batch (evaluation, no
    ``drop_remainder``) is zero-padded to full size so jitted steps never see a new shape, and
    ``mask`` marks the real rows (all True in training). ``get_state``/``set_state`` delegate to
    the grain iterator, so Orbax (``grain_checkpoint_args``) saves and restores this object
    directly. ``source`` is the underlying source (``source.num_skipped`` for user data).
    """

    def __init__(self, loader: grain.DataLoader, local_batch_size: int, source: Any = None):
        self.loader = loader
        self.source = source
        self.local_batch_size = local_batch_size
        self._iterator = iter(loader)

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return _pad_rows(next(self._iterator), self.local_batch_size)

    def get_state(self) -> bytes:
        return self._iterator.get_state()

    def set_state(self, state: bytes) -> None:
        self._iterator.set_state(state)

    def start_prefetch(self) -> None:
        self._iterator.start_prefetch()


def grain_checkpoint_args(iterator: Any, *, restore: bool = False):
    """Orbax args for saving (or, with ``restore=True``, restoring in place) a grain iterator.

    Works for ``iter(make_loader(...))`` and ``build_dataset``'s ``DataIterator``; use it as one item of
    ``ocp.args.Composite`` beside the train state. Each process writes its own
    ``process_<i>-of-<n>.json``, so resuming needs the same process count.
    """
    import grain.checkpoint  # registers the handler with Orbax

    return grain.checkpoint.CheckpointRestore(iterator) if restore else grain.checkpoint.CheckpointSave(iterator)


# ----------------------------------------------------------------------------------------------
# Entry point


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.key``; None and "" (ConfigDict placeholders for unset fields) give ``default``."""
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None or (isinstance(value, str) and not value) else value


def _expand(path: Any) -> Any:
    return os.path.expanduser(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else path


def _per_split(value: Any, split: str, field: str) -> Any:
    """A field given either once for all splits or as a mapping split → value."""
    if isinstance(value, Mapping) or (hasattr(value, "keys") and hasattr(value, "get")):
        if split not in value:
            raise ValueError(f"data.{field} has no entry for split {split!r}; it has {sorted(value.keys())}")
        return value[split]
    return value


def make_source(cfg: Any, split: str) -> Any:
    """The random-access source a data config describes (see ``build_dataset``)."""
    name = _get(cfg, "name", "shapes")
    resolution = _get(cfg, "resolution")
    if resolution is None:
        raise ValueError("data.resolution is not set; give the image side in pixels (e.g. 32 for shapes)")
    on_error = _get(cfg, "on_error", "skip")
    if name == "shapes":
        from jaxunified.data.shapes_tfds import DEFAULT_NUM_TEST, DEFAULT_NUM_TRAIN, shapes_source

        return shapes_source(
            _get(cfg, "data_dir", "~/tensorflow_datasets"),
            split,
            resolution,
            num_train=_get(cfg, "num_train", DEFAULT_NUM_TRAIN),
            num_test=_get(cfg, "num_test", DEFAULT_NUM_TEST),
            seed=_get(cfg, "shapes_seed", 0),
        )
    if name in ("folder", "webdataset"):
        path = _per_split(_get(cfg, "path"), split, "path")
        if path is None or path == "":
            raise ValueError(f"data.name={name!r} needs data.path (a folder, or tar shards / a glob for webdataset)")
        from jaxunified.data.sources import ImageFolderSource, WebDatasetSource

        if name == "folder":
            captions = _per_split(_get(cfg, "captions_file"), split, "captions_file") or None
            return ImageFolderSource(_expand(path), _expand(captions), resolution=resolution, on_error=on_error)
        if not isinstance(path, (str, os.PathLike)):
            path = [_expand(p) for p in path]
        return WebDatasetSource(_expand(path), resolution=resolution, on_error=on_error)
    raise ValueError(f"unknown dataset name data.name={name!r}; use one of {DATASET_NAMES}")


def read_threads(cfg: Any) -> int | None:
    """``cfg.read_threads`` for ``make_loader``; by default 0 for shapes (a local array_record
    build, read in the calling thread) and grain's own default for everything else."""
    return _get(cfg, "read_threads", 0 if _get(cfg, "name") == "shapes" else None)


def text_transforms(cfg: Any, split: str, *, tokens: bool = True, negatives: bool = True) -> tuple:
    """The caption transforms ``cfg.text`` asks for: ``tokens`` (skip with ``tokens=False`` when a
    cache already holds the text embeddings) and, on the train split with ``text.hard_negatives``
    = K > 0, ``neg_tokens`` [K, max_len] (shapes only; ``negatives=False`` skips them for a
    one-pass read such as a cache build). Empty without ``text.tokenizer``."""
    text = _get(cfg, "text")
    num_negatives = int(_get(text, "hard_negatives", 0) or 0) if text is not None else 0
    if num_negatives and _get(cfg, "name") != "shapes":
        raise ValueError("data.text.hard_negatives needs the shapes caption grammar (data.name='shapes'); "
                         f"got data.name={_get(cfg, 'name')!r}")
    if text is None or _get(text, "tokenizer") is None:
        return ()
    tokenizer = make_tokenizer(text)
    out = (TokenizeCaptions(tokenizer),) if tokens else ()
    if num_negatives and negatives and split == "train":
        out += (HardNegativeCaptions(tokenizer, num_negatives, _get(text, "negative_kinds")),)
    return out


def build_dataset(cfg: Any, split: str, mesh: Mesh, extra_transforms: tuple = ()) -> DataIterator:
    """The training loop's single data entry point: an iterator of host batches for ``split``.

    Pass each batch through ``to_global(batch, mesh)`` before a jitted step; captions stay in the
    host batch. ``mesh`` fixes how many data-parallel shards the batch must split into.

    ``cfg`` (a ConfigDict, dict or attribute object) fields: ``name`` ("shapes" | "folder" |
    "webdataset"), ``resolution``, ``batch_size`` (global), ``seed`` (shuffle order);
    shapes: ``data_dir`` (default ``~/tensorflow_datasets``; built there on first use),
    ``num_train``, ``num_test``, optional ``shapes_seed`` (content, default 0 — kept apart from
    ``seed`` so every run shares one build and one test set); folder/webdataset: ``path``,
    ``captions_file`` (folder only), each either one value for every split or a mapping split →
    value; optional ``on_error`` ("skip"), ``worker_count`` (0), ``read_threads`` (0 for shapes,
    else grain's default), ``eval_batch_size``, ``text``
    (a sub-config with ``tokenizer`` set, e.g. ``{tokenizer: "byte", max_len: 32}``; see
    ``jaxunified.data.text.make_tokenizer``): adds an int32 ``tokens`` field ``[max_len]``
    tokenised from each caption; ``text.hard_negatives`` = K > 0 (shapes only, train split) adds
    ``neg_tokens`` [K, max_len], K grammar-made captions that contradict the image
    (``text.negative_kinds`` picks the edits). Unset
    fields may be None or "" (ConfigDict placeholders); paths may start with ``~``.

    The "train" split follows ``shuffle`` (True) and ``num_epochs`` (None = forever) and drops
    the last partial batch and keeps its images uint8 (tasks normalise on device); every other split
    is read once, in order, with the last batch padded (see ``DataIterator``'s ``mask`` field) and its
    images float32 in [-1, 1]. ``extra_transforms`` (grain transforms a task adds,
    e.g. chat examples from the labels) run after the caption transforms.
    """
    transforms = text_transforms(cfg, split) + tuple(extra_transforms)  # first: a bad text config fails before any data is read
    source = make_source(cfg, split)
    train = split == "train"
    batch_size = _get(cfg, "batch_size") if train else _get(cfg, "eval_batch_size", _get(cfg, "batch_size"))
    if batch_size is None:
        raise ValueError("data.batch_size is not set; give the global batch size")
    batch_size = int(batch_size)
    shards = num_batch_shards(mesh)
    if batch_size % shards:
        raise ValueError(
            f"data.batch_size={batch_size} ({split}) must be a multiple of the mesh's {shards} data-parallel "
            f"shards (axes {BATCH_AXES}); change the batch size or config.mesh_shape"
        )
    loader = make_loader(
        source,
        batch_size,
        transforms=transforms,
        seed=int(_get(cfg, "seed", 0)),
        shuffle=bool(_get(cfg, "shuffle", True)) if train else False,
        num_epochs=_get(cfg, "num_epochs") if train else 1,
        drop_remainder=train,
        worker_count=int(_get(cfg, "worker_count", 0)),
        read_threads=read_threads(cfg),
        # training images go to the device as uint8 (a quarter of float32's host-to-device bytes) and
        # the step normalises them (``as_float_images``); evaluation reads them normalised
        normalize=not train,
    )
    return DataIterator(loader, batch_size // jax.process_count(), source=source)
