"""transformers' T5EncoderModel holding a GGUF file's weights, its linear layers kept in GGML blocks.

FLUX.1's T5-XXL encoder is 4.7B parameters (9.5 GB in bf16); ComfyUI-GGUF users keep it as Q8_0 (5 GB) or
Q4_K_M (3 GB). Here the attention and feed-forward linears (q, k, v, o, wi_0, wi_1, wo: all but 3% of the
weights) become :class:`~pictor.models.weight_storage.QuantizedLinear`, dequantized one layer at a time
as they run; the embedding, the norms and the relative attention bias are small and take the compute
dtype. Reading the file is :mod:`pictor.t5_gguf_files`' job: this module only builds and loads the model.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pictor.models.weight_storage import DENSE_FORMATS, GGML_TYPE_KEY, quantize_structure, type_id_of

# T5's linears, by their transformers names: the layers that may stay in GGML blocks.
LINEAR_NAMES = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")


class T5LoadError(ValueError):
    """A T5 state dict that does not fit the model (missing, unexpected or misshapen tensors)."""


def _feed_forward(self: nn.Module, hidden: Tensor) -> Tensor:
    """T5's feed-forward block, but with transformers' cast of the input to ``wo.weight``'s dtype (there to
    run an fp32 ``wo`` in fp32: T5's activations overflow float16) made safe for GGML blocks, whose uint8
    weight would turn the activations into bytes: a quantized ``wo`` meets float16 input in float32."""
    if hasattr(self, "wi_0"):
        hidden = self.act(self.wi_0(hidden)) * self.wi_1(hidden)
    else:
        hidden = self.act(self.wi(hidden))
    hidden = self.dropout(hidden)
    weight = self.wo.weight
    if weight.is_floating_point():
        hidden = hidden.to(weight.dtype)
    elif hidden.dtype == torch.float16:
        hidden = hidden.float()
    return self.wo(hidden)  # type: ignore[no-any-return]


@functools.cache
def _patched_classes() -> dict[type, type]:
    from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense

    return {
        cls: type(f"Quantized{cls.__name__}", (cls,), {"forward": _feed_forward})
        for cls in (T5DenseActDense, T5DenseGatedActDense)
    }


def _patch_feed_forward(model: nn.Module) -> None:
    patched = _patched_classes()
    for module in model.modules():
        if type(module) in patched:
            module.__class__ = patched[type(module)]  # same keys, only the forward differs


def build_t5_encoder(
    config: Mapping[str, Any],
    state_dict: Mapping[str, Tensor],
    formats: Mapping[str, str],
    dtype: torch.dtype,
) -> nn.Module:
    """A T5EncoderModel of ``config`` (T5Config's fields) holding ``state_dict`` (transformers' key names).

    ``formats``: {linear layer path: GGML block format} for the layers whose weight is stored as blocks
    (uint8 [out, bytes per row]); every other floating-point tensor is cast to ``dtype``. Built on the meta
    device and loaded with ``assign=True``, strictly: a missing or unexpected key is an error naming it."""
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**config))
    for path, fmt in formats.items():
        if fmt in DENSE_FORMATS or path.rpartition(".")[2] not in LINEAR_NAMES:
            raise T5LoadError(f"{path}: {fmt} is not a block format of a T5 linear layer")
    quantize_structure(model, formats)
    _patch_feed_forward(model)
    # transformers keeps T5's `wo` in float32 under float16 compute (_keep_in_fp32_modules): so does pictor
    # for a `wo` held dense.
    wide = {
        k: torch.float32 if dtype == torch.float16 and k.endswith(".wo.weight") else dtype for k in state_dict
    }
    tensors = {k: v.to(wide[k]) if v.is_floating_point() else v for k, v in state_dict.items()}
    for path, fmt in formats.items():  # what a QuantizedLinear checks its blocks against
        tensors[f"{path}.{GGML_TYPE_KEY}"] = torch.tensor(type_id_of(fmt), dtype=torch.int32)
    # T5EncoderModel ties encoder.embed_tokens to shared: one tensor under both names.
    if "shared.weight" in tensors:
        tensors.setdefault("encoder.embed_tokens.weight", tensors["shared.weight"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        found = [f"missing {missing}"] * bool(missing) + [f"unexpected {unexpected}"] * bool(unexpected)
        raise T5LoadError(f"the T5 weights do not fit a T5 encoder of this config: {'; '.join(found)}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise T5LoadError(
                f"{key}: shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(tensors, strict=True, assign=True)
    model.encoder.embed_tokens = model.shared  # assign=True replaced the tied Parameter
    return model.eval().requires_grad_(False)
