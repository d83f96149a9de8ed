"""Remake docs/references.png: the default model with its reference adapter. Each row: a reference picture
(a ground-truth render of a dev prompt, at the left), then the first seeds from an empty prompt without the
picture, and the same seeds from an empty prompt with it.

    python docs/reference_demo.py [--model default] [--seeds 4] [--out docs/references.png]

Nothing is picked by hand: the rows are every 50th dev prompt, the first seeds, misses included.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from pictor.eval.shapes import ground_truth_images, load_prompts
from pictor.loading import load
from pictor.pipeline import GenerationRequest

SCALE = 2  # each 64x64 image shown at 128x128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "references.png"))
    args = ap.parse_args()
    pipe = load(args.model, device="cpu")
    specs = load_prompts()[::50]
    pictures = [row[0] for row in ground_truth_images(specs, 1, seed=1)]
    tiles: list[list[Image.Image]] = []
    for picture in pictures:
        row = [Image.fromarray(picture)]
        for reference in (None, picture):
            request = GenerationRequest("", seed=0, num_images=args.seeds, reference=reference)
            row += [g.image for g in pipe.generate(request)]
        tiles.append(
            [im.resize((im.width * SCALE, im.height * SCALE), Image.Resampling.NEAREST) for im in row]
        )
    w, h, gap = tiles[0][0].width, tiles[0][0].height, 4
    groups = [0, 1, 1 + args.seeds]  # where the picture, the plain and the referenced images start
    sheet = Image.new("RGB", (len(tiles[0]) * (w + gap) + 2 * gap * 2, len(tiles) * (h + gap)), "white")
    for r, row in enumerate(tiles):
        for c, im in enumerate(row):
            wide = sum(c >= g for g in groups[1:])  # a wider gap between the three groups
            sheet.paste(im, (c * (w + gap) + wide * gap * 2, r * (h + gap)))
    sheet.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
