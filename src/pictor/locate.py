"""Where models live: the shipped default bundle, named presets, and local bundle folders.

Resolution order for a model reference (``--model`` / ``pictor.load``):
1. an existing folder path holding a bundle (an existing folder that is not one, named like the default,
   a named bundle or a preset and written without path syntax, means that model: `-o default` makes
   such folders);
2. ``default`` -> the bundle shipped inside the package (``pictor/weights/default``);
3. a bundle name under the models directory (``$PICTOR_MODELS``, else ``~/.pictor/models``);
4. a preset name -> an untrained model with that architecture.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pictor.checkpoint import CheckpointError, is_bundle, read_bundle_config
from pictor.presets import PRESETS

DEFAULT_MODEL = "default"
# The architecture used when no trained default bundle is installed.
FALLBACK_PRESET = "shapes-small"


@dataclass(frozen=True)
class ModelRef:
    kind: str  # "bundle" or "preset"
    name: str
    path: Path | None = None


def shipped_default_path() -> Path:
    return Path(str(resources.files("pictor"))) / "weights" / "default"


def models_dir() -> Path:
    return Path(os.environ.get("PICTOR_MODELS", Path.home() / ".pictor" / "models"))


def resolve(reference: str | os.PathLike[str] | None) -> ModelRef:
    ref = DEFAULT_MODEL if reference is None else str(reference)
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_dir() and is_bundle(path):
            return ModelRef("bundle", path.name, path)
        if _names_a_model(ref):
            # A bare name that is also some folder here (`-o default` makes one): the name is meant.
            return _by_name(ref)
        if path.suffix.lower() == ".safetensors":
            raise CheckpointError(
                f"{path}: a single weight file is not a model. For FLUX.1 files run "
                "`pictor convert flux --transformer FILE --ae AE_FILE --t5 DIR --clip DIR --out BUNDLE`."
            )
        read_bundle_config(path)  # raises with the reason
    return _by_name(ref)


def _names_a_model(ref: str) -> bool:
    """Whether `ref`, written without any path syntax, is the default, a named bundle or a preset."""
    if "/" in ref or os.sep in ref or ref.startswith((".", "~")):
        return False
    return ref == DEFAULT_MODEL or is_bundle(models_dir() / ref) or ref in PRESETS


def _by_name(ref: str) -> ModelRef:
    if ref == DEFAULT_MODEL:
        if is_bundle(shipped_default_path()):
            return ModelRef("bundle", DEFAULT_MODEL, shipped_default_path())
        return ModelRef("preset", FALLBACK_PRESET)
    named = models_dir() / ref
    if is_bundle(named):
        return ModelRef("bundle", ref, named)
    if ref in PRESETS:
        return ModelRef("preset", ref)
    raise CheckpointError(
        f"unknown model '{ref}': not a bundle folder, not a bundle in {models_dir()}, and not a preset "
        f"({', '.join(sorted(PRESETS))}). `pictor models` lists what is available."
    )


def list_bundles() -> list[tuple[str, Path]]:
    found = []
    if is_bundle(shipped_default_path()):
        found.append((DEFAULT_MODEL, shipped_default_path()))
    root = models_dir()
    if root.is_dir():
        found += [(p.name, p) for p in sorted(root.iterdir()) if p.is_dir() and is_bundle(p)]
    return found
