"""AOT compile of the real train step for TPU topologies (libtpu, no TPU), and the bench commands."""


import jax
import pytest

from jaxunified import bench
from jaxunified.parallel import aot, hlo_cost
from jaxunified.train import compile as aot_compile
from tests import helpers


needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(), reason='needs libtpu: pip install "jax[tpu]==0.10.2" (requirements-test.txt)'
)


def tiny_config(**data):
    return helpers.tiny_config("vqgan", **{f"data.{k}": v for k, v in data.items()})


# ---- pure helpers (no compiler) ----


def test_parse_topology_defaults():
    s = aot.parse_topology("v5e:16x16")
    assert (s.topology_name, s.chip_config_name, s.wrap, s.chips_per_host_bounds) == (
        "v5e:16x16", "default", (True, True, False), (2, 2, 1))
    assert aot.parse_topology("v5e-16").dims == (4, 4)
    v4 = aot.parse_topology("v4-8")  # Cloud names count TensorCores on v4/v5p: 4 chips
    assert (v4.topology_name, v4.chip_config_name, v4.num_chips) == ("v4:2x2x1", "megacore", 4)
    assert aot.parse_topology("v5p:4x4x4").wrap == (True, True, True)
    assert aot.parse_topology("v6e:2x4", num_slices=2).num_chips == 16
    assert aot.parse_topology("v5p:2x2x2").hbm_bytes == 95 * aot.GiB
    with pytest.raises(ValueError, match="not understood"):
        aot.parse_topology("tpu-big")
    with pytest.raises(ValueError, match="unknown TPU generation"):
        aot.parse_topology("v9z:2x2")


def test_collectives_read_from_tpu_hlo():
    hlo = """
%all-reduce-scatter (input: f32[64,8]) -> f32[16,8] {
  %all-reduce.2 = f32[64,8]{1,0} all-reduce(%input), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %dynamic-slice.3 = f32[16,8]{1,0} dynamic-slice(%all-reduce.2, %c, %c)
}
ENTRY %main.1 (p0: f32[16,8], p1: f32[4,8]) -> (f32[16,8]) {
  %all-gather.6 = bf16[64,8]{1,0:T(8,128)(2,1)} all-gather(%p0), dimensions={0}, frontend_attributes={async_collective_name="all-gather-start"}
  %fusion = f32[16,8]{1,0} fusion(%all-gather.6), kind=kCustom, calls=%all-reduce-scatter
  %all-reduce-start = (f32[], f32[]) all-reduce-start(%x), to_apply=%add
  %all-reduce-done = f32[] all-reduce-done(%all-reduce-start)
  %collective-permute-start = (f32[4,8]{1,0:T(8,128)S(1)}, u32[]{:S(2)}) collective-permute-start(%p1), source_target_pairs={{0,1}}
  %collective-permute-done = f32[4,8]{1,0} collective-permute-done(%collective-permute-start)
  ROOT %t = (f32[16,8]) tuple(%fusion)
}
"""
    assert hlo_cost.program_cost(hlo).collectives == {
        "all-gather": 1, "reduce-scatter": 1, "all-reduce": 1, "collective-permute": 1}
    assert aot.largest_arrays(hlo)[0] == (64 * 8 * 2, "bf16[64,8]", "all-gather x1")


def test_oom_detection_and_figure():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(21.12G) exceeds available HBM (15.75G).")
    assert aot.is_oom(msg) and not aot.is_oom("INVALID_ARGUMENT: shapes differ")
    assert abs(aot.oom_required_bytes(msg) / aot.GiB - 21.12) < 1e-6


def test_missing_libtpu_error_names_the_fix(monkeypatch):
    monkeypatch.setattr(aot, "libtpu_available", lambda: False)
    with pytest.raises(RuntimeError, match=r'pip install "jax\[tpu\]==0.10.2"'):
        aot.topology_devices("v5e:2x2")


# ---- compile-only TPU devices ----


@needs_libtpu
def test_topology_devices_single_and_multislice():
    devs = aot.topology_devices("v5e:2x2")
    assert len(devs) == 4 and devs[0].device_kind == "TPU v5 lite"
    two = aot.topology_devices("v5e:2x2", num_slices=2)
    assert len(two) == 8 and {d.slice_index for d in two} == {0, 1}
    assert aot.topology_devices("v5p:2x2x2")[0].device_kind == "TPU v5"
    assert all(d.platform == "cpu" for d in jax.devices())  # the run itself stays on CPU


@needs_libtpu
def test_lower_for_v5p_is_fast_and_uses_the_config_mesh():
    cfg = tiny_config()
    cfg.mesh_shape = (2, -1, 1)
    low = aot_compile.lower_train_step(cfg, "v5p:2x2x2")
    assert low.report.mesh == {"data": 2, "fsdp": 4, "tensor": 1}
    assert low.report.num_params > 0 and low.report.per_device_batch == cfg.data.batch_size / 8


