"""FLOPs and HBM bytes of an HLO module, with every loop counted as many times as it runs.

XLA's own cost analysis (``Compiled.cost_analysis()``, ``Lowered.cost_analysis()``, on CPU and on the
TPU compiler alike) counts a ``while`` body once whatever its trip count. Every model here that
stacks its layers with ``nn.scan`` (the LM, STAR, the 7B planning presets) is one such loop, so
XLA's figure for it is about ``1 / num_layers`` of the work, and an MFU or a roofline step time
built on it is off by that factor (``configs/star.py:shapes_edit``'s step: 45 GFLOP counted for
70 done; STAR-7B stage 2 on v5p-128: 0.69 PFLOP for 5.9).

This module reads the module's text instead:

- **FLOPs** are the matrix-unit work: ``dot`` (2 · output elements · contracted size) and
  ``convolution`` (2 multiply-adds per valid window tap, padding and dilation holes excluded, as
  XLA counts them; the TPU compiler writes its dots as convolutions). Elementwise arithmetic is
  left out: MFU here is against a matmul peak.
- **Bytes** are what each instruction of a non-fused computation reads and writes (operands plus
  result; a fusion at its boundary), the quantity XLA's "bytes accessed" approximates: an upper
  estimate of HBM traffic (on TPU it includes moves between HBM and on-chip memory).
- A ``while`` multiplies its body by its trip count: the compiler's ``known_trip_count`` when it
  wrote one (XLA:CPU does), else ``induction < N`` read from the loop's condition with the step
  the body adds (what ``lax.scan``/``fori_loop`` lower to; the TPU compiler writes no annotation).
  A loop whose count cannot be read counts once and is listed in ``unknown_loops``.
- **Collectives** are counted as executed: an FSDP all-gather inside the layer scan counts once per
  layer; an async pair counts at its ``-start``; the TPU compiler's reduce-scatter (a fusion calling
  an ``all-reduce-scatter`` computation) counts as one reduce-scatter, not as its inner all-reduce.
- ``conditional`` takes its costliest branch; ``call``/``fusion``/async wrappers count their callee
  once; the scalar ``to_apply`` computations of reductions are not matmul work.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}

# no data moves: views, bookkeeping, and the control ops whose callees are counted instead
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call", "conditional",
         "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "add-dependency", "domain"}

# "%name (params) -> type {" in compiled text, "name {" in a lowered module's
_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)(?:\s+\(.*\)\s+->\s+.*)?\s*\{\s*$")
_ASSIGN_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_ARRAY_RE = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\]")
_CALLEE_RE = re.compile(r"\b(calls|to_apply|condition|body|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES_RE = re.compile(r"branch_computations=\{([^}]*)\}")
_COMMENT_RE = re.compile(r"/\*.*?\*/")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # the result type as printed (an array or a tuple)
    opcode: str
    operands: list[str]
    attrs: str


@dataclasses.dataclass
class HloCost:
    flops: float = 0.0
    bytes_accessed: float = 0.0
    unknown_loops: list[str] = dataclasses.field(default_factory=list)
    collectives: dict[str, int] = dataclasses.field(default_factory=dict)  # executed per step
    note: str | None = None  # set when the text could not be read and XLA's own figures stand in

    @property
    def warning(self) -> str | None:
        """What a report should say about these figures, if anything."""
        if self.note:
            return self.note
        if self.unknown_loops:
            return f"{len(self.unknown_loops)} loop(s) of unknown trip count counted once in FLOPs/bytes"
        return None


def _split_top(s: str) -> list[str]:
    """``s`` split at the commas outside any bracket."""
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out


def _closing(s: str, start: int) -> int:
    """Index of the bracket closing the one at ``start``."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] in "([{":
            depth += 1
        elif s[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced HLO text: {s[:120]!r}")


def _parse_instr(line: str) -> Instr | None:
    m = _ASSIGN_RE.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # a tuple result type
        end = _closing(rest, 0)
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        # an array type may hold parentheses in its layout ({1,0:T(8,128)(2,1)}): it ends at the
        # first space outside brackets
        depth, end = 0, len(rest)
        for i, ch in enumerate(rest):
            if ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
            elif ch == " " and depth == 0:
                end = i
                break
        shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([a-z][\w\-]*)\(", rest)
    if not op:
        return None
    open_at = op.end() - 1
    close = _closing(rest, open_at)
    operands = [a.strip().split()[-1].lstrip("%") for a in _split_top(rest[open_at + 1:close]) if a.strip()]
    return Instr(m.group(1), shape, op.group(1), operands, rest[close + 1:])


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
    """HLO module text → ({computation: instructions}, entry computation's name)."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        line = _COMMENT_RE.sub("", line)  # TPU text numbers long operand lists: /*index=5*/
        header = _HEADER_RE.match(line)
        if header and "=" not in line.split("(")[0]:
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        if current is not None:
            ins = _parse_instr(line)
            if ins is not None:
                comps[current].append(ins)
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _arrays(shape: str) -> list[tuple[str, list[int]]]:
    return [(dt, [int(d) for d in dims.split(",") if d]) for dt, dims in _ARRAY_RE.findall(shape)
            if dt in DTYPE_BYTES]


def shape_bytes(shape: str) -> float:
    return float(sum(math.prod(dims) * DTYPE_BYTES[dt] for dt, dims in _arrays(shape)))


def _dims(shape: str) -> list[int]:
    arrays = _arrays(shape)
    return arrays[0][1] if arrays else []


def _attr_list(attrs: str, key: str) -> list[int]:
    m = re.search(key + r"=\{([\d,]*)\}", attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def dot_flops(out: list[int], lhs: list[int], attrs: str) -> float:
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in _attr_list(attrs, "lhs_contracting_dims"))


def _window(attrs: str, rank: int) -> dict[str, list]:
    m = re.search(r"window=\{([^}]*)\}", attrs)
    win = {"size": [1] * rank, "stride": [1] * rank, "pad": [(0, 0)] * rank, "lhs_dilate": [1] * rank,
           "rhs_dilate": [1] * rank}
    if not m:
        return win
    for item in m.group(1).split():
        key, _, val = item.partition("=")
        parts = val.split("x")
        if key == "pad":
            win["pad"] = [tuple(int(v) for v in p.split("_")) for p in parts]
        elif key in win:
            win[key] = [int(v) for v in parts]
    return win


def _valid_taps(out: int, size: int, stride: int, pad_lo: int, in_size: int, lhs_dilate: int,
                rhs_dilate: int) -> int:
    """(output position, kernel tap) pairs along one spatial dim that read a real input element."""
    last = (in_size - 1) * lhs_dilate
    count = 0
    for k in range(size):
        offset = k * rhs_dilate - pad_lo
        for o in range(out):
            pos = o * stride + offset
            if 0 <= pos <= last and pos % lhs_dilate == 0:
                count += 1
    return count


def conv_flops(out: list[int], lhs: list[int], rhs: list[int], attrs: str) -> float:
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if not m:
        raise ValueError(f"convolution without dim_labels: {attrs[:200]!r}")
    lhs_l, rhs_l, out_l = m.groups()
    spatial = sorted(c for c in out_l if c.isdigit())
    win = _window(attrs, len(spatial))
    macs = out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")]
    for d, c in enumerate(spatial):
        macs *= _valid_taps(out[out_l.index(c)], win["size"][d], win["stride"][d], win["pad"][d][0],
                            lhs[lhs_l.index(c)], win["lhs_dilate"][d], win["rhs_dilate"][d])
    return 2.0 * macs


_INT_SCALAR_RE = re.compile(r"^[su](8|16|32|64)\[\]")


def _through_copies(node: Instr | None, table: dict[str, Instr]) -> Instr | None:
    while node is not None and node.opcode in ("copy", "bitcast"):
        node = table.get(node.operands[0])
    return node


def _int_constant(node: Instr | None, table: dict[str, Instr]) -> int | None:
    """The value of an integer scalar constant, through copies and bitcasts; None otherwise."""
    node = _through_copies(node, table)
    if node is None or node.opcode != "constant" or not _INT_SCALAR_RE.match(node.shape) or not node.operands:
        return None
    m = re.fullmatch(r"-?\d+", node.operands[0])
    return int(m.group(0)) if m else None


def _trip_count(ins: Instr, comps: dict[str, list[Instr]], caller: dict[str, Instr]) -> int | None:
    """How often while-instruction ``ins`` (in a computation whose instructions are ``caller``) runs its
    body: XLA's ``known_trip_count``, else ``ceil((limit - init) / step)`` for an integer counter that
    starts at a constant, grows by a constant and is compared ``<``/``<=`` with a constant."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attrs)
    if m:
        return int(m.group(1))
    callees = dict(_CALLEE_RE.findall(ins.attrs))
    cond, body = comps.get(callees.get("condition", "")), comps.get(callees.get("body", ""))
    if not cond or not body or not ins.operands:
        return None
    table = {i.name: i for i in cond}
    root = cond[-1]
    direction = re.search(r"direction=(\w+)", root.attrs)
    if root.opcode != "compare" or len(root.operands) != 2 or not direction or direction.group(1) not in ("LT", "LE"):
        return None
    counter = table.get(root.operands[0])
    limit = _int_constant(table.get(root.operands[1]), table)
    if counter is None or counter.opcode != "get-tuple-element" or limit is None:
        return None
    index = int(re.search(r"index=(\d+)", counter.attrs).group(1))
    step = _induction_step(body, index)
    init_tuple = caller.get(ins.operands[0])
    if step is None or init_tuple is None or init_tuple.opcode != "tuple" or index >= len(init_tuple.operands):
        return None
    init = _int_constant(caller.get(init_tuple.operands[index]), caller)
    if init is None:
        return None
    return max(0, math.ceil((limit + (direction.group(1) == "LE") - init) / step))


def _induction_step(body: list[Instr], index: int) -> int | None:
    """The positive constant the loop body adds to tuple element ``index``."""
    if not body or body[-1].opcode != "tuple" or index >= len(body[-1].operands):
        return None
    table = {i.name: i for i in body}
    node = _through_copies(table.get(body[-1].operands[index]), table)
    if node is None or node.opcode != "add":
        return None
    for name in node.operands:
        step = _int_constant(table.get(name), table)
        if step is not None and step > 0:
            return step
    return None


_SLICES = ("slice", "dynamic-slice")


def _moved_bytes(ins: Instr, shapes: dict[str, str], fused: list[Instr]) -> float:
    """HBM bytes one top-level instruction reads and writes. A slice reads only what it keeps and a
    dynamic-update-slice (a scan stacking its outputs) writes its update in place, whole buffers
    in their operand lists notwithstanding; inside a fusion the same holds per fused parameter."""
    if ins.opcode in _SLICES:
        return 2 * shape_bytes(ins.shape)
    if ins.opcode == "copy-start":  # its result is a (destination, source, context) tuple
        return 2 * shape_bytes(shapes.get(ins.operands[0], ""))
    if ins.opcode == "dynamic-update-slice":
        return 2 * shape_bytes(shapes.get(ins.operands[1], ""))
    if not fused:
        return shape_bytes(ins.shape) + sum(shape_bytes(shapes.get(o, "")) for o in ins.operands)
    table = {i.name: i for i in fused}
    users: dict[str, list[Instr]] = {}
    for i in fused:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    params = {int(i.operands[0]): i for i in fused if i.opcode == "parameter" and i.operands}
    total = 0.0
    for k, operand in enumerate(ins.operands):
        param = params.get(k)
        use = users.get(param.name, []) if param is not None else []
        if use and all(u.opcode in _SLICES and u.operands[0] == param.name for u in use):
            total += sum(shape_bytes(u.shape) for u in use)
        elif use and all(u.opcode == "dynamic-update-slice" and u.operands[0] == param.name for u in use):
            continue  # the buffer updated in place
        else:
            total += shape_bytes(shapes.get(operand, ""))
    root = fused[-1]
    outs = [table.get(o) for o in root.operands] if root.opcode == "tuple" else [root]
    for out in outs:
        if out is None:
            continue
        if out.opcode == "dynamic-update-slice":
            total += shape_bytes(table[out.operands[1]].shape) if out.operands[1] in table else 0.0
        else:
            total += shape_bytes(out.shape)
    return total


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class _Cost:
    flops: float = 0.0
    nbytes: float = 0.0
    collectives: tuple[tuple[str, int], ...] = ()

    def __add__(self, other: "_Cost") -> "_Cost":
        return _Cost(self.flops + other.flops, self.nbytes + other.nbytes, _merge(self.collectives, other.collectives))

    def scaled(self, n: int) -> "_Cost":
        return _Cost(n * self.flops, n * self.nbytes, tuple((k, n * v) for k, v in self.collectives))


def _merge(a, b) -> tuple[tuple[str, int], ...]:
    out = dict(a)
    for k, v in b:
        out[k] = out.get(k, 0) + v
    return tuple(sorted(out.items()))


def _collective(opcode: str) -> str | None:
    """The collective an opcode starts (an async pair counts at its ``-start``)."""
    base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
    return base if base in COLLECTIVES else None


def _collective_key(ins: Instr, where: str) -> tuple[str, str] | None:
    """(kind, identity) of a collective instruction: its channel when it has one — the TPU compiler
    splits one async collective over its start, overlapped-compute and done fusions, each holding a
    copy of the op with the same channel — else the instruction itself."""
    kind = _collective(ins.opcode)
    if kind is None:
        return None
    channel = re.search(r"channel_id=(\d+)", ins.attrs)
    return kind, (f"channel {channel.group(1)}" if channel else f"{where}/{ins.name}")


def _is_free(ins: Instr) -> bool:
    """Moves no data of its own: views and bookkeeping, control ops (their callees count), the done
    half of an async pair (its start counts) and the TPU's buffer allocations."""
    return (ins.opcode in _FREE or ins.opcode.endswith(("-done", "-update"))
            or (ins.opcode == "custom-call" and 'custom_call_target="AllocateBuffer"' in ins.attrs))


def program_cost(text: str) -> HloCost:
    """Loop-aware matmul FLOPs, bytes accessed and collectives of HLO module ``text`` (module docstring)."""
    comps, entry = parse_module(text)
    unknown: list[str] = []

    @functools.lru_cache(maxsize=None)
    def fused(name: str) -> tuple[float, frozenset]:
        """Matmul FLOPs and collectives (``_collective_key``s) of a fused computation and the fusions inside it."""
        instrs = comps.get(name, [])
        shapes = {i.name: i.shape for i in instrs}
        flops, keys = 0.0, set()
        for ins in instrs:
            flops += _flops(ins, shapes)
            key = _collective_key(ins, name)
            if key:
                keys.add(key)
            callee = dict(_CALLEE_RE.findall(ins.attrs)).get("calls")
            if callee:
                inner_flops, inner_keys = called(callee)
                flops += inner_flops
                keys |= inner_keys
        return flops, frozenset(keys)

    def called(callee: str) -> tuple[float, frozenset]:
        flops, keys = fused(callee)
        if "reduce-scatter" in callee:  # the TPU's reduce-scatter: an all-reduce and a slice, fused
            keys = frozenset({("reduce-scatter", min((k for _, k in keys), default=callee))})
        return flops, keys

    @functools.lru_cache(maxsize=None)
    def cost(name: str) -> _Cost:
        """One run of non-fused computation ``name``; fused callees add FLOPs and collectives only."""
        total = _Cost()
        instrs = comps.get(name, [])
        table = {i.name: i for i in instrs}
        shapes = {i.name: i.shape for i in instrs}
        keys = set()
        for ins in instrs:
            callees = dict(_CALLEE_RE.findall(ins.attrs))
            key = _collective_key(ins, name)
            if key:
                keys.add(key)
            nbytes = 0.0
            if not _is_free(ins):
                nbytes = _moved_bytes(ins, shapes, comps.get(callees.get("calls", ""), []))
            total = total + _Cost(_flops(ins, shapes), nbytes)
            if ins.opcode == "while":
                trips = _trip_count(ins, comps, table)
                if trips is None:
                    unknown.append(ins.name)
                    trips = 1
                total = total + cost(callees["body"]).scaled(trips)
            elif ins.opcode == "conditional":
                found = _BRANCHES_RE.search(ins.attrs)
                branches = ([c.strip().lstrip("%") for c in found.group(1).split(",")] if found else
                            [callees[k] for k in ("true_computation", "false_computation") if k in callees])
                total = total + max((cost(c) for c in branches), key=lambda c: (c.flops, c.nbytes), default=_Cost())
            elif ins.opcode == "call":  # ordinary code (``to_apply=`` before XLA's passes)
                total = total + cost(callees.get("calls") or callees["to_apply"])
            elif "calls" in callees and not ins.opcode.endswith(("-done", "-update")):
                # a fusion or async wrapper: matmul work and collectives inside, no HBM bytes of its own
                inner_flops, inner_keys = called(callees["calls"])
                total = total + _Cost(inner_flops)
                keys |= inner_keys
        counts: dict[str, int] = {}
        for kind, _ in keys:
            counts[kind] = counts.get(kind, 0) + 1
        return total + _Cost(collectives=tuple(sorted(counts.items())))

    c = cost(entry)
    return HloCost(c.flops, c.nbytes, unknown, {k: v for k, v in c.collectives if v})


def _flops(ins: Instr, shapes: dict[str, str]) -> float:
    if ins.opcode == "dot":
        return dot_flops(_dims(ins.shape), _dims(shapes.get(ins.operands[0], "")), ins.attrs)
    if ins.opcode == "convolution":
        return conv_flops(_dims(ins.shape), _dims(shapes.get(ins.operands[0], "")),
                          _dims(shapes.get(ins.operands[1], "")), ins.attrs)
    return 0.0


def compiled_cost(compiled, text: str | None = None) -> HloCost:
    """``program_cost`` of a ``jax.stages.Compiled`` (one device's program under SPMD); pass ``text``
    when the caller already holds ``compiled.as_text()`` (a pod-sized module's text takes a while)."""
    return _read((compiled.as_text() if text is None else text) or "", compiled)


def lowered_cost(lowered) -> HloCost:
    """``program_cost`` of a ``jax.stages.Lowered`` (the global program, before XLA's passes)."""
    return _read(lowered.as_text(dialect="hlo"), lowered)


def _read(text: str, stage) -> HloCost:
    """A report should not die on HLO this reader does not know: XLA's own figures then stand in."""
    try:
        return program_cost(text)
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        ca = stage.cost_analysis()
        ca = (ca[0] if ca else {}) if isinstance(ca, (list, tuple)) else (ca or {})
        return HloCost(float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0)),
                       note=f"HLO text not read ({type(e).__name__}: {e}); XLA's cost analysis used, "
                            "loop bodies counted once")


__all__ = ["HloCost", "program_cost", "compiled_cost", "lowered_cost", "parse_module", "dot_flops", "conv_flops",
           "shape_bytes", "DTYPE_BYTES", "COLLECTIVES"]
