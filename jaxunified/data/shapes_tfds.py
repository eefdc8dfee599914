"""The shapes dataset as a TFDS builder written to array_record, readable without TensorFlow.

Build once, read many: ``build_shapes(data_dir, resolution=32)`` renders the train/test splits
into ``data_dir/jaxunified_shapes/<config>/<version>/`` and returns the builder; calling it again
finds the finished build and only reads its metadata. ``shapes_source(...)`` is the grain-ready
random-access source.

Stale builds: the config name carries everything that changes the content — resolution,
example counts and seed (``"32"`` for the defaults, ``"32_train5000_test500_seed3"`` otherwise)
— and ``VERSION`` is bumped whenever the renderer in ``shapes.py`` changes its pixels or labels.

Features are ``Tensor``/``Text``/``Scalar`` only (``Image`` would need TensorFlow to encode), with
the same dtypes ``shapes.render_example`` returns, so a record read back equals a fresh render.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import inspect
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxunified.data import shapes

DEFAULT_NUM_TRAIN = 20_000
DEFAULT_NUM_TEST = 1_000
DEFAULT_SEED = 0
RESOLUTIONS = (32, 64, 128, 256)


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    resolution: int = 32
    num_train: int = DEFAULT_NUM_TRAIN
    num_test: int = DEFAULT_NUM_TEST
    seed: int = DEFAULT_SEED


def config_name(resolution: int, num_train: int, num_test: int, seed: int) -> str:
    if (num_train, num_test, seed) == (DEFAULT_NUM_TRAIN, DEFAULT_NUM_TEST, DEFAULT_SEED):
        return str(resolution)
    return f"{resolution}_train{num_train}_test{num_test}_seed{seed}"


def _make_config(resolution: int, num_train: int, num_test: int, seed: int) -> ShapesConfig:
    return ShapesConfig(
        name=config_name(resolution, num_train, num_test, seed),
        description=f"{resolution}px, {num_train} train / {num_test} test examples, seed {seed}",
        resolution=resolution,
        num_train=num_train,
        num_test=num_test,
        seed=seed,
    )


class JaxunifiedShapes(tfds.core.GeneratorBasedBuilder):
    """Procedural coloured shapes with captions and structured labels (see jaxunified.data.shapes)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        _make_config(r, DEFAULT_NUM_TRAIN, DEFAULT_NUM_TEST, DEFAULT_SEED) for r in RESOLUTIONS
    ]
    DEFAULT_CONFIG_NAME = "32"

    # TFDS's own lookup of this file needs the optional `importlib_resources` package whenever the
    # builder lives outside tensorflow_datasets; the plain file path is what it would return anyway.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        r, n = self.builder_config.resolution, shapes.MAX_OBJECTS
        ids = lambda names: tfds.features.Tensor(shape=(n,), dtype=np.int32, doc=f"-1 = padding; {names}")  # noqa: E731
        scalar = lambda doc: tfds.features.Scalar(dtype=np.int32, doc=doc)  # noqa: E731
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    # Raw bytes: the default stores each uint8 as an int64 and is 20× slower to write.
                    "image": tfds.features.Tensor(
                        shape=(r, r, 3), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
                    ),
                    "caption": tfds.features.Text(),
                    "obj_shape": ids(shapes.SHAPES),
                    "obj_color": ids(shapes.COLORS),
                    "obj_size": ids(shapes.SIZES),
                    "obj_center": tfds.features.Tensor(
                        shape=(n, 2), dtype=np.float32, doc="box centre (x, y) in [0, 1], y down"
                    ),
                    "obj_mask": tfds.features.Tensor(shape=(n,), dtype=np.bool_),
                    "count": scalar("number of objects, 1-4"),
                    "template": scalar(f"caption template: {shapes.TEMPLATES}"),
                    "relation": scalar(f"-1 = none; {shapes.RELATIONS}"),
                    "main_shape": scalar(f"first mentioned object: {shapes.SHAPES}"),
                    "main_color": scalar(f"first mentioned object: {shapes.COLORS}"),
                }
            ),
            supervised_keys=None,
            # Record i of a split is render_example(i): grain shuffles at read time anyway.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is procedural: no downloads
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test),
        }

    def _generate_examples(self, split: str, num_examples: int):
        cfg = self.builder_config
        for i in range(num_examples):
            yield i, shapes.render_example(i, split, cfg.seed, cfg.resolution)


