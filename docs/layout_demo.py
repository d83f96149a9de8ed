"""Remake docs/layouts.png: the default model with its layout adapter, one prompt per row, the same seeds
without a layout and with two layouts that put the objects in opposite places (boxes drawn on top).

    python docs/layout_demo.py [--model default] [--seeds 4] [--out docs/layouts.png]

Nothing is picked by hand: the first seeds, misses included.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from pictor.loading import load
from pictor.pipeline import GenerationRequest

LEFT, RIGHT = [0.05, 0.3, 0.45, 0.7], [0.55, 0.3, 0.95, 0.7]
TOP, BOTTOM = [0.3, 0.05, 0.7, 0.45], [0.3, 0.55, 0.7, 0.95]
ROWS = [
    ("a red circle and a blue square", "a red circle", "a blue square", (LEFT, RIGHT)),
    ("a yellow star and a green triangle", "a yellow star", "a green triangle", (TOP, BOTTOM)),
    ("a purple square and an orange circle", "a purple square", "an orange circle", (LEFT, RIGHT)),
]
SCALE = 2  # each 64x64 image shown at 128x128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "layouts.png"))
    args = ap.parse_args()
    pipe = load(args.model, device="cpu")
    tiles: list[list[Image.Image]] = []
    for prompt, a, b, (box_a, box_b) in ROWS:
        layouts = [None, [{"box": box_a, "phrase": a}, {"box": box_b, "phrase": b}]]
        layouts.append([{"box": box_b, "phrase": a}, {"box": box_a, "phrase": b}])
        row = []
        for layout in layouts:
            request = GenerationRequest(prompt, seed=0, num_images=args.seeds, layout=layout)
            for g in pipe.generate(request):
                im = g.image.resize((g.image.width * SCALE, g.image.height * SCALE), Image.Resampling.NEAREST)
                draw = ImageDraw.Draw(im)
                for item in layout or []:
                    x0, y0, x1, y1 = (v * im.width for v in item["box"])
                    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(120, 120, 120))
                row.append(im)
        tiles.append(row)
    w, h, gap = tiles[0][0].width, tiles[0][0].height, 4
    per = args.seeds
    sheet = Image.new("RGB", (len(tiles[0]) * (w + gap) + 2 * gap * 2, len(tiles) * (h + gap)), "white")
    for r, row in enumerate(tiles):
        for c, im in enumerate(row):
            x = c * (w + gap) + (c // per) * gap * 2  # a wider gap between the three groups
            sheet.paste(im, (x, r * (h + gap)))
    sheet.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
