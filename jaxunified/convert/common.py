"""Reading PyTorch/HF/big_vision checkpoints into flat numpy dicts, layout transposes, key checks.

torch is imported only when a ``.pt``/``.pth``/``.bin`` file is read, so it stays optional.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Iterable, Mapping

import numpy as np

# Wrapper keys under which training scripts store the model's state dict, tried in order.
_WRAPPER_KEYS = ("ema", "model", "state_dict", "module", "model_state_dict")


class CheckpointMismatchError(ValueError):
    """Raised when a checkpoint's keys or shapes do not match what the model expects."""


def _to_numpy(v) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    try:  # torch tensor (bf16 has no numpy dtype: go through float32)
        import torch

        if isinstance(v, torch.Tensor):
            t = v.detach().cpu()
            if t.dtype == torch.bfloat16:
                t = t.float()
            return t.numpy()
    except ImportError:
        pass
    return np.asarray(v)


def _unwrap(obj: Any, prefer: str | None) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    keys = ((prefer,) if prefer else ()) + _WRAPPER_KEYS
    for k in keys:
        if k in obj and isinstance(obj[k], Mapping):
            return obj[k]
    return obj


def read_state_dict(path: str | os.PathLike, prefer: str | None = None) -> dict[str, np.ndarray]:
    """Reads a flat ``{key: array}`` dict from ``.safetensors``, ``.pt/.pth/.bin``, ``.npz`` or a folder.

    A folder may hold ``model.safetensors``, a sharded ``*.safetensors.index.json`` or a single
    ``.pt``. For ``.pt`` files the state dict is unwrapped from ``prefer`` or the usual wrapper keys
    (``ema``, ``model``, ``state_dict``, ``module``); optimizer state is ignored.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p} (pass a local file; nothing is downloaded)")
    if p.is_dir():
        index = sorted(p.glob("*.safetensors.index.json"))
        if index:
            files = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
            out: dict[str, np.ndarray] = {}
            for f in files:
                out.update(read_state_dict(p / f))
            return out
        for pattern in ("*.safetensors", "*.pt", "*.pth", "*.bin", "*.npz"):
            found = sorted(p.glob(pattern))
            if len(found) == 1:
                return read_state_dict(found[0], prefer)
        raise FileNotFoundError(f"no single checkpoint file found in folder {p}")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(p)))
    if suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"reading {p.name} needs PyTorch (`pip install torch`); or convert it to .safetensors first"
            ) from e
        obj = torch.load(str(p), map_location="cpu", weights_only=False)
        sd = _unwrap(obj, prefer)
        return {str(k): _to_numpy(v) for k, v in sd.items() if hasattr(v, "shape")}
    raise ValueError(f"unsupported checkpoint format {suffix!r} for {p}; use .safetensors, .pt/.pth/.bin or .npz")


def strip_prefix(sd: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Drops ``prefix`` from keys that have it (e.g. DDP's ``module.``); other keys are kept."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


# ---- layout transposes (PyTorch → Flax) ----

def conv_kernel(w: np.ndarray) -> np.ndarray:
    """OIHW → HWIO."""
    return np.transpose(w, (2, 3, 1, 0))


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """[out, in] → [in, out]."""
    return np.transpose(w)


def conv1x1_as_dense(w: np.ndarray) -> np.ndarray:
    """A 1×1 Conv2d weight [O, I, 1, 1] → Dense kernel [I, O]."""
    return np.transpose(w[:, :, 0, 0])


# ---- building the Flax tree and checking it ----

def flatten(tree: Mapping, sep: str = "/") -> dict[str, Any]:
    out: dict[str, Any] = {}

    def rec(t, prefix):
        for k, v in t.items():
            key = f"{prefix}{sep}{k}" if prefix else str(k)
            if isinstance(v, Mapping):
                rec(v, key)
            else:
                out[key] = v

    rec(tree, "")
    return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict:
    out: dict = {}
    for key, v in flat.items():
        parts = key.split(sep)
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def check_and_build(
    converted: Mapping[str, np.ndarray],
    expected: Mapping,
    unmapped_source_keys: Iterable[str] = (),
    what: str = "checkpoint",
) -> dict:
    """Compares converted Flax leaves (flat ``a/b/c`` keys) against an abstract variables tree.

    ``expected`` is a nested dict of arrays or ``ShapeDtypeStruct``s (from ``jax.eval_shape``).
    Raises one ``CheckpointMismatchError`` listing every missing, unexpected and mis-shaped key,
    plus any source keys the converter could not map. Returns the nested variables, cast to the
    expected dtypes.
    """
    exp = flatten(expected)
    missing = sorted(set(exp) - set(converted))
    unexpected = sorted(set(converted) - set(exp))
    bad_shape = sorted(
        f"{k}: checkpoint {tuple(np.shape(converted[k]))} vs model {tuple(exp[k].shape)}"
        for k in set(exp) & set(converted)
        if tuple(np.shape(converted[k])) != tuple(exp[k].shape)
    )
    unmapped = sorted(unmapped_source_keys)
    if missing or unexpected or bad_shape or unmapped:
        lines = [f"{what} does not match the model:"]
        for title, items in (
            ("missing in checkpoint", missing),
            ("unexpected (not in model)", unexpected),
            ("shape mismatch", bad_shape),
            ("checkpoint keys with no mapping", unmapped),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {x}" for x in items[:50])
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")
        lines.append("  Fix: pass the variant/overrides that match the checkpoint, or the right file.")
        raise CheckpointMismatchError("\n".join(lines))
    return unflatten({k: np.asarray(v, dtype=exp[k].dtype) for k, v in converted.items()})


def apply_rules(
    sd: Mapping[str, np.ndarray],
    rules: Iterable[tuple[str, Callable[[str, np.ndarray], tuple[str, np.ndarray] | None]]],
    ignore: Iterable[str] = (),
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Applies regex rules ``(pattern, fn(key, value) -> (flax_key, array) | None)`` to each source key.

    The first rule whose pattern ``re.fullmatch``es a key handles it; keys matching an ``ignore``
    pattern are dropped silently. Returns ``(converted, unmapped_source_keys)``.
    """
    import re

    compiled = [(re.compile(p), fn) for p, fn in rules]
    ign = [re.compile(p) for p in ignore]
    out: dict[str, np.ndarray] = {}
    unmapped: list[str] = []
    for k, v in sd.items():
        if any(r.fullmatch(k) for r in ign):
            continue
        for r, fn in compiled:
            m = r.fullmatch(k)
            if m:
                res = fn(m, np.asarray(v))
                if res is not None:
                    fk, fv = res
                    out[fk] = fv
                break
        else:
            unmapped.append(k)
    return out, unmapped


