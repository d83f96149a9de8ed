"""`pictor ...`: runs the commands that `cli_args` parses by calling the layers below; no logic of its own
beyond presentation."""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from pictor.cli_args import build_parser, regional_option_args
from pictor.cli_caption import cmd_caption
from pictor.cli_grid import cmd_grid
from pictor.cli_inspect import cmd_info, cmd_models
from pictor.cli_lora import cmd_lora
from pictor.cli_merge import cmd_merge
from pictor.cli_preprocess import cmd_preprocess
from pictor.cli_preview import preview_writer
from pictor.cli_upscale import cmd_upscale, reproduce_upscale
from pictor.notices import PictorWarning
from pictor.train import command as train_command


def _load(  # type: ignore[no-untyped-def]
    args: argparse.Namespace,
    model: str | None = None,
    loras: list[tuple[str, float]] | None = None,
    layout_adapter: str | None = None,
    reference_adapter: str | None = None,
    redux: tuple[str, str] | None = None,
    controlnets: list[str] | None = None,
    ip_adapter: tuple[str, str] | None = None,
):
    """The pipeline for a command: the model, then its LoRAs in order, then the adapters given (`redux`:
    the Redux file and SigLIP folder, else --redux-model and --siglip; `controlnets`: the ControlNet
    files, else --controlnet's; `ip_adapter`: the IP-Adapter file and CLIP folder, else
    --ip-adapter-model and --clip-vision)."""
    from pictor.loading import load

    pipe = load(model if model is not None else args.model, device=args.device)
    for path, scale in args.lora if loras is None else loras:
        pipe.add_lora(path, scale)
    adapter = layout_adapter or getattr(args, "layout_adapter", None)
    if adapter:
        pipe.set_layout_adapter(adapter)
    reference = reference_adapter or getattr(args, "reference_adapter", None)
    if reference:
        pipe.set_reference_adapter(reference)
    redux_model, siglip = redux or (getattr(args, "redux_model", None), getattr(args, "siglip", None))
    if (redux_model is None) != (siglip is None):
        raise ValueError("FLUX.1 Redux needs both --redux-model FILE and --siglip FOLDER")
    if redux_model is not None and siglip is not None:
        pipe.set_redux(redux_model, siglip)
    ip_model, clip = ip_adapter or (
        getattr(args, "ip_adapter_model", None),
        getattr(args, "clip_vision", None),
    )
    if (ip_model is None) != (clip is None):
        raise ValueError("the IP-Adapter needs both --ip-adapter-model FILE and --clip-vision FOLDER")
    if ip_model is not None and clip is not None:
        pipe.set_ip_adapter(ip_model, clip)
    for path in controlnets if controlnets is not None else getattr(args, "controlnet", None) or []:
        pipe.add_controlnet(path)
    if not pipe.config.trained:
        print(f"note: '{pipe.name}' is untrained: expect noise, not pictures", file=sys.stderr)
    return pipe


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling settings that generate and edit share."""
    from pictor.cli_guidance import guidance_method_arg
    from pictor.layout_files import read_layout_arg
    from pictor.regional_prompts import read_regions_arg

    return {
        "negative_prompt": args.negative,
        "steps": args.steps,
        "guidance": args.guidance,
        "guidance_method": guidance_method_arg(args),
        "sampler": args.sampler,
        "schedule": args.schedule,
        "seed": args.seed,
        "num_images": args.num_images,
        "batch_size": args.batch_size,
        "layout": read_layout_arg(args.layout) if args.layout is not None else None,
        "regions": read_regions_arg(args.regions) if getattr(args, "regions", None) is not None else None,
        "reference": args.reference,
        "context_image": _context_arg(args.context),
        "control_image": getattr(args, "control", None),
        "control_canny": _canny_arg(args),
        "redux_image": getattr(args, "redux", None),
        "redux_strength": getattr(args, "redux_strength", None),
        "ip_adapter_image": getattr(args, "ip_adapter", None),
        "ip_adapter_scale": getattr(args, "ip_adapter_scale", None),
        "controlnet_images": getattr(args, "controlnet_image", None),
        "controlnet_scales": getattr(args, "controlnet_scale", None),
        "controlnet_modes": getattr(args, "controlnet_mode", None),
        "controlnet_start": getattr(args, "controlnet_start", None),
        "controlnet_end": getattr(args, "controlnet_end", None),
        "vae_tile": args.vae_tile,
        "vae_tile_overlap": args.vae_tile_overlap,
        "denoise_tile": getattr(args, "denoise_tile", None),
        "denoise_tile_overlap": getattr(args, "denoise_tile_overlap", None),
        "cache_threshold": args.cache_threshold,
        # prompt editing reads A1111's whole syntax, its weights included
        "prompt_weights": getattr(args, "prompt_weights", False) or getattr(args, "prompt_editing", False),
        "prompt_editing": getattr(args, "prompt_editing", False),
        "composable": getattr(args, "composable", False),
        "regional_attention": getattr(args, "regional_attention", False),
        **regional_option_args(args),
        "variation_seed": args.variation_seed,
        "variation_strength": args.variation_strength,
        "seed_resize_from": getattr(args, "seed_resize_from", None),
    }


def _canny_arg(args: argparse.Namespace) -> tuple[float, float] | None:
    """--canny-thresholds (which implies --canny), else BFL's 50 and 200 with --canny, else None."""
    from pictor.edge_maps import FLUX_CANNY_HIGH, FLUX_CANNY_LOW

    thresholds = getattr(args, "canny_thresholds", None)
    if thresholds is not None:
        return thresholds
    return (float(FLUX_CANNY_LOW), float(FLUX_CANNY_HIGH)) if getattr(args, "canny", False) else None


