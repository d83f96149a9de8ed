"""`pictor eval shapes`: generate K images per benchmark prompt with a model, score them exactly, report.

Image j of prompt i uses seed + i * K + j, so a report is reproducible and any single image can be
regenerated from its seed. With a save folder every image is also written there as NNNN-ID-J.png (prompt
index, prompt id, image index): generated ones with their provenance, renders with their `pictor-render`
chunk; two such folders (a model's and --ground-truth's) are what `pictor eval distribution` compares.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pictor.data.folder import IMAGE_EXTENSIONS
from pictor.edit_blending import to_model_pixels
from pictor.eval.shapes import (
    box_hits,
    contact_sheet,
    ground_truth_images,
    ground_truth_layouts,
    load_prompts,
    score_images,
)
from pictor.generation_request import MAX_IMAGES, MAX_SEED
from pictor.guidance_methods import GuidanceMethod
from pictor.pipeline import GenerationRequest, Pipeline, to_pil
from pictor.provenance import save_png, save_render_png

ProgressFn = Callable[[int, int], None]


def generate_for_specs(
    pipe: Pipeline,
    specs: list[dict],
    k: int,
    seed: int,
    steps: int | None = None,
    guidance: float | None = None,
    sampler: str | None = None,
    cache_threshold: float | None = None,
    progress: ProgressFn | None = None,
    save_dir: Path | None = None,
    layouts: list[list[list[dict]]] | None = None,
    references: list[list[np.ndarray]] | None = None,
    empty_prompts: bool = False,
    controls: list[list[np.ndarray]] | None = None,
    regions: list[list[list[dict]]] | None = None,
    regional_attention: bool = False,
    guidance_method: GuidanceMethod | None = None,
    regional_options: dict[str, Any] | None = None,
) -> list[list[np.ndarray]]:
    """K images per spec; with `layouts`, `references` or `controls`, image j of spec i follows
    layouts[i][j], takes references[i][j], gives controls[i][j] to the pipeline's ControlNet or takes
    regional prompts regions[i][j] (one sampler run each, on the same seed as without; `regional_attention`:
    run them as one pass with masked attention, `pictor.regional_attention`). With
    `empty_prompts` the prompt is "" (the spec still scores the image): what a reference alone carries, or
    the unconditional model. `guidance_method`: how guidance combines the predictions
    (`pictor.guidance_methods`; None: plain CFG). `regional_options`: regional attention's request fields
    (`GenerationRequest.regional_steps` and the like)."""
    images: list[list[np.ndarray]] = []
    for i, spec in enumerate(specs):
        prompt = "" if empty_prompts else spec["prompt"]
        base = GenerationRequest(
            prompt,
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            cache_threshold=cache_threshold,
            guidance_method=guidance_method,
        )
        if layouts is None and references is None and controls is None and regions is None:
            generated = pipe.generate(replace(base, seed=seed + i * k, num_images=k))
        else:
            generated = [
                pipe.generate(
                    replace(
                        base,
                        seed=seed + i * k + j,
                        layout=layouts[i][j] if layouts is not None else None,
                        reference=references[i][j] if references is not None else None,
                        controlnet_images=[controls[i][j]] if controls is not None else None,
                        regions=regions[i][j] if regions is not None else None,
                        regional_attention=regional_attention and regions is not None,
                        **(regional_options or {}),
                    )
                )[0]
                for j in range(k)
            ]
        if save_dir is not None:
            for j, g in enumerate(generated):
                save_png(g.image, g.record, save_dir / image_name(i, spec, j))
        images.append([np.asarray(g.image) for g in generated])
        if progress is not None:
            progress(i + 1, len(specs))
    return images


def layout_scores(
    specs: list[dict], images: list[list[np.ndarray]], layouts: list[list[list[dict]]]
) -> dict[str, Any]:
    """The fraction of layout boxes that hold their object, over all boxes and per tag."""
    per_tag: dict[str, list[bool]] = {}
    for spec, row, row_layouts in zip(specs, images, layouts, strict=True):
        for img, layout in zip(row, row_layouts, strict=True):
            per_tag.setdefault(spec["tag"], []).extend(box_hits(img, layout))
    every = [hit for hits in per_tag.values() for hit in hits]
    return {
        "box_accuracy": float(np.mean(every)) if every else 0.0,
        "per_tag_box_accuracy": {tag: float(np.mean(v)) for tag, v in per_tag.items()},
        "boxes": len(every),
    }


def image_name(i: int, spec: dict, j: int) -> str:
    """NNNN-ID-J.png; characters of the id that a file name should not hold become '_'."""
    return f"{i:04d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', str(spec.get('id', '')))}-{j}.png"


def save_folder(path: str | os.PathLike[str]) -> Path:
    """A new or image-free folder: adding to one that already holds images would mix two sets."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--save-images {folder} is a file; give a folder")
    # Recursive, as `pictor eval distribution` reads folders.
    old = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS] if folder.is_dir() else []
    if old:
        raise ValueError(
            f"--save-images {folder} already holds {len(old)} images (e.g. {old[0].name}); give a new or "
            "empty folder, so that it holds exactly one evaluation's images"
        )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_renders(
    specs: list[dict], images: list[list[np.ndarray]], seed: int, folder: Path, meta: dict[str, Any]
) -> None:
    for i, (spec, row) in enumerate(zip(specs, images, strict=True)):
        for j, img in enumerate(row):
            # ground_truth_images draws image j of spec i from default_rng([seed, i, j])
            render = {**meta, "spec": spec, "rng_seed": [seed, i, j]}
            save_render_png(Image.fromarray(img), render, folder / image_name(i, spec, j))


