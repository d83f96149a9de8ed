"""CLIP, T5 and FLUX.1's T5 + CLIP text encoders, loaded with transformers from local folders only (what
`save_pretrained()` writes); nothing here touches the network."""

from __future__ import annotations

from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pictor.models.text_encoder import (
    TextEmbeddings,
    TextEncoder,
    check_config_keys,
    check_max_length,
    masked_mean,
    model_folder_config,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.model")
# Reads a T5 GGUF file: (path, compute dtype, tokenizer folder or None) -> (T5EncoderModel, tokenizer). GGUF
# parsing lives above models (pictor.t5_gguf_files), which passes its loader in.
GGUFLoader = Callable[[str, torch.dtype, "str | PathLike[str] | None"], tuple[nn.Module, Any]]


def _dtype(kind: str, name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"text encoder '{kind}': dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def load_tokenizer(path: Path, what: str) -> Any:
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


def _spans(tokenizer: Any, prompts: list[str], max_length: int) -> list[list[tuple[int, int]]]:
    """Character offsets of the tokens `_tokenize` makes (special tokens and padding: (0, 0))."""
    try:
        batch = tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
    except NotImplementedError as exc:  # a slow (Python) tokenizer has no offsets
        raise ValueError(
            "prompt weights need a fast tokenizer (a tokenizer.json in the tokenizer folder): this one gives "
            f"no token offsets ({exc})"
        ) from exc
    return [
        [
            (int(s), int(e)) if not special else (0, 0)
            for (s, e), special in zip(offsets, specials, strict=True)
        ]
        for offsets, specials in zip(batch["offset_mapping"], batch["special_tokens_mask"], strict=True)
    ]


def _cut_off(tokenizer: Any, prompt: str, max_length: int) -> str:
    """What `_tokenize` truncates away: the tokens past max_length, less the closing special token."""
    ids = tokenizer(prompt, truncation=False, verbose=False)["input_ids"]  # no "sequence too long" notice
    if len(ids) <= max_length:
        return ""
    return str(tokenizer.decode(ids[max_length - 1 :], skip_special_tokens=True)).strip()


def _folders(path: str | PathLike[str], tokenizer_path: str | PathLike[str] | None) -> tuple[Path, Path]:
    # The tokenizer usually sits beside the weights; diffusers layouts keep it in a sibling folder.
    return Path(path), Path(path if tokenizer_path is None else tokenizer_path)


def _folder_config(
    kind: str, path: str, max_length: int, tokenizer_path: str | PathLike[str] | None, dtype: str
) -> dict[str, Any]:
    config: dict[str, Any] = {"kind": kind, "path": path, "max_length": max_length, "dtype": dtype}
    if tokenizer_path is not None:
        config["tokenizer_path"] = str(tokenizer_path)
    return config


# --- CLIP and T5 ----------------------------------------------------------------------------------------


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
        model_config = model_folder_config(folder, {"clip_text_model", "clip"}, "CLIP text encoder")
        text_config = model_config.get("text_config", model_config)  # a full CLIP folder nests it
        self.max_length = check_max_length(
            self.kind, max_length, text_config.get("max_position_embeddings", 77)
        )
        self.tokenizer = load_tokenizer(tok_folder, "CLIP")
        self.model = _load_model(CLIPTextModel, folder, _dtype(self.kind, dtype))
        self.context_dim = self.pooled_dim = int(self.model.config.hidden_size)

    def cut_off(self, prompt: str) -> str:
        return _cut_off(self.tokenizer, prompt, self.max_length)

    def token_spans(self, prompts: list[str]) -> list[list[tuple[int, int]]]:
        return _spans(self.tokenizer, prompts, self.max_length)

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
        check_config_keys(cls.kind, config, {"path"}, {"max_length", "tokenizer_path", "dtype"})
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
        load_gguf: GGUFLoader | None = None,
    ) -> None:
        from transformers import T5EncoderModel

        super().__init__()
        self._path, self._tokenizer_path, self._dtype = str(path), tokenizer_path, dtype
        self.mask_padding = bool(mask_padding)
        self.max_length = check_max_length(self.kind, max_length, None)  # relative positions: no limit
        # A file: FLUX.1's T5-XXL as ComfyUI-GGUF users have it (t5-v1_1-xxl-encoder-Q8_0.gguf).
        if Path(path).suffix.lower() == ".gguf" and not Path(path).is_file():
            raise FileNotFoundError(
                f"T5 text encoder file {path} does not exist (moved or renamed?): put the T5 encoder GGUF "
                "file's path in config.json's text_encoder.t5.path (or a save_pretrained() folder)"
            )
        if Path(path).is_file():
            if load_gguf is None:
                raise ValueError(
                    f"T5 text encoder {path} is a file: a T5 GGUF file is read through "
                    "pictor.t5_gguf_files.build_text_encoder (or give a save_pretrained() folder)"
                )
            self.model, self.tokenizer = load_gguf(str(path), _dtype(self.kind, dtype), tokenizer_path)
        else:
            folder, tok_folder = _folders(path, tokenizer_path)
            model_folder_config(folder, {"t5"}, "T5 text encoder")
            self.tokenizer = load_tokenizer(tok_folder, "T5")
            self.model = _load_model(T5EncoderModel, folder, _dtype(self.kind, dtype))
        self.context_dim = self.pooled_dim = int(self.model.config.d_model)

    def cut_off(self, prompt: str) -> str:
        return _cut_off(self.tokenizer, prompt, self.max_length)

    def token_spans(self, prompts: list[str]) -> list[list[tuple[int, int]]]:
        return _spans(self.tokenizer, prompts, self.max_length)

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        ids, mask = _tokenize(self.tokenizer, prompts, self.max_length, self._device())
        attention_mask = mask.long() if self.mask_padding else None
        tokens = self.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state.float()
        return TextEmbeddings(tokens=tokens, mask=mask, pooled=masked_mean(tokens, mask))

    def config(self) -> dict[str, Any]:
        config = _folder_config(self.kind, self._path, self.max_length, self._tokenizer_path, self._dtype)
        if self.mask_padding:
            config["mask_padding"] = True
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], load_gguf: GGUFLoader | None = None) -> T5TextEncoder:
        """``load_gguf``: how to read a ``path`` that is a GGUF file (see :data:`GGUFLoader`)."""
        check_config_keys(
            cls.kind, config, {"path"}, {"max_length", "tokenizer_path", "dtype", "mask_padding"}
        )
        return cls(
            path=config["path"],
            max_length=config.get("max_length", 512),
            tokenizer_path=config.get("tokenizer_path"),
            dtype=config.get("dtype", "float32"),
            mask_padding=config.get("mask_padding", False),
            load_gguf=load_gguf,
        )