def _context_arg(paths: list[str] | None) -> str | list[str] | None:
    """--context's one image; several are passed on as a list, which the pipeline refuses with the reason."""
    if not paths:
        return None
    return paths[0] if len(paths) == 1 else paths


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


def _output_folder(out_dir: str) -> None:
    """Make -o's folder before any work, so a path that cannot be one fails in a second, not after the
    sampling it would have held."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out_dir}: this is a file; give a folder for the images")
    out.mkdir(parents=True, exist_ok=True)


def _save(images: list[Any], out_dir: str, labels: list[str] | None = None) -> list[Path]:
    """NNNNN-SEED.png, or NNNNN-LABEL-SEED.png with labels (e.g. best-of ranks)."""
    from pictor.provenance import save_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = _next_index(out)
    tags = [f"{label}-" for label in labels] if labels else [""] * len(images)
    paths = [
        save_png(g.image, g.record, out / f"{start + k:05d}-{tag}{g.seed}.png")
        for k, (g, tag) in enumerate(zip(images, tags, strict=True))
    ]
    _cache_summary(images)
    return paths


def _cache_summary(images: list[Any]) -> None:
    """How much the first-block cache skipped, so a threshold can be tuned (stderr: stdout lists files)."""
    counts = [g.record["cache_passes"] for g in images if "cache_passes" in g.record]
    total = sum(c["total"] for c in counts)
    if total:
        full = sum(c["full"] for c in counts)
        threshold = images[0].record.get("cache_threshold")
        print(
            f"first-block cache {threshold:g}: {full} of {total} transformer passes ran every block "
            f"({full / total:.0%})",
            file=sys.stderr,
        )


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
    _output_folder(args.out)
    pipe = _load(args)
    if args.hires_upscaler:
        pipe.set_upscaler(args.hires_upscaler)
    width, height = args.size or (None, None)
    hires = {
        "hires_scale": args.hires,
        "hires_strength": args.hires_strength,
        "hires_steps": args.hires_steps,
        "hires_upscaler": pipe.upscaler.name if pipe.upscaler else None,
    }
    base = pl.GenerationRequest(prompt=runs[0].prompt, width=width, height=height, **_settings(args), **hires)
    for k, run in enumerate(runs, 1):
        if len(runs) > 1:
            print(f"run {k}/{len(runs)}: {run.prompt}", file=sys.stderr)
        texts = {"prompt": run.prompt, "negative_prompt": run.negative_prompt}
        request = replace(base, **texts, seed=run.seed, num_images=run.num_images)
        if args.best_of is not None:
            from pictor.rerank import generate_best_of

            bar = _progress_bar("best-of")
            ranked = generate_best_of(pipe, request, args.best_of, args.scorer, progress=bar)
            _keep_template(ranked, run, args.variants)
            labels = [f"rank{g.record['best_of']['rank']}" for g in ranked]
            for path, g in zip(_save(ranked, args.out, labels), ranked, strict=True):
                print(f"{path}\tscore {g.record['best_of']['score']:g}")
            continue
        images = pipe.generate(request, progress=_progress_bar("generate"), previews=previews)
        _keep_template(images, run, args.variants)
        for path in _save(images, args.out):
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


def cmd_edit(args: argparse.Namespace) -> int:
    from pictor.editing import DEFAULT_FEATHER, EditRequest

    # Options that shape only an expanded or masked area: without one they would change nothing.
    if args.fill is not None and args.expand is None:
        raise ValueError("--fill sets how --expand's new area starts; add --expand L,T,R,B or drop --fill")
    if args.feather is not None and args.mask is None:  # an expanded area is always wholly new
        raise ValueError("--feather blends the edge of a --mask; add --mask or drop --feather")
    if args.upscaler and args.upscaler.lower() == "lanczos":
        args.upscaler = None  # the default: no file to load
    if args.upscaler and args.upscale is None:
        raise ValueError("--upscaler enlarges the image for --upscale; add --upscale SCALE (e.g. 2)")
    if args.upscale is not None and args.expand is not None:
        raise ValueError(
            "--upscale and --expand do not go together: outpaint first, then upscale the result in a "
            "second edit"
        )
    if (args.mask_padding is not None or args.inpaint_size) and args.inpaint_area != "masked":
        raise ValueError("--mask-padding and --inpaint-size shape --inpaint-area masked; add it or drop them")
    from pictor.picture_files import masks_for, pictures_in

    # A folder is a batch (A1111's img2img batch): every picture directly in it, each with the mask of its
    # name from a --mask folder; all checked before the model loads or anything is written.
    batch = Path(args.image).is_dir()
    if args.mask is not None and Path(args.mask).is_dir() and not batch:
        raise ValueError("--mask is a folder of masks for a folder of pictures; give the one mask file")
    sources = pictures_in([args.image])
    masks = masks_for(sources, args.mask)
    previews = preview_writer(args)
    _output_folder(args.out)
    pipe = _load(args)
    if args.upscaler:
        pipe.set_upscaler(args.upscaler)
    settings = _settings(args)
    if batch and settings["seed"] is None:  # one random seed for the batch, as for --from-file
        import secrets

        settings["seed"] = secrets.randbelow(2**32)
    if batch and settings["variation_strength"] and settings["variation_seed"] is None:
        import secrets

        settings["variation_seed"] = secrets.randbelow(2**32)  # likewise one variation seed for all
    requests = [
        EditRequest(
            image=source,
            prompt=args.prompt,
            mask=mask,
            strength=args.strength,
            expand=args.expand,
            fill=args.fill or "edge",
            feather=DEFAULT_FEATHER if args.feather is None else args.feather,
            upscale=args.upscale,
            upscaler=pipe.upscaler.name if pipe.upscaler else None,
            inpaint_area=args.inpaint_area or "whole",
            mask_padding=args.mask_padding,
            inpaint_size=args.inpaint_size,
            **settings,
        )
        for source, mask in zip(sources, masks, strict=True)
    ]
    if batch:  # a bad picture or mask is found before any is edited
        for request in requests:
            try:
                pipe.resolve_edit(request)
            except ValueError as exc:
                raise ValueError(f"{Path(str(request.image)).name}: {exc}") from None
    for k, request in enumerate(requests, 1):
        if batch:
            print(f"picture {k}/{len(requests)}: {request.image}", file=sys.stderr)
        images = pipe.edit(request, progress=_progress_bar(request.mode), previews=previews)
        labels = [Path(str(request.image)).stem] * len(images) if batch else None
        for path in _save(images, args.out, labels):
            print(path)
    return 0


def _recorded_file(record: dict[str, Any], key: str) -> str | None:
    """The path of the adapter a record names, where that file still is."""
    path = (record.get(key) or {}).get("path")
    return path if path and Path(path).is_file() else None


def _recorded_redux(args: argparse.Namespace, record: dict[str, Any]) -> tuple[str, str] | None:
    """The Redux file and SigLIP folder to reproduce with: the flags, else the record's, if still there."""
    if args.redux_model or args.siglip:
        return None  # _load reads the flags (and says so if one of the two is missing)
    return _recorded_pair(record, "redux", "siglip")


