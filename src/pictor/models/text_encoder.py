"""The text encoder interface: prompts -> token states, their mask, and one pooled vector per prompt.

:class:`TextEncoder` is what the pipeline and the trainers hold; the kinds (packaged MiniLM, CLIP, T5, FLUX.1)
live in :mod:`pictor.models.minilm` and :mod:`pictor.models.text_folders`, and :mod:`pictor.models.text`
builds one from a config. The helpers here are the checks every kind shares.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pictor.models.offload import bring_in


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
        prompts = check_prompts(prompts)
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

    def encode_weighted(self, prompts: Sequence[Sequence[tuple[str, float]]]) -> TextEmbeddings:
        """Prompts given as pieces with weights (`pictor.prompt_weights`): the pieces' texts joined are
        encoded as any prompt, then each token's state is moved from the empty prompt's state at its place
        by its piece's weight, ``empty + w * (state - empty)``, as ComfyUI weighs prompts (so a weight of 0
        says nothing there, and 1 leaves the state as it is). Special tokens, padding and the pooled vector
        are not weighted. Prompts whose weights are all 1 give `encode`'s result exactly. A token takes the
        weight of its first visible character: a piece inside one token (``photo(graph:2)``, one token
        "photograph") weighs it only if the token starts in it."""
        texts = ["".join(text for text, _ in pieces) for pieces in prompts]
        emb = self.encode(texts)
        if all(w == 1.0 for pieces in prompts for _, w in pieces):
            return emb
        weights = torch.ones(emb.mask.shape, dtype=torch.float32)
        for b, (text, pieces, spans) in enumerate(zip(texts, prompts, self.token_spans(texts), strict=True)):
            at_char = [w for piece, w in pieces for _ in piece]  # each character's weight
            for i, (start, end) in enumerate(spans):
                # a token's weight is that of its first visible character (a token may take the space
                # before its word, which belongs to the piece before); special tokens span nothing
                chars = [c for c in range(start, min(end, len(text))) if not text[c].isspace()]
                if chars:
                    weights[b, i] = at_char[chars[0]]
        with torch.no_grad():
            empty = self._empty_tokens()
            w = weights.to(emb.tokens.device, emb.tokens.dtype).unsqueeze(-1)
            # weight 1 keeps a state bit for bit (empty + (state - empty) is not always state in floats)
            tokens = torch.where(w == 1.0, emb.tokens, empty + w * (emb.tokens - empty))
        return TextEmbeddings(tokens=tokens, mask=emb.mask, pooled=emb.pooled)

    def _empty_tokens(self) -> Tensor:
        """The empty prompt's token states [1, L, D], which weighed states move from: encoded once per device
        (a FLUX.1 T5 pass is not small), then kept."""
        cache: dict[str, Tensor] = self.__dict__.setdefault("_empty_cache", {})
        key = str(self._device())
        if key not in cache:
            cache[key] = self.encode([""]).tokens
        return cache[key]

    def token_spans(self, prompts: list[str]) -> list[list[tuple[int, int]]]:
        """Each prompt's tokens as `encode` makes them (max_length of them), as (start, end) character
        offsets into the prompt; special tokens and padding span nothing (start == end). What
        `encode_weighted` needs; a kind without it cannot weigh prompts."""
        raise ValueError(f"text encoder '{self.kind}' cannot weigh prompts (it gives no token offsets)")

    def cut_off(self, prompt: str) -> str:
        """The end of `prompt` that does not fit in `max_length` tokens, and so is not encoded ("" when
        it all fits), so that callers can say so instead of dropping it silently. Every kind here says;
        an encoder written elsewhere that does not override this reports nothing cut."""
        return ""

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
        """Where token ids and masks go: the encoder's device. Under CPU offload `encode` is no forward, so
        this brings the encoder's group onto the execution device first (`bring_in`): its parameters' own
        device is CPU memory until then, and ids put there would meet states computed on the device."""
        return bring_in(self)


# --- checks every kind shares --------------------------------------------------------------------------


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts as a list of str; one bare str is an error (it would be encoded letter by letter)."""
    if isinstance(prompts, str):
        raise TypeError("encode() takes a sequence of prompts, got one str: wrap it, encode([prompt])")
    prompts = list(prompts)
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be str, got {sorted(set(bad))}")
    return prompts


def check_config_keys(kind: str, config: dict[str, Any], required: set[str], optional: set[str]) -> None:
    """A config with a missing or unknown key is an error that lists the known keys."""
    keys = set(config) - {"kind"}
    missing, unknown = required - keys, keys - required - optional
    if missing:
        raise ValueError(f"text encoder '{kind}' config lacks {sorted(missing)}")
    if unknown:
        raise ValueError(
            f"text encoder '{kind}' config has unknown keys {sorted(unknown)}; "
            f"known: {sorted(required | optional)}"
        )


def check_max_length(kind: str, max_length: Any, limit: int | None) -> int:
    """A positive int within the model's positions (``limit``; None: no limit)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"text encoder '{kind}': max_length must be a positive int, got {max_length!r}")
    if limit is not None and max_length > limit:
        raise ValueError(
            f"text encoder '{kind}': max_length {max_length} exceeds the model's {limit} positions"
        )
    return max_length


def model_folder_config(path: Path, model_types: set[str], what: str) -> dict[str, Any]:
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


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of the real tokens' states: [B, L, D], [B, L] -> [B, D]."""
    # The clamp keeps an all-padding row at zero instead of NaN.
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
