"""What a text-to-image task reports after sampling: shapes-GenEval figures as metrics, a PNG grid
of samples per category and a JSON of every caption's verdict (``ar`` and ``star`` alike)."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from jaxunified.eval import shapes_geneval
from jaxunified.eval.images import image_grid, save_png


def geneval_metrics(report, prefix: str = "geneval") -> dict:
    """``{prefix}_overall``, ``{prefix}_caption_pass`` and ``{prefix}_{category}`` of an
    ``shapes_geneval.evaluate`` report."""
    out = {f"{prefix}_overall": float(report["overall"]), f"{prefix}_caption_pass": float(report["caption_pass_rate"])}
    for cat in shapes_geneval.CATEGORIES:
        if cat in report["per_category"]:
            out[f"{prefix}_{cat}"] = float(report["per_category"][cat])
    return out


def write_samples(workdir, split: str, step: int, images: np.ndarray, captions, report, per_category: int = 16,
                  prefix: str = "samples") -> None:
    workdir = pathlib.Path(workdir)
    results = report["results"]
    for cat in shapes_geneval.CATEGORIES:
        idx = [i for i, r in enumerate(results) if cat in r.categories][:per_category]
        if idx:
            save_png(workdir / f"{prefix}_{split}_{step:07d}_{cat}.png",
                     image_grid(images[idx], ncol=min(8, len(idx))), upscale=4)
    rows = [{"caption": c, "passed": bool(r.passed), "categories": list(r.categories), "reason": r.reason}
            for c, r in zip(captions, results)]
    (workdir / f"{prefix}_{split}_{step:07d}.json").write_text(json.dumps(rows, indent=0))
