"""`pictor merge A B [--c C] --alpha X [--method weighted|add-difference] --out BUNDLE`: parser and run."""

from __future__ import annotations

import argparse
from typing import Any


def add_merge_parser(sub: Any) -> None:
    m = sub.add_parser(
        "merge",
        help="blend two models of one architecture, or add what a fine-tune learned to another model",
        description="weighted: (1 - alpha) * A + alpha * B; add-difference: A + alpha * (B - C). "
        "The autoencoder, text encoder, defaults and adapters are A's.",
    )
    m.add_argument("a", help="model A (bundle folder or name); the result takes its dtype and settings")
    m.add_argument("b", help="model B")
    m.add_argument(
        "--c", default=None, help="model C, for add-difference (B - C is what a fine-tune learned)"
    )
    m.add_argument("--alpha", type=float, required=True, help="the weight of B (weighted) or of B - C")
    m.add_argument("--method", choices=("weighted", "add-difference"), default="weighted")
    m.add_argument("--name", default=None, help="the new bundle's name (default: from the inputs)")
    m.add_argument("--out", required=True, help="the new bundle folder")


def cmd_merge(args: argparse.Namespace) -> int:
    from pictor.model_merge import merge_models

    print(merge_models(args.a, args.b, args.out, args.alpha, args.method, args.c, args.name))
    return 0
