"""`pictor ...`: runs the commands that `cli_args` parses by calling the layers below; no logic of its own
beyond presentation. Here: `pictor generate`'s run, the table of every command's run, and `main`; the
other commands run from their own modules (:mod:`pictor.cli_edit`, :mod:`pictor.cli_eval`, ...)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from pictor.cli_args import build_parser
from pictor.cli_caption import cmd_caption
from pictor.cli_convert import cmd_convert
from pictor.cli_edit import cmd_edit
from pictor.cli_eval import cmd_eval
from pictor.cli_grid import cmd_grid
from pictor.cli_inspect import cmd_info, cmd_models
from pictor.cli_lora import cmd_lora
from pictor.cli_merge import cmd_merge
from pictor.cli_output import output_folder, progress_bar, save_images
from pictor.cli_pipeline import load_pipeline, sampling_settings
from pictor.cli_preprocess import cmd_preprocess
from pictor.cli_preview import preview_writer
from pictor.cli_reproduce import cmd_reproduce
from pictor.cli_serve import cmd_serve
from pictor.cli_upscale import cmd_upscale
from pictor.notices import PictorWarning
from pictor.train import command as train_command


def cmd_generate(args: argparse.Namespace) -> int:
    import pictor.pipeline as pl

    if args.scorer is not None and args.best_of is None:
        raise ValueError("--scorer ranks the images of --best-of N; add --best-of or drop --scorer")
    args.scorer = args.scorer or "shapes"
    if args.best_of is not None:
        from pictor.rerank import get_scorer

        get_scorer(args.scorer)  # a wrong name fails before the model loads
        if args.num_images != 1:
            raise ValueError("--best-of N sets the number of images; drop -n")
        if args.variants == "random":
            raise ValueError(
                "--best-of ranks candidates of one prompt, and --variants random gives each image its own; "
                "use --variants all (each combination gets its own --best-of) or drop --best-of"
            )
    if args.settings_from:
        _take_settings(args)
    runs = _prompt_runs(args)  # a bad template or prompt file fails before the model loads
    previews = preview_writer(args)
    if args.hires_upscaler and args.hires is None:
        raise ValueError("--hires-upscaler enlarges the first pass of the hires fix; add --hires SCALE")
    output_folder(args.out)
    pipe = load_pipeline(args)
    if args.hires_upscaler:
        pipe.set_upscaler(args.hires_upscaler)
    width, height = args.size or (None, None)
    hires = {
        "hires_scale": args.hires,
        "hires_strength": args.hires_strength,
        "hires_steps": args.hires_steps,
        "hires_upscaler": pipe.upscaler.name if pipe.upscaler else None,
    }
    base = pl.GenerationRequest(
        prompt=runs[0].prompt, width=width, height=height, **sampling_settings(args), **hires
    )
    for k, run in enumerate(runs, 1):
        if len(runs) > 1:
            print(f"run {k}/{len(runs)}: {run.prompt}", file=sys.stderr)
        texts = {"prompt": run.prompt, "negative_prompt": run.negative_prompt}
        request = replace(base, **texts, seed=run.seed, num_images=run.num_images)
        if args.best_of is not None:
            from pictor.rerank import generate_best_of

            bar = progress_bar("best-of")
            ranked = generate_best_of(pipe, request, args.best_of, args.scorer, progress=bar)
            _keep_template(ranked, run, args.variants)
            labels = [f"rank{g.record['best_of']['rank']}" for g in ranked]
            for path, g in zip(save_images(ranked, args.out, labels), ranked, strict=True):
                print(f"{path}\tscore {g.record['best_of']['score']:g}")
            continue
        images = pipe.generate(request, progress=progress_bar("generate"), previews=previews)
        _keep_template(images, run, args.variants)
        for path in save_images(images, args.out):
            print(path)
    return 0


def _take_settings(args: argparse.Namespace) -> None:
    """--settings-from IMAGE: the image's settings (`pictor.settings_import`) for every option the command
    line left unset; what is not taken is said on stderr."""
    from pictor.sampling import SAMPLERS
    from pictor.settings_import import (
        GUIDANCE_DESTS,
        GUIDANCE_METHOD_OF,
        REGIONAL_OPTIONS,
        settings_from_image,
    )

    imported = settings_from_image(args.settings_from)
    for notice in imported.notices:
        print(f"pictor generate: {notice}", file=sys.stderr)
    if imported.sampler_name and args.sampler is None:
        raise ValueError(
            f"the image's sampler '{imported.sampler_name}' has no pictor equivalent; choose one with "
            f"--sampler ({', '.join(SAMPLERS)})"
        )
    if imported.hires_upscaler_name and args.hires is None and not args.hires_upscaler:
        file = imported.hires_upscaler_file
        if not (file and Path(file).is_file()):
            raise ValueError(
                f"the image's hires fix enlarged with upscale model '{imported.hires_upscaler_name}'; pass "
                "its file with --hires-upscaler FILE (or give --hires SCALE for Lanczos)"
            )
        args.hires_upscaler = file
    # Asked before the loop, which sets args.prompt from the image: a prompt of one's own is the command
    # line's, and so are whether it uses prompt editing or AND and the regions that go with it.
    own_prompt = args.prompt is not None or args.from_file is not None
    # The image's guidance method (settings_import: its record's, or its A1111 text's) fills each
    # guidance-method option the command line left unset, as every other option is, the method built from
    # them after (cli_guidance): but a method's own parameters (APG's, CFG-Zero*'s) only where the method
    # run is still the image's, not one the command line names instead.
    method = args.guidance_method or imported.values.get("guidance_method")
    for dest, value in imported.values.items():
        if dest in ("prompt", "prompt_editing", "composable", "regions", "regional_attention") and own_prompt:
            continue
        if dest in REGIONAL_OPTIONS and own_prompt:  # they go with the image's regions
            continue
        if dest in GUIDANCE_DESTS and GUIDANCE_METHOD_OF.get(dest, method) != method:
            continue
        current = getattr(args, dest)
        flags = ("negative", "prompt_weights", "prompt_editing", "composable", "regional_attention")
        unset = current is None or (dest in flags and not current)
        if unset:
            setattr(args, dest, value)


def _prompt_runs(args: argparse.Namespace) -> list[Any]:
    """generate's requests: PROMPT or each line of --from-file, as written or, with --variants, resolved
    (`pictor.prompt_variants.plan_runs`). Without --seed, every prompt shares one random seed."""
    import secrets

    from pictor.prompt_variants import plan_runs, read_prompt_file

    if (args.prompt is None) == (args.from_file is None):
        raise ValueError("give a PROMPT or --from-file FILE (one prompt per line), not both or neither")
    from pictor.generation_request import MAX_IMAGES, MAX_SEED

    prompts = [args.prompt] if args.from_file is None else read_prompt_file(args.from_file)
    # The pipeline's own checks, for the whole plan: --variants random splits -n into runs of one image,
    # each of which would pass them, and the run would stop halfway with images written.
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise ValueError(
            f"number of images must be between 1 and {MAX_IMAGES}, got {args.num_images}; for more, run "
            "again with the next --seed"
        )
    last = MAX_SEED - args.num_images + 1
    if args.seed is not None and not 0 <= args.seed <= last:
        raise ValueError(f"seed must be between 0 and {last}, got {args.seed}")
    if args.variants == "random" and args.variation_strength:
        raise ValueError(
            "--variants random gives each image its own prompt and seed, and variation seeds vary one "
            "picture: use --variants all (each combination gets its variations) or drop --variation-strength"
        )
    seed = args.seed
    if seed is None and (args.variants or args.from_file):
        seed = secrets.randbelow(2**32)  # as the pipeline draws one
    if args.variation_strength and args.variation_seed is None and (args.variants or args.from_file):
        args.variation_seed = secrets.randbelow(2**32)  # likewise one variation seed for every prompt
    return plan_runs(prompts, args.negative, seed, args.num_images, args.variants, args.wildcards)


def _keep_template(images: list[Any], run: Any, variants: str | None) -> None:
    """With --variants, each record keeps the templates its texts were resolved from, beside the resolved
    prompt that `reproduce` uses (as --best-of keeps its rank)."""
    if variants:
        template = {"variants": variants, "prompt": run.template, "negative_prompt": run.negative_template}
        for g in images:
            g.record["prompt_template"] = template


COMMANDS = {
    "generate": cmd_generate,
    "grid": lambda args: cmd_grid(args, load_pipeline, sampling_settings, progress_bar),
    "edit": cmd_edit,
    "reproduce": cmd_reproduce,
    "info": cmd_info,
    "models": cmd_models,
    "convert": cmd_convert,
    "eval": cmd_eval,
    "train": train_command.run_train,
    "lora": cmd_lora,
    "merge": cmd_merge,
    "preprocess": cmd_preprocess,
    "caption": cmd_caption,
    "upscale": cmd_upscale,
    "serve": cmd_serve,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)  # other libraries' notices: keep stderr readable
    # ...except pictor's own, which a user must see: skipped images, LoRA keys left out, and the like.
    warnings.simplefilter("default", PictorWarning)
    warnings.showwarning = lambda message, *_rest, **_kw: print(
        f"pictor {args.command}: warning: {message}", file=sys.stderr
    )
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        # Our errors (CheckpointError, GenerationError, ProvenanceError) are ValueErrors with a full message.
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"pictor {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Image.DecompressionBombError as exc:
        print(f"pictor {args.command}: error: an image declares too many pixels ({exc})", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only folder, a file where a folder should be...
        print(f"pictor {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
