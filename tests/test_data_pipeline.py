"""Grain pipelines: batching, resumable iterators (also through Orbax), global arrays, build_dataset."""

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from jaxunified.data import pipeline, shapes
from jaxunified.data.shapes_tfds import build_shapes, shapes_source
from jaxunified.parallel.mesh import BATCH_AXES, make_mesh

RES = 32
NUM_TRAIN, NUM_TEST = 96, 20


class _ListSource:
    """A tiny in-memory source; ``None`` marks a record the source could not decode."""

    def __init__(self, n, holes=()):
        self.records = [
            None if i in holes else {"image": np.full((4, 4, 3), i, np.uint8), "id": np.int32(i), "caption": f"c{i}"}
            for i in range(n)
        ]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def __repr__(self):
        return f"_ListSource({len(self.records)})"


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    build_shapes(data_dir, RES, num_train=NUM_TRAIN, num_test=NUM_TEST)
    return data_dir


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((2, 4, 1))  # 8 batch shards over ('data', 'fsdp')


def _shapes_cfg(data_dir, **overrides):
    cfg = dict(name="shapes", data_dir=str(data_dir), resolution=RES, num_train=NUM_TRAIN, num_test=NUM_TEST)
    return {**cfg, **overrides}


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]))


def test_shapes_build_is_reused_and_matches_renders(shapes_dir):
    builder = build_shapes(shapes_dir, RES, num_train=NUM_TRAIN, num_test=NUM_TEST)
    assert builder.builder_config.name == f"{RES}_train{NUM_TRAIN}_test{NUM_TEST}_seed0"
    src = shapes_source(shapes_dir, "test", RES, num_train=NUM_TRAIN, num_test=NUM_TEST)
    assert len(src) == NUM_TEST and "0x" not in repr(src)
    for i in (0, NUM_TEST - 1):
        got, want = src[i], shapes.render_example(i, "test", 0, RES)
        assert got.keys() == want.keys() and got["caption"] == want["caption"]
        for k in shapes.LABEL_KEYS + ("image",):
            assert np.asarray(got[k]).dtype == np.asarray(want[k]).dtype
            np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(ValueError, match="split"):
        shapes_source(shapes_dir, "validation", RES, num_train=NUM_TRAIN, num_test=NUM_TEST)
    with pytest.raises(ValueError, match="resolution"):
        build_shapes(shapes_dir, 8)


def test_different_settings_never_reuse_a_build(shapes_dir):
    other = build_shapes(shapes_dir, RES, num_train=NUM_TRAIN, num_test=8, seed=1)
    assert other.info.splits["test"].num_examples == 8
    assert other.data_dir != build_shapes(shapes_dir, RES, num_train=NUM_TRAIN, num_test=NUM_TEST).data_dir


def test_loader_batches(shapes_dir):
    src = shapes_source(shapes_dir, "train", RES, num_train=NUM_TRAIN, num_test=NUM_TEST)
    batch = next(iter(pipeline.make_loader(src, 8, seed=0)))
    assert batch["image"].shape == (8, RES, RES, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["caption"].dtype == object and isinstance(batch["caption"][0], str)
    assert batch["obj_center"].shape == (8, 4, 2) and batch["count"].dtype == np.int32
    raw = next(iter(pipeline.make_loader(src, 8, seed=0, normalize=False)))
    assert raw["image"].dtype == np.uint8
    np.testing.assert_allclose(pipeline.normalize_images(raw)["image"], batch["image"])


def test_loader_order_epochs_and_skips():
    src = _ListSource(10, holes={3, 7})
    ordered = list(
        pipeline.make_loader(src, 4, seed=0, shuffle=False, num_epochs=1, drop_remainder=False, normalize=False)
    )
    assert [b["id"].tolist() for b in ordered] == [[0, 1, 2, 4], [5, 6, 8, 9]]
    shuffled = list(pipeline.make_loader(src, 2, seed=5, num_epochs=2, normalize=False))
    ids = np.concatenate([b["id"] for b in shuffled])
    assert sorted(ids.tolist()) == sorted([i for i in range(10) if i not in (3, 7)] * 2)
    assert ids[:8].tolist() != sorted(ids[:8].tolist())
    with pytest.raises(ValueError, match="empty"):
        pipeline.make_loader(_ListSource(0), 2, seed=0)


def test_iterator_state_resumes_exactly():
    loader = pipeline.make_loader(_ListSource(50, holes={5}), 4, seed=1)
    it = iter(loader)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 2)
    fresh = iter(pipeline.make_loader(_ListSource(50, holes={5}), 4, seed=1))
    fresh.set_state(state)
    _assert_same_batches(_take(fresh, 2), expected)


