"""Regional prompts on the shapes dev prompts: the same model, the same seeds, from the prompt alone, with
regional prompts (no training), and with the model's trained layout adapter, all given the same boxes.

For K images per dev prompt, the boxes of image j of prompt i are those of the ground-truth scene that
`pictor eval shapes --ground-truth` renders in its place (as benchmarks/bench_layout.py): each box becomes a
region whose prompt is its phrase ("a red circle"), at each --strengths value, and the same boxes are the
layout of the layout-adapter row. Each set is scored by the exact shapes scorer (per tag, overall) and by
how many boxes hold an object of their phrase's colour and shape at its centroid ("boxes held"). Prints
JSON; --out writes it.

    python benchmarks/bench_regions.py [--model default] [-k 2] [--strengths 1,10] [--limit N] [--no-layout]

--attention-settings adds, for each regional attention strength, a row per Regional-Prompting-FLUX setting
(`pictor.regional_attention.RegionalOptions`): "steps=0.4,base_ratio=0.2;single=2" (keys steps, double,
single, base_ratio).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from _shapes_rows import emit, run_header, scored_row

from pictor.eval.shapes import ground_truth_layouts, load_prompts
from pictor.eval.shapes_run import generate_for_specs, layout_scores
from pictor.loading import load


def as_regions(layouts: list[list[list[dict]]], strength: float) -> list[list[list[dict]]]:
    """Each layout box as a region of that strength, its phrase the region's prompt."""
    return [
        [[{"box": b["box"], "prompt": b["phrase"], "strength": strength} for b in layout] for layout in row]
        for row in layouts
    ]


def settings_fields(setting: str) -> dict[str, Any]:
    """'steps=0.4,base_ratio=0.2' -> the request's regional attention fields."""
    names = {
        "steps": "regional_steps",
        "double": "regional_double_interval",
        "single": "regional_single_interval",
        "base_ratio": "regional_base_ratio",
    }
    out: dict[str, Any] = {}
    for part in setting.split(","):
        key, value = part.split("=")
        number = float(value)
        out[names[key.strip()]] = int(number) if key.strip() in ("double", "single") else number
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("-k", "--images-per-prompt", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strengths", default="1,10", help="the regions' strengths, one row each")
    ap.add_argument("--limit", type=int, default=None, help="only the first N dev prompts")
    ap.add_argument("--no-layout", action="store_true", help="leave out the layout-adapter row")
    ap.add_argument(
        "--attention-strengths",
        default="1,4",
        help="the regions' strengths under regional attention (one pass, masked), one row each; '' for none",
    )
    ap.add_argument(
        "--attention-settings",
        default="",
        help="regional attention's RPF settings, one row each per strength: "
        "'steps=0.4,base_ratio=0.2;single=2' (';' between rows)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    pipe = load(args.model, device="cpu")
    specs = load_prompts()[: args.limit]
    k = args.images_per_prompt
    layouts = ground_truth_layouts(specs, k, args.seed)
    result = run_header(pipe, len(specs), k, args.seed, layout_adapter=pipe.layout_info)
    rows: list[tuple[str, dict[str, Any]]] = [("prompt only", {})]
    for strength in (float(s) for s in args.strengths.split(",") if s):
        rows.append((f"prompt + regions (strength {strength:g})", {"regions": as_regions(layouts, strength)}))
    for strength in (float(s) for s in args.attention_strengths.split(",") if s):
        given = {"regions": as_regions(layouts, strength), "regional_attention": True}
        rows.append((f"prompt + regional attention (strength {strength:g})", given))
        for setting in (s for s in args.attention_settings.split(";") if s):
            options = settings_fields(setting)
            name = f"prompt + regional attention (strength {strength:g}, {setting})"
            rows.append((name, {**given, "regional_options": options}))
    if not args.no_layout and pipe.layout_adapter is not None:
        rows.append(("prompt + layout adapter", {"layouts": layouts}))
    for name, given in rows:
        start = time.perf_counter()
        images = generate_for_specs(pipe, specs, k, args.seed, **given)
        seconds = time.perf_counter() - start
        held = layout_scores(specs, images, layouts)
        result[name] = scored_row(
            specs, images, seconds, boxes_held=round(held["box_accuracy"], 4), boxes=held["boxes"]
        )
        print(json.dumps({name: result[name]}), flush=True)
    emit(result, args.out)


if __name__ == "__main__":
    main()
