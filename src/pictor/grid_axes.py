"""The axes of an X/Y/Z plot (`pictor grid`, A1111's "X/Y/Z plot" script) and the cells they make.

An axis is a setting and its values, ``steps=10,20,30``: values are comma-separated (CSV: a value holding
a comma is written in double quotes). Each cell of the plot is the base request with one value of each axis
applied; every cell keeps the base request's seed unless an axis is ``seed``, so cells differ only by the
axis values. ``prompt`` is A1111's "Prompt S/R": its first value is a word or phrase of the prompt, and
each value replaces it (so the first cell has the prompt as written).

What needs no model is checked here, before anything loads (a value's syntax, a sampler's name, the S/R
word in the prompt, the same axis twice, the number of cells); what depends on the model (a size's latent
packing, a negative prompt under guidance 1, ...) is checked by the pipeline's request resolution, for
every cell before the first image (`pictor.grid_runs`).
"""

from __future__ import annotations

import csv
import difflib
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pictor.controlnet_requests import MAX_SCALE as MAX_CONTROLNET_SCALE
from pictor.generation_request import NOISE_SEED_RANGE, GeneratedImage, GenerationRequest
from pictor.grid_values import (
    HIRES_OFF,
    GridError,
    bounded,
    parse_cache_threshold,
    parse_guidance,
    parse_guidance_method,
    parse_hires,
    parse_hires_steps,
    parse_hires_strength,
    parse_hires_upscaler,
    parse_lora,
    parse_regions_mode,
    parse_sampler,
    parse_schedule,
    parse_seed,
    parse_size,
    parse_steps,
    parse_text,
    upscaler_name,
)
from pictor.guidance_methods import GuidanceMethod, GuidanceMethodError
from pictor.hires import UPSCALER
from pictor.ip_adapter_files import MAX_SCALE as MAX_IP_ADAPTER_SCALE
from pictor.redux_images import MAX_STRENGTH as MAX_REDUX_STRENGTH

# Cells a grid may have unless the caller raises the limit (--max-cells): a typo such as steps=1,2,...,100
# should not start hours of sampling.
MAX_CELLS = 64


@dataclass(frozen=True)
class _Kind:
    parse: Callable[[str], Any]
    # The request fields a value sets (none: the pipeline's state, as the LoRA scale).
    apply: Callable[[GenerationRequest, Any, Any], GenerationRequest]
    example: str
    empty_ok: bool = False  # may a value be empty text


def _set(name: str) -> Callable[[GenerationRequest, Any, Any], GenerationRequest]:
    return lambda r, value, _first: replace(r, **{name: value})


def _with_method(r: GenerationRequest, fields: dict[str, Any]) -> GenerationRequest:
    """The request with these fields of its guidance method (`pictor.guidance_methods`; none: plain CFG's)
    set together, and checked once they all are."""
    try:
        method = replace(r.guidance_method or GuidanceMethod(), **fields)
    except GuidanceMethodError as exc:  # e.g. a stop at or below the cell's start
        raise GridError(str(exc)) from None
    return replace(r, guidance_method=method)


def _method(name: str) -> Callable[[GenerationRequest, Any, Any], GenerationRequest]:
    """Sets one field of the request's guidance method (a cell sets all its axes' fields at once)."""
    return lambda r, value, _first: _with_method(r, {name: value})


def _regions_mode(r: GenerationRequest, mode: str) -> GenerationRequest:
    """A cell's regions as passes of their own (blend), or in one pass with regional attention, which keeps
    the request's Regional-Prompting-FLUX options (a blend cell has no use for them)."""
    if mode == "attention":
        return replace(r, regional_attention=True)
    return replace(
        r,
        regional_attention=False,
        regional_steps=None,
        regional_double_interval=None,
        regional_single_interval=None,
        regional_base_ratio=None,
    )


# Axes that set a field of the guidance method: a cell applies them together, since one alone may not yet
# make a valid method (a start above the request's stop, which the cell's stop axis lowers too).
METHOD_FIELDS = {
    "guidance-method": "method",
    "guidance-rescale": "rescale",
    "guidance-start": "start",
    "guidance-stop": "stop",
    "apg-eta": "eta",
}