@pytest.mark.parametrize("kind", ["loader", "build_dataset"])
def test_orbax_checkpoint_manager_round_trip(tmp_path, shapes_dir, mesh, kind):
    cfg = _shapes_cfg(shapes_dir, batch_size=8, seed=2)

    def make_iterator():
        if kind == "build_dataset":
            return pipeline.build_dataset(cfg, "train", mesh)
        return iter(pipeline.make_loader(pipeline.make_source(cfg, "train"), 8, seed=2))

    it = make_iterator()
    _take(it, 3)
    params = {"w": np.arange(6, dtype=np.float32)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        data = pipeline.grain_checkpoint_args(it)
        mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(params), data=data))
        mngr.wait_until_finished()
    expected = _take(it, 2)

    resumed = make_iterator()
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(
            mngr.latest_step(),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(params), data=pipeline.grain_checkpoint_args(resumed, restore=True)
            ),
        )
    np.testing.assert_array_equal(restored["state"]["w"], params["w"])
    _assert_same_batches(_take(resumed, 2), expected)


def test_to_global_places_rows_on_their_shards(mesh):
    batch = {
        "x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
        "id": np.arange(16, dtype=np.int64),
        "caption": np.array([f"c{i}" for i in range(16)], dtype=object),
    }
    out = pipeline.to_global(batch, mesh)
    assert set(out) == {"x", "id"}  # strings stay on the host
    assert out["id"].dtype == np.int32  # x64 is off: narrowed like jnp.asarray would
    for key in ("x", "id"):
        arr = out[key]
        assert arr.shape == batch[key].shape and arr.sharding.spec[0] == BATCH_AXES
        assert len(arr.addressable_shards) == 8
        for shard in arr.addressable_shards:
            assert shard.data.shape[0] == 2
            np.testing.assert_array_equal(np.asarray(shard.data), batch[key][shard.index].astype(shard.data.dtype))
    with pytest.raises(ValueError, match="multiple of 8"):
        pipeline.to_global({"x": np.zeros((12, 2), np.float32)}, mesh)


def test_build_dataset_shapes_train_and_eval(shapes_dir, mesh):
    cfg = ml_collections.ConfigDict(_shapes_cfg(shapes_dir, batch_size=16, seed=0, shuffle=True, captions_file=""))
    cfg.num_epochs = ml_collections.FieldReference(None, field_type=int)
    train = pipeline.build_dataset(cfg, "train", mesh)
    host = next(train)
    # training images reach the device as uint8 and are normalised there
    assert host["image"].shape == (16, RES, RES, 3) and host["image"].dtype == np.uint8
    assert host["mask"].all() and host["caption"].dtype == object
    batch = pipeline.to_global(host, mesh)
    assert batch["image"].sharding.spec[0] == BATCH_AXES and "caption" not in batch
    assert batch["image"].dtype == np.uint8 and batch["image"].nbytes == host["image"].nbytes
    np.testing.assert_array_equal(np.asarray(pipeline.as_float_images(batch["image"])),
                                  pipeline.normalize_images(host)["image"])
    state = train.get_state()
    expected = _take(train, 1)
    again = pipeline.build_dataset(cfg, "train", mesh)
    again.set_state(state)
    _assert_same_batches(_take(again, 1), expected)

    evals = list(pipeline.build_dataset(cfg, "test", mesh))
    assert len(evals) == 2  # 20 examples: one full batch, one padded
    assert sum(int(b["mask"].sum()) for b in evals) == NUM_TEST
    assert all(b["image"].shape == (16, RES, RES, 3) and b["image"].dtype == np.float32 for b in evals)
    assert list(evals[1]["caption"][NUM_TEST - 16 :]) == [""] * (32 - NUM_TEST)
    with pytest.raises(ValueError, match="multiple of the mesh's 8"):
        pipeline.build_dataset({**cfg.to_dict(), "batch_size": 12}, "train", mesh)


