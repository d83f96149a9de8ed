"""`pictor ...`: parses arguments and calls the layers below. No logic of its own beyond presentation."""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pictor import __version__
from pictor.train import command as train_command

SIZE_RE = re.compile(r"^(\d+)[xX](\d+)$")


def _size(text: str) -> tuple[int, int]:
    m = SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 64x64; got '{text}'")
    return int(m.group(1)), int(m.group(2))


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", "-m", default=None, help="bundle folder, local bundle name, preset, or 'default' (default)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pictor", description="pictor: text-to-image generation")
    parser.add_argument("--version", action="version", version=f"pictor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate images from a prompt")
    g.add_argument("prompt")
    _add_model(g)
    g.add_argument("-n", "--num-images", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=None, help="images per sampler run (default: all)")
    g.add_argument("--seed", type=int, default=None, help="image i uses seed+i (default: random)")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--guidance", "--cfg", type=float, default=None, dest="guidance")
    g.add_argument("--sampler", default=None, help="euler, heun, dpmpp_2m")
    g.add_argument("--schedule", default=None, help="flux, linear, shifted")
    g.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("-o", "--out", default="outputs", help="output folder (default: outputs)")

    r = sub.add_parser("reproduce", help="regenerate an image from its own metadata")
    r.add_argument("image")
    _add_model(r)
    r.add_argument("-o", "--out", default="outputs")

    i = sub.add_parser("info", help="show an image's provenance or a model's config")
    i.add_argument("target", help="a PNG, a bundle folder, or a preset name")
    i.add_argument("--json", action="store_true", help="print JSON only")

    sub.add_parser("models", help="list presets and local bundles")

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="suite", required=True)
    es = esub.add_parser("shapes", help="exact prompt adherence on the shapes world (SHAPES.md)")
    _add_model(es)
    es.add_argument("--prompts", default=None, help="JSONL benchmark file (default: packaged shapes-dev)")
    es.add_argument("--images-per-prompt", "-k", type=int, default=4)
    es.add_argument("--seed", type=int, default=0)
    es.add_argument("--steps", type=int, default=None)
    es.add_argument("--guidance", type=float, default=None)
    es.add_argument("--sampler", default=None)
    es.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    es.add_argument("--out", default=None, help="report.json (a contact sheet .png is written beside it)")
    es.add_argument("--ground-truth", action="store_true", help="score renders of the specs themselves")

    c = sub.add_parser("convert", help="make a pictor bundle from other formats")
    csub = c.add_subparsers(dest="format", required=True)
    cf = csub.add_parser("flux", help="FLUX.1 original single files -> bundle")
    cf.add_argument("--transformer", required=True, help="flux1-dev.safetensors or flux1-schnell.safetensors")
    cf.add_argument("--ae", required=True, help="ae.safetensors")
    cf.add_argument("--t5", required=True, help="local folder of a T5 encoder (save_pretrained layout)")
    cf.add_argument("--clip", required=True, help="local folder of a CLIP text model")
    cf.add_argument("--out", required=True)
    cf.add_argument("--name", default=None)
    train_command.add_train_parser(sub)
    return parser


def _progress_bar(total_hint: str):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(step: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=total_hint, unit="step", file=sys.stderr, leave=False)
        b = bar["bar"]
        b.update(step - b.n)
        if step >= total:
            b.close()

    return update


def _next_index(out: Path) -> int:
    nums = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"^(\d{5})-", p.name))]
    return max(nums, default=-1) + 1


def _save(images: list[Any], out_dir: str) -> list[Path]:
    from pictor.provenance import save_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = _next_index(out)
    return [save_png(g.image, g.record, out / f"{start + k:05d}-{g.seed}.png") for k, g in enumerate(images)]


