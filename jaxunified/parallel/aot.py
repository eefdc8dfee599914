"""Ahead-of-time compile of the real train step for a TPU topology, from a CPU-only machine.

The MaxText ``train_compile`` recipe: ``jax.experimental.topologies.get_topology_desc`` asks
libtpu (the ``libtpu`` wheel that ``pip install "jax[tpu]==0.10.2"`` pins; no TPU hardware needed)
for *compile-only* devices of a named topology; the trainer
(``jaxunified.train.compile``) builds its mesh, abstract train state and shardings over them; the jitted step is lowered against
``ShapeDtypeStruct``s and compiled by the TPU compiler. Nothing is allocated. The compiled
executable tells, per device, how much HBM the step needs, how many FLOPs it does (read from its
HLO with every loop iteration counted, ``parallel.hlo_cost``: XLA's own count sees a scanned layer
stack's body once) and which
collectives the partitioner inserted — so a pod run can be planned (batch size, mesh, remat) on a
laptop. A step that does not fit fails to compile with the same ``RESOURCE_EXHAUSTED`` the pod
would give; that becomes a report with ``fits=False``.

Usage::

    from jaxunified.train import compile as aot_compile
    report = aot_compile.compile_train_step(config, "v5e:4x4")   # devices: parallel.aot.topology_devices
    print(report.summary())

or ``python -m jaxunified.bench aot --config configs/vqgan.py:imagenet --topology v5e:4x4``.

Topology names are ``<generation>:<chips per dimension>`` (``v5e:2x2``, ``v5e:16x16``, ``v6e:2x4``,
``v4:2x2x1``, ``v5p:2x2x2``) or the Cloud slice names ``v5e-16``, ``v6e-8``, ``v4-8``, ``v5p-16``
(for v4/v5p the number counts TensorCores, two per chip).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from jaxunified.parallel.hlo_cost import DTYPE_BYTES

GiB = 1024**3

# Per generation: (libtpu topology prefix, chip_config_name, dims, HBM per device, peak bf16 TFLOP/s and
# HBM bandwidth per chip).
# v4/v5p run "megacore": one JAX device per chip (its two TensorCores), so per device = per chip.
# HBM and peaks are the published per-chip figures (the v5e compiler itself reports 15.75 GiB usable).
GENERATIONS: dict[str, dict[str, Any]] = {
    "v4": dict(prefix="v4", chip_config="megacore", ndim=3, hbm_gib=32, peak_tflops=275.0, hbm_gbps=1228.0),
    "v5p": dict(prefix="v5p", chip_config="megacore", ndim=3, hbm_gib=95, peak_tflops=459.0, hbm_gbps=2765.0),
    "v5e": dict(prefix="v5e", chip_config="default", ndim=2, hbm_gib=16, peak_tflops=197.0, hbm_gbps=819.0),
    "v6e": dict(prefix="v6e", chip_config="default", ndim=2, hbm_gib=32, peak_tflops=918.0, hbm_gbps=1640.0),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e", "trillium": "v6e"}

# Cloud slice name ("v5e-16") → chips per dimension, for the usual slice shapes.
_SLICE_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_SLICE_SHAPES_3D = {
    4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
    256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16),
}

_INSTALL_HINT = (
    'TPU topologies need libtpu (no TPU hardware): pip install "jax[tpu]==0.10.2" '
    "(it pins the matching libtpu wheel; Linux x86-64/aarch64 only). Ordinary CPU runs then need JAX_PLATFORMS=cpu."
)



@dataclasses.dataclass(frozen=True)
class TopologySpec:
    generation: str
    dims: tuple[int, ...]
    topology_name: str  # as libtpu takes it, e.g. "v5e:4x4"
    chip_config_name: str
    chips_per_host_bounds: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]
    num_slices: int = 1

    @property
    def num_chips(self) -> int:
        return math.prod(self.dims) * self.num_slices

    @property
    def hbm_bytes(self) -> int:
        return int(GENERATIONS[self.generation]["hbm_gib"] * GiB)

    @property
    def peak_flops(self) -> float:
        return GENERATIONS[self.generation]["peak_tflops"] * 1e12

    @property
    def name(self) -> str:
        dims = "x".join(map(str, self.dims))
        base = f"{self.generation}:{dims}"
        return base if self.num_slices == 1 else f"{base} x {self.num_slices} slices"


def parse_topology(name: str, num_slices: int = 1) -> TopologySpec:
    """``"v5e:4x4"`` / ``"v5e-16"`` / ``"v4:2x2x1"`` → the arguments ``get_topology_desc`` needs.

    Defaults follow MaxText's ``accelerator_to_spec_map``: hosts of 2×2 chips; a dimension wraps
    (torus) on v5e/v6e when it spans a full 16-chip pod side, and on v4/v5p when every dimension
    is a multiple of 4 (full cubes).
    """
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    raw = name.strip().lower()
    m = re.fullmatch(r"(v\d+[a-z]*|trillium)\s*[:]\s*(\d+(?:x\d+){1,2})", raw)
    if m:
        gen, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
    else:
        m = re.fullmatch(r"(v\d+[a-z]*|trillium)-(\d+)", raw)
        if not m:
            raise ValueError(
                f"topology {name!r} not understood; use e.g. 'v5e:4x4', 'v6e:2x4', 'v4:2x2x1', 'v5p:2x2x2' or 'v5e-16'"
            )
        gen, n = m.group(1), int(m.group(2))
        gen = _ALIASES.get(gen, gen)
        if gen not in GENERATIONS:
            raise ValueError(f"unknown TPU generation {m.group(1)!r} in {name!r}; known: {', '.join(GENERATIONS)}")
        if GENERATIONS[gen]["ndim"] == 3:
            if n % 2:
                raise ValueError(
                    f"{name!r}: {gen} slice names count TensorCores (2 per chip), so the number must be even")
            table, chips = _SLICE_SHAPES_3D, n // 2
        else:
            table, chips = _SLICE_SHAPES_2D, n
        if chips not in table:
            raise ValueError(f"no standard {gen} slice with {chips} chips; give the shape instead, e.g. '{gen}:4x4'")
        dims = table[chips]
    gen = _ALIASES.get(gen, gen)
    if gen not in GENERATIONS:
        raise ValueError(f"unknown TPU generation {gen!r} in {name!r}; known: {', '.join(GENERATIONS)}")
    g = GENERATIONS[gen]
    if len(dims) != g["ndim"] and not (g["ndim"] == 2 and len(dims) == 3 and dims[2] == 1):
        want = "AxB" if g["ndim"] == 2 else "AxBxC"
        raise ValueError(f"topology {name!r}: {gen} topologies are {g['ndim']}-D ({want})")
    if g["ndim"] == 2:
        dims = dims[:2]
    if min(dims) < 1:
        raise ValueError(f"topology {name!r} has an empty dimension")
    d3 = tuple(dims) + (1,) * (3 - len(dims))
    host = (min(d3[0], 2), min(d3[1], 2), 1)
    if g["ndim"] == 2:
        wrap = (d3[0] == 16, d3[1] == 16, False)
    else:
        full = all(d % 4 == 0 for d in d3)
        wrap = (full, full, full)
    return TopologySpec(
        generation=gen,
        dims=tuple(dims),
        topology_name=f"{g['prefix']}:{'x'.join(map(str, dims))}",
        chip_config_name=g["chip_config"],
        chips_per_host_bounds=host,
        wrap=wrap,
        num_slices=int(num_slices),
    )


def _prepare_libtpu_env():
    # Compile-only use of libtpu: skip the GCE metadata-server query (hangs/warns off-cloud) and do not
    # take libtpu's single-process lock (/tmp/libtpu_lockfile): another JAX process that merely loaded
    # the plugin would otherwise make this one fail with "ABORTED: ... libtpu multi-process lockfile".
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def libtpu_available() -> bool:
    """Whether a TPU PJRT plugin (the ``libtpu`` wheel or ``TPU_LIBRARY_PATH``) is installed."""
    import importlib.util

    if os.environ.get("TPU_LIBRARY_PATH"):
        return os.path.exists(os.environ["TPU_LIBRARY_PATH"])
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str | TopologySpec, num_slices: int = 1) -> list:
    """Compile-only TPU devices of topology ``name`` (``"v5e:2x2"``, ``"v5p:2x2x2"``, ``"v5e-16"``, ...).

    Needs libtpu but no TPU; ``jax.devices()`` is untouched. With ``num_slices > 1`` the devices
    carry ``slice_index`` (a multi-slice job over DCN).
    """
    spec = name if isinstance(name, TopologySpec) else parse_topology(name, num_slices)
    if not libtpu_available():
        raise RuntimeError(f"cannot build TPU topology {spec.name!r}: libtpu is not installed. {_INSTALL_HINT}")
    _prepare_libtpu_env()
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=spec.topology_name,
            chip_config_name=spec.chip_config_name,
            chips_per_host_bounds=spec.chips_per_host_bounds,
            num_slices=spec.num_slices,
            wrap=spec.wrap,
        )
    except RuntimeError as e:
        if "TPU support not installed" in str(e):
            raise RuntimeError(f"cannot build TPU topology {spec.name!r}: {e}. {_INSTALL_HINT}") from e
        if "lockfile" in str(e):
            raise RuntimeError(
                f"cannot build TPU topology {spec.name!r}: {e}. Another process holds libtpu; set "
                "ALLOW_MULTIPLE_LIBTPU_LOAD=1 before JAX loads the plugin (this module does so itself unless "
                "the variable is already set)."
            ) from e
        raise
    return list(desc.devices)


# ---------------------------------------------------------------------------------------------
# the report


@dataclasses.dataclass
class CompileReport:
    """What the TPU compiler says about one train step. Memory and FLOPs are *per device*."""

    topology: str
    generation: str
    num_devices: int
    device_kind: str
    mesh: dict[str, int]
    global_batch: int
    fits: bool
    hbm_capacity_bytes: int
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    generated_code_bytes: int = 0
    flops_per_device: float = 0.0
    model_flops_per_step: float = 0.0  # the global, unpartitioned, unoptimized step's (parallel.hlo_cost)
    bytes_accessed_per_device: float = 0.0
    hbm_bytes_per_second: float = 0.0  # the chip's published HBM bandwidth
    collectives: dict[str, int] = dataclasses.field(default_factory=dict)  # as run: a scanned layer's, per layer
    num_params: int = 0
    state_bytes: int = 0  # whole train state (params, optimizer, EMA, collections), all devices together
    peak_flops_per_device: float = 0.0
    lower_seconds: float = 0.0
    compile_seconds: float = 0.0
    message: str | None = None  # the compiler's error when the step does not fit
    required_bytes: int | None = None  # from an out-of-memory message, when it names a figure
    available_bytes: int | None = None  # the usable HBM the compiler's message names (v5e: 15.75 GiB)
    notes: list[str] = dataclasses.field(default_factory=list)
    # per device when compiled; the unpartitioned program's (global shapes) when it did not fit
    largest_arrays: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Live HBM per device: arguments + outputs not aliased to (donated) arguments + temporaries + code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.generated_code_bytes

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_device * self.num_devices

    @property
    def per_device_batch(self) -> float:
        return self.global_batch / max(self.mesh.get("data", 1) * self.mesh.get("fsdp", 1), 1)

    @property
    def min_step_seconds(self) -> float:
        """The step time at 100% MFU (the chip's published bf16 peak); real steps are slower."""
        return self.flops_per_device / self.peak_flops_per_device if self.peak_flops_per_device else float("nan")

    @property
    def hbm_seconds(self) -> float:
        """The compiled step's memory traffic (``parallel.hlo_cost``, per device; an upper estimate of its HBM
        traffic) at the chip's HBM bandwidth."""
        return self.bytes_accessed_per_device / self.hbm_bytes_per_second if self.hbm_bytes_per_second else 0.0

    @property
    def estimated_step_seconds(self) -> float:
        """A roofline of the compiled step (``parallel.hlo_cost``: every scanned layer counted): its matmul
        FLOPs at the chip's peak plus its HBM bytes at the chip's bandwidth, not overlapped (collectives not counted). The TPU cost
        model's own ``optimal_seconds`` is close to that sum on small programs but overflows (negative)
        on pod-sized ones, so it is not used. With full overlap the step would take the longer of the two."""
        return self.min_step_seconds + self.hbm_seconds

    @property
    def implied_mfu(self) -> float:
        """The MFU of a step that takes :attr:`estimated_step_seconds`."""
        return self.min_step_seconds / self.estimated_step_seconds if self.estimated_step_seconds else float("nan")

    @property
    def compiled(self) -> bool:
        """False when the compiler stopped (out of memory): the memory/FLOP/collective fields are then unset."""
        return self.flops_per_device > 0 or self.argument_bytes > 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(total_bytes=self.total_bytes, flops_per_step=self.flops_per_step, compiled=self.compiled,
                 estimated_step_seconds=self.estimated_step_seconds, implied_mfu=self.implied_mfu)
        if not self.compiled:  # JSON readers should not mistake "not measured" for zero
            for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "generated_code_bytes",
                      "total_bytes", "flops_per_device", "flops_per_step", "bytes_accessed_per_device", "collectives",
                      "estimated_step_seconds", "implied_mfu"):
                d[k] = None
        return d

    def summary(self) -> str:
        g = lambda b: f"{b / GiB:.3f} GiB"  # noqa: E731
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"topology        {self.topology} ({self.num_devices} x {self.device_kind}), mesh {mesh}",
            f"global batch    {self.global_batch} ({self.per_device_batch:g} per device)",
            f"parameters      {self.num_params / 1e6:.2f} M; train state {self.state_bytes / GiB:.3f} GiB in total",
        ]
        if self.compiled:
            lines += [
                f"memory/device   total {g(self.total_bytes)} of {g(self.hbm_capacity_bytes)} HBM "
                f"({100 * self.total_bytes / self.hbm_capacity_bytes:.1f}%)",
                f"                arguments {g(self.argument_bytes)}, outputs {g(self.output_bytes)}, "
                f"aliased (donated) {g(self.alias_bytes)}, temporaries {g(self.temp_bytes)}, "
                f"code {g(self.generated_code_bytes)}",
                f"FLOPs           {_si(self.flops_per_step, 'FLOP')} per step, "
                f"{_si(self.flops_per_device, 'FLOP')} per device"
                + (f"; global unoptimized program {_si(self.model_flops_per_step, 'FLOP')} "
                   f"(compiled/global = {self.flops_per_step / self.model_flops_per_step:.2f})"
                   if self.model_flops_per_step else ""),
                f"ideal step      {_duration(self.min_step_seconds)} at 100% MFU "
                f"({self.peak_flops_per_device / 1e12:.0f} TFLOP/s bf16 peak per chip) → "
                f"≤ {self.global_batch / self.min_step_seconds:.0f} images/s",
                f"roofline step   {_duration(self.estimated_step_seconds)} = compute + "
                f"{_duration(self.hbm_seconds)} for {_nbytes(self.bytes_accessed_per_device)} of HBM traffic at "
                f"{self.hbm_bytes_per_second / 1e9:.0f} GB/s → implied MFU {100 * self.implied_mfu:.1f}% "
                f"({100 * self.min_step_seconds / max(self.min_step_seconds, self.hbm_seconds):.0f}% if fully overlapped), "
                f"≈ {self.global_batch / self.estimated_step_seconds:.0f} images/s",
                "collectives     " + (", ".join(f"{k} {v}" for k, v in self.collectives.items()) + " (run per step)"
                                      if self.collectives else "none"),
            ]
            if self.largest_arrays:
                lines.append("largest arrays  " + "; ".join(f"{sh} {_nbytes(b)} ({op})"
                                                            for b, sh, op in self.largest_arrays[:3]))
            if self.message:
                lines.append(f"does not fit: {self.message}")
        else:
            have = self.available_bytes or self.hbm_capacity_bytes
            over = (f": needs {self.required_bytes / GiB:.2f} GiB, {(self.required_bytes - have) / GiB:.2f} GiB "
                    f"more than the {have / GiB:.2f} GiB available"
                    if self.required_bytes and self.required_bytes > have else "")
            lines.append(f"memory/device   does not fit{over}")
            lines.append(f"compiler        {self.message}")
            if self.largest_arrays:
                lines.append("largest arrays  " + "; ".join(f"{sh} {_nbytes(b)} ({op})"
                                                            for b, sh, op in self.largest_arrays[:3]))
            if self.model_flops_per_step:
                ideal = self.model_flops_per_step / (self.num_devices * self.peak_flops_per_device)
                lines.append(f"FLOPs           {_si(self.model_flops_per_step, 'FLOP')} per step "
                             f"(global unoptimized program); {_duration(ideal)} per step at 100% MFU "
                             f"on {self.num_devices} chips")
        lines += [f"note            {n}" for n in self.notes]
        lines.append(f"fits            {self.fits}   (traced in {self.lower_seconds:.1f} s, "
                     f"compiled in {self.compile_seconds:.1f} s)")
        return "\n".join(lines)


