"""The LoRAs a request may choose (``pictor serve --lora-dir DIR``): checked at start, applied per run.

Every ``*.safetensors`` in the folder is read when the server starts and checked against the served model's
layers (any layout pictor reads: its own, diffusers/PEFT, kohya); one that does not fit is left out and
named (in the log and in ``GET /v1/loras``), the server still starts. ``POST /v1/loras/refresh`` reads the
folder again: new files are checked and offered, removed ones no longer offered, changed ones checked anew
(and, if the worker holds the old version, dropped from the model before its next run). A request names
LoRAs and scales (``"loras": [{"name": "style", "scale": 0.8}]``). The worker loads a LoRA the first time a
job asks for it and keeps it; before each sampler run exactly the chosen ones get their scales and every
other loaded one scale 0, which the LoRA layers skip, so a job without LoRAs draws the base model's picture
exactly. Jobs with different choices never share a run (their choice is part of the batching key), and each
image's record names its LoRAs with file hashes and scales, so ``pictor reproduce`` finds them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from pictor.checkpoint import CheckpointError
from pictor.lora_files import a1111_lora_hash, lora_file_hash
from pictor.lora_tools import finite_update, read_lora
from pictor.models.lora import remove_lora, set_lora_scale
from pictor.models.lora_formats import LoRAError
from pictor.pipeline import Pipeline
from pictor.serve.errors import APIError
from pictor.serve.generation_parts import LoraChoice

log = logging.getLogger("pictor.serve")
_CHOICES = TypeAdapter(Annotated[list[LoraChoice], Field(max_length=8)])


MAX_NAME = 200  # what a request's name may be (generation_parts.LoraChoice)


def _stat(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def _content(lora: LoraFile | None) -> tuple[Path, str] | None:
    return (lora.path, lora.sha256) if lora is not None else None


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
    stat: tuple[int, int, int]  # size, modification time (ns), inode when it was read: a refresh's shortcut


class LoraLibrary:
    def __init__(self, folder: Path | None = None, linears: dict[str, tuple[int, int]] | None = None) -> None:
        self.folder = folder
        self.files: dict[str, LoraFile] = {}
        self.unusable: dict[str, str] = {}  # file name -> why it was left out
        self._linears = linears or {}
        self._loaded: dict[str, dict[str, Any]] = {}  # name -> the pipeline's entry for it
        self._stale: set[str] = set()  # loaded, but their file changed or went: the worker drops them
        self._base: list[dict[str, Any]] | None = None  # LoRAs the pipeline came with, kept on
        # The worker thread applies LoRAs while requests choose them and a refresh rereads the folder.
        self._lock = threading.RLock()
        if folder is None:
            return
        if not folder.is_dir():
            raise ValueError(f"--lora-dir {folder}: no such folder; give the folder of the LoRA files")
        assert linears is not None
        self._scan()

    def _scan(self) -> None:
        """Read the folder and offer what it holds (under the lock: the reading itself is done outside it)."""
        with self._lock:
            known, reported = dict(self.files), dict(self.unusable)
        files, unusable = self._read_folder(known, reported)
        with self._lock:
            # A loaded LoRA whose file went or changed is taken out of the model before the next run.
            self._stale |= {
                name
                for name, old in self.files.items()
                if name in self._loaded and _content(files.get(name)) != _content(old)
            }
            self.files, self.unusable = files, unusable
        log.info("LoRAs offered: %s", ", ".join(files) or "none")

    def _read_folder(
        self, known: dict[str, LoraFile], reported: dict[str, str]
    ) -> tuple[dict[str, LoraFile], dict[str, str]]:
        """The folder's LoRAs and the files left out with why. A file known and untouched since (same size,
        modification time and inode) is not read again, so a refresh of a large folder costs little."""
        assert self.folder is not None
        files: dict[str, LoraFile] = {}
        unusable: dict[str, str] = {}
        for path in sorted(p for p in self.folder.iterdir() if p.suffix.lower() == ".safetensors"):
            old = known.get(path.stem)
            try:
                if old is not None and old.path == path.resolve() and old.stat == _stat(path):
                    files[path.stem] = old
                    continue
                files[path.stem] = self._check(path)
            except Exception as exc:  # any failure of one file leaves that file out, not the rest
                why = str(exc) if isinstance(exc, LoRAError | CheckpointError | OSError) else f"{exc!r}"
                unusable[path.name] = why
                if reported.get(path.name) != why:
                    log.info("LoRA %s left out: %s", path.name, why)  # `pictor serve` prints it too
        return files, unusable

    def _check(self, path: Path) -> LoraFile:
        updates, _text_keys = read_lora(path, self._linears)
        broken = next((u.source for u in updates.values() if not finite_update(u)), None)
        if broken is not None:
            raise LoRAError(f"{broken} holds NaN or infinite values; the file is broken")
        if len(path.stem) > MAX_NAME:
            raise LoRAError(f"its name is longer than {MAX_NAME} characters; rename the file")
        rank = max((u.rank for u in updates.values()), default=0)
        stat = _stat(path)
        return LoraFile(
            path.stem, path.resolve(), lora_file_hash(path), a1111_lora_hash(path), len(updates), rank, stat
        )

    def refresh(self) -> dict[str, Any]:
        """Read the folder again (``POST /v1/loras/refresh``); the new listing."""
        if self.folder is None:
            raise APIError(
                400,
                "this server was started without --lora-dir, so it has no LoRA folder to read again",
                code="invalid_parameters",
            )
        try:
            self._scan()
        except OSError as exc:  # the folder itself is gone or unreadable: keep offering what was there
            raise APIError(
                503,
                f"--lora-dir {self.folder} cannot be read: {exc.strerror or exc}; the LoRAs offered "
                "before stay offered",
                type="server_error",
                code="lora_dir_unreadable",
            ) from None
        return self.listing()

    def choose(self, choices: list[dict[str, Any]] | None) -> list[list[Any]] | None:
        """A request's ``loras`` as the job keeps them (``[[name, scale], ...]``), or a 400 saying why not."""
        if not choices:
            return None
        with self._lock:
            return self._choose(choices)

    def _choose(self, choices: list[dict[str, Any]]) -> list[list[Any]]:
        if not self.files:
            where = (
                "its LoRA folder holds no usable LoRA now (GET /v1/loras says why; add files and POST "
                "/v1/loras/refresh)"
                if self.folder is not None
                else "start it with --lora-dir DIR"
            )
            raise APIError(
                400,
                f"this server offers no LoRAs ({where}); omit loras",
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
        with self._lock:
            self._activate(pipe, chosen or [])

    def _activate(self, pipe: Pipeline, chosen: list[list[Any]]) -> None:
        if self._base is None:
            self._base = list(pipe.loras)
        for name in self._stale & set(self._loaded):  # an older version of a file the folder now holds
            remove_lora(pipe.transformer, self._loaded.pop(name)["name"])
        self._stale.clear()
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
                f"LoRA '{name}' is no longer offered by this server (its file left --lora-dir before a "
                f"refresh or a restart after the job was queued); it offers "
                f"{', '.join(sorted(self.files)) or 'none'}"
            )
        try:
            if lora_file_hash(lora.path) != lora.sha256:
                raise LoraUnavailable(
                    f"LoRA '{name}' ({lora.path}) changed since the server last read the folder; POST "
                    "/v1/loras/refresh (or restart the server) and submit the job again"
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
        with self._lock:
            return self._listing()

    def _listing(self) -> dict[str, Any]:
        return {
            "refreshable": self.folder is not None,
            "data": [
                {"name": f.name, "sha256": f.sha256, "hash": f.hash, "layers": f.layers, "rank": f.rank}
                for f in self.files.values()
            ],
            "unusable": [{"file": name, "reason": why} for name, why in self.unusable.items()],
        }