def _recorded_ip_adapter(args: argparse.Namespace, record: dict[str, Any]) -> tuple[str, str] | None:
    """The IP-Adapter file and CLIP folder to reproduce with: the flags, else the record's, if still there."""
    if args.ip_adapter_model or args.clip_vision:
        return None  # _load reads the flags (and says so if one of the two is missing)
    return _recorded_pair(record, "ip_adapter", "clip")


def _recorded_pair(record: dict[str, Any], key: str, folder: str) -> tuple[str, str] | None:
    """A record's file (`key`'s path) and the folder beside it (`key`'s `folder`), where both still are."""
    entry = record.get(key) if isinstance(record.get(key), dict) else None
    if not entry or not Path(str(entry.get("path"))).is_file() or not Path(str(entry.get(folder))).is_dir():
        return None
    return str(entry["path"]), str(entry[folder])


def _check_upscaler_flags(args: argparse.Namespace, record: Any) -> None:
    """An upscale model file given for a part of the image that used none would be silently unused: refused,
    naming the flag."""
    from pictor.reproduce import recorded_upscaler

    if not isinstance(record, dict):
        return

    def used(key: str) -> bool:  # a pictor upscale's record holds its source's keys beside its own
        entry = record.get(key)
        return isinstance(entry, dict) and entry.get("upscaler", "lanczos") != "lanczos"

    checks = (
        (args.upscaler, "--upscaler", "upscale" in record, "made by pictor upscale"),
        (args.hires_upscaler, "--hires-upscaler", used("hires"), "a hires fix enlarged by an upscale model"),
        (args.source_upscaler, "--source-upscaler", used("source_upscale"), "an upscaling edit by a model"),
    )
    for given, flag, applies, what in checks:
        if given and not applies:
            raise ValueError(f"{flag}: the image is not {what}; drop {flag}")
    recorded_upscaler(record)  # a damaged entry is named before anything loads