def test_build_dataset_folder_and_config_errors(tmp_path, mesh):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(9):
        Image.fromarray(np.full((20, 24, 3), i * 20, np.uint8)).save(root / f"{i}.png")
    (root / "9.png").write_bytes(b"corrupt")
    cfg = {"name": "folder", "path": {"train": str(root)}, "resolution": 8, "batch_size": 8, "seed": 0}
    it = pipeline.build_dataset(ml_collections.ConfigDict(cfg), "train", mesh)
    assert next(it)["image"].shape == (8, 8, 8, 3)
    # One pass: the corrupt file is filtered out and counted on the source.
    src = pipeline.make_source(cfg, "train")
    rows = sum(len(b["caption"]) for b in pipeline.make_loader(src, 4, seed=0, num_epochs=1, drop_remainder=False))
    assert rows == 9 and src.num_skipped == 1 and src.skipped[0].endswith("9.png")
    with pytest.raises(ValueError, match="no entry for split 'test'"):
        pipeline.build_dataset(cfg, "test", mesh)
    with pytest.raises(ValueError, match="unknown dataset name"):
        pipeline.build_dataset({**cfg, "name": "imagenet"}, "train", mesh)
    with pytest.raises(ValueError, match="needs data.path"):
        pipeline.build_dataset({**cfg, "path": None}, "train", mesh)
    with pytest.raises(ValueError, match="data.resolution"):
        pipeline.build_dataset({k: v for k, v in cfg.items() if k != "resolution"}, "train", mesh)


@pytest.mark.slow
def test_worker_processes_read_the_same_stream(shapes_dir):
    src = shapes_source(shapes_dir, "train", RES, num_train=NUM_TRAIN, num_test=NUM_TEST)
    inline = _take(iter(pipeline.make_loader(src, 8, seed=4)), 3)
    it = iter(pipeline.make_loader(src, 8, seed=4, worker_count=1))
    _assert_same_batches(_take(it, 3), inline)


def test_write_cache_prepare_gives_host_fields_in_record_order(shapes_dir, tmp_path):
    """``prepare`` sees each padded batch with the index of its first record; fields it names in
    ``inputs`` reach ``compute``, the others are cached as they are, padding rows dropped."""
    from jaxunified.data import cache

    cfg = ml_collections.ConfigDict(_shapes_cfg(shapes_dir, captions_file=""))
    firsts = []

    def prepare(host, first):
        firsts.append(first)
        index = first + np.arange(len(host["mask"]))
        return {"index": index.astype(np.int32), "name": np.array([f"r{i}" for i in index])}

    arrays = cache.write_cache(lambda b: {"twice": b["index"] * 2}, cfg, "test", tmp_path / "c.npz",
                               inputs=("index",), batch_size=8, prepare=prepare)
    assert firsts == [0, 8, 16]  # 20 records in batches of 8
    np.testing.assert_array_equal(arrays["twice"], 2 * np.arange(NUM_TEST))
    assert list(arrays["name"]) == [f"r{i}" for i in range(NUM_TEST)] and "index" not in arrays
    with np.load(tmp_path / "c.npz") as z:
        assert sorted(z.files) == ["name", "twice"]
    with pytest.raises(ValueError, match="both give"):
        cache.write_cache(lambda b: {"name": b["index"]}, cfg, "test", tmp_path / "d.npz", inputs=("index",),
                          batch_size=8, prepare=prepare)
