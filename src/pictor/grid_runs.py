"""X/Y/Z plots with a Pipeline (`pictor grid`): every cell of a `GridPlan` checked by the pipeline's request
resolution before the first image, then generated as `Pipeline.generate` makes it (so `pictor generate`
with a cell's settings, and `pictor reproduce` of its PNG, give the same pixels), then drawn into labelled
grids and written out atomically: each cell's PNG with its provenance, grid.png (grid-zK.png per z value)
and grid.json, written last.

    import pictor
    from pictor.grid_runs import run_grid, write_grid
    from pictor.pipeline import GenerationRequest

    pipe = pictor.load("default")
    result = run_grid(pipe, GenerationRequest("a red circle", seed=7), "steps=10,20", y="sampler=euler,heun")
    result.grids[0].image.show()  # result.cells[i].image: a GeneratedImage with its record
    write_grid(result, "grid-out")
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import PngImagePlugin

from pictor import __version__
from pictor.checkpoint import staged_file, write_json
from pictor.generation_request import GenerationError, GenerationRequest, ProgressFn
from pictor.grid_axes import HIRES_OFF, MAX_CELLS, Axis, GridCell, GridError, GridPlan, plan_grid
from pictor.image_grid import LabelledGrid, labelled_grid
from pictor.models.lora import set_lora_scale
from pictor.provenance import save_png

if TYPE_CHECKING:
    from pictor.pipeline import Pipeline
    from pictor.upscaler_files import UpscalerFile

GRID_JSON = "grid.json"
# The PNG text chunk of a grid image: its part of grid.json (a grid is no one generation, so it has no
# `pictor` record; each cell's PNG has its own).
GRID_KEY = "pictor-grid"
# Record fields grid.json lists for each cell (the full record is in the cell's PNG).
_SETTINGS = (
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance",
    "guidance_method",  # (only where not plain CFG)
    "sampler",
    "schedule",
    "seed",
)


@dataclass
class GridResult:
    """A grid that has run: its plan, whose cells now hold their images, and one labelled grid per z value
    (one without a z axis)."""

    plan: GridPlan
    grids: list[LabelledGrid]

    @property
    def cells(self) -> list[GridCell]:
        return self.plan.cells


def _where(cell: GridCell) -> str:
    return "cell " + ", ".join(f"{k}={_text(v)}" for k, v in cell.settings.items())


def _text(value: Any) -> str:
    if value is None:  # the one axis value that is None: hires=off
        return HIRES_OFF
    if isinstance(value, list):
        return "x".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


def check_grid(pipe: Pipeline, plan: GridPlan) -> list[GenerationRequest]:
    """Every cell's request resolved by the pipeline (its defaults filled in); GridError, naming the cell
    where only some cells fail, for the first that the model would refuse. No image is made; the upscale
    models of a hires-upscaler axis are read (to check their files), and the pipeline's is kept."""
    before = pipe.upscaler
    try:
        return _check(pipe, plan, _load_upscalers(pipe, plan))
    finally:
        pipe.upscaler = before


def _check(pipe: Pipeline, plan: GridPlan, upscalers: dict[str, UpscalerFile]) -> list[GenerationRequest]:
    if pipe.fill:  # FLUX.1 Fill repaints masked pictures only (pictor.fill_images)
        raise GridError(
            "a FLUX.1 Fill model repaints the masked part of a picture; a grid generates from text"
        )
    if any(c.lora_scale is not None for c in plan.cells) and not pipe.loras:
        raise GridError("axis lora sets the scale of the first LoRA, but none is loaded: add --lora FILE")
    resolved: list[GenerationRequest] = []
    failures: list[tuple[GridCell, str]] = []
    for cell in plan.cells:
        _use_upscaler(pipe, cell, upscalers)  # resolution checks the request's upscaler is the loaded one
        try:
            resolved.append(pipe.resolve_request(cell.request))
        except GenerationError as exc:
            failures.append((cell, str(exc)))
    if failures:
        cell, message = failures[0]
        if len(failures) == len(plan.cells) and len({m for _, m in failures}) == 1:
            raise GridError(message)  # not the axes' doing: every cell fails alike
        raise GridError(f"{_where(cell)}: {message}")
    return resolved


def _load_upscalers(pipe: Pipeline, plan: GridPlan) -> dict[str, UpscalerFile]:
    """The upscale model of each distinct file of a hires-upscaler axis, read once (cells switch between
    them); leaves the last one loaded on the pipeline."""
    loaded: dict[str, UpscalerFile] = {}
    for cell in plan.cells:
        if cell.upscaler is None or cell.upscaler in loaded:
            continue
        try:
            pipe.set_upscaler(cell.upscaler)
        except (ValueError, OSError) as exc:
            raise GridError(f"axis hires-upscaler: {exc}") from None
        assert pipe.upscaler is not None
        loaded[cell.upscaler] = pipe.upscaler
    return loaded


def _use_upscaler(pipe: Pipeline, cell: GridCell, upscalers: dict[str, UpscalerFile]) -> None:
    """The cell's upscale model on the pipeline, as if loaded by itself (records name it and its file)."""
    if cell.upscaler is not None:
        pipe.upscaler = upscalers[cell.upscaler]


def _set_lora_scale(pipe: Pipeline, scale: float) -> None:
    """The first LoRA's scale, in the model and in the records (as if loaded at this scale)."""
    entry = pipe.loras[0]
    set_lora_scale(pipe.transformer, entry["name"], scale)
    pipe.loras[0] = {**entry, "scale": float(scale)}