def _check(resolution: int, num_train: int, num_test: int, seed: int) -> None:
    if resolution not in range(shapes.MIN_RESOLUTION, shapes.MAX_RESOLUTION + 1):
        raise ValueError(
            f"shapes: resolution {resolution} is not supported; use {shapes.MIN_RESOLUTION}-"
            f"{shapes.MAX_RESOLUTION} (prebuilt configs: {RESOLUTIONS})"
        )
    if num_train < 1 or num_test < 1 or seed < 0:
        raise ValueError(
            f"shapes: num_train ({num_train}) and num_test ({num_test}) must be ≥ 1 and seed ({seed}) ≥ 0"
        )


def build_shapes(
    data_dir: str | os.PathLike,
    resolution: int = 32,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_test: int = DEFAULT_NUM_TEST,
    seed: int = DEFAULT_SEED,
) -> JaxunifiedShapes:
    """Returns the shapes builder for these settings, building it under ``data_dir`` if absent."""
    _check(int(resolution), int(num_train), int(num_test), int(seed))
    config: ShapesConfig | str = _make_config(int(resolution), int(num_train), int(num_test), int(seed))
    if config.name in JaxunifiedShapes.builder_configs:  # TFDS refuses a custom config that shadows one
        config = config.name
    data_dir = os.path.expanduser(os.fspath(data_dir))
    make = lambda: JaxunifiedShapes(data_dir=data_dir, config=config, file_format="array_record")  # noqa: E731
    builder = make()
    if builder.is_prepared():
        return builder
    with _build_lock(data_dir, builder.builder_config.name):
        builder = make()  # re-read: another process may have finished the build while we waited
        if not builder.is_prepared():
            builder.download_and_prepare()
    return builder


@contextlib.contextmanager
def _build_lock(data_dir: str, name: str):
    """Serialises builds of one config across processes (pytest-xdist workers, parallel jobs).

    Without it, two processes render the same data and the slower one's final rename fails.
    Remote paths (``gs://``) are not locked.
    """
    if "://" in data_dir:
        yield
        return
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".jaxunified_shapes-{name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ShapesSource:
    """Random-access view of one built split whose records match ``shapes.render_example`` exactly.

    TFDS hands ``Text`` back as bytes and scalars as Python ints (which would batch to int64);
    converting here keeps captions ``str`` like the other sources and dtypes as declared.
    """

    def __init__(self, data_source: Any, dtypes: dict[str, Any], description: str):
        self._source = data_source
        self._dtypes = dtypes
        self._description = description

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = dict(self._source[index])
        for key, value in record.items():
            if isinstance(value, bytes):
                record[key] = value.decode("utf-8")
            elif key in self._dtypes:
                record[key] = np.asarray(value, self._dtypes[key])[()]  # 0-d → numpy scalar, like a render
        return record

    def __repr__(self) -> str:
        # grain compares repr(source) when restoring an iterator: no addresses, no local paths.
        return f"ShapesSource({self._description})"


def shapes_source(
    data_dir: str | os.PathLike,
    split: str = "train",
    resolution: int = 32,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_test: int = DEFAULT_NUM_TEST,
    seed: int = DEFAULT_SEED,
) -> ShapesSource:
    """A grain random-access source over ``split`` ("train" | "test"), building the data if needed."""
    builder = build_shapes(data_dir, resolution, num_train, num_test, seed)
    if split not in builder.info.splits:
        raise ValueError(f"shapes: unknown split {split!r}; available: {sorted(builder.info.splits)}")
    dtypes = {k: f.np_dtype for k, f in builder.info.features.items() if not isinstance(f, tfds.features.Text)}
    return ShapesSource(
        builder.as_data_source(split=split),
        dtypes,
        f"split={split!r}, config={builder.builder_config.name!r}, version={builder.version}",
    )
