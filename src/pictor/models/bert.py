"""A plain BERT encoder (the MiniLM default text encoder) in torch, with its tokenizer from tokenizer.json.

Why not transformers: importing it costs ~8 s of start-up on 2 cores, paid by every `pictor` command and
server start, for a 6-layer encoder that is 60 lines of torch. The keys are Hugging Face's BertModel keys,
so the same model.safetensors loads, and a test checks the outputs against transformers' BertModel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        if (
            raw.get("hidden_act", "gelu") != "gelu"
            or raw.get("position_embedding_type", "absolute") != "absolute"
        ):
            raise ValueError(f"{path}: only BERT with gelu and absolute positions is supported")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = (
            self.word_embeddings(ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings.weight[0]
        )
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)


class _Output(nn.Module):
    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _Output(c.hidden_size, c.hidden_size, c.layer_norm_eps)


class _Intermediate(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Output(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        # x [B, L, D]; key_mask [B, 1, 1, L] bool, True where the key is a real token.
        b, n, d = x.shape
        sa = self.attention.self

        def heads(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(sa.query(x)), heads(sa.key(x)), heads(sa.value(x)), key_mask)
        x = self.attention.output(a.transpose(1, 2).reshape(b, n, d), x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _Encoder(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))


class BertModel(nn.Module):
    """BERT without the pooler (sentence-transformers pools the token states itself)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = _Encoder(config)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask [B, L] -> last hidden states [B, L, D]."""
        x = self.embeddings(ids)
        key_mask = mask[:, None, None, :].bool()
        for layer in self.encoder.layer:
            x = layer(x, key_mask)
        return x


# Keys in Hugging Face BERT files that this encoder does not use.
UNUSED_KEYS = ("pooler.", "embeddings.position_ids")


def load_bert(folder: Path) -> BertModel:
    from safetensors.torch import load_file

    config = BertConfig.from_file(folder / "config.json")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no model.safetensors in {folder} (pickle weights are never loaded)")
    sd = {k.removeprefix("bert."): v for k, v in load_file(str(weights)).items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(UNUSED_KEYS)}
    with torch.device("meta"):
        model = BertModel(config)
    missing = set(model.state_dict()) - set(sd)
    unexpected = set(sd) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(
            f"{weights}: not a BERT encoder this loader understands "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.load_state_dict(sd, strict=True, assign=True)
    return model.float().eval().requires_grad_(False)


class WordPieceTokenizer:
    """tokenizer.json through the `tokenizers` library, padded and truncated to a fixed length."""

    def __init__(self, folder: Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.whole = Tokenizer.from_file(str(path))  # no truncation: to see what the other one cuts
        self.whole.no_truncation()
        self.whole.no_padding()
        self.max_length = max_length
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer.enable_padding(length=max_length, pad_id=0 if pad_id is None else pad_id)

    def cut_off(self, prompt: str) -> str:
        """The text past max_length tokens ([CLS] and [SEP] take one place each)."""
        ids = self.whole.encode(prompt).ids  # [CLS] ... [SEP]
        if len(ids) <= self.max_length:
            return ""
        return self.whole.decode(ids[self.max_length - 1 : -1])

    def spans(self, prompts: list[str]) -> list[list[tuple[int, int]]]:
        """Each prompt's tokens (as `__call__` makes them) as character offsets; [CLS], [SEP] and padding
        span nothing."""
        return [
            [
                (s, e) if special == 0 else (0, 0)
                for (s, e), special in zip(enc.offsets, enc.special_tokens_mask, strict=True)
            ]
            for enc in self.tokenizer.encode_batch(prompts)
        ]

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer.encode_batch(prompts)
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.bool)
        return ids, mask
