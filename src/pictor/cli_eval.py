"""`pictor eval shapes | distribution | clip-score`: prompt adherence on the shapes world, distribution
metrics between two image folders, and CLIP scores: parser and run. The numbers are
:mod:`pictor.eval`'s; here the flags are checked and the reports printed."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pictor.cli_conditioning_options import add_layout_adapter, add_reference_adapter
from pictor.cli_options import add_cache_threshold, add_lora, add_model, add_sampler
from pictor.cli_output import progress_bar
from pictor.cli_pipeline import load_pipeline


def add_eval_parser(sub: Any) -> None:
    """`pictor eval` and its three suites."""
    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="suite", required=True)
    es = esub.add_parser("shapes", help="exact prompt adherence on the shapes world (SHAPES.md)")
    add_model(es)
    add_lora(es)
    es.add_argument("--prompts", default=None, help="JSONL benchmark file (default: packaged shapes-dev)")
    es.add_argument("--images-per-prompt", "-k", type=int, default=4)
    es.add_argument("--seed", type=int, default=0)
    es.add_argument("--steps", type=int, default=None)
    es.add_argument("--guidance", type=float, default=None)
    add_sampler(es)
    add_cache_threshold(es)
    es.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    es.add_argument("--out", default=None, help="report.json (a contact sheet .png is written beside it)")
    es.add_argument("--ground-truth", action="store_true", help="score renders of the specs themselves")
    es.add_argument(
        "--through-autoencoder",
        action="store_true",
        help="with --ground-truth: score the renders after an encode/decode by the model's autoencoder",
    )
    es.add_argument(
        "--save-images",
        default=None,
        metavar="DIR",
        help="also write every image to DIR (new or image-free), e.g. for `pictor eval distribution`",
    )
    es.add_argument(
        "--layouts",
        action="store_true",
        help="condition each image on the boxes of a ground-truth scene of its prompt (needs a layout "
        "adapter); the report adds the fraction of boxes that hold their object",
    )
    add_layout_adapter(es)
    es.add_argument(
        "--references",
        action="store_true",
        help="give each image the ground-truth render of its prompt that --ground-truth would score as "
        "its reference picture (needs a reference adapter)",
    )
    es.add_argument(
        "--empty-prompts",
        action="store_true",
        help='generate from the prompt "" (the specs still score the images): with --references, what '
        "the pictures alone carry",
    )
    add_reference_adapter(es)

    ed = esub.add_parser(
        "distribution",
        help="FD, KID, precision and recall (and CMMD with CLIP features) between two image folders "
        "(generated vs real)",
    )
    ed.add_argument("real", help="folder of reference images (searched recursively)")
    ed.add_argument("fake", help="folder of generated images")
    ed.add_argument(
        "--features",
        default="shapes",
        help="shapes (no weights; the shapes world), clip:PATH or dinov2:PATH (local model folder)",
    )
    ed.add_argument("--device", default="cpu", help="where the feature model runs (cpu, cuda, ...)")
    ed.add_argument("--batch-size", type=int, default=32)
    ed.add_argument("--kid-subsets", type=int, default=100)
    ed.add_argument("--kid-subset-size", type=int, default=1000)
    ed.add_argument("--nearest-k", type=int, default=3, help="k of the precision/recall manifolds")
    ed.add_argument("--seed", type=int, default=0, help="seed of the KID subsets")
    ed.add_argument("--out", default=None, help="report.json")

    ec = esub.add_parser(
        "clip-score",
        help="CLIP score of each image against the prompt it was made from (its record, A1111 text or "
        "caption)",
    )
    ec.add_argument("folder", help="folder of images (searched recursively)")
    ec.add_argument("--clip", required=True, metavar="DIR", help="a local CLIPModel folder (safetensors)")
    ec.add_argument("--device", default="cpu", help="where CLIP runs (cpu, cuda, ...)")
    ec.add_argument("--batch-size", type=int, default=32)
    ec.add_argument("--out", default=None, help="report.json (the mean, and each image's score)")


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
        pipe = load_pipeline(args)
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
        progress=progress_bar("prompts"),
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
        progress=progress_bar,
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
    if "cmmd" in report:
        print(f"CMMD       {report['cmmd']:.4f}")
    for note in report["notes"]:
        print(f"note: {note}")
    if args.out:
        print(f"report: {args.out}")
    return 0


def _eval_clip_score(args: argparse.Namespace) -> int:
    from pictor.eval.clip_score import run_clip_score

    report = run_clip_score(
        args.folder, args.clip, args.device, args.batch_size, args.out, progress=progress_bar("clip score")
    )
    for entry in report["skipped"]:
        print(f"skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
    print(f"model       {report['model']}")
    print(f"images      {report['images']}")
    print(f"CLIP score  {report['clip_score']:.3f} (std {report['std']:.3f})")
    if args.out:
        print(f"report: {args.out}")
    return 0