AXES: dict[str, _Kind] = {
    "steps": _Kind(parse_steps, _set("steps"), "steps=10,20,30"),
    "guidance": _Kind(parse_guidance, _set("guidance"), "guidance=2,4,7"),
    "sampler": _Kind(parse_sampler, _set("sampler"), "sampler=euler,heun"),
    "schedule": _Kind(parse_schedule, _set("schedule"), "schedule=flux,linear"),
    "seed": _Kind(parse_seed, _set("seed"), "seed=1,2,3"),
    # Variation seeds (`pictor.noise_variation`): a seed axis needs a strength (the request's or an axis)
    "variation-seed": _Kind(parse_seed, _set("variation_seed"), "variation-seed=1,2,3"),
    "variation-strength": _Kind(
        bounded(0.0, 1.0, "a variation strength"), _set("variation_strength"), "variation-strength=0,0.1,0.3"
    ),
    "size": _Kind(parse_size, lambda r, v, _f: replace(r, width=v[0], height=v[1]), "size=64x64,128x64"),
    "negative": _Kind(parse_text, _set("negative_prompt"), 'negative=,blurry,"dark, blurry"', empty_ok=True),
    # Prompt S/R: every occurrence of the first value is replaced by the cell's value.
    "prompt": _Kind(
        parse_text, lambda r, v, first: replace(r, prompt=r.prompt.replace(first, v)), "prompt=red,blue"
    ),
    "lora": _Kind(parse_lora, lambda r, _v, _f: r, "lora=0,0.5,1"),
    "cache-threshold": _Kind(parse_cache_threshold, _set("cache_threshold"), "cache-threshold=0,0.1,0.2"),
    # The guidance method and its settings (`pictor.guidance_methods`); apg-eta needs apg in some cell.
    "guidance-method": _Kind(parse_guidance_method, _method("method"), "guidance-method=cfg,apg,tcfg"),
    "guidance-rescale": _Kind(
        bounded(0.0, 1.0, "a guidance rescale"), _method("rescale"), "guidance-rescale=0,0.5,0.7"
    ),
    "guidance-start": _Kind(bounded(0.0, 0.99, "a guidance start"), _method("start"), "guidance-start=0,0.2"),
    "guidance-stop": _Kind(bounded(0.01, 1.0, "a guidance stop"), _method("stop"), "guidance-stop=1,0.7,0.5"),
    "apg-eta": _Kind(bounded(0.0, 1.0, "an APG eta"), _method("eta"), "apg-eta=0,0.5,1"),
    # How --regions run: a pass each, blended, or one pass with regional attention (needs regions).
    "regions-mode": _Kind(
        parse_regions_mode,
        lambda r, v, _f: _regions_mode(r, v),
        "regions-mode=blend,attention",
    ),
    # The loaded ControlNets' scale (one for all of them) and the share of the steps they run in.
    "controlnet-scale": _Kind(
        bounded(0.0, MAX_CONTROLNET_SCALE, "a ControlNet scale"),
        lambda r, v, _f: replace(r, controlnet_scales=[v]),
        "controlnet-scale=0.4,0.7,1",
    ),
    "controlnet-end": _Kind(
        bounded(0.0, 1.0, "a ControlNet end"), _set("controlnet_end"), "controlnet-end=0.5,0.8,1"
    ),
    "redux-strength": _Kind(
        bounded(0.0, MAX_REDUX_STRENGTH, "a Redux strength"), _set("redux_strength"), "redux-strength=0.5,1"
    ),
    "ip-adapter-scale": _Kind(
        bounded(0.0, MAX_IP_ADAPTER_SCALE, "an IP-Adapter scale"),
        _set("ip_adapter_scale"),
        "ip-adapter-scale=0.5,0.8,1",
    ),
    # The hires fix (`pictor.hires`): its scale (off: one pass), second pass and what enlarges the first.
    "hires": _Kind(parse_hires, _set("hires_scale"), "hires=off,1.5,2"),
    "hires-strength": _Kind(parse_hires_strength, _set("hires_strength"), "hires-strength=0.3,0.5,0.7"),
    "hires-steps": _Kind(parse_hires_steps, _set("hires_steps"), "hires-steps=5,10,20"),
    "hires-upscaler": _Kind(
        parse_hires_upscaler,
        lambda r, v, _f: replace(r, hires_upscaler=upscaler_name(v)),
        "hires-upscaler=lanczos,4x-UltraSharp.safetensors",
    ),
}
# Axes that set the hires fix's second pass: they need a hires scale (the request's, or a hires axis).
_HIRES_PARTS = ("hires-strength", "hires-steps", "hires-upscaler")
ALIASES = {
    "cfg": "guidance",
    "cache_threshold": "cache-threshold",
    "guidance_method": "guidance-method",
    "guidance_rescale": "guidance-rescale",
    "cfg-rescale": "guidance-rescale",
    "guidance_start": "guidance-start",
    "guidance_stop": "guidance-stop",
    "apg_eta": "apg-eta",
    "regions_mode": "regions-mode",
    "prompt-sr": "prompt",
    "controlnet_scale": "controlnet-scale",
    "controlnet_end": "controlnet-end",
    "redux_strength": "redux-strength",
    "ip_adapter_scale": "ip-adapter-scale",
    "hires-scale": "hires",
    "hires_scale": "hires",
    "hires_strength": "hires-strength",
    "denoising": "hires-strength",  # A1111's axis name
    "hires_steps": "hires-steps",
    "hires_upscaler": "hires-upscaler",
}


