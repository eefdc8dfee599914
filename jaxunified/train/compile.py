"""Ahead-of-time lowering and compile of a config's real train step for a TPU topology (from a CPU).

Beside the trainer, as MaxText keeps ``train_compile`` beside ``train``: the topology's
compile-only devices, the report and the HLO readers live in ``jaxunified.parallel.aot``; this
module builds the run's :class:`~jaxunified.train.loop.Trainer` over those devices and lowers its
step against abstract (``ShapeDtypeStruct`` + sharding) state and batch.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import warnings
from typing import Any, Sequence

import jax
import numpy as np

from jaxunified.nn import sums
from jaxunified.parallel import hlo_cost
from jaxunified.parallel import mesh as meshlib
from jaxunified.parallel.aot import (
    GENERATIONS,
    CompileReport,
    GiB,
    TopologySpec,
    oom_required_bytes,
    resolve_devices,
    slice_notes,
    tree_bytes,
    tree_size,
    is_oom,
    largest_arrays,
    largest_global_arrays,
    oom_available_bytes,
)
from jaxunified.train import planning
from jaxunified.train.loop import Trainer


def with_batch_size(config, batch_size: int | None):
    """A copy of ``config`` (references resolved, unlocked copy) with ``data.batch_size`` replaced."""
    cfg = config.copy_and_resolve_references()
    if batch_size is not None:
        with cfg.unlocked():
            cfg.data.batch_size = int(batch_size)
    return cfg



def abstract_batch(trainer) -> dict:
    """The per-step global batch as ShapeDtypeStructs carrying the trainer's batch shardings."""
    example = trainer.task.train_batch_example()
    shardings = trainer.batch_shardings(example)
    return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=shardings[k])
            for k, v in example.items()}


def abstract_state(trainer):
    """The trainer's state as ShapeDtypeStructs carrying its shardings."""
    return trainer.layout.target


def _check_batch(trainer, batch: dict, topology: str):
    shards = meshlib.num_batch_shards(trainer.mesh)
    for k, v in batch.items():
        if v.shape and v.shape[0] % shards:
            raise ValueError(
                f"batch {k!r} of {v.shape[0]} examples does not split over the {shards} data-parallel shards of "
                f"mesh {dict(trainer.mesh.shape)} on {topology}; set --config.data.batch_size to a multiple of "
                f"{shards} (or change --config.mesh_shape)"
            )


@dataclasses.dataclass
class LoweredStep:
    """The train step traced for a topology, before compilation."""

    trainer: Any
    lowered: Any
    report: CompileReport  # filled in except for the compiler's figures


def lower_train_step(
    config,
    topology: str | TopologySpec | Sequence[Any],
    batch_size: int | None = None,
    num_slices: int = 1,
) -> LoweredStep:
    """Builds the :class:`Trainer` over ``topology``'s devices and lowers its step against abstract
    (``ShapeDtypeStruct`` + sharding) state and batch. Seconds, not minutes: use it to check that a mesh
    and batch are valid for a topology without paying for the TPU compiler."""
    devices, gen, name = resolve_devices(topology, num_slices)
    cfg = with_batch_size(config, batch_size)
    # frozen sub-models (VQ, teacher, base LM) as shapes: planning needs no checkpoint
    with tempfile.TemporaryDirectory(prefix="jaxunified_aot_") as tmp, planning.shapes_only():
        trainer = Trainer(cfg, workdir=tmp, devices=devices)
    state = abstract_state(trainer)
    batch = abstract_batch(trainer)
    _check_batch(trainer, batch, name)
    report = CompileReport(
        topology=name,
        generation=gen,
        num_devices=len(devices),
        device_kind=devices[0].device_kind,
        mesh={k: int(v) for k, v in trainer.mesh.shape.items()},
        global_batch=int(next(iter(batch.values())).shape[0]),
        fits=False,
        hbm_capacity_bytes=int(GENERATIONS[gen]["hbm_gib"] * GiB),
        num_params=tree_size(trainer.abstract_state.params),
        state_bytes=tree_bytes(trainer.abstract_state),
        peak_flops_per_device=GENERATIONS[gen]["peak_tflops"] * 1e12,
        hbm_bytes_per_second=GENERATIONS[gen]["hbm_gbps"] * 1e9,
    )
    report.notes += slice_notes(trainer.mesh)
    step = trainer.make_step(batch)
    t0 = time.perf_counter()
    # trace the TPU program, not the CPU-only formulations (nn.sums) of the process doing the compiling
    with jax.set_mesh(trainer.mesh), sums.targeting(devices[0].platform):
        lowered = step.lower(state, batch)
    report.lower_seconds = time.perf_counter() - t0
    return LoweredStep(trainer, lowered, report)


