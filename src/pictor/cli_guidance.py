"""The guidance-method options of `pictor generate`, `edit` and `grid` (`pictor.guidance_methods`), and the
request field they make."""

from __future__ import annotations

import argparse
from typing import Any

from pictor.guidance_methods import METHODS, GuidanceMethod, GuidanceMethodError

# GuidanceMethod field -> the option that sets it (argparse dest, flag)
OPTIONS = {
    "method": ("guidance_method", "--guidance-method"),
    "rescale": ("guidance_rescale", "--guidance-rescale"),
    "start": ("guidance_interval", "--guidance-interval"),
    "stop": ("guidance_interval", "--guidance-interval"),
    "eta": ("apg_eta", "--apg-eta"),
    "norm_threshold": ("apg_norm_threshold", "--apg-norm-threshold"),
    "momentum": ("apg_momentum", "--apg-momentum"),
    "zero_init_steps": ("zero_init_steps", "--zero-init-steps"),
}
DESTS = tuple(dict.fromkeys(dest for dest, _ in OPTIONS.values()))


def add_guidance_options(p: argparse.ArgumentParser) -> None:
    d = GuidanceMethod()
    p.add_argument(
        "--guidance-method",
        default=None,
        choices=METHODS,
        help="how classifier-free guidance combines the prompt's and the negative prompt's predictions: cfg "
        "(default), apg (Adaptive Projected Guidance), cfg-zero-star (CFG-Zero*), tcfg (Tangential CFG); "
        "diffusers' guiders' formulas. Models with real CFG only",
    )
    p.add_argument(
        "--guidance-rescale",
        type=float,
        default=None,
        metavar="R",
        help=f"CFG rescale (0-1, any method): pull the guided prediction's spread toward the prompt's, "
        f"against overexposure at high guidance (default {d.rescale:g}; 0.7 is the paper's)",
    )
    p.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("START", "STOP"),
        help="guide only on the steps from START to STOP (shares of the steps, 0-1); elsewhere the "
        "negative prompt's pass is not run at all (e.g. 0 0.7: CFG off in the last 30%%, faster)",
    )
    p.add_argument(
        "--apg-eta",
        type=float,
        default=None,
        metavar="E",
        help=f"with apg: how much of the guidance parallel to the prediction stays, 0-1 (default {d.eta:g}, "
        "the paper's; 1 keeps it, as diffusers' default)",
    )
    p.add_argument(
        "--apg-norm-threshold",
        type=float,
        default=None,
        metavar="X",
        help=f"with apg: clip the guidance's L2 norm per image to X; 0 off (default {d.norm_threshold:g}, "
        "diffusers')",
    )
    p.add_argument(
        "--apg-momentum",
        type=float,
        default=None,
        metavar="M",
        help=f"with apg: average the guidance over the steps with momentum M (-1 < M < 1; the paper uses "
        f"negative values, e.g. -0.5; default {d.momentum:g}, off)",
    )
    p.add_argument(
        "--zero-init-steps",
        type=int,
        default=None,
        metavar="N",
        help=f"with cfg-zero-star: the first N steps predict zero velocity (default {d.zero_init_steps})",
    )


def guidance_method_arg(args: argparse.Namespace) -> GuidanceMethod | None:
    """The request's guidance method from the options (None: none given); errors name the option."""
    given = {dest: getattr(args, dest, None) for dest in DESTS}
    if all(v is None for v in given.values()):
        return None
    method = given["guidance_method"] or "cfg"
    axis = getattr(args, "guidance_method_axis", False)  # `pictor grid`: the axis sets each cell's method
    for dest, flag, wanted in (
        ("apg_eta", "--apg-eta", "apg"),
        ("apg_norm_threshold", "--apg-norm-threshold", "apg"),
        ("apg_momentum", "--apg-momentum", "apg"),
        ("zero_init_steps", "--zero-init-steps", "cfg-zero-star"),
    ):
        if given[dest] is not None and method != wanted and not axis:
            raise ValueError(f"{flag} is a setting of --guidance-method {wanted}; add that or drop {flag}")
    values: dict[str, Any] = {"method": method}
    if given["guidance_rescale"] is not None:
        values["rescale"] = given["guidance_rescale"]
    if given["guidance_interval"] is not None:
        values["start"], values["stop"] = given["guidance_interval"]
    for field, dest in (
        ("eta", "apg_eta"),
        ("norm_threshold", "apg_norm_threshold"),
        ("momentum", "apg_momentum"),
        ("zero_init_steps", "zero_init_steps"),
    ):
        if given[dest] is not None:
            values[field] = given[dest]
    try:
        return GuidanceMethod(**values)
    except GuidanceMethodError as exc:
        raise ValueError(f"{OPTIONS[exc.field][1]}: {exc}") from None