def _si(x: float, unit: str) -> str:
    """1.234e14, "FLOP" → "123.4 TFLOP"."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {prefix}{unit}"
    return f"{x:.4g} {unit}"


def _duration(sec: float) -> str:
    return f"{sec * 1e3:.4g} ms" if sec >= 1e-3 else f"{sec * 1e6:.4g} µs"


def _nbytes(b: float) -> str:
    for scale, unit in ((GiB, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if b >= scale:
            return f"{b / scale:.4g} {unit}"
    return f"{b:.0f} B"


def is_oom(err: BaseException | str) -> bool:
    """MaxText's test: the compile error is an out-of-memory one."""
    text = str(err).lower()
    return "resource_exhausted" in text or "hbm" in text


def oom_required_bytes(text: str) -> int | None:
    m = re.search(r"required for [^(]*\(([\d.]+)([KMGT])\)", text)
    if not m:
        m = re.search(r"(?:used|requires?|required)\D{0,40}?([\d.]+)([KMGT])\b", text)
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


_ARRAY_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z0-9]+)\[([\d,]*)\]\S*\s+([a-z][\w\-]*)\(")


def largest_arrays(hlo_text: str, k: int = 5) -> list[tuple[int, str, str]]:
    """The ``k`` biggest per-device array shapes the ENTRY computation materialises:
    ``(bytes, shape, "opcode xN")`` with N the number of instructions producing that shape.

    Not a liveness analysis (that is ``temp_bytes``) but the quickest way to spot an activation that
    is not sharded over the batch: its per-device shape still has the global batch in it.
    """
    found: dict[str, list] = {}
    in_entry = False
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY"):
            in_entry = True
            continue
        if in_entry and line.startswith("}"):
            break
        if not in_entry:
            continue
        m = _ARRAY_RE.match(line)
        if not m or m.group(2) not in DTYPE_BYTES or m.group(4) in ("parameter", "bitcast", "get-tuple-element"):
            continue
        shape = f"{m.group(2)}[{m.group(3)}]"
        if shape in found:
            found[shape][2] += 1
        else:
            dims = [int(d) for d in m.group(3).split(",") if d]
            found[shape] = [math.prod(dims) * DTYPE_BYTES[m.group(2)], m.group(4), 1]
    top = sorted(((b, sh, f"{op} x{n}") for sh, (b, op, n) in found.items()), reverse=True)
    return top[:k]


_MLIR_DTYPES = {"i1": "pred", "i8": "s8", "ui8": "u8", "i16": "s16", "ui16": "u16", "i32": "s32", "ui32": "u32",
                "i64": "s64", "ui64": "u64", "bf16": "bf16", "f16": "f16", "f32": "f32", "f64": "f64"}
_TENSOR_RE = re.compile(r"tensor<((?:\d+x)+)(" + "|".join(sorted(_MLIR_DTYPES, key=len, reverse=True)) + r")>")


def largest_global_arrays(stablehlo_text: str, k: int = 5) -> list[tuple[int, str, str]]:
    """The ``k`` biggest array types of a lowered (not yet partitioned) program: ``(bytes, shape,
    "global xN")``, N the number of mentions. What a step that does not compile can still show: the
    global shapes; one whose batch axis is not split over the mesh is the usual culprit."""
    found: dict[str, list] = {}
    for m in _TENSOR_RE.finditer(stablehlo_text):
        dims = [int(d) for d in m.group(1).split("x") if d]
        dtype = _MLIR_DTYPES[m.group(2)]
        shape = f"{dtype}[{','.join(map(str, dims))}]"
        if shape in found:
            found[shape][1] += 1
        else:
            found[shape] = [math.prod(dims) * DTYPE_BYTES.get(dtype, 4), 1]
    top = sorted(((b, sh, f"global x{n}") for sh, (b, n) in found.items()), reverse=True)
    return top[:k]


def oom_available_bytes(text: str) -> int | None:
    """The HBM the compiler had ("exceeds available HBM (15.75G)"), when its message says."""
    m = re.search(r"available HBM \(([\d.]+)([KMGT])\)", text) or re.search(r"of ([\d.]+)([KMGT]) hbm", text, re.I)
    return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024) if m else None


