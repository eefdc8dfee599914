"""Reconstruction evaluation of an image tokenizer over one split: PSNR, SSIM, codebook usage, a grid.

Shared by every tokenizer task (VQGAN, DualToken; later the RQ and STAR tokenizers): the task
passes ``reconstruct(variables, x) -> (recon, {codebook name: codes})`` and the size of each
codebook; the split is read once, in order, with padded rows masked out.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.data.pipeline import as_float_images, build_dataset, to_global
from jaxunified.eval import image_metrics
from jaxunified.eval.images import image_grid, save_png

Reconstruct = Callable[[dict, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]


def code_counts(codes: jax.Array, depth: int, codebook_size: int, mask: jax.Array) -> jax.Array:
    """``[B, ...(, depth)]`` codes → ``[depth, K]`` histogram over the rows ``mask`` keeps."""
    flat = codes.reshape(codes.shape[0], -1, depth)
    w = jnp.broadcast_to(mask[:, None, None].astype(jnp.float32), flat.shape)
    idx = flat.transpose(2, 0, 1).reshape(depth, -1)
    return jax.vmap(lambda i, ww: jnp.zeros((codebook_size,), jnp.float32).at[i].add(ww))(
        idx, w.transpose(2, 0, 1).reshape(depth, -1))


def evaluate_reconstruction(
    reconstruct: Reconstruct,
    variables,
    codebooks: Mapping[str, tuple[int, int]],
    data_cfg,
    split: str,
    mesh,
    *,
    num_examples: int | None = None,
    grid_path: str | pathlib.Path | None = None,
) -> dict:
    """``psnr``, ``ssim``, ``num_examples`` and ``counts`` (``{name: [depth, K] histogram}``) over
    ``split``; ``codebooks`` maps each code name ``reconstruct`` returns to ``(depth, K)``.
    ``grid_path``: a PNG of the first batch's images (top row) over their reconstructions."""

    @jax.jit
    def eval_step(variables, images, mask):
        x = as_float_images(images)
        recon, codes = reconstruct(variables, x)
        recon = jnp.clip(recon, -1.0, 1.0)
        return {
            "psnr": image_metrics.psnr(recon, x) * mask,
            "ssim": image_metrics.ssim(recon, x) * mask,
            "mask": mask.astype(jnp.float32),
            "counts": {k: code_counts(codes[k], d, n, mask) for k, (d, n) in codebooks.items()},
            "recon": recon,
        }

    data = build_dataset(data_cfg, split, mesh)
    total = {"psnr": 0.0, "ssim": 0.0, "n": 0.0}
    counts = {k: np.zeros((d, n), np.float64) for k, (d, n) in codebooks.items()}
    first = None
    with jax.set_mesh(mesh):
        for host in data:
            b = to_global(host, mesh)
            mask = b.get("mask", jnp.ones((b["image"].shape[0],), jnp.bool_))
            out = jax.device_get(eval_step(variables, b["image"], mask))
            for k in ("psnr", "ssim"):
                total[k] += float(out[k].sum())
            total["n"] += float(out["mask"].sum())
            for k in counts:
                counts[k] += np.asarray(out["counts"][k], np.float64)
            if first is None:
                first = (np.asarray(jax.device_get(b["image"])), out["recon"])
            if num_examples and total["n"] >= num_examples:
                break
    n = max(total["n"], 1.0)
    if grid_path is not None and first is not None and jax.process_index() == 0:
        real, rec = first
        k = min(16, real.shape[0])
        real = np.asarray(as_float_images(jnp.asarray(real[:k])))
        save_png(grid_path, image_grid(np.concatenate([real, rec[:k]], axis=0), ncol=k), upscale=4)
    return {"psnr": total["psnr"] / n, "ssim": total["ssim"] / n, "num_examples": n, "counts": counts}


def grid_path(workdir, split: str, step: int) -> pathlib.Path:
    return pathlib.Path(workdir) / f"recon_{split}_{step:07d}.png"


def depth_usage(counts: np.ndarray, name: str, shared: bool) -> dict[str, float]:
    """Per-depth codebook usage and perplexity of a ``[depth, K]`` histogram: ``usage_<name>`` (the
    mean over depths), ``usage_<name>_d{d}``, ``perplexity_<name>_d{d}`` and, when one codebook
    serves every depth, ``usage_<name>_all`` (the fraction of it any depth uses)."""
    stats = image_metrics.codebook_stats(counts)
    usage, ppl = np.asarray(stats["usage"]), np.asarray(stats["perplexity"])
    out = {f"usage_{name}": float(usage.mean())}
    if shared:
        out[f"usage_{name}_all"] = float(np.mean(np.asarray(counts).sum(0) > 0))
    for d, (u, p) in enumerate(zip(usage, ppl)):
        out[f"usage_{name}_d{d}"] = float(u)
        out[f"perplexity_{name}_d{d}"] = float(p)
    return out