def cmd_reproduce(args: argparse.Namespace) -> int:
    from pictor.provenance import read_record
    from pictor.reproduce import pixel_report

    record = read_record(args.image)
    _check_upscaler_flags(args, record)
    _output_folder(args.out)
    if isinstance(record, dict) and "upscale" in record:  # `pictor upscale` made it
        return reproduce_upscale(args, record, lambda base: _reproduced(args, base))
    image = _reproduced(args, record)
    for path in _save([image], args.out):
        print(path)
    print(f"pictor reproduce: {pixel_report(args.image, image.image)}", file=sys.stderr)
    return 0


def _reproduced(args: argparse.Namespace, record: Any) -> Any:
    """The GeneratedImage of a generation or edit record, made again with the files the record or the
    command line names."""
    from pictor.reproduce import check_record, recorded_upscaler, reproduce, upscaler_flag

    check_record(record)
    model = args.model or record["model"].get("ref") or "default"
    # Without --lora, the LoRAs named in the record, from where they were (their hashes are checked).
    loras = args.lora or [(lo["path"], lo["scale"]) for lo in record.get("loras") or []]
    # Likewise the layout adapter named in the record (its hash is checked), unless the bundle has one.
    adapter = args.layout_adapter or _recorded_file(record, "layout_adapter")
    reference = args.reference_adapter or _recorded_file(record, "reference_adapter")
    from pictor.controlnet_runs import recorded_controlnet_paths

    # Without --controlnet, the ControlNets named in the record, from where they were (hashes checked).
    controlnets = args.controlnet or recorded_controlnet_paths(record) or []
    pipe = _load(
        args,
        model,
        loras,
        adapter,
        reference,
        _recorded_redux(args, record),
        controlnets,
        _recorded_ip_adapter(args, record),
    )
    _, upscaler = recorded_upscaler(record)
    if upscaler is not None:  # from where it was, unless given (its hash is checked)
        flag = upscaler_flag(record)
        given = args.hires_upscaler if flag == "--hires-upscaler" else args.source_upscaler
        if not given and not Path(upscaler["file"]).is_file():
            raise ValueError(f"the upscale model, {upscaler['file']}, is not there; pass it with {flag} FILE")
        pipe.set_upscaler(given or upscaler["file"])
    return reproduce(
        pipe,
        record,
        progress=_progress_bar("reproduce"),
        source=args.source,
        mask=args.mask,
        reference=args.reference,
        context=args.context,
        control=args.control,
        redux=args.redux,
        controlnet_images=args.controlnet_image,
        ip_adapter=args.ip_adapter,
    )