@needs_libtpu
def test_batch_that_does_not_split_is_a_clear_error():
    with pytest.raises(ValueError, match="data-parallel shards"):
        aot_compile.lower_train_step(tiny_config(), "v5e:2x4", batch_size=12)


@pytest.fixture(scope="module")
def tiny_report():
    # One image per chip at 16 px: the TPU backend's code generation time grows with the per-device
    # batch (16 images at 32 px take minutes on 2 cores), the program and its collectives do not.
    return aot_compile.compile_train_step(tiny_config(resolution=16), "v5e:2x2", batch_size=4, with_model_flops=False)


@needs_libtpu
@pytest.mark.slow
def test_compile_tiny_for_v5e(tiny_report):
    r = tiny_report
    assert r.fits and r.message is None, r.summary()
    assert r.mesh == {"data": 1, "fsdp": 4, "tensor": 1} and r.num_devices == 4 and r.global_batch == 4
    assert r.argument_bytes > 0 and r.temp_bytes >= 0 and r.total_bytes > 0
    assert r.alias_bytes > 0  # the state is donated
    assert r.flops_per_device > 0 and r.flops_per_step == 4 * r.flops_per_device
    assert r.collectives.get("all-gather", 0) + r.collectives.get("reduce-scatter", 0) > 0, r.collectives
    # the roofline step is no faster than the compute alone at the chip's peak
    assert r.estimated_step_seconds >= r.min_step_seconds > 0 and 0 < r.implied_mfu <= 1
    assert r.bytes_accessed_per_device > 0 and r.hbm_bytes_per_second == 819e9
    text = r.summary()
    assert "GiB" in text and "FLOP per step" in text and "fits            True" in text and "implied MFU" in text
    assert r.to_dict()["total_bytes"] == r.total_bytes and r.to_dict()["implied_mfu"] == r.implied_mfu


@needs_libtpu
@pytest.mark.slow
def test_huge_batch_reports_does_not_fit():
    # 2048 images of 64 px per chip: the mid-block attention alone needs ~4× a v5e's 16 GiB of HBM.
    # (A clear overflow fails fast; a batch near the capacity keeps the TPU compiler searching for
    # minutes before it answers.)
    batch = 2**13
    r = aot_compile.compile_train_step(tiny_config(resolution=64), "v5e:2x2", batch_size=batch)
    assert not r.fits and r.required_bytes > r.hbm_capacity_bytes
    assert aot.is_oom(r.message) or "HBM" in r.message, r.message
    text = r.summary()
    # one message: by how much, and the array that dominates (the batch's activations: the global
    # shapes when the compiler gave up, else the per-device ones)
    assert "does not fit: needs" in text and "GiB more than the" in text, text
    lead = int(r.largest_arrays[0][1].split("[")[1].split(",")[0])
    assert lead in (batch, batch // 4), r.largest_arrays
    assert r.model_flops_per_step > 0  # still there: the unpartitioned program, by the CPU cost model


# ---- bench ----


def test_matmul_peak_is_positive():
    r = bench.measure_matmul_peak("float32", size=128, trials=2, min_trial_seconds=0.01)
    assert r["tflops"] > 0 and r["size"] == 128


@pytest.mark.slow
def test_bench_step_smoke(capsys):
    peak = bench.measure_matmul_peak("float32", size=256, trials=2, min_trial_seconds=0.01)
    # One device and 16 px keep the CPU compile short; the code path is the multi-device one.
    r = bench.bench_step(tiny_config(resolution=16, batch_size=8), steps=2, warmup=1, peak=peak, name="tiny",
                         devices=jax.devices()[:1])
    print(r.summary())
    out = capsys.readouterr().out
    assert "steps/s" in out and "MFU" in out and "forward" in out
    for v in (r.steps_per_sec, r.images_per_sec, r.flops_per_step, r.achieved_tflops, r.peak_tflops, r.mfu,
              r.forward_seconds, r.forward_images_per_sec, r.forward_flops, r.forward_mfu):
        assert v > 0
    # the inference pass is part of the step's work: fewer FLOPs than forward + backward
    assert r.forward_flops < r.flops_per_step
    assert r.global_batch == 8 and r.num_devices == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_sample_smoke(dtype):
    r = bench.bench_sample("tiny", batch=2, tokens=4, prompt_len=3, recompute_points=2, dtype=dtype)
    assert r["dtype"] == dtype and r["batch"] == 2 and r["tokens"] == 4 and r["cfg"]
    for k in ("kv_cache_tokens_per_sec", "recompute_tokens_per_sec_est", "speedup"):
        assert r[k] > 0
