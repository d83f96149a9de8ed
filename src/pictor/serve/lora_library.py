"""The LoRAs a request may choose (``pictor serve --lora-dir DIR``): checked at start, applied per run.

Every ``*.safetensors`` in the folder is read once when the server starts and checked against the served
model's layers (any layout pictor reads: its own, diffusers/PEFT, kohya); one that does not fit is left out
and named (in the log and in ``GET /v1/loras``), the server still starts. A request names LoRAs and scales
(``"loras": [{"name": "style", "scale": 0.8}]``). The worker loads a LoRA the first time a job asks for it
and keeps it; before each sampler run exactly the chosen ones get their scales and every other loaded one
scale 0, which the LoRA layers skip, so a job without LoRAs draws the base model's picture exactly. Jobs
with different choices never share a run (their choice is part of the batching key), and each image's
record names its LoRAs with file hashes and scales, so ``pictor reproduce`` finds them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from pictor.checkpoint import CheckpointError
from pictor.lora_files import a1111_lora_hash, lora_file_hash
from pictor.lora_tools import finite_update, read_lora
from pictor.models.lora import set_lora_scale
from pictor.models.lora_formats import LoRAError
from pictor.pipeline import Pipeline
from pictor.serve.api_models import LoraChoice
from pictor.serve.errors import APIError

log = logging.getLogger("pictor.serve")
_CHOICES = TypeAdapter(Annotated[list[LoraChoice], Field(max_length=8)])


MAX_NAME = 200  # what a request's name may be (api_models.LoraChoice)


class LoraUnavailable(Exception):
    """A chosen LoRA the server cannot apply now: the server's fault, not the request's."""


@dataclass(frozen=True)
class LoraFile:
    name: str  # the file's stem: what requests call it
    path: Path
    sha256: str
    hash: str  # A1111's short LoRA hash, as in the images' "Lora hashes"
    layers: int
    rank: int


class LoraLibrary:
    def __init__(self, folder: Path | None = None, linears: dict[str, tuple[int, int]] | None = None) -> None:
        self.folder = folder
        self.files: dict[str, LoraFile] = {}
        self.unusable: dict[str, str] = {}  # file name -> why it was left out
        self._loaded: dict[str, dict[str, Any]] = {}  # name -> the pipeline's entry for it
        self._base: list[dict[str, Any]] | None = None  # LoRAs the pipeline came with, kept on
        if folder is None:
            return
        if not folder.is_dir():
            raise ValueError(f"--lora-dir {folder}: no such folder; give the folder of the LoRA files")
        assert linears is not None
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() == ".safetensors"):
            try:
                updates, _text_keys = read_lora(path, linears)
                broken = next((u.source for u in updates.values() if not finite_update(u)), None)
                if broken is not None:
                    raise LoRAError(f"{broken} holds NaN or infinite values; the file is broken")
                if len(path.stem) > MAX_NAME:
                    raise LoRAError(f"its name is longer than {MAX_NAME} characters; rename the file")
            except (LoRAError, CheckpointError, OSError) as exc:
                self.unusable[path.name] = str(exc)
                log.info("LoRA %s left out: %s", path.name, exc)  # `pictor serve` prints it too
                continue
            rank = max((u.rank for u in updates.values()), default=0)
            self.files[path.stem] = LoraFile(
                path.stem, path.resolve(), lora_file_hash(path), a1111_lora_hash(path), len(updates), rank
            )
        log.info("LoRAs offered: %s", ", ".join(self.files) or "none")

    def choose(self, choices: list[dict[str, Any]] | None) -> list[list[Any]] | None:
        """A request's ``loras`` as the job keeps them (``[[name, scale], ...]``), or a 400 saying why not."""
        if not choices:
            return None
        if not self.files:
            raise APIError(
                400,
                "this server offers no LoRAs (start it with --lora-dir DIR); omit loras",
                param="loras",
                code="invalid_parameters",
            )
        chosen: list[list[Any]] = []
        for choice in choices:
            name = choice["name"]
            if name not in self.files:
                raise APIError(
                    400,
                    f"unknown LoRA '{name}'; this server offers "
                    f"{', '.join(sorted(self.files))} (GET /v1/loras)",
                    param="loras",
                    code="invalid_parameters",
                )
            if any(name == c[0] for c in chosen):
                raise APIError(400, f"LoRA '{name}' is named twice", param="loras", code="invalid_parameters")
            chosen.append([name, float(choice["scale"])])
        return chosen

    def activate(self, pipe: Pipeline, chosen: list[list[Any]] | None) -> None:
        """Exactly ``chosen`` at their scales for the next run; other loaded LoRAs at scale 0.

        Raises :class:`LoraUnavailable` when a chosen LoRA's file is gone, changed or broken since the server
        started, or (a job queued before a restart) is no longer offered.
        """
        if self._base is None:
            self._base = list(pipe.loras)
        chosen = chosen or []
        for name, scale in chosen:
            if name not in self._loaded:
                self._loaded[name] = self._load(pipe, name, scale)
        scales = {name: float(scale) for name, scale in chosen}
        for name, entry in self._loaded.items():
            set_lora_scale(pipe.transformer, entry["name"], scales.get(name, 0.0))
        # Records name each LoRA as requests do (the adapter's own name may be a cleaned-up one).
        pipe.loras = [*self._base, *({**self._loaded[n], "name": n, "scale": s} for n, s in scales.items())]

    def _load(self, pipe: Pipeline, name: str, scale: float) -> dict[str, Any]:
        lora = self.files.get(name)
        if lora is None:
            raise LoraUnavailable(
                f"LoRA '{name}' is not offered by this server now (the job was queued before a restart "
                f"without it); it offers {', '.join(sorted(self.files)) or 'none'}"
            )
        try:
            if lora_file_hash(lora.path) != lora.sha256:
                raise LoraUnavailable(
                    f"LoRA '{name}' ({lora.path}) changed since the server started; restart the server"
                )
            return pipe.add_lora(lora.path, scale)
        except OSError as exc:
            raise LoraUnavailable(
                f"LoRA '{name}' ({lora.path}) cannot be read: {exc.strerror or exc}"
            ) from None
        except (LoRAError, CheckpointError) as exc:
            raise LoraUnavailable(f"LoRA '{name}' cannot be applied: {exc}") from None

    def choose_text(self, text: str | None) -> list[list[Any]] | None:
        """``choose`` for an edit form's ``loras`` field: its JSON text, checked as the JSON body's is."""
        if text is None or not text.strip():
            return None
        try:
            choices = _CHOICES.validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            raise APIError(
                400,
                f'loras must be JSON like [{{"name": "style", "scale": 0.8}}] '
                f"({where + ': ' if where else ''}{first.get('msg', 'invalid')})",
                param="loras",
                code="invalid_parameters",
            ) from None
        return self.choose([c.model_dump() for c in choices])

    def listing(self) -> dict[str, Any]:
        return {
            "data": [
                {"name": f.name, "sha256": f.sha256, "hash": f.hash, "layers": f.layers, "rank": f.rank}
                for f in self.files.values()
            ],
            "unusable": [{"file": name, "reason": why} for name, why in self.unusable.items()],
        }