# Options that choose the model whose images are scored (flag -> argparse dest).
_MODEL_FLAGS = {
    "--model": "model",
    "--lora": "lora",
    "--layout-adapter": "layout_adapter",
    "--reference-adapter": "reference_adapter",
}


def cmd_eval(args: argparse.Namespace) -> int:
    if args.suite == "distribution":
        return _eval_distribution(args)
    if args.suite == "clip-score":
        return _eval_clip_score(args)
    from pictor.eval.shapes_run import check_shapes_eval, run_shapes_eval

    pipe = None
    if args.through_autoencoder and not args.ground_truth:
        raise ValueError("--through-autoencoder scores ground-truth renders: add --ground-truth")
    if args.ground_truth and not args.through_autoencoder:
        chosen = [f for f, v in _MODEL_FLAGS.items() if getattr(args, v, None)]
        if chosen:
            raise ValueError(
                f"{', '.join(chosen)}: --ground-truth scores renders of the specs, no model's images; drop "
                "them (or add --through-autoencoder to score the renders through the model's autoencoder)"
            )
    generation = {
        "steps": args.steps,
        "guidance": args.guidance,
        "sampler": args.sampler,
        "cache_threshold": args.cache_threshold,
    }
    # Before the model loads: a bad --out or seed found after the sampling would waste all of it.
    check_shapes_eval(
        args.prompts,
        args.images_per_prompt,
        args.seed,
        args.out,
        args.save_images,
        args.ground_truth,
        args.limit,
        **generation,
    )
    if not args.ground_truth or args.through_autoencoder:
        pipe = _load(args)
    report = run_shapes_eval(
        pipe,
        args.prompts,
        args.images_per_prompt,
        args.seed,
        args.out,
        ground_truth=args.ground_truth,
        through_autoencoder=args.through_autoencoder,
        save_images=args.save_images,
        layouts=args.layouts,
        references=args.references,
        empty_prompts=args.empty_prompts,
        limit=args.limit,
        progress=_progress_bar("prompts"),
        **generation,
    )
    for tag, acc in report["per_tag"].items():
        print(f"{tag:<14} {acc:.3f}")
    print(f"{'overall':<14} {report['overall']:.3f}  ({report['n_images']} images)")
    if "layout" in report:
        held = report["layout"]
        print(f"{'boxes held':<14} {held['box_accuracy']:.3f}  ({held['boxes']} boxes)")
    if args.out:
        print(f"report: {args.out}  contact sheet: {report['contact_sheet']}")
    return 0


