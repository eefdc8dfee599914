"""Per-record values precomputed once per dataset by frozen models, read back as a data source.

TokLIP's step spends most of its frozen work on the same inputs every epoch (VQ codes, teacher
image embeddings, caption embeddings); a cache holds them as one ``.npz`` per split, keyed by a
digest of everything they depend on, and ``cached_dataset`` serves them in the order
``pipeline.build_dataset`` would, so a cached batch and the image batch it came from give the
same loss. Valid while the data has no random augmentation (the built-in shapes pipeline has none).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.data import pipeline
from jaxunified.data.text import PIPELINE_FIELDS

log = logging.getLogger(__name__)


class CachedSource:
    """A random-access source whose records carry the cached fields; ``drop`` removes fields the
    step no longer needs (``image``), so training reads no pixels."""

    def __init__(self, source, arrays: Mapping[str, np.ndarray], drop: tuple[str, ...] = ("image",)):
        n = len(source)
        for k, a in arrays.items():
            if len(a) != n:
                raise ValueError(f"cache field {k!r} has {len(a)} rows but the data source {n}; rebuild the cache")
        self.source, self.arrays, self.drop = source, dict(arrays), tuple(drop)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        record = self.source[index]
        if record is None:
            return None
        out = {k: v for k, v in record.items() if k not in self.drop}
        out.update({k: a[index] for k, a in self.arrays.items()})
        return out

    def __repr__(self):
        return f"CachedSource({self.source!r}, fields={sorted(self.arrays)})"


def cache_path(cache_dir, split: str, key: str = "", prefix: str = "toklip") -> pathlib.Path:
    """``<prefix>_cache_<split>[_<key>].npz`` under ``cache_dir``."""
    return pathlib.Path(cache_dir).expanduser() / f"{prefix}_cache_{split}{'_' + key if key else ''}.npz"


def digest(trees: Iterable[Any], extra: Any) -> str:
    """16 hex digits of the arrays in ``trees`` (shapes, dtypes, bytes) and ``repr(extra)``."""
    h = hashlib.sha256()
    for tree in trees:
        for leaf in jax.tree.leaves(tree):
            a = np.ascontiguousarray(np.asarray(leaf))
            h.update(str((a.shape, a.dtype)).encode())
            h.update(a.tobytes())
    h.update(repr(extra).encode())
    return h.hexdigest()[:16]


# The data fields that decide which records (and pixels) a cache holds.
DATA_KEY_FIELDS = ("name", "path", "captions_file", "data_dir", "resolution", "num_train", "num_test", "shapes_seed")


def dataset_key(data_cfg, trees: Iterable[Any], configs: tuple) -> str:
    """The key of a cache of frozen outputs: the frozen weights ``trees``, their ``configs``, the
    data fields that pick the records and the caption tokenizer (less its per-step pipeline
    fields, e.g. hard negatives, which are never cached). A retrained frozen part, another
    dataset or tokenizer never reads a stale cache."""
    text = data_cfg.get("text")
    text = None if text is None else {k: v for k, v in text.to_dict().items() if k not in PIPELINE_FIELDS}
    return digest(trees, (*configs, [data_cfg.get(k) for k in DATA_KEY_FIELDS], text))


def in_order_batches(data_cfg, split: str, batch_size: int, source=None):
    """Every record of ``split`` (or of ``source``) once, in index order, in padded batches (with
    ``mask``). Returns ``(source, iterator)``."""
    source = pipeline.make_source(data_cfg, split) if source is None else source
    transforms = pipeline.text_transforms(data_cfg, split, negatives=False)
    pixels = not (isinstance(source, CachedSource) and "image" in source.drop)
    loader = pipeline.make_loader(source, batch_size, seed=0, shuffle=False, num_epochs=1, drop_remainder=False,
                                  transforms=transforms, shard_by_process=False, normalize=pixels,
                                  read_threads=pipeline.read_threads(data_cfg))
    return source, pipeline.DataIterator(loader, batch_size, source=source)


def write_cache(compute: Callable[[dict], Mapping[str, jax.Array]], data_cfg, split: str, path,
                inputs: tuple[str, ...] = ("image", "tokens"), batch_size: int = 256,
                prepare: Callable[[dict, int], Mapping[str, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """Runs the jitted ``compute(batch of inputs) -> {field: [B, ...]}`` once over ``split`` in order
    and writes the fields to ``path`` atomically (an interrupted build never leaves a truncated
    cache behind). Single-process. Returns the arrays.

    ``prepare(host batch, index of its first record)`` is the host-side work ``compute`` cannot
    express (drawing from a per-record seed, rendering, strings): it returns more [B, ...] fields;
    those named in ``inputs`` go to ``compute``, the others are cached as they are."""
    _, data = in_order_batches(data_cfg, split, batch_size)
    parts: dict[str, list[np.ndarray]] = {}
    first = 0
    for host in data:
        keep = np.asarray(host["mask"], bool)
        extra = dict(prepare(host, first)) if prepare is not None else {}
        batch = {**host, **extra}
        out = dict(jax.device_get(compute({k: jnp.asarray(batch[k]) for k in inputs})))
        kept_as_is = {k: v for k, v in extra.items() if k not in inputs}
        if set(out) & set(kept_as_is):
            raise ValueError(f"compute and prepare both give the fields {sorted(set(out) & set(kept_as_is))}")
        for k, v in {**out, **kept_as_is}.items():
            parts.setdefault(k, []).append(np.asarray(v)[keep])
        first += int(keep.sum())
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    save_arrays(path, arrays)
    return arrays


def save_arrays(path, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes ``arrays`` to the ``.npz`` at ``path`` atomically: an interrupted build never leaves a
    truncated cache behind."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    log.info("wrote %s (%s)", path, {k: v.shape for k, v in arrays.items()})


def cached_dataset(data_cfg, split: str, mesh, path, pixel_fields: tuple[str, ...] = ("codes", "teacher_embeds"),
                   token_field: str = "text_embeds", extra_transforms: tuple = (), extra_paths: tuple = ()):
    """Training batches whose records come from the cache at ``path`` (and the per-record fields of
    the caches at ``extra_paths``) instead of pixels, in the same shuffled order
    ``pipeline.build_dataset`` would give. Pixels are still read unless every field in
    ``pixel_fields`` is cached; captions are tokenized unless ``token_field`` is; a task's
    ``extra_transforms`` run after that."""
    arrays = {}
    for p in (path, *extra_paths):
        p = pathlib.Path(p)
        if not p.exists():
            raise FileNotFoundError(f"no cache at {p}; build it first (data.build_cache=True builds it on start)")
        with np.load(p) as z:
            if set(z.files) & set(arrays):
                raise ValueError(f"cache {p} repeats the fields {sorted(set(z.files) & set(arrays))}")
            arrays.update({k: z[k] for k in z.files})
    pixels_needed = not set(pixel_fields) <= set(arrays)
    source = CachedSource(pipeline.make_source(data_cfg, split), arrays, drop=() if pixels_needed else ("image",))
    transforms = pipeline.text_transforms(data_cfg, split, tokens=token_field not in arrays) + tuple(extra_transforms)
    bs = int(data_cfg.batch_size)
    loader = pipeline.make_loader(source, bs, seed=int(data_cfg.get("seed", 0)), shuffle=bool(data_cfg.get("shuffle", True)),
                                  num_epochs=data_cfg.get("num_epochs"), drop_remainder=True, transforms=transforms,
                                  worker_count=int(data_cfg.get("worker_count", 0)), normalize=False,
                                  read_threads=pipeline.read_threads(data_cfg))
    return pipeline.DataIterator(loader, bs // jax.process_count(), source=source)