# ---- attention layouts (PyTorch Linear → ``nn.attention.MultiHeadAttention``) ----

def qkv_kernel(w: np.ndarray, num_heads: int) -> np.ndarray:
    """q/k/v projection weight [H·hd, D] → DenseGeneral kernel [D, H, hd]."""
    out_dim, in_dim = w.shape
    return np.transpose(w).reshape(in_dim, num_heads, out_dim // num_heads)


def qkv_bias(b: np.ndarray, num_heads: int) -> np.ndarray:
    """[H·hd] → [H, hd]."""
    return b.reshape(num_heads, -1)


def attn_out_kernel(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Output projection weight [D, H·hd] → DenseGeneral kernel [H, hd, D]."""
    out_dim, in_dim = w.shape
    return np.transpose(w).reshape(num_heads, in_dim // num_heads, out_dim)


def split_fused(w: np.ndarray, parts: int) -> list[np.ndarray]:
    """A fused projection ([3·D, D] in_proj / timm qkv, or [2·D, D] kv) → its row blocks in order."""
    if w.shape[0] % parts:
        raise CheckpointMismatchError(f"fused projection of shape {w.shape} does not split into {parts} parts")
    return list(np.split(w, parts, axis=0))


def resolve_config(config: Mapping | str | os.PathLike | None, path, what: str, *,
                   beside_weights: bool = False) -> Mapping:
    """A loader's model config: ``config`` itself (a dict), read from it (a JSON path), or by default
    the ``config.json`` in the checkpoint's folder (``beside_weights``: else ``<weights>.json``).

    ``what`` completes the error's advice when none is found: "pass config= (<what>)".
    """
    if isinstance(config, (str, os.PathLike)):
        return json.loads(pathlib.Path(config).read_text())
    if config is not None:
        return config
    p = pathlib.Path(path)
    candidates = [(p if p.is_dir() else p.parent) / "config.json"]
    if beside_weights:
        candidates.append(p.with_suffix(".json"))
    for cand in candidates:
        if cand.is_file():
            return json.loads(cand.read_text())
    raise FileNotFoundError(f"no {' or '.join(c.name for c in candidates)} beside {p}; pass config= ({what})")