def _eval_distribution(args: argparse.Namespace) -> int:
    from pictor.eval.distribution_run import run_distribution_eval

    report = run_distribution_eval(
        args.real,
        args.fake,
        features=args.features,
        device=args.device,
        batch_size=args.batch_size,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        nearest_k=args.nearest_k,
        seed=args.seed,
        out=args.out,
        progress=_progress_bar,
    )
    for name in ("real", "fake"):
        for entry in report["skipped"][name]:
            print(f"skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
    print(f"features   {report['features']} ({report['dim']} dimensions)")
    print(f"images     real {report['n_real']}, fake {report['n_fake']}")
    print(f"FD         {report['fd']:.4f}")
    kid, std, size = report["kid"], report["kid_std"], report["kid_subset_size"]
    print(f"KID        {kid:.5f} +- {std:.5f} (subsets of {size})")
    print(f"precision  {report['precision']:.3f}")
    print(f"recall     {report['recall']:.3f}  (k={report['nearest_k']})")
    for note in report["notes"]:
        print(f"note: {note}")
    if args.out:
        print(f"report: {args.out}")
    return 0


def _eval_clip_score(args: argparse.Namespace) -> int:
    from pictor.eval.clip_score import run_clip_score

    report = run_clip_score(
        args.folder, args.clip, args.device, args.batch_size, args.out, progress=_progress_bar("clip score")
    )
    for entry in report["skipped"]:
        print(f"skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
    print(f"model       {report['model']}")
    print(f"images      {report['images']}")
    print(f"CLIP score  {report['clip_score']:.3f} (std {report['std']:.3f})")
    if args.out:
        print(f"report: {args.out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pictor.convert import cast_bundle, convert_flux, export_gguf

    if args.format == "defaults":
        from pictor.bundle_defaults import SETTABLE, set_defaults

        before, after = set_defaults(args.bundle, **{k: getattr(args, k) for k in SETTABLE})
        for key in sorted(set(before) | set(after)):
            old, new = before.get(key), after.get(key)
            print(f"{key:<14} {old}" + (f" -> {new}" if new != old else ""))
        return 0
    if args.format == "gguf":
        path = export_gguf(args.bundle, args.out, args.dtype)
        print(f"{path}  ({path.stat().st_size / 2**20:.1f} MiB)")
        return 0
    if args.format == "dtype":
        src = Path(args.bundle)
        before = _folder_bytes(src) if src.is_dir() else 0  # cast_bundle says what is wrong with src
        path = cast_bundle(args.bundle, args.out, args.dtype)
        print(f"{path}  ({args.dtype}: {before / 2**20:.1f} MiB -> {_folder_bytes(path) / 2**20:.1f} MiB)")
        return 0
    path = convert_flux(
        args.transformer,
        args.ae,
        args.t5,
        args.clip,
        args.out,
        name=args.name,
        kontext=args.kontext,
        control=args.control,
    )
    print(path)
    return 0


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from pictor.serve.security import BlockList
    from pictor.serve.server import serve
    from pictor.serve.settings import Limits, ServeSettings, default_data_dir

    block = BlockList.from_file(args.block_words).words if args.block_words else ()
    settings = ServeSettings(
        model=args.model,
        device=args.device,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("PICTOR_API_KEY") or None,
        data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(),
        queue_size=args.queue_size,
        max_batch=args.max_batch,
        job_timeout=args.job_timeout,
        max_attempts=args.max_attempts,
        load_retry=args.load_retry,
        block_words=block,
        limits=Limits(max_pixels=args.max_pixels, max_steps=args.max_steps, max_images=args.max_images),
        vae_tile=args.vae_tile,
        vae_tile_overlap=args.vae_tile_overlap,
        lora_dir=Path(args.lora_dir) if args.lora_dir else None,
        redux_model=Path(args.redux_model) if args.redux_model else None,
        siglip=Path(args.siglip) if args.siglip else None,
        ip_adapter_model=Path(args.ip_adapter_model) if args.ip_adapter_model else None,
        clip_vision=Path(args.clip_vision) if args.clip_vision else None,
        controlnets=tuple(Path(p) for p in args.controlnet or ()),
        upscaler=Path(args.upscaler) if args.upscaler else None,
        previews=args.previews,
    )
    return serve(settings, log_level=args.log_level)


COMMANDS = {
    "generate": cmd_generate,
    "grid": lambda args: cmd_grid(args, _load, _settings, _progress_bar),
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