def _label(name: str, value: Any) -> str:
    if name == "size":
        return f"{value[0]}x{value[1]}"
    if isinstance(value, float):
        return f"{value:g}"
    if name == "negative" and value == "":
        return "(none)"
    if name == "hires" and value is None:
        return HIRES_OFF
    if name == "hires-upscaler" and value != UPSCALER:
        return Path(value).name
    return str(value)


@dataclass(frozen=True)
class Axis:
    """One axis of a grid: a setting (a name of AXES) and its values, with their labels."""

    name: str
    values: tuple[Any, ...]
    labels: tuple[str, ...]

    def caption(self, index: int) -> str:
        """What the grid writes for value `index`, e.g. "steps: 20"."""
        return f"{self.name}: {self.labels[index]}"

    def as_dict(self) -> dict[str, Any]:
        values = [list(v) if isinstance(v, tuple) else v for v in self.values]
        return {"name": self.name, "values": values, "labels": list(self.labels)}


def axis_names() -> str:
    return ", ".join(AXES)


def _axis_name(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in AXES:
        near = difflib.get_close_matches(key, [*AXES, *ALIASES], n=1)
        hint = f" (did you mean '{ALIASES.get(near[0], near[0])}'?)" if near else ""
        raise GridError(f"unknown axis '{name}'{hint}; the axes are {axis_names()}")
    return key


def make_axis(name: str, values: list[Any] | tuple[Any, ...]) -> Axis:
    """An axis from a name and its values (text as typed on the command line, or values of the setting's
    own type: 20, 4.5, (64, 32)); GridError says what is wrong with them."""
    key = _axis_name(name)
    kind = AXES[key]
    if not values:
        raise GridError(f"axis {key} has no values; give at least one, e.g. {kind.example}")
    parsed = []
    for i, value in enumerate(values):
        if key == "hires" and value is None:  # a hires=off cell as grid.json and `Axis.values` hold it
            value = HIRES_OFF
        text = f"{value[0]}x{value[1]}" if isinstance(value, tuple) and key == "size" else str(value).strip()
        if not text and not (kind.empty_ok or (key == "prompt" and i > 0)):
            raise GridError(
                f"axis {key}: value {i + 1} of {len(values)} is empty; remove the extra comma, e.g. "
                f"{kind.example}"
            )
        try:
            parsed.append(kind.parse(text))
        except GridError as exc:
            raise GridError(f"axis {key}: {exc}; e.g. {kind.example}") from None
    labels = tuple(_label(key, v) for v in parsed)
    if key == "hires-upscaler":
        _distinct_files(parsed, labels)
    return Axis(key, tuple(parsed), labels)


def _distinct_files(paths: list[str], labels: tuple[str, ...]) -> None:
    """Records name an upscale model by its file's stem (`upscaler_name`): two files of one stem, even with
    their suffixes in other cases, would read as one model."""
    seen: dict[str, str] = {}
    for path in paths:
        if path == UPSCALER:
            continue
        name = upscaler_name(path) or ""
        other = seen.setdefault(name, path)
        if other != path:
            raise GridError(
                f"axis hires-upscaler: {other} and {path} are both named {name}, and cells' records name a "
                "model by its file's name; rename one (or copy it under another name)"
            )


def parse_axis(text: str) -> Axis:
    """``AXIS=V1,V2,...`` (CSV values: ``prompt=red,"dark, blue"``) -> Axis; GridError says what is wrong."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip():
        raise GridError(
            f"an axis is AXIS=V1,V2,..., e.g. steps=10,20,30; got '{text}' (axes: {axis_names()})"
        )
    _axis_name(name)  # an unknown name is named before its values
    if rest.count('"') % 2:  # the csv module would close an unclosed quote at the end, silently
        raise GridError(f"axis {name.strip()}: the values '{rest}' open a double quote they do not close")
    try:
        values = next(csv.reader([rest], skipinitialspace=True), [])
    except csv.Error as exc:
        raise GridError(
            f"axis {name.strip()}: the values '{rest}' are not a comma-separated list ({exc})"
        ) from None
    if not rest.strip():
        values = []
    return make_axis(name, values)


@dataclass
class GridCell:
    """One cell: its place (x, y, z indices), its axis values, and the request that makes it. `image` is
    filled in when it has run; `file` is its PNG's name in a grid folder; `box` is where its picture lies
    in its grid ([x0, y0, x1, y1), filled in when the grid is drawn). `lora_scale` and `upscaler` (the upscale
    model file of a hires-upscaler axis) are pipeline state that the cell sets before it runs."""

    x: int
    y: int
    z: int
    settings: dict[str, Any]
    request: GenerationRequest
    file: str
    lora_scale: float | None = None
    upscaler: str | None = None
    image: GeneratedImage | None = None
    box: tuple[int, int, int, int] | None = None


@dataclass
class GridPlan:
    """A grid's axes and its cells, z-major then y then x (the order they run in)."""

    x: Axis
    y: Axis | None
    z: Axis | None
    cells: list[GridCell] = field(default_factory=list)

    @property
    def axes(self) -> dict[str, Axis]:
        return {k: a for k, a in (("x", self.x), ("y", self.y), ("z", self.z)) if a is not None}

    def cell(self, x: int, y: int = 0, z: int = 0) -> GridCell:
        columns, rows = len(self.x.values), len(self.y.values) if self.y else 1
        return self.cells[(z * rows + y) * columns + x]

    def grid_files(self) -> list[str]:
        """grid.png, or one grid-zK.png per z value."""
        return [f"grid-z{k}.png" for k in range(len(self.z.values))] if self.z else ["grid.png"]


def _as_axis(axis: Axis | str | None) -> Axis | None:
    return parse_axis(axis) if isinstance(axis, str) else axis


def plan_grid(
    request: GenerationRequest,
    x: Axis | str,
    y: Axis | str | None = None,
    z: Axis | str | None = None,
    max_cells: int = MAX_CELLS,
) -> GridPlan:
    """The cells of an X/Y/Z plot of `request` (axes as Axis or as "AXIS=V1,V2" text), checked as far as
    no model is needed; GridError says what to change. A request without a seed gets one random seed for
    all its cells."""
    xa, ya, za = _as_axis(x), _as_axis(y), _as_axis(z)
    if xa is None:
        raise GridError("a grid needs an x axis, e.g. steps=10,20,30")
    given = [(k, a) for k, a in (("x", xa), ("y", ya), ("z", za)) if a is not None]
    seen: dict[str, str] = {}
    for key, a in given:
        if a.name in seen:
            raise GridError(
                f"axis {a.name} is both the {seen[a.name]} and the {key} axis; give each setting once "
                "(put all its values on one axis)"
            )
        seen[a.name] = key
    counts = [len(a.values) for _, a in given]
    n = math.prod(counts)
    if max_cells < 1:
        raise GridError(f"max_cells (--max-cells) must be at least 1, got {max_cells}")
    if n > max_cells:
        raise GridError(
            f"the grid has {n} cells ({' x '.join(map(str, counts))}), more than the {max_cells} allowed; "
            "use fewer values or raise the limit (--max-cells N)"
        )
    if request.num_images != 1:
        raise GridError(f"a grid makes one image per cell; ask for 1 image, not {request.num_images}")
    if "prompt" in seen:
        search = next(a.values[0] for _, a in given if a.name == "prompt")
        if search not in request.prompt:
            raise GridError(
                f"axis prompt: its first value '{search}' is not in the prompt '{request.prompt}'; the "
                "first value is the word or phrase each value replaces (A1111's Prompt S/R)"
            )
    parts = [a.name for _, a in given if a.name in _HIRES_PARTS]
    if parts and not has_hires(request.hires_scale, [a for _, a in given]):
        raise GridError(
            f"axis {parts[0]} sets the hires fix's second pass, but the grid has no hires fix: add --hires "
            "SCALE (a hires_scale) or a hires axis, e.g. hires=1.5,2"
        )
    methods = {request.guidance_method.method if request.guidance_method else "cfg"}
    methods |= {v for _, a in given if a.name == "guidance-method" for v in a.values}
    if "apg-eta" in seen and "apg" not in methods:
        raise GridError(
            "axis apg-eta sets APG's eta, but no cell uses APG: add --guidance-method apg or a "
            "guidance-method axis with apg"
        )
    seed = request.seed if request.seed is not None else secrets.randbelow(NOISE_SEED_RANGE)
    base = replace(request, seed=seed, batch_size=None)
    varied = request.variation_strength or "variation-strength" in seen
    if "variation-seed" in seen and not varied:
        raise GridError(
            "axis variation-seed changes nothing without a variation strength: add --variation-strength S "
            "(e.g. 0.2) or a variation-strength axis"
        )
    if varied and request.variation_seed is None and "variation-seed" not in seen:
        # likewise one variation seed for all cells, or each cell would draw its own
        base = replace(base, variation_seed=secrets.randbelow(NOISE_SEED_RANGE))
    plan = GridPlan(xa, ya, za)
    for k in range(len(za.values) if za else 1):
        for j in range(len(ya.values) if ya else 1):
            for i in range(len(xa.values)):
                plan.cells.append(_cell(plan, base, i, j, k))
    return plan


def has_hires(scale: float | None, axes: list[Axis]) -> bool:
    """Whether some cell of a grid has the hires fix: the base `scale`, or a hires axis value not off."""
    values = [v for a in axes if a.name == "hires" for v in a.values]
    return scale is not None or any(v is not None for v in values)


def _cell(plan: GridPlan, base: GenerationRequest, i: int, j: int, k: int) -> GridCell:
    request, settings, scale, upscaler = base, {}, None, None
    method_fields: dict[str, Any] = {}
    for key, index in (("x", i), ("y", j), ("z", k)):
        a = plan.axes.get(key)
        if a is None:
            continue
        value = a.values[index]
        if a.name in METHOD_FIELDS:
            method_fields[METHOD_FIELDS[a.name]] = value
        else:
            request = AXES[a.name].apply(request, value, a.values[0])
        settings[a.name] = list(value) if isinstance(value, tuple) else value
        if a.name == "lora":
            scale = value
        if a.name == "hires-upscaler" and value != UPSCALER:
            upscaler = value
    if method_fields:
        request = _with_method(request, method_fields)
    if any(a.name == "hires" for a in plan.axes.values()) and request.hires_scale is None:
        # A hires=off cell has one pass, so no second pass to set: the pipeline refuses a hires strength,
        # steps or upscaler without a scale (whichever axis came first).
        request = replace(request, hires_strength=None, hires_steps=None, hires_upscaler=None)
        upscaler = None
    tags = [f"{key}{index}" for key, index in (("x", i), ("y", j), ("z", k)) if key in plan.axes]
    return GridCell(i, j, k, settings, request, f"cell-{'-'.join(tags)}.png", scale, upscaler)
