"""Model bundles and weight files: safetensors + JSON only, strict keys, hashes, atomic writes.

A bundle is a folder::

    config.json                   model / autoencoder / text-encoder configs, preset, defaults, hashes
    transformer.safetensors       Flux weights, FLUX.1 key names
    autoencoder.safetensors       AutoEncoder weights, LDM/FLUX key names

Nothing here ever unpickles: ``.ckpt``/``.pt``/``.bin`` files are refused before they are opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pictor import __version__
from pictor.models.weight_storage import format_names, quantize_structure, quantized_formats, quantized_kind

CONFIG_NAME = "config.json"
TRANSFORMER_FILE = "transformer.safetensors"
AUTOENCODER_FILE = "autoencoder.safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A weight file or bundle that cannot be used as it is; the message says why and what to do."""


class UnreadableFileError(CheckpointError):
    """A file cut short or corrupt (as a full disk or a killed copy leaves it), not merely a mismatch."""


def refuse_pickle(path: str | os.PathLike[str]) -> None:
    """Raise for pickle-based formats: loading them can run arbitrary code, so pictor never opens them."""
    suffix = Path(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: '{suffix}' files are Python pickles, which can run arbitrary code when loaded; pictor "
            "never unpickles. Convert it to safetensors with a tool you trust (e.g. load it in an isolated "
            "environment and call safetensors.torch.save_file), then pass the .safetensors file."
        )


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def short_hash(full: str) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's SHA-256."""
    return full[:10]


def read_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a .safetensors file, refusing pickles and naming the file in every error."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weight file")
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors file")
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # safetensors raises several types for truncated/corrupt headers
        raise UnreadableFileError(f"{path}: not a readable safetensors file ({exc})") from exc


