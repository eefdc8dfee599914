"""Planning a run reads no weights: inside ``train.planning.shapes_only`` every task builds its frozen
parts (VQ, teacher, text tower, vision model, base LM) from their blocks' shapes, and the train
state it lays out is the one the real run would have."""

import jax
import numpy as np
import pytest

from jaxunified.parallel import aot
from jaxunified.parallel import mesh as meshlib
from jaxunified.train import compile as aot_compile
from jaxunified.train import frozen, planning
from jaxunified.train.loop import Trainer
from tests import helpers

MISSING = "/nonexistent/jaxunified_plan"


def _missing_run(block):
    """``block`` (a tiny preset's random part) as a ``workdir`` run that does not exist: planning
    falls back to the block's variant + overrides, which describe the same shapes."""
    block.kind, block.workdir, block.preset = "workdir", MISSING + "/run", ""


def _missing_checkpoint(block, kind):
    block.kind, block.path = kind, MISSING + "/checkpoint"


# family -> edits that point every frozen part at runs / checkpoints that are not there
PLANS = {
    "toklip": lambda c: (_missing_run(c.tokenizer), _missing_checkpoint(c.teacher, "hf_siglip")),
    "ar": lambda c: (_missing_run(c.tokenizer), _missing_checkpoint(c.text_encoder, "open_clip")),
    "mllm": lambda c: _missing_checkpoint(c.vision.source, "hf_siglip"),
    "star": lambda c: (_missing_run(c.tokenizer), _missing_run(c.base)),
    "dualtoken": lambda c: setattr(c.model, "init_from", MISSING + "/dualtoken"),
}


def _shapes(tree):
    return jax.tree.map(lambda x: (x.shape, str(x.dtype)), tree)


@pytest.mark.parametrize("family", sorted(PLANS))
def test_plan_needs_no_weights_and_matches_the_real_state(family, tmp_path):
    real = helpers.tiny_config(family)
    planned = real.copy_and_resolve_references()
    with planned.unlocked():
        PLANS[family](planned)
    cpu = jax.devices()[:1]
    with pytest.raises((FileNotFoundError, OSError)):
        Trainer(planned, tmp_path / "run", devices=cpu)  # a real run reads the missing files
    with planning.shapes_only():
        plan = Trainer(planned, tmp_path / "plan", devices=cpu)
    assert not planning.is_shapes_only()
    ref = Trainer(real, tmp_path / "ref", devices=cpu)
    assert _shapes(plan.abstract_state) == _shapes(ref.abstract_state)
    # and the step traces against that state (what the AOT compile starts from)
    batch = aot_compile.abstract_batch(plan)
    with jax.set_mesh(plan.mesh):
        lowered = plan.make_step(batch).lower(aot_compile.abstract_state(plan), batch)
    assert lowered.as_text()


def test_shapes_only_variables_are_shapes():
    cfg = helpers.tiny_config("star")
    with cfg.unlocked():
        _missing_run(cfg.tokenizer)
    with planning.shapes_only():
        module, variables = frozen.load_vq(cfg.tokenizer)
    leaves = jax.tree.leaves(variables)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert module.cfg.vq.codebook_size == 32
    with pytest.raises(FileNotFoundError):
        frozen.load_vq(cfg.tokenizer)


# ---- every task on the pod shapes the issue names (compile-only TPU devices, needs libtpu) ----

needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(), reason='needs libtpu: pip install "jax[tpu]==0.10.2"')

TOPOLOGIES = (("v5e-16", 1), ("v5e-64", 1), ("v5e-256", 1), ("v5p-128", 1), ("v5e-16", 2))
TASKS = ("vqgan", "siglip", "toklip", "dualtoken", "ar", "mllm", "star")


def _pod_config(family, chips):
    """The tiny preset with one example per chip (16 px where the task allows) and frozen parts as
    shapes: the program, mesh and collectives are the pod's, the compile stays short."""
    res = {"vqgan": 16, "siglip": 16, "toklip": 16}.get(family)
    over = {"data.batch_size": chips, **({"data.resolution": res} if res else {})}
    return helpers.tiny_config(family, **over)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("topology,slices", TOPOLOGIES[2:], ids=[f"{t}x{s}" for t, s in TOPOLOGIES[2:]])
def test_every_task_lowers_for_the_pod(topology, slices):  # the largest, the other generation, two slices
    chips = aot.parse_topology(topology, num_slices=slices).num_chips
    for family in TASKS:
        low = aot_compile.lower_train_step(_pod_config(family, chips), topology, num_slices=slices)
        assert low.report.num_devices == chips and low.report.per_device_batch == 1, family
        assert low.lowered.as_text(), family


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("family,topology,slices", [(f, *TOPOLOGIES[i % len(TOPOLOGIES)]) for i, f in enumerate(TASKS)])
def test_every_task_compiles_for_a_pod(family, topology, slices):
    chips = aot.parse_topology(topology, num_slices=slices).num_chips
    r = aot_compile.compile_train_step(_pod_config(family, chips), topology, num_slices=slices,
                                       with_model_flops=False)
    assert r.fits and r.compiled and r.flops_per_device > 0, r.summary()
    assert r.num_devices == chips and r.collectives, r.summary()


@needs_libtpu
def test_multislice_mesh_runs_data_across_slices():
    devs = aot.topology_devices("v5e:2x2", num_slices=2)
    m = meshlib.make_mesh((1, -1, 1), devs)  # the default shape: 'data' takes the two slices
    assert dict(m.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    slice_of = np.vectorize(lambda d: d.slice_index)(m.devices)
    assert (slice_of[0] == 0).all() and (slice_of[1] == 1).all()
    assert aot.slice_notes(m) == []  # only 'data' crosses the slice boundary


# trained parameters of the pod presets, planned on this CPU from their shapes alone
POD_PRESETS = {
    "configs/star.py:7b": 3_262_812_672 + 234_946_560 + 40_384_512,  # stacked + head + adapter (STAR-7B)
    "configs/mllm.py:7b": None,
    "configs/ar.py:xl": None,
    "configs/toklip.py:L": None,
    "configs/dualtoken.py:so400m": None,
}


@pytest.mark.parametrize("spec", sorted(POD_PRESETS))
def test_pod_presets_plan_without_any_file(spec, tmp_path):
    from jaxunified.train.runs import load_config

    cfg = load_config(spec)
    with cfg.unlocked():
        cfg.data.batch_size = 8
    with planning.shapes_only():
        plan = Trainer(cfg, tmp_path, devices=jax.devices()[:8])
    n = sum(x.size for x in jax.tree.leaves(plan.abstract_state.params))
    assert n > 1e8 and (POD_PRESETS[spec] is None or n == POD_PRESETS[spec]), n
    assert planning.is_shapes_only() is False
