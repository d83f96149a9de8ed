"""spandrel 0.4.2's ESRGAN and Compact architectures: the reference pictor's upscalers are tested against.

spandrel (chaiNNer's model loader, which ComfyUI runs every upscale model through) reads the same files
pictor does, so its networks and its loaders (`ESRGANArch().load(state_dict)`, which also takes basicsr's and
BSRGAN's key names and converts them to the old `model.N` layout) are what "the same pixels" means.

It is installed without its dependencies, `python3 -m pip install --no-deps spandrel==0.4.2`, because it
declares torchvision, whose wheels here are CUDA builds that replace the CPU torch. Importing `spandrel`
itself runs its package `__init__`, which builds the registry of every architecture, and two of them (LaMa,
RestoreFormer) import torchvision. The two architectures used here need nothing of torchvision, so this module
puts a bare package object for `spandrel` into `sys.modules` (same search path, no `__init__` run) and imports
only `spandrel.architectures.ESRGAN` and `spandrel.architectures.Compact`.

When spandrel is missing, importing this module raises with the command to install it: the parity tests must
fail where the reference is absent, never skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

import torch

VERSION = "0.4.2"
INSTALL = f"python3 -m pip install --no-deps spandrel=={VERSION}"


def _bare_package() -> None:
    """`spandrel` in sys.modules as a package whose `__init__` never ran (its submodules import normally)."""
    if "spandrel" in sys.modules:
        return
    spec = importlib.util.find_spec("spandrel")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"spandrel {VERSION}, the reference for pictor's upscaler tests, is not installed; run "
            f"`{INSTALL}` (without its dependencies: its torchvision requirement would replace the CPU torch)"
        )
    package = types.ModuleType("spandrel")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    package.__package__ = "spandrel"
    package.__spec__ = spec
    sys.modules["spandrel"] = package


_bare_package()
_esrgan = importlib.import_module("spandrel.architectures.ESRGAN")
_compact = importlib.import_module("spandrel.architectures.Compact")

ESRGAN = _esrgan.ESRGAN  # the old-arch RRDBNet (`model.N` keys); its dense growth is fixed at 32
ESRGANArch = _esrgan.ESRGANArch
Compact = _compact.Compact  # SRVGGNetCompact
CompactArch = _compact.CompactArch


def load_esrgan(state_dict: dict[str, torch.Tensor]) -> Any:
    """spandrel's ImageModelDescriptor for an ESRGAN state dict in any layout it reads (old, new, BSRGAN)."""
    return ESRGANArch().load(dict(state_dict))


def load_compact(state_dict: dict[str, torch.Tensor]) -> Any:
    return CompactArch().load(dict(state_dict))