# --- FLUX.1: T5 tokens + CLIP pooled -----------------------------------------------------------------------


class FluxTextEncoder(TextEncoder):
    """FLUX.1's conditioning: `txt` = T5 token states (with T5's mask), `y` = CLIP's pooled vector."""

    kind = "flux"

    def __init__(self, t5: T5TextEncoder, clip: CLIPTextEncoder) -> None:
        super().__init__()
        self.t5, self.clip = t5, clip
        self.context_dim, self.pooled_dim, self.max_length = t5.context_dim, clip.pooled_dim, t5.max_length

    def cut_off(self, prompt: str) -> str:
        # T5 carries the tokens; CLIP's 77 only bound the pooled vector (a summary), as in FLUX.1 itself.
        return self.t5.cut_off(prompt)

    def token_spans(self, prompts: list[str]) -> list[list[tuple[int, int]]]:
        return self.t5.token_spans(prompts)  # the tokens are T5's; CLIP's pooled vector is not weighted

    def _empty_tokens(self) -> Tensor:
        return self.t5._empty_tokens()  # T5's alone: CLIP's part of the empty prompt would go unused

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        t5 = self.t5._encode(prompts)
        clip = self.clip._encode(prompts)
        return TextEmbeddings(tokens=t5.tokens, mask=t5.mask, pooled=clip.pooled)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "t5": self.t5.config(), "clip": self.clip.config()}

    @classmethod
    def from_config(cls, config: dict[str, Any], load_gguf: GGUFLoader | None = None) -> FluxTextEncoder:
        """``load_gguf``: how to read a T5 ``path`` that is a GGUF file (see :data:`GGUFLoader`)."""
        check_config_keys(cls.kind, config, {"t5", "clip"}, set())
        parts: dict[str, dict[str, Any]] = {}
        for name in ("t5", "clip"):
            parts[name] = dict(config[name])
            if parts[name].setdefault("kind", name) != name:
                raise ValueError(f"text encoder 'flux': its '{name}' part has kind {parts[name]['kind']!r}")
        return cls(
            t5=T5TextEncoder.from_config(parts["t5"], load_gguf=load_gguf),
            clip=CLIPTextEncoder.from_config(parts["clip"]),
        )