def cmd_generate(args: argparse.Namespace) -> int:
    import pictor.pipeline as pl

    pipe = pl.load(args.model, device=args.device)
    if not pipe.config.trained:
        print(f"note: '{pipe.name}' is untrained: expect noise, not pictures", file=sys.stderr)
    width, height = args.size or (None, None)
    request = pl.GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative,
        width=width,
        height=height,
        steps=args.steps,
        guidance=args.guidance,
        sampler=args.sampler,
        schedule=args.schedule,
        seed=args.seed,
        num_images=args.num_images,
        batch_size=args.batch_size,
    )
    images = pipe.generate(request, progress=_progress_bar("generate"))
    for path in _save(images, args.out):
        print(path)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    import pictor.pipeline as pl
    from pictor.provenance import read_record

    record = read_record(args.image)
    model = args.model or record["model"].get("ref") or "default"
    pipe = pl.load(model, device=args.device)
    image = pipe.reproduce(record, progress=_progress_bar("reproduce"))
    for path in _save([image], args.out):
        print(path)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from pictor.checkpoint import is_bundle, read_bundle_config
    from pictor.presets import PRESETS
    from pictor.provenance import parse_parameters, read_text_chunks

    target = Path(args.target)
    if target.is_file():
        chunks = read_text_chunks(target)
        info: dict[str, Any] = {}
        if "pictor" in chunks:
            info["pictor"] = json.loads(chunks["pictor"])
        if "parameters" in chunks:
            info["parameters"] = parse_parameters(chunks["parameters"])
        if not info:
            print(f"{target}: no generation metadata found", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(info, indent=2, ensure_ascii=False))
        else:
            if "parameters" in chunks:
                print(chunks["parameters"])
            if "pictor" in info:
                print(json.dumps(info["pictor"], indent=2, ensure_ascii=False))
        return 0
    if target.is_dir() and is_bundle(target):
        print(json.dumps(read_bundle_config(target).to_dict(), indent=2))
        return 0
    if args.target in PRESETS:
        print(json.dumps(PRESETS[args.target], indent=2))
        return 0
    print(f"{args.target}: not an image, a bundle folder or a preset name", file=sys.stderr)
    return 2


def cmd_models(_args: argparse.Namespace) -> int:
    from pictor.checkpoint import read_bundle_config
    from pictor.locate import FALLBACK_PRESET, list_bundles, models_dir
    from pictor.presets import PRESETS

    bundles = list_bundles()
    print("bundles:")
    for name, path in bundles:
        cfg = read_bundle_config(path)
        print(f"  {name:<16} {path}  ({cfg.preset or 'custom'}, {'trained' if cfg.trained else 'untrained'})")
    if not bundles:
        print(f"  (none; put bundles in {models_dir()} or set PICTOR_MODELS)")
        print(f"  'default' falls back to the untrained preset '{FALLBACK_PRESET}'")
    print("presets (architectures; untrained unless you load weights):")
    for name, preset in PRESETS.items():
        print(f"  {name:<16} {preset['description']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pictor.eval.shapes_run import run_shapes_eval

    pipe = None
    if not args.ground_truth:
        import pictor.pipeline as pl

        pipe = pl.load(args.model, device=args.device)
    report = run_shapes_eval(
        pipe,
        args.prompts,
        args.images_per_prompt,
        args.seed,
        args.out,
        ground_truth=args.ground_truth,
        limit=args.limit,
        progress=_progress_bar("prompts"),
        steps=args.steps,
        guidance=args.guidance,
        sampler=args.sampler,
    )
    for tag, acc in report["per_tag"].items():
        print(f"{tag:<14} {acc:.3f}")
    print(f"{'overall':<14} {report['overall']:.3f}  ({report['n_images']} images)")
    if args.out:
        print(f"report: {args.out}  contact sheet: {report['contact_sheet']}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pictor.convert import convert_flux

    path = convert_flux(args.transformer, args.ae, args.t5, args.clip, args.out, name=args.name)
    print(path)
    return 0


COMMANDS = {
    "generate": cmd_generate,
    "reproduce": cmd_reproduce,
    "info": cmd_info,
    "models": cmd_models,
    "convert": cmd_convert,
    "eval": cmd_eval,
    "train": train_command.run_train,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)  # the CLI prints its own notes; keep stderr readable
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        # Our errors (CheckpointError, GenerationError, ProvenanceError) are ValueErrors with a full message.
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"pictor {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
