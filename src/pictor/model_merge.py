"""Merge model bundles of one architecture (A1111's checkpoint merger, kohya's model-merging scripts):

- ``weighted``:       ``(1 - alpha) * A + alpha * B``  (alpha 0 gives A, 1 gives B);
- ``add-difference``: ``A + alpha * (B - C)``  (moves A by what a fine-tune C -> B learned).

Transformer weights are merged tensor by tensor in float32, each input read lazily from its file (verified
against its hash first), and written in A's stored dtype (an FP8 or fp16 result past the dtype's range is
refused by name). The autoencoder, text encoder, defaults and the layout/reference adapters are A's; the
training record names every input (name, hash, path) with the method and alpha.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pictor.bundle_folders import check_bundle_out, copy_adapters, copy_autoencoder
from pictor.checkpoint import (
    AUTOENCODER_FILE,
    CONFIG_NAME,
    TRANSFORMER_FILE,
    BundleConfig,
    CheckpointError,
    LazySafetensors,
    model_hash,
    read_bundle_config,
    refuse_quantized,
    sha256_file,
    staged_dir,
    write_json,
    write_safetensors,
)
from pictor.locate import resolve
from pictor.models.weight_storage import fp8_problem, is_fp8

METHODS = ("weighted", "add-difference")


def _bundle(model: str | os.PathLike[str], flag: str) -> tuple[Path, BundleConfig]:
    ref = resolve(model)
    if ref.path is None:
        raise CheckpointError(
            f"{flag} '{model}' is a preset: an untrained architecture; merge trained bundles"
        )
    config = read_bundle_config(ref.path)
    refuse_quantized(ref.path, f"blending it (model {flag})")
    return ref.path, config


def _same_architecture(a: BundleConfig, other: BundleConfig, flag: str) -> None:
    for part in ("model", "autoencoder"):
        mine, theirs = getattr(a, part), getattr(other, part)
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            key = diff[0]
            raise CheckpointError(
                f"{flag} {other.name} is another architecture than {a.name}: {part} {key} is "
                f"{theirs.get(key)!r}, not {mine.get(key)!r}; only models of one architecture merge"
            )
    if a.control != other.control:  # a Canny model and a Depth one read different pictures
        raise CheckpointError(
            f"{flag} {other.name} reads {other.control or 'no'} control pictures, {a.name} reads "
            f"{a.control or 'none'}; only models of one kind of control merge"
        )


def _weights(path: Path, config: BundleConfig) -> Mapping[str, torch.Tensor]:
    """The transformer file, checked against its hash, read tensor by tensor (never whole)."""
    fpath = path / TRANSFORMER_FILE
    if not fpath.is_file():
        raise CheckpointError(f"{path}: bundle is missing {TRANSFORMER_FILE}")
    want = config.hashes.get(TRANSFORMER_FILE)
    if want and sha256_file(fpath) != want:
        raise CheckpointError(f"{fpath}: its SHA-256 is not the one config.json names; the file is damaged")
    return LazySafetensors(fpath)


def _headers(path: Path) -> dict[str, tuple[list[int], str]]:
    """Each tensor's shape and dtype, from the file's header alone."""
    with safe_open(str(path), framework="pt") as f:
        return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118


def _merged(
    key: str, tensors: list[torch.Tensor], method: str, alpha: float, names: list[str]
) -> torch.Tensor:
    a = tensors[0]
    if not a.is_floating_point():
        if any(not torch.equal(a, t) for t in tensors[1:]):
            raise CheckpointError(f"{key}: integer tensors differ between the models and cannot be blended")
        return a
    if method == "weighted" and alpha in (0.0, 1.0):  # exactly one model's tensor (-0.0 stays -0.0)
        return tensors[int(alpha)].to(a.dtype)
    x = [t.float() for t in tensors]
    for name, t in zip(names, x, strict=True):
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"model {name}: {key} holds NaN or infinite values; that model is broken")
    out = (1 - alpha) * x[0] + alpha * x[1] if method == "weighted" else x[0] + alpha * (x[1] - x[2])
    problem = fp8_problem(key, out) if is_fp8(a) else None
    merged = out.to(a.dtype)
    if problem or not bool(torch.isfinite(merged.float()).all()):
        dtype = str(a.dtype).removeprefix("torch.")
        fix = (
            f"alpha {alpha:g} is far too large"
            if a.dtype in (torch.float32, torch.bfloat16)
            else "merge a bf16 or fp32 copy of model A (`pictor convert dtype`)"
        )
        raise CheckpointError(
            f"{key}: the merged weight does not fit {dtype} ({problem or 'it overflows'}); {fix}"
        )
    return merged


def merge_models(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    out: str | os.PathLike[str],
    alpha: float,
    method: str = "weighted",
    c: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> Path:
    """Write the merge of bundles ``a`` and ``b`` (and ``c`` for add-difference) to the bundle ``out``."""
    if method not in METHODS:
        raise CheckpointError(f"merge method {method!r}: choose one of {', '.join(METHODS)}")
    if not math.isfinite(alpha):
        raise CheckpointError(f"--alpha must be a finite number, got {alpha}")
    if (method == "add-difference") != (c is not None):
        raise CheckpointError(
            "add-difference needs a third model (--c C: A + alpha * (B - C)); weighted takes two"
            if c is None
            else "--c is for add-difference only; weighted blends A and B"
        )
    inputs = [_bundle(m, flag) for m, flag in ((a, "A"), (b, "B"), (c, "--c")) if m is not None]
    (path_a, config_a), others = inputs[0], inputs[1:]
    for (_, config), flag in zip(others, ("B", "--c"), strict=False):
        _same_architecture(config_a, config, flag)
    out = Path(out)
    check_bundle_out(out)
    if not (path_a / AUTOENCODER_FILE).is_file():
        raise CheckpointError(f"{path_a}: bundle is missing {AUTOENCODER_FILE} (the merge takes model A's)")
    weights = [_weights(path, config) for path, config in inputs]
    shapes = [{k: shape for k, (shape, _) in _headers(path / TRANSFORMER_FILE).items()} for path, _ in inputs]
    keys = list(weights[0])
    for (path, _), theirs, flag in zip(others, shapes[1:], ("B", "--c"), strict=False):
        if set(theirs) != set(keys):
            odd = sorted(set(theirs) ^ set(keys))
            raise CheckpointError(f"{path}: its transformer keys differ from A's ({', '.join(odd[:4])})")
        key = next((k for k in keys if theirs[k] != shapes[0][k]), None)
        if key is not None:
            raise CheckpointError(
                f"model {flag} ({path}): {key} is {theirs[key]}, in model A {shapes[0][key]}; only models of "
                "one architecture merge"
            )
    names = [config.name for _, config in inputs]
    with staged_dir(out) as tmp:
        sd = {key: _merged(key, [w[key] for w in weights], method, alpha, names) for key in keys}
        hashes = {TRANSFORMER_FILE: write_safetensors(sd, tmp / TRANSFORMER_FILE, {"format": "pt"})}
        del sd
        hashes[AUTOENCODER_FILE] = copy_autoencoder(path_a, tmp, config_a)
        copy_adapters(path_a, tmp)  # A's adapters go along (they will say they were trained on A)
        default_name = "-".join([*names[:2], *(f"minus-{n}" for n in names[2:]), method, f"{alpha:g}"])
        formula = (
            f"{1 - alpha:g} * {names[0]} + {alpha:g} * {names[1]}"
            if method == "weighted"
            else f"{names[0]} + {alpha:g} * ({names[1]} - {names[2]})"
        )
        models: list[dict[str, Any]] = [
            {"name": config.name, "hash": model_hash(config), "path": str(path.resolve())}
            for path, config in inputs
        ]
        merged = BundleConfig(
            **{
                **config_a.__dict__,
                "name": name or default_name,
                "description": f"merged: {formula}",
                "hashes": hashes,
                "training": {
                    "stage": "model-merge",
                    "method": method,
                    "alpha": alpha,
                    "models": models,
                    "base_training": config_a.training,  # model A's own history
                },
            }
        )
        write_json(merged.to_dict(), tmp / CONFIG_NAME)
    return out
