"""The squares world of the layout and ControlNet training tests (16x16 images, tiny preset): "a blue
square", on the left half in some images and on the right half in others, the caption the same; a base model
trained on it draws a blue square on either side, and an adapter must put it where it is told."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pictor.train.config import TrainConfig
from pictor.train.loop import train

SIZE = 16
COMMON = {"preset": "tiny", "image_size": SIZE, "sample_every": 0, "eval_every": 0, "progress": False}


def square(rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    img = np.full((SIZE, SIZE, 3), (230, 230, 230), np.uint8)
    side = 5
    x0 = int(rng.integers(0, SIZE // 2 - side + 1)) + (SIZE // 2 if rng.random() < 0.5 else 0)
    y0 = int(rng.integers(1, SIZE - side - 1))
    img[y0 : y0 + side, x0 : x0 + side] = (40, 80, 230)
    return img, [x0 / SIZE, y0 / SIZE, (x0 + side) / SIZE, (y0 + side) / SIZE]


def blue_x(img: np.ndarray) -> float | None:
    """The blue pixels' mean x as a fraction of the width; None when there is no blue."""
    a = img.astype(int)
    blue = (a[..., 2] - a[..., 0] > 80) & (a[..., 2] - a[..., 1] > 60)
    if blue.sum() < 3:
        return None
    return float((np.nonzero(blue)[1].mean() + 0.5) / SIZE)


def build_square_world(root: Path, model: dict | None = None) -> dict[str, Path]:
    """32 pictures of a blue square on the left or the right half (caption and box in metadata.jsonl), an
    autoencoder and a base model trained on them: {"folder", "base" (the bundle), "root"}. `model`: the
    base's architecture, if not the tiny preset's."""
    folder = root / "squares"
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(32):
        img, box = square(rng)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
        lines.append(
            {
                "file_name": f"{i:03d}.png",
                "text": "a blue square",
                "layout": [{"box": box, "phrase": "a blue square"}],
            }
        )
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    ae = train(
        TrainConfig(
            stage="autoencoder",
            out=str(root / "ae"),
            data=str(folder),
            max_steps=100,
            batch_size=4,
            lr=4e-3,
            warmup_steps=5,
            save_every=0,
            **COMMON,
        )
    )
    base = train(
        TrainConfig(
            stage="t2i",
            out=str(root / "base"),
            data=str(folder),
            autoencoder_path=str(ae.out),
            max_steps=80,
            batch_size=8,
            lr=2e-3,
            warmup_steps=5,
            latent_stats_images=16,
            save_every=0,
            model=model,
            **COMMON,
        )
    )
    return {"folder": folder, "base": base.final, "root": root}
