"""`pictor lora extract | resize | convert | merge`: :mod:`pictor.lora_tools` and :mod:`pictor.lora_merge` on
the command line. :func:`add_merge_options` adds `merge`'s options for BFL's Canny / Depth LoRAs (`--control`,
`--keep-defaults`) to its parser."""

from __future__ import annotations

import argparse
import sys

from pictor.lora_tools import (
    LowRankReport,
    check_out,
    check_rank,
    extract_lora,
    model_linears,
    read_lora,
    resize_lora,
    write_lora,
)
from pictor.models.lora_formats import LoRAUpdate


def cmd_lora(args: argparse.Namespace) -> int:
    if args.lora_cmd == "merge":
        return _merge(args)
    check_out(args.out)  # before anything is read or computed: an extract at FLUX.1 size takes long
    if args.lora_cmd != "convert":
        check_rank(args.rank, args.energy)
    if args.lora_cmd == "extract":
        updates, report = _extract(args)
    else:
        updates, skipped = read_lora(args.lora, model_linears(args.model))
        _warn_text_keys(f"keys of {args.lora}", "kept", skipped)
        report = None
        if args.lora_cmd == "resize":
            updates, report = resize_lora(updates, args.rank, args.energy)
    if report is not None:
        _print_report(report)
    write_lora(updates, args.out, args.format)
    print(args.out)
    return 0


def _extract(args: argparse.Namespace) -> tuple[dict[str, LoRAUpdate], LowRankReport]:
    from pictor.checkpoint import CheckpointError, load_bundle, refuse_quantized
    from pictor.locate import resolve

    weights = []
    for flag, model in (("--base", args.base), ("--tuned", args.tuned)):
        ref = resolve(model)
        if ref.path is None:
            raise CheckpointError(
                f"{flag} '{model}' is a preset: an untrained architecture with random weights, not a model "
                "to extract from; pass a bundle folder or name"
            )
        refuse_quantized(ref.path, f"extracting a LoRA ({flag})")
        weights.append({k: v.to(args.device) for k, v in load_bundle(ref.path).transformer.items()})
    return extract_lora(weights[0], weights[1], args.rank, args.energy)


def _print_report(report: LowRankReport) -> None:
    print(report.summary(), file=sys.stderr)
    if report.not_carried:
        worst = max(report.not_carried, key=report.not_carried.__getitem__)
        print(
            f"warning: {len(report.not_carried)} changed tensors are not linear weights, which a LoRA cannot "
            f"carry (biases, norm scales); they keep the base's values (largest change "
            f"{report.not_carried[worst]:.3g} in {worst})",
            file=sys.stderr,
        )


def _merge(args: argparse.Namespace) -> int:
    from pictor.lora_merge import merge_loras

    out, left_out = merge_loras(
        args.model,
        args.lora,
        args.out,
        args.name,
        control=args.control,
        keep_defaults=args.keep_defaults,
    )
    _warn_text_keys("LoRA keys", "merged", left_out)
    print(out)
    return 0


def _warn_text_keys(what: str, done: str, keys: list[str]) -> None:
    if keys:
        print(
            f"warning: {len(keys)} {what} are for a text encoder and are not {done} (pictor applies LoRAs "
            f"to the transformer only): {', '.join(keys[:4])}" + (", ..." if len(keys) > 4 else ""),
            file=sys.stderr,
        )
