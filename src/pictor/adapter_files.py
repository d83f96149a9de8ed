"""Adapter files: the weights of a module that works beside a model (a layout or a reference adapter) as a
``.safetensors`` whose header names its kind (``format``) and its params (JSON under ``KIND_params``), so a
file of another kind, or weights that do not fit the params, are refused with the reason. No pickles.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from pictor.checkpoint import (
    CheckpointError,
    check_keys,
    read_safetensors,
    read_safetensors_metadata,
    sha256_file,
    write_safetensors,
)
from pictor.notices import PictorWarning

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class AdapterKind(Generic[M]):
    """One kind of adapter file: its name ("layout"), how to build the module from its params dict, and
    the error its problems raise."""

    name: str
    build: Callable[[dict[str, Any]], M]
    error: type[Exception]

    @property
    def format(self) -> str:
        return f"pictor-{self.name}"

    @property
    def params_key(self) -> str:
        return f"{self.name}_params"

    def save(
        self,
        module: nn.Module,
        params: Mapping[str, Any],
        path: str | os.PathLike[str],
        metadata: Mapping[str, str],
    ) -> str:
        """Write the weights (the module or an EMA copy of it) with their params; returns the SHA-256."""
        path = Path(path)
        if path.suffix.lower() != ".safetensors":
            raise self.error(f"{path}: {self.name} adapters are written as .safetensors")
        header = {"format": self.format, self.params_key: json.dumps(dict(params)), **dict(metadata)}
        return write_safetensors({k: v.detach() for k, v in module.state_dict().items()}, path, header)

    def load(self, path: str | os.PathLike[str]) -> tuple[M, dict[str, str]]:
        """(module in float32, eval mode, frozen; header) from a file of this kind."""
        path = Path(path)
        try:
            tensors = read_safetensors(path)
            header = read_safetensors_metadata(path)
        except CheckpointError as exc:
            raise self.error(str(exc)) from exc
        if header.get("format") != self.format:
            raise self.error(
                f"{path}: not a pictor {self.name} adapter (header format {header.get('format')!r}); train "
                f"one with `pictor train {self.name} --base MODEL --out DIR`"
            )
        try:
            params = json.loads(header[self.params_key])
            with torch.device("meta"):
                module = self.build(params)
        except (KeyError, ValueError, TypeError) as exc:
            raise self.error(f"{path}: unreadable {self.params_key} in the header ({exc})") from exc
        try:
            check_keys(module, tensors, str(path))
            module.load_state_dict({k: v.float() for k, v in tensors.items()}, assign=True)
        except (CheckpointError, RuntimeError) as exc:
            raise self.error(
                f"{path}: weights do not fit the {self.name} adapter its header describes ({exc})"
            ) from exc
        return module.eval().requires_grad_(False), header

    def opened(
        self, path: str | os.PathLike[str], header: Mapping[str, str], model_hash: str
    ) -> dict[str, Any]:
        """A loaded adapter's entry for the records; one trained on another model (same shapes, or it
        would not have loaded) gets a warning."""
        base = header.get("base_model_hash", "")
        if base and model_hash and base != model_hash:
            warnings.warn(
                f"{path}: this {self.name} adapter was trained on model {header.get('base_model', '?')} "
                f"(hash {base[:10]}), not on this one ({model_hash[:10]}); it may follow {self.name}s poorly",
                PictorWarning,
                stacklevel=4,
            )
        return {"path": str(Path(path).resolve()), "sha256": sha256_file(path)}
