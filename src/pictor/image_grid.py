"""Pictures tiled into a grid: training's sample grids (`pictor.train.previews.grid`) and the X/Y/Z plots of
`pictor grid` (`labelled_grid`: the axis values written along the top and the left, PIL's default font).

Pure image work: numpy and PIL, no model, no files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# White pixels between cells and around the sheet.
PAD = 2
# Pixels between a label and the edge of its margin.
LABEL_PAD = 4
# The labels' font size (pixels).
LABEL_SIZE = 12
# The widest a row label may be before it wraps (labels along the top wrap at the cell's width).
MAX_ROW_LABEL = 160

Picture = np.ndarray | Image.Image


def _pixels(image: Picture) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)


def tile_layout(
    sizes: Sequence[tuple[int, int]],
    columns: int,
    pad: int = PAD,
    centre: bool = False,
    least: tuple[int, int] = (0, 0),
) -> tuple[tuple[int, int], tuple[int, int], list[tuple[int, int]]]:
    """Where `tile` puts pictures of these (width, height) sizes: the sheet's (width, height), the cell
    box's (width, height) (the largest width and height, at least `least`), and each picture's top-left
    corner."""
    w, h = max(least[0], *(s[0] for s in sizes)), max(least[1], *(s[1] for s in sizes))
    columns = max(1, min(columns, len(sizes)))
    rows = -(-len(sizes) // columns)
    corners = []
    for i, (iw, ih) in enumerate(sizes):
        x, y = pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)
        if centre:
            x, y = x + (w - iw) // 2, y + (h - ih) // 2
        corners.append((x, y))
    return (columns * (w + pad) + pad, rows * (h + pad) + pad), (w, h), corners


def tile(
    images: Sequence[Picture],
    columns: int,
    pad: int = PAD,
    centre: bool = False,
    least: tuple[int, int] = (0, 0),
) -> Image.Image:
    """Tile uint8 [H, W, 3] images (or PIL images) into rows of `columns` with a `pad`-pixel white gutter.
    Images of several sizes each take a cell of the largest height and width (at least `least`): its top
    left, or its centre with `centre`."""
    pictures = [_pixels(img) for img in images]
    (sheet_w, sheet_h), _, corners = tile_layout(
        [(p.shape[1], p.shape[0]) for p in pictures], columns, pad, centre, least
    )
    sheet = np.full((sheet_h, sheet_w, 3), 255, dtype=np.uint8)
    for p, (x, y) in zip(pictures, corners, strict=True):
        sheet[y : y + p.shape[0], x : x + p.shape[1]] = p
    return Image.fromarray(sheet)


@dataclass
class LabelledGrid:
    """A labelled grid and where things are in it (pixels; boxes are [x0, y0, x1, y1), x1 and y1 past the
    end)."""

    image: Image.Image
    cell: tuple[int, int]  # the cell box (width, height): the largest picture, widened for a long word
    margin: tuple[int, int]  # (left, top): the label margins before the tiled pictures
    pad: int
    boxes: list[list[tuple[int, int, int, int]]]  # [row][column]: where each picture lies


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's default font at 12 px (at its own 10 px, hinting drops the colon of "steps:")."""
    try:
        return ImageFont.load_default(size=LABEL_SIZE)
    except (ImportError, OSError, TypeError):  # a Pillow without FreeType: its bitmap font
        return ImageFont.load_default()


def _line_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    return int(font.getbbox("Agjy|")[3]) + 3


def wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """`text` in lines at most `width` pixels wide: words kept whole where they fit, a longer one cut."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split() or [""]:
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
            continue
        while len(word) > 1 and draw.textlength(word, font=font) > width:
            cut = len(word) - 1
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines


def labelled_grid(
    rows: Sequence[Sequence[Picture]],
    column_labels: Sequence[str],
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    pad: int = PAD,
) -> LabelledGrid:
    """Pictures in rows (all rows as long as `column_labels`), each centred in a cell box of the largest
    size, with the column labels written above the columns, the row labels (if any) left of the rows and
    the title (if any) above everything; black on white, PIL's default font. Column labels wrap to the
    cell's width, which is widened to the longest word of any (small pictures keep their labels legible);
    row labels wrap at MAX_ROW_LABEL pixels, and the cell is made as tall as the longest of them."""
    columns = len(column_labels)
    if not rows or any(len(row) != columns for row in rows):
        raise ValueError(f"every row must hold {columns} pictures, one per column label")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(row_labels)} row labels")
    pictures = [_pixels(p) for row in rows for p in row]
    sizes = [(p.shape[1], p.shape[0]) for p in pictures]
    font = _font()
    line_h = _line_height(font)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    word = max(probe.textlength(w, font=font) for label in column_labels for w in [*label.split(), ""])
    sides = [wrap(label, font, MAX_ROW_LABEL) for label in row_labels] if row_labels is not None else []
    # Labels of neighbouring columns must not touch, and a row must be tall enough for its label's lines.
    tallest = max((len(lines) for lines in sides), default=0) * line_h
    least = (int(np.ceil(word)) + LABEL_PAD, tallest)
    (sheet_w, sheet_h), (cell_w, cell_h), corners = tile_layout(sizes, columns, pad, True, least)

    tops = [wrap(label, font, cell_w) for label in column_labels]
    side_w = max((probe.textlength(line, font=font) for lines in sides for line in lines), default=0)
    left = int(np.ceil(side_w)) + 2 * LABEL_PAD if sides else 0
    heading = wrap(title, font, max(left + sheet_w - 2 * LABEL_PAD, cell_w)) if title else []
    top = (len(heading) + max(len(lines) for lines in tops)) * line_h + LABEL_PAD

    canvas = Image.new("RGB", (left + sheet_w, top + sheet_h), "white")
    canvas.paste(tile(pictures, columns, pad, True, least), (left, top))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(heading):
        draw.text((LABEL_PAD, k * line_h), line, fill="black", font=font)
    label_top = top - LABEL_PAD - max(len(lines) for lines in tops) * line_h
    for i, lines in enumerate(tops):
        x0 = left + pad + i * (cell_w + pad)
        for k, line in enumerate(lines):
            x = x0 + (cell_w - probe.textlength(line, font=font)) / 2
            draw.text((x, label_top + k * line_h), line, fill="black", font=font)
    for j, lines in enumerate(sides):
        y0 = top + pad + j * (cell_h + pad) + (cell_h - len(lines) * line_h) / 2
        for k, line in enumerate(lines):
            draw.text((LABEL_PAD, y0 + k * line_h), line, fill="black", font=font)

    boxes = [
        [
            (left + x, top + y, left + x + w, top + y + h)
            for (w, h), (x, y) in zip(
                sizes[j * columns : (j + 1) * columns], corners[j * columns : (j + 1) * columns], strict=True
            )
        ]
        for j in range(len(rows))
    ]
    return LabelledGrid(canvas, (cell_w, cell_h), (left, top), pad, boxes)