class LazySafetensors(Mapping[str, torch.Tensor]):
    """A .safetensors file as a read-only mapping that reads each tensor when it is asked for, not before:
    resuming a large model tensor by tensor (FSDP cuts each to a shard at once) never holds the whole file in
    memory, and processes on one machine share the file's pages. Each access reads the tensor anew."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        refuse_pickle(self.path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such weight file")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self._keys = list(f.keys())
        except Exception as exc:  # as read_safetensors: several types for truncated/corrupt headers
            raise UnreadableFileError(f"{self.path}: not a readable safetensors file ({exc})") from exc

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return f.get_tensor(key)
        except Exception as exc:  # a file cut short after its header was read
            raise UnreadableFileError(f"{self.path}: cannot read tensor {key!r} ({exc})") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    refuse_pickle(path)
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it to read it back would
    race with threads that create files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def as_if_created(path: str | os.PathLike[str], directory: bool = False) -> None:
    """Give a temp file or folder the mode that open() / mkdir() would have given it: mkstemp and mkdtemp
    make them private (0600 / 0700), but weights and bundles are for whoever may read their folder."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A temp file beside ``path`` for the block to write: synced, given the umask's mode and renamed over
    ``path`` when the block ends, removed when it raises, so a reader sees the old file or the new one."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        as_if_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> str:
    """Write atomically (temp file + rename) and return the file's SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage and non-contiguous tensors; clone makes each tensor its own.
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with staged_file(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)
    return sha256_file(path)


def write_json(obj: Any, path: str | os.PathLike[str]) -> None:
    with staged_file(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _fsync(path: str | os.PathLike[str]) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def strip_prefixes(
    state_dict: Mapping[str, torch.Tensor], prefixes: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Remove the first prefix that every key carries (all keys must agree, so mixed files stay visible)."""
    keys = list(state_dict)
    for prefix in prefixes:
        if keys and all(k.startswith(prefix) for k in keys):
            return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _key_list(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Strict key and shape check with a message that names what is missing, unexpected or mis-shaped."""
    expected = module.state_dict()
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    wrong = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_key_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_key_list(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {'; '.join(wrong[:5])}")
    if problems:
        raise CheckpointError(
            f"{what}: the weights do not fit the configured model — "
            + " | ".join(problems)
            + ". Check that the config matches the weights (preset, depth, hidden size)."
        )


def load_into(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, dtype: torch.dtype | None = None
) -> nn.Module:
    """Strictly load weights into a module (which may live on the meta device) without copying twice.

    The module takes the file's dtypes unless ``dtype`` is given: training passes float32, because a bundle
    may store half-precision weights (`pictor convert dtype`) and AdamW on those would lose small updates.
    Layers whose weights the state dict holds in GGML blocks (``ggml_type`` keys) become
    :class:`~pictor.models.weight_storage.QuantizedLinear` first; they cannot be cast to ``dtype``.
    """
    formats = quantized_formats(state_dict)
    if formats and dtype is not None:
        kind, names = quantized_kind(formats), format_names(formats)
        kind = kind if names in kind else f"{kind} ({names})"  # the 4-bit kind names its formats itself
        raise CheckpointError(
            f"{what}: {len(formats)} layers hold {kind} weights, which cannot be trained; widen them first "
            "(`pictor convert dtype BUNDLE --dtype bf16 --out NEW`), or train a LoRA on them"
        )
    quantize_structure(module, formats)
    check_keys(module, state_dict, what)
    if dtype is not None:
        state_dict = cast_floats(state_dict, dtype)
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module


STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cast_floats(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors in ``dtype``; integer tensors (GGML blocks and their types) as they are."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


@dataclass
class BundleConfig:
    """Everything needed to rebuild a model bundle, stored as config.json."""

    name: str
    model: dict[str, Any]
    autoencoder: dict[str, Any]
    text_encoder: dict[str, Any]
    preset: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    trained: bool = True
    description: str = ""
    hashes: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    pictor_version: str = __version__
    # A FLUX.1 Kontext model: it reads a context image's tokens beside the noisy ones
    # (`pictor.context_images`). Not in the weights' keys (Kontext has FLUX.1 [dev]'s), so the config says it.
    kontext: bool = False
    # A FLUX.1 Canny or Depth [dev] model ("canny" / "depth"): what its control pictures are
    # (`pictor.control_images`). Its shapes say it reads one; only the config says which kind.
    control: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "preset": self.preset,
            "pictor_version": self.pictor_version,
            "trained": self.trained,
            "description": self.description,
            "model": self.model,
            "autoencoder": self.autoencoder,
            "text_encoder": self.text_encoder,
            "defaults": self.defaults,
            "hashes": self.hashes,
            "training": self.training,
            # Written only when set, so every other bundle's config.json stays as it was.
            **({"kontext": True} if self.kontext else {}),
            **({"control": self.control} if self.control else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> BundleConfig:
        for key in ("name", "model", "autoencoder", "text_encoder"):
            if key not in d:
                raise CheckpointError(f"{where}: missing '{key}' — not a pictor bundle config")
        if not isinstance(d.get("kontext", False), bool):
            raise CheckpointError(f"{where}: 'kontext' is {d['kontext']!r}; it must be true or false")
        if d.get("kontext") and isinstance(d["model"], dict) and not d["model"].get("guidance_embed"):
            raise CheckpointError(
                f"{where}: 'kontext' is true, but the model has no guidance embedding (FLUX.1 Kontext [dev] "
                "is guidance-distilled, like [dev]); set 'kontext' to false, or give a Kontext model"
            )
        control = d.get("control")
        if control is not None:
            if control not in ("canny", "depth"):
                raise CheckpointError(f'{where}: \'control\' is {control!r}; it must be "canny" or "depth"')
            model = d["model"]
            if isinstance(model, dict) and model.get("in_channels") != 2 * model.get("out_channels", 0):
                raise CheckpointError(
                    f"{where}: 'control' is {control!r}, but the model reads {model.get('in_channels')} "
                    f"channels a token and writes {model.get('out_channels')}: a FLUX.1 Canny or Depth "
                    "model reads twice what it writes (the noise and the control picture); drop 'control'"
                )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Bundle:
    config: BundleConfig
    transformer: dict[str, torch.Tensor]
    autoencoder: dict[str, torch.Tensor]
    path: Path | None = None


def is_bundle(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def refuse_quantized(bundle: str | os.PathLike[str], doing: str) -> None:
    """Refuse a bundle whose transformer layers are GGML blocks (a GGUF import, `convert dtype q4_0`) or
    bitsandbytes 4-bit rows (an NF4 import) for work on its weights' values (merging, extraction): only the
    small ``ggml_type`` tensors are read, before anything is computed."""
    path = Path(bundle) / TRANSFORMER_FILE
    if not path.is_file():
        return  # the caller's own checks name a missing file
    with safe_open(str(path), framework="pt") as f:
        formats = quantized_formats({k: f.get_tensor(k) for k in f.keys() if k.endswith(".ggml_type")})  # noqa: SIM118
    if formats:
        raise CheckpointError(
            f"{bundle}: {len(formats)} transformer layers are {quantized_kind(formats)}; {doing} needs dense "
            "weights. Widen the "
            f"bundle first (`pictor convert dtype {bundle} --dtype bf16 --out WIDE`) and use that"
        )


def read_bundle_config(path: str | os.PathLike[str]) -> BundleConfig:
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if path.is_file():
        refuse_pickle(path)  # a .ckpt/.pt given as a model: say why it is refused, not only "no config"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{path}: not a pictor model bundle (no {CONFIG_NAME}). Give a bundle folder, a preset name "
            "(see `pictor models`), or convert FLUX.1 files with `pictor convert`."
        )
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({exc})") from exc
    return BundleConfig.from_dict(raw, where=str(cfg_path))


def read_bundle_file(
    path: Path, fname: str, config: BundleConfig, verify: bool = True, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """One weight file of a bundle; with ``verify`` its SHA-256 must match the hash in config.json."""
    fpath = path / fname
    if not fpath.is_file():
        raise CheckpointError(f"{path}: bundle is missing {fname}")
    if verify and fname in config.hashes:
        actual = sha256_file(fpath)
        if actual != config.hashes[fname]:
            raise CheckpointError(
                f"{fpath}: SHA-256 {actual[:12]}… does not match config.json "
                f"({config.hashes[fname][:12]}…); the file is corrupt or was replaced. "
                "Restore it or re-save the bundle."
            )
    return read_safetensors(fpath, device=device)


def load_bundle(path: str | os.PathLike[str], verify: bool = True, device: str = "cpu") -> Bundle:
    """Read a bundle; with ``verify`` the files' SHA-256 must match the hashes in config.json."""
    path = Path(path)
    config = read_bundle_config(path)
    transformer = read_bundle_file(path, TRANSFORMER_FILE, config, verify, device)
    autoencoder = read_bundle_file(path, AUTOENCODER_FILE, config, verify, device)
    return Bundle(config, transformer, autoencoder, path)


def save_bundle(
    path: str | os.PathLike[str],
    config: BundleConfig,
    transformer: Mapping[str, torch.Tensor],
    autoencoder: Mapping[str, torch.Tensor],
) -> BundleConfig:
    """Write a bundle atomically: a reader sees the old bundle or the new one, never half of either."""
    with staged_dir(Path(path)) as tmp:
        hashes = {
            TRANSFORMER_FILE: write_safetensors(transformer, tmp / TRANSFORMER_FILE, {"format": "pt"}),
            AUTOENCODER_FILE: write_safetensors(autoencoder, tmp / AUTOENCODER_FILE, {"format": "pt"}),
        }
        config = BundleConfig(**{**config.__dict__, "hashes": hashes})
        write_json(config.to_dict(), tmp / CONFIG_NAME)
    return config


@contextmanager
def staged_dir(path: Path) -> Iterator[Path]:
    """A temp folder beside ``path`` to assemble a bundle in: moved into place when the block ends, removed
    when it raises, so a reader sees the old folder or the new one, never half of either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    as_if_created(tmp, directory=True)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an existing one is moved aside first, then removed."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def model_hash(config: BundleConfig) -> str | None:
    """The bundle's identity: the SHA-256 of its transformer weights (what A1111 calls the model hash)."""
    return config.hashes.get(TRANSFORMER_FILE)


def state_dict_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: an identity for weights that live in no file."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