def run_plan(
    pipe: Pipeline,
    plan: GridPlan,
    progress: ProgressFn | None = None,
    on_cell: Callable[[GridCell], None] | None = None,
) -> GridResult:
    """Check every cell (`check_grid`), then generate them in order, calling `on_cell` as each is made;
    `progress(step, total)` runs over all cells' steps. The first LoRA's scale and the pipeline's upscale
    model are restored afterwards."""
    scale = pipe.loras[0]["scale"] if pipe.loras else None
    upscaler = pipe.upscaler
    try:
        upscalers = _load_upscalers(pipe, plan)
        resolved = _check(pipe, plan, upscalers)
        passes = [int(r.steps or 0) + int(r.hires_steps or 0) for r in resolved]
        total, done = sum(passes), 0
        for cell, steps in zip(plan.cells, passes, strict=True):
            if cell.lora_scale is not None:
                _set_lora_scale(pipe, cell.lora_scale)
            _use_upscaler(pipe, cell, upscalers)

            def step(i: int, _n: int, _offset: int = done) -> None:
                if progress is not None:
                    progress(_offset + i, total)

            (cell.image,) = pipe.generate(cell.request, progress=step)
            done += steps
            if on_cell is not None:
                on_cell(cell)
    finally:
        pipe.upscaler = upscaler
        if scale is not None and any(c.lora_scale is not None for c in plan.cells):
            _set_lora_scale(pipe, scale)
    return GridResult(plan, draw_grids(plan))


def run_grid(
    pipe: Pipeline,
    request: GenerationRequest,
    x: Axis | str,
    y: Axis | str | None = None,
    z: Axis | str | None = None,
    max_cells: int = MAX_CELLS,
    progress: ProgressFn | None = None,
    on_cell: Callable[[GridCell], None] | None = None,
) -> GridResult:
    """An X/Y/Z plot of `request` along axes "AXIS=V1,V2,..." (or `pictor.grid_axes.Axis`): the cells,
    each with its image and record, and the labelled grid(s). Every setting is checked before any image
    is made; GridError says what to change."""
    return run_plan(pipe, plan_grid(request, x, y, z, max_cells), progress, on_cell)


def draw_grids(plan: GridPlan) -> list[LabelledGrid]:
    """One labelled grid per z value of a plan whose cells have run; sets each cell's `box`."""
    columns, rows = len(plan.x.values), len(plan.y.values) if plan.y else 1
    grids = []
    for k in range(len(plan.z.values) if plan.z else 1):
        cells = [[plan.cell(i, j, k) for i in range(columns)] for j in range(rows)]
        if any(c.image is None for row in cells for c in row):
            raise ValueError("draw_grids needs every cell's image: run the plan first")
        grid = labelled_grid(
            [[c.image.image for c in row] for row in cells],  # type: ignore[union-attr]
            [plan.x.caption(i) for i in range(columns)],
            [plan.y.caption(j) for j in range(rows)] if plan.y else None,
            plan.z.caption(k) if plan.z else None,
        )
        for j, row in enumerate(cells):
            for i, c in enumerate(row):
                c.box = grid.boxes[j][i]
        grids.append(grid)
    return grids


def write_cell(cell: GridCell, out: str | Path) -> Path:
    """The cell's PNG, with its provenance (as `pictor generate` writes it), atomically."""
    if cell.image is None:
        raise ValueError(f"{cell.file} has not run")
    return save_png(cell.image.image, cell.image.record, Path(out) / cell.file)


def grid_summary(result: GridResult) -> dict[str, Any]:
    """What grid.json holds: the axes, each grid's file and geometry, each cell's file, place and settings."""
    plan = result.plan
    files = plan.grid_files()
    cells = []
    for c in plan.cells:
        record = c.image.record if c.image is not None else {}
        generation = {k: record[k] for k in _SETTINGS if k in record}
        if record.get("cache_threshold"):
            generation["cache_threshold"] = record["cache_threshold"]
        if record.get("loras"):
            generation["loras"] = [{"name": lo["name"], "scale": lo["scale"]} for lo in record["loras"]]
        if record.get("hires"):
            generation["hires"] = record["hires"]
        cells.append(
            {
                "file": c.file,
                **{key: getattr(c, key) for key in plan.axes},
                "grid": files[c.z],
                "box": list(c.box) if c.box else None,
                "settings": c.settings,
                "generation": generation,
            }
        )
    grids = [
        {
            "file": name,
            **({"z": k} if plan.z else {}),
            "size": list(g.image.size),
            "cell": list(g.cell),
            "margin": list(g.margin),
            "pad": g.pad,
        }
        for k, (name, g) in enumerate(zip(files, result.grids, strict=True))
    ]
    return {
        "pictor_version": __version__,
        "axes": {key: a.as_dict() for key, a in plan.axes.items()},
        "grids": grids,
        "cells": cells,
    }


def write_grid(result: GridResult, out: str | Path, cells: bool = True) -> list[Path]:
    """Write the grid(s), grid.json last (and, with `cells`, each cell's PNG first), every file atomically;
    returns the paths of the grids and grid.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cells:
        for cell in result.cells:
            write_cell(cell, out)
    summary = grid_summary(result)
    paths = []
    for entry, grid in zip(summary["grids"], result.grids, strict=True):
        info = PngImagePlugin.PngInfo()
        mine = [c for c in summary["cells"] if c["grid"] == entry["file"]]
        chunk = {"axes": summary["axes"], "grid": entry, "cells": mine}
        info.add_itxt(GRID_KEY, json.dumps(chunk, ensure_ascii=False, sort_keys=True))
        path = out / entry["file"]
        with staged_file(path) as tmp:
            grid.image.save(tmp, format="PNG", pnginfo=info)
        paths.append(path)
    write_json(summary, out / GRID_JSON)
    return [*paths, out / GRID_JSON]