def autoencoder_roundtrip(pipe: Pipeline, images: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """Each image encoded to latents and decoded again by the model's autoencoder (latent means, no
    sampling): what the transformer would have to produce exactly to score as the renders do."""
    out = []
    try:
        with torch.inference_mode():
            for row in images:
                x = torch.cat([to_model_pixels(img, pipe.device, pipe.dtype) for img in row])
                decoded = pipe.autoencoder.decode(pipe.autoencoder.encode(x))
                out.append([np.asarray(im) for im in to_pil(decoded)])
    finally:
        pipe.release_offload()  # no sampler run after it releases the autoencoder (under CPU offload)
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


def check_shapes_eval(
    prompts: str | None,
    k: int,
    seed: int,
    out: str | os.PathLike[str] | None,
    save_images: str | os.PathLike[str] | None,
    ground_truth: bool,
    limit: int | None,
    **generation: Any,
) -> list[dict]:
    """Everything about a shapes eval that can be wrong, checked before a model loads or an image is
    made (a bad --out found after an hour of sampling loses that hour); returns the specs to score."""
    if not 1 <= k <= MAX_IMAGES:
        raise ValueError(f"--images-per-prompt must be between 1 and {MAX_IMAGES}, got {k}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1 (the number of prompts to score), got {limit}")
    asked = sorted(name for name, value in generation.items() if value is not None)
    if ground_truth and asked:
        flags = ", ".join("--" + name.replace("_", "-") for name in asked)
        raise ValueError(f"{flags}: these change a model's images; --ground-truth scores renders, drop them")
    specs = load_prompts(prompts)[:limit]
    last = seed + len(specs) * k - 1  # image j of prompt i takes seed + i * k + j
    if seed < 0 or last > MAX_SEED:
        raise ValueError(
            f"--seed must be between 0 and {MAX_SEED - len(specs) * k + 1} for {len(specs)} prompts x {k} "
            f"images, got {seed}"
        )
    if out is not None:
        report = Path(out)
        if report.suffix.lower() == ".png":
            raise ValueError(
                f"--out {out}: the JSON report; its contact sheet is the .png beside it: give .json"
            )
        if report.is_dir():
            raise ValueError(
                f"--out {out}: a folder; give the report's file name, e.g. {report / 'report.json'}"
            )
        if save_images is not None and Path(save_images).resolve() in report.resolve().parents:
            raise ValueError(
                f"--out {out} is inside --save-images {save_images}: its contact sheet would join the "
                "images there (and any folder comparison of them); write the report elsewhere"
            )
    return specs


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
    save_images: str | os.PathLike[str] | None = None,
    layouts: bool = False,
    references: bool = False,
    empty_prompts: bool = False,
    **generation: Any,
) -> dict[str, Any]:
    """Score `pipe`'s images, or with ``ground_truth`` renders of the specs; ``through_autoencoder`` (with
    ``ground_truth``) scores the renders after a round trip through `pipe`'s autoencoder: the ceiling that
    the autoencoder sets for any transformer trained on its latents. With ``layouts`` each image is
    conditioned on the boxes of the ground-truth scene that --ground-truth would render in its place, and
    the report adds how many boxes hold their object (`box_hits`). With ``references`` each image takes
    that ground-truth render as its reference picture, and with ``empty_prompts`` its prompt is "": the
    score then says how much of each spec the picture alone carried into the image."""
    if through_autoencoder and not (ground_truth and pipe is not None):
        raise ValueError("--through-autoencoder needs --ground-truth and a model whose autoencoder to use")
    if layouts and (ground_truth or pipe is None):
        raise ValueError("--layouts conditions a model's images on boxes; drop --ground-truth")
    if layouts and pipe is not None and pipe.layout_adapter is None:
        raise ValueError(
            f"--layouts: model '{pipe.name}' has no layout adapter; pass --layout-adapter FILE "
            "(made by `pictor train layout`)"
        )
    if (references or empty_prompts) and (ground_truth or pipe is None):
        raise ValueError("--references and --empty-prompts change a model's images; drop --ground-truth")
    if references and pipe is not None and pipe.reference_adapter is None:
        raise ValueError(
            f"--references: model '{pipe.name}' has no reference adapter; pass --reference-adapter FILE "
            "(made by `pictor train reference`)"
        )
    specs = check_shapes_eval(prompts, k, seed, out, save_images, ground_truth, limit, **generation)
    folder = save_folder(save_images) if save_images is not None else None
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
        if folder is not None:
            save_renders(specs, images, seed, folder, meta)
    else:
        assert pipe is not None
        boxes = ground_truth_layouts(specs, k, seed) if layouts else None
        pictures = ground_truth_images(specs, k, seed) if references else None
        images = generate_for_specs(
            pipe,
            specs,
            k,
            seed,
            progress=progress,
            save_dir=folder,
            layouts=boxes,
            references=pictures,
            empty_prompts=empty_prompts,
            **generation,
        )
        meta = {"source": "model", "model": {"name": pipe.name, "hash": pipe.hash}}
        if generation.get("cache_threshold"):
            meta["cache_threshold"] = generation["cache_threshold"]
        if empty_prompts:
            meta["empty_prompts"] = True
        if pictures is not None:
            meta["reference"] = {"adapter": pipe.reference_info, "pictures": "ground-truth renders, --seed"}
        if boxes is not None:
            meta["layout"] = {"adapter": pipe.layout_info, **layout_scores(specs, images, boxes)}
    meta.update({"prompts": prompts or "shapes-dev (packaged)", "images_per_prompt": k, "seed": seed})
    if folder is not None:
        meta["images"] = str(folder)
    return evaluate(specs, images, out, meta)
