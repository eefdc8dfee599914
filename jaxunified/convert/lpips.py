"""VGG16 (torchvision) and LPIPS (richzhang / taming / LlamaGen) weights → Flax.

Accepted source layouts:
- torchvision ``vgg16().state_dict()``: ``features.{0,2,5,…,28}.{weight,bias}``; ``classifier.*`` ignored.
- richzhang's / taming's / LlamaGen's ``vgg.pth`` heads: ``lin{k}.model.1.weight`` [1, C, 1, 1]
  (``model.0`` when the heads were built without dropout, or bare ``lin{k}.weight``).
- a whole LPIPS module's state dict, which adds ``net.slice{1..5}.{idx}.{weight,bias}`` (``idx`` is the
  torchvision ``features`` index) and the ``scaling_layer.{shift,scale}`` constants.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.convert.common import (
    CheckpointMismatchError,
    apply_rules,
    check_and_build,
    conv_kernel,
    read_state_dict,
    strip_prefix,
)
from jaxunified.models.lpips import LPIPS, SCALE, SHIFT, LPIPSConfig, VGG16Config, VGG16Features, vgg16_conv_names

# torchvision ``features`` index of each conv, in order (ReLUs and max-pools fill the gaps).
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_FLAX_CONV = dict(zip(VGG16_CONV_INDICES, vgg16_conv_names()))

# Wrappers seen around these weights: DDP, and LlamaGen/taming loss modules holding the LPIPS.
_PREFIXES = ("module.", "perceptual_loss.", "loss.perceptual_loss.")


def _vgg_rules(source_prefix: str, flax_prefix: str):
    def conv(m, v):
        name = f"{flax_prefix}{_FLAX_CONV[int(m.group(1))]}"
        return (f"{name}/kernel", conv_kernel(v)) if m.group(2) == "weight" else (f"{name}/bias", v)

    # Only conv indices match, so any other index is reported as unmapped.
    indices = "|".join(map(str, VGG16_CONV_INDICES))
    return [(rf"{source_prefix}({indices})\.(weight|bias)", conv)]


def _convert_vgg(sd: dict[str, np.ndarray], flax_prefix: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Maps torchvision ``features.N`` keys, or LPIPS ``net.sliceK.N`` keys, to ``{flax_prefix}convB_I``."""
    if any(k.startswith("features.") for k in sd):
        return apply_rules(sd, _vgg_rules(r"features\.", flax_prefix), ignore=[r"classifier\..*"])
    # A whole LPIPS state dict also carries its heads and constants: not VGG, so not ours to map here.
    return apply_rules(sd, _vgg_rules(r"net\.slice[1-5]\.", flax_prefix), ignore=[r"lin\d\..*", r"scaling_layer\..*"])


def _strip(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for p in _PREFIXES:
        sd = strip_prefix(sd, p)
    return sd


def _config(cls, overrides: dict[str, Any]):
    try:
        return cls(**overrides)
    except TypeError as e:
        raise TypeError(f"unknown override for {cls.__name__}: {overrides} ({e})") from None


def _expected_params(module, *image_args) -> dict:
    abstract = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *image_args)
    return {"params": nn.meta.unbox(abstract["params"])}


def load_vgg16(path: str | os.PathLike, **overrides) -> tuple[VGG16Features, dict]:
    """torchvision VGG16 state dict → ``(VGG16Features, {"params": …})``; overrides set ``VGG16Config``."""
    cfg = _config(VGG16Config, overrides)
    module = VGG16Features(cfg)
    sd = _strip(read_state_dict(path))
    if not any(k.startswith(("features.", "net.slice")) for k in sd):
        raise CheckpointMismatchError(
            f"{path} holds no VGG16 features (keys 'features.N.*' or 'net.sliceK.N.*'); pass a torchvision vgg16 state dict"
        )
    converted, unmapped = _convert_vgg(sd, "")
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    expected = _expected_params(module, x)
    variables = check_and_build({f"params/{k}": v for k, v in converted.items()}, expected, unmapped, what=f"VGG16 {path}")
    return module, variables


def _lin_rules():
    def lin(m, v):
        return f"lin{m.group(1)}/kernel", conv_kernel(v)

    return [(r"lin([0-4])\.(?:model\.[01]\.)?weight", lin)]


def _check_scaling(sd: dict[str, np.ndarray], path) -> None:
    # The module hard-codes the scaling constants; a file with others would be silently misread.
    for name, ref in (("scaling_layer.shift", SHIFT), ("scaling_layer.scale", SCALE)):
        if name in sd and not np.allclose(np.ravel(sd[name]), ref, atol=1e-6):
            raise CheckpointMismatchError(
                f"{path}: {name}={np.ravel(sd[name]).tolist()} differs from the LPIPS constants {list(ref)}; "
                "this file is not a standard LPIPS checkpoint"
            )


def load_lpips(path: str | os.PathLike, vgg_path: str | os.PathLike | None = None, **overrides) -> tuple[LPIPS, dict]:
    """LPIPS heads (``lin0..lin4``) + VGG16 features → ``(LPIPS, {"params": …})``.

    The VGG weights come from ``path`` when it is a whole LPIPS state dict (``net.slice*`` keys),
    else from ``vgg_path`` (a torchvision VGG16 state dict). Overrides set ``LPIPSConfig``.
    """
    cfg = _config(LPIPSConfig, overrides)
    module = LPIPS(cfg)
    sd = _strip(read_state_dict(path))
    _check_scaling(sd, path)
    sd = {k: v for k, v in sd.items() if not k.startswith("scaling_layer.")}
    head_sd = {k: v for k, v in sd.items() if not k.startswith("net.")}
    net_sd = {k: v for k, v in sd.items() if k.startswith("net.")}
    if net_sd and vgg_path is not None:
        raise CheckpointMismatchError(
            f"{path} already holds the VGG features (net.slice* keys) and vgg_path={vgg_path} was given too; "
            "pass only one source of VGG weights"
        )
    if not net_sd:
        if vgg_path is None:
            raise CheckpointMismatchError(
                f"{path} holds only the LPIPS heads (lin0..lin4); pass vgg_path=<torchvision vgg16 state dict> "
                "for the VGG16 features"
            )
        net_sd = _strip(read_state_dict(vgg_path))
        if not any(k.startswith("features.") for k in net_sd):
            raise CheckpointMismatchError(f"vgg_path={vgg_path} holds no 'features.N.*' keys; pass a torchvision vgg16 state dict")
    heads, unmapped_heads = apply_rules(head_sd, _lin_rules())
    vgg, unmapped_vgg = _convert_vgg(net_sd, "vgg/")
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    expected = _expected_params(module, x, x)
    converted = {f"params/{k}": v for k, v in {**heads, **vgg}.items()}
    variables = check_and_build(converted, expected, unmapped_heads + unmapped_vgg, what=f"LPIPS {path}")
    return module, variables


__all__ = ["load_vgg16", "load_lpips", "VGG16_CONV_INDICES"]
