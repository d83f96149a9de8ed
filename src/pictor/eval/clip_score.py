"""CLIP score: how well each image matches its prompt, by a CLIP model from a local folder (Hessel et al.
2021; torchmetrics' `CLIPScore`, which diffusers' evaluation docs use).

The score of an image and its prompt is ``max(100 * cos(image embedding, text embedding), 0)`` with CLIP's
projected embeddings (a CLIPModel folder: both towers, its tokenizer; safetensors only); a folder's score is
torchmetrics' over all its images, ``max(mean(100 * cos), 0)`` (the mean before the floor at 0). The prompt of
each image is the one it was made from: its pictor record's prompt, else the prompt of the A1111
``parameters`` text other tools write, else the caption file beside it (``<stem>.txt``); an image with
none of them, or that does not decode, is reported and left out. Prompts longer than the text tower's
positions (77 tokens) are cut there with CLIP's end token kept (torchmetrics cuts the token sequence itself,
end token and all); shorter ones score as torchmetrics scores them (tested on a tiny random CLIP). Scores
are only comparable within one CLIP model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pictor.checkpoint import write_json
from pictor.eval.image_features import VisionModelFeatures, image_files, read_images
from pictor.provenance import PARAMETERS_KEY, RECORD_KEY, parse_parameters, read_text_chunks


class ClipScorer:
    """A local CLIPModel folder's image and text towers, scoring (image, prompt) pairs."""

    def __init__(self, folder: str | Path, device: str = "cpu") -> None:
        path = Path(folder)
        self.images = VisionModelFeatures("clip", path, device)  # checks the folder: config, safetensors
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        try:
            self.text = CLIPTextModelWithProjection.from_pretrained(
                str(path), local_files_only=True, use_safetensors=True, dtype=torch.float32
            )
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # transformers raises many kinds; name the folder in every case
            raise ValueError(
                f"CLIP score: could not load the text tower and tokenizer from {path} ({exc}); give a whole "
                "CLIPModel folder (e.g. openai/clip-vit-large-patch14 saved with save_pretrained)"
            ) from exc
        self.text = self.text.eval().requires_grad_(False).to(self.images.device)
        self.name = f"clip:{path}"
        self.max_tokens = int(self.text.config.max_position_embeddings)

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> Tensor:
        """100 x the cosine of each (image, prompt) pair, float32 [N] (before any floor at 0)."""
        image = self.images(images)
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.images.device)
        text = self.text(**tokens).text_embeds.float().cpu()
        return 100.0 * torch.nn.functional.cosine_similarity(image, text, dim=-1)


def image_prompt(path: Path) -> str | None:
    """The prompt an image was made from (module docstring), or None."""
    try:
        chunks = read_text_chunks(path)
    except ValueError:
        chunks = {}
    record = chunks.get(RECORD_KEY)
    if record is not None:
        try:
            prompt = json.loads(record).get("prompt")
        except (ValueError, AttributeError):
            prompt = None
        if isinstance(prompt, str):
            return prompt
    if PARAMETERS_KEY in chunks:
        return str(parse_parameters(chunks[PARAMETERS_KEY])["prompt"])
    caption = path.with_suffix(".txt")
    if caption.is_file():
        return caption.read_text(encoding="utf-8", errors="replace").strip()
    return None


def run_clip_score(
    folder: str | Path,
    clip: str | Path,
    device: str = "cpu",
    batch_size: int = 32,
    out: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    scorer: Callable[[Sequence[np.ndarray], Sequence[str]], Tensor] | None = None,
) -> dict[str, Any]:
    """{"clip_score", "std", "images", "per_image": [{"path", "prompt", "score", "cosine_x100"}], "skipped"}
    for the images under `folder` (module docstring); written to `out` (atomically) when given."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if out is not None and Path(out).is_dir():
        raise ValueError(f"--out {out}: a folder; give the report's file, e.g. {Path(out) / 'report.json'}")
    paths = image_files(folder)
    skipped: list[tuple[str, str]] = []
    prompted: list[tuple[Path, str]] = []
    for path in paths:
        prompt = image_prompt(path)
        if prompt is None:
            skipped.append((str(path), "no prompt: no pictor record, A1111 parameters or caption file"))
        else:
            prompted.append((path, prompt))
    if not prompted:
        raise ValueError(f"{folder}: no image with a prompt to score ({len(paths)} images looked at)")
    score = scorer if scorer is not None else ClipScorer(clip, device)
    rows: list[dict[str, Any]] = []
    by_path = dict(prompted)
    done = 0
    # read_images leaves out (and reports) the files that do not decode; pair each batch back by path
    for start in range(0, len(prompted), batch_size):
        part = [p for p, _ in prompted[start : start + batch_size]]
        failed_before = len(skipped)
        batch = next(read_images(part, len(part), skipped), [])
        failed = {Path(p) for p, _ in skipped[failed_before:]}
        kept = [p for p in part if p not in failed]
        if batch:
            scores = score(batch, [by_path[p] for p in kept])
            rows += [
                {"path": str(p), "prompt": by_path[p], "score": max(float(s), 0.0), "cosine_x100": float(s)}
                for p, s in zip(kept, scores.tolist(), strict=True)
            ]
        done += len(part)
        if progress is not None:
            progress(done, len(prompted))
    values = [row["cosine_x100"] for row in rows]
    mean = max(float(np.mean(values)), 0.0) if values else math.nan
    report = {
        "folder": str(folder),
        "model": getattr(score, "name", "clip"),
        "clip_score": mean,
        "std": float(np.std(values)) if values else math.nan,
        "images": len(rows),
        "per_image": rows,
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
    }
    if out is not None:
        write_json(report, out)
    return report
