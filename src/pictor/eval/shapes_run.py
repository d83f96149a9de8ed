"""`pictor eval shapes`: generate K images per benchmark prompt with a model, score them exactly, report.

Image j of prompt i uses seed + i * K + j, so a report is reproducible and any single image can be
regenerated from its seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pictor.edit_blending import to_model_pixels
from pictor.eval.shapes import contact_sheet, ground_truth_images, load_prompts, score_images
from pictor.pipeline import GenerationRequest, Pipeline, to_pil

ProgressFn = Callable[[int, int], None]


def generate_for_specs(
    pipe: Pipeline,
    specs: list[dict],
    k: int,
    seed: int,
    steps: int | None = None,
    guidance: float | None = None,
    sampler: str | None = None,
    progress: ProgressFn | None = None,
) -> list[list[np.ndarray]]:
    images: list[list[np.ndarray]] = []
    for i, spec in enumerate(specs):
        request = GenerationRequest(
            prompt=spec["prompt"],
            seed=seed + i * k,
            num_images=k,
            steps=steps,
            guidance=guidance,
            sampler=sampler,
        )
        images.append([np.asarray(g.image) for g in pipe.generate(request)])
        if progress is not None:
            progress(i + 1, len(specs))
    return images


def autoencoder_roundtrip(pipe: Pipeline, images: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """Each image encoded to latents and decoded again by the model's autoencoder (latent means, no
    sampling): what the transformer would have to produce exactly to score as the renders do."""
    out = []
    with torch.inference_mode():
        for row in images:
            x = torch.cat([to_model_pixels(img, pipe.device, pipe.dtype) for img in row])
            decoded = pipe.autoencoder.decode(pipe.autoencoder.encode(x))
            out.append([np.asarray(im) for im in to_pil(decoded)])
    return out


def evaluate(
    specs: list[dict],
    images: list[list[np.ndarray]],
    out: str | os.PathLike[str] | None,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Score, then write the JSON report and a contact sheet (samples with their verdicts) beside it."""
    report = {**score_images(specs, images), **meta}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        sheet_path = out.with_suffix(".png")
        flat, labels, verdicts = [], [], []
        for spec, imgs, row in zip(specs, images, report["per_prompt"], strict=True):
            for img, ok in zip(imgs, row["correct"], strict=True):
                flat.append(img)
                labels.append(spec["prompt"])
                verdicts.append(ok)
        contact_sheet(flat, labels, verdicts).save(sheet_path)
        report["contact_sheet"] = str(sheet_path)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def run_shapes_eval(
    pipe: Pipeline | None,
    prompts: str | None,
    k: int,
    seed: int,
    out: str | None,
    ground_truth: bool = False,
    limit: int | None = None,
    progress: ProgressFn | None = None,
    through_autoencoder: bool = False,
    **generation: Any,
) -> dict[str, Any]:
    """Score `pipe`'s images, or with ``ground_truth`` renders of the specs; ``through_autoencoder`` (with
    ``ground_truth``) scores the renders after a round trip through `pipe`'s autoencoder: the ceiling that
    the autoencoder sets for any transformer trained on its latents."""
    if through_autoencoder and not (ground_truth and pipe is not None):
        raise ValueError("--through-autoencoder needs --ground-truth and a model whose autoencoder to use")
    specs = load_prompts(prompts)
    if limit is not None:
        specs = specs[:limit]
    if ground_truth:
        images = ground_truth_images(specs, k, seed)
        meta: dict[str, Any] = {"source": "ground-truth renders"}
        if through_autoencoder:
            assert pipe is not None
            images = autoencoder_roundtrip(pipe, images)
            meta = {
                "source": "ground-truth renders through the model's autoencoder",
                "model": {"name": pipe.name, "hash": pipe.hash},
            }
    else:
        assert pipe is not None
        images = generate_for_specs(pipe, specs, k, seed, progress=progress, **generation)
        meta = {"source": "model", "model": {"name": pipe.name, "hash": pipe.hash}}
    meta.update({"prompts": prompts or "shapes-dev (packaged)", "images_per_prompt": k, "seed": seed})
    return evaluate(specs, images, out, meta)
