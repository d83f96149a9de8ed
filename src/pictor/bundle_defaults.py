"""A bundle's generation defaults (size, steps, guidance, sampler, schedule): what `pictor generate`, the
server and `pictor eval` use when a request leaves them out. They live in config.json, outside the hashed
weights, so setting them (say, more steps once they are measured to score better) keeps the model's identity.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pictor.checkpoint import CONFIG_NAME, CheckpointError, is_bundle, read_bundle_config, write_json
from pictor.generation_settings import settings_problem
from pictor.models.autoencoder import AutoEncoderParams

SETTABLE = ("width", "height", "steps", "guidance", "sampler", "schedule")


def _pixel_multiple(config: dict[str, Any]) -> int:
    """Width and height must be multiples of the autoencoder's factor times the 2x2 patch (as generation
    checks them)."""
    return 2 * AutoEncoderParams.from_dict(config["autoencoder"]).downsample_factor


def _check(changes: dict[str, Any], multiple: int) -> None:
    unknown = sorted(set(changes) - set(SETTABLE))
    if unknown:
        raise CheckpointError(f"cannot set default(s) {unknown}; settable: {', '.join(SETTABLE)}")
    problem = settings_problem(multiple, **changes)
    if problem:
        raise CheckpointError(f"cannot store this default: {problem}")


def set_defaults(bundle: str | os.PathLike[str], **changes: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rewrite BUNDLE/config.json with `changes` applied to its defaults (atomically; weights untouched).

    Returns (before, after). With no changes nothing is written: it only reads the defaults.
    """
    folder = Path(bundle)
    if not is_bundle(folder):
        raise CheckpointError(f"{folder}: not a model bundle (no {CONFIG_NAME}); give a bundle folder")
    read_bundle_config(folder)  # a config that does not parse is refused here, before anything is written
    raw = json.loads((folder / CONFIG_NAME).read_text())
    before = dict(raw.get("defaults", {}))
    changes = {k: v for k, v in changes.items() if v is not None}
    _check(changes, _pixel_multiple(raw))
    after = {**before, **changes}
    if changes:
        write_json({**raw, "defaults": after}, folder / CONFIG_NAME)
    return before, after