def model_flops(config, batch_size: int | None = None) -> float:
    """Matmul FLOPs of one train step of the whole (global-batch, unpartitioned) program, read from
    its CPU lowering (``parallel.hlo_cost``, every scanned layer counted): no TPU compiler involved,
    so it is there even when the step does not fit.

    It counts the program as traced, before XLA's simplifications (dead-code elimination of unused
    forward values, algebraic rewrites), so it is an upper estimate: a compiled report's
    ``flops_per_step`` is usually lower; much higher means the partitioner duplicates work."""
    cfg = with_batch_size(config, batch_size)
    cfg.mesh_shape = (1, 1, 1)
    with tempfile.TemporaryDirectory(prefix="jaxunified_aot_") as tmp, planning.shapes_only():
        trainer = Trainer(cfg, workdir=tmp, devices=jax.devices("cpu")[:1])
    state, batch = abstract_state(trainer), abstract_batch(trainer)
    with jax.set_mesh(trainer.mesh), sums.targeting("tpu"):
        lowered = trainer.make_step(batch).lower(state, batch)
    return hlo_cost.lowered_cost(lowered).flops


def compile_train_step(
    config,
    topology: str | TopologySpec | Sequence[Any],
    batch_size: int | None = None,
    num_slices: int = 1,
    compiler_options: dict[str, Any] | None = None,
    with_model_flops: bool = True,
) -> CompileReport:
    """Compiles ``config``'s real train step for ``topology`` and reports memory, FLOPs and collectives.

    ``topology`` is a name (see :func:`parse_topology`) or a list of (compile-only) TPU devices.
    ``batch_size`` overrides ``config.data.batch_size`` (the global batch). The mesh comes from
    ``config.mesh_shape`` (``(1, -1, 1)`` = pure FSDP). A step too big for the chip's HBM returns a
    report with ``fits=False`` and the compiler's message; other compile errors raise.
    ``compiler_options`` go to ``Lowered.compile`` (XLA/libtpu flags, as MaxText's ``compile_xla_flags``).
    ``with_model_flops`` also counts the unpartitioned program's FLOPs (:func:`model_flops`, seconds).
    """
    low = lower_train_step(config, topology, batch_size=batch_size, num_slices=num_slices)
    report = low.report
    if with_model_flops:
        report.model_flops_per_step = model_flops(config, batch_size)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # With JAX's persistent compilation cache on, compile-only executables are written to it but
            # cannot be loaded back ("PjRtCompiler must be constructed with a Client"); JAX then
            # recompiles, which is all that can happen here anyway.
            warnings.filterwarnings("ignore", message="Error reading persistent compilation cache entry")
            compiled = low.lowered.compile(compiler_options) if compiler_options else low.lowered.compile()
    except Exception as e:  # noqa: BLE001  (the OOM path returns a report; anything else raises)
        if not is_oom(e):
            raise
        report.compile_seconds = time.perf_counter() - t0
        text = str(e).strip()
        report.message = text.splitlines()[0][:600] if text else type(e).__name__
        report.required_bytes = oom_required_bytes(text)
        report.available_bytes = oom_available_bytes(text)
        # no partitioned program to read: the unpartitioned one names the arrays that dominate
        report.largest_arrays = largest_global_arrays(low.lowered.as_text())
        return report
    report.compile_seconds = time.perf_counter() - t0

    mem = compiled.memory_analysis()
    if mem is not None:
        report.argument_bytes = int(mem.argument_size_in_bytes)
        report.output_bytes = int(mem.output_size_in_bytes)
        report.alias_bytes = int(mem.alias_size_in_bytes)
        report.temp_bytes = int(mem.temp_size_in_bytes)
        report.generated_code_bytes = int(mem.generated_code_size_in_bytes)
    hlo = compiled.as_text() or ""
    cost = hlo_cost.compiled_cost(compiled, hlo)
    report.flops_per_device = cost.flops
    report.bytes_accessed_per_device = cost.bytes_accessed
    report.notes += [cost.warning] if cost.warning else []
    report.collectives = cost.collectives
    report.largest_arrays = largest_arrays(hlo)
    hbm = report.hbm_capacity_bytes
    report.fits = report.total_bytes <= hbm
    if not report.fits:
        report.message = (f"needs {report.total_bytes / GiB:.2f} GiB per device, {(report.total_bytes - hbm) / GiB:.2f} "
                          f"GiB more than the {hbm / GiB:.0f} GiB of HBM of a {report.generation} chip")
        report.required_bytes = report.total_bytes
    return report