def tree_bytes(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def tree_size(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def resolve_devices(topology, num_slices: int):
    """(devices, generation, display name) for a topology name/spec or a list of TPU devices."""
    if isinstance(topology, (str, TopologySpec)):
        spec = topology if isinstance(topology, TopologySpec) else parse_topology(topology, num_slices)
        return topology_devices(spec), spec.generation, spec.name
    devices = list(topology)
    if not devices:
        raise ValueError("no devices given")
    kind = devices[0].device_kind.lower()
    kinds = (("v5e", "v5 lite"), ("v6e", "v6 lite"), ("v5p", "v5"), ("v4", "v4"))
    gen = next((g for g, k in kinds if kind.endswith(k)), None)
    if gen is None:
        raise ValueError(f"devices of kind {devices[0].device_kind!r} are not a TPU generation this module knows "
                         f"({', '.join(GENERATIONS)})")
    return devices, gen, f"{gen} ({len(devices)} devices)"


def slice_notes(mesh) -> list[str]:
    """Multi-slice: which mesh axes cross slice (DCN) boundaries. Only 'data' should."""
    import numpy as np

    devs = mesh.devices
    if not hasattr(devs.flat[0], "slice_index"):
        return []
    sl = np.vectorize(lambda d: d.slice_index)(devs)
    if len(np.unique(sl)) < 2:
        return []
    crossing = [name for i, name in enumerate(mesh.axis_names) if devs.shape[i] > 1 and
                np.any(np.diff(sl, axis=i) != 0)]
    bad = [a for a in crossing if a != "data"]
    if not bad:
        return []
    return [f"mesh axes {bad} cross slice boundaries (DCN), not just 'data': their collectives run over the "
            f"data-centre network. A multi-slice mesh needs 'data' over slices (mesh_utils.create_hybrid_device_mesh)."]
