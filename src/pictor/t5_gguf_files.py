"""T5 encoders as GGUF files: FLUX.1's T5-XXL the way ComfyUI-GGUF users have it (city96's
``t5-v1_1-xxl-encoder-Q8_0.gguf``, ``-Q5_K_M``, ``-Q4_K_M``, ...), read into transformers' T5EncoderModel.

Those files come from llama.cpp's ``convert_hf_to_gguf.py`` (class ``T5EncoderModel``, architecture
``t5encoder``; a whole T5, architecture ``t5``, also carries a decoder, which is skipped). Tensor names are
llama.cpp's (gguf-py ``MODEL_TENSORS[T5ENCODER]``), mapped back as ComfyUI-GGUF's ``T5_SD_MAP`` does;
the config is the ``{arch}.*`` metadata; the tokenizer is rebuilt from ``tokenizer.ggml.*`` (a
SentencePiece Unigram vocabulary: pieces, scores, types, T5's precompiled normalizer), or taken from a
tokenizer folder when one is given. Nothing is unpickled and nothing is downloaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pictor.checkpoint import CheckpointError
from pictor.gguf_files import GGUFFile, is_gguf, read_gguf
from pictor.models.t5_gguf import LINEAR_NAMES, build_t5_encoder
from pictor.models.text import build_text_encoder as build_folder_text_encoder
from pictor.models.text_encoder import TextEncoder
from pictor.models.text_folders import FluxTextEncoder, T5TextEncoder, load_tokenizer
from pictor.models.weight_storage import DENSE_FORMATS

T5_ARCHS = ("t5encoder", "t5")  # what llama.cpp writes for T5EncoderModel, and for a whole T5
# llama.cpp hard-codes T5's relative attention max distance (the converter does not write it): 128, the
# value of every T5 / T5 v1.1 / FLAN-T5 config.
MAX_DISTANCE = 128
# llama.cpp's names of one block's tensors -> transformers' (block-relative); ffn_up is `wi` in an
# ungated T5 (the original ReLU one), `wi_1` beside ffn_gate's `wi_0` in T5 v1.1's gated-GELU.
_BLOCK = {
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}
_TOP = {"token_embd": "shared", "enc.output_norm": "encoder.final_layer_norm"}
_BLOCK_NAME = re.compile(r"enc\.blk\.(\d+)\.(\w+)\.(weight|bias)")
# SentencePiece piece types, as llama.cpp's converter writes them (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 3, 4, 5, 6


def hf_name(name: str, gated: bool) -> str | None:
    """transformers' key of a llama.cpp T5 tensor name; None for a name that is no encoder tensor."""
    stem, _, suffix = name.rpartition(".")
    if stem in _TOP:
        return f"{_TOP[stem]}.{suffix}"
    match = _BLOCK_NAME.fullmatch(name)
    if not match or match[2] not in _BLOCK:
        return None
    part = _BLOCK[match[2]] if gated or match[2] != "ffn_up" else "layer.1.DenseReluDense.wi"
    return f"encoder.block.{match[1]}.{part}.{match[3]}"


def gguf_name(key: str) -> str:
    """The llama.cpp name of a transformers T5 key (for messages about missing tensors)."""
    for stem, hf in _TOP.items():
        if key.startswith(hf + "."):
            return stem + key[len(hf) :]
    match = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)\.(\w+)", key)
    if match:
        part = "layer.1.DenseReluDense.wi_1" if match[2] == "layer.1.DenseReluDense.wi" else match[2]
        for short, long in _BLOCK.items():
            if part == long:
                return f"enc.blk.{match[1]}.{short}.{match[3]}"
    return key


def _arch(gguf: GGUFFile) -> str:
    arch = gguf.metadata.get("general.architecture")
    if arch not in T5_ARCHS:
        kind = f"a {arch!r} model" if isinstance(arch, str) else "a file without general.architecture"
        raise CheckpointError(
            f"{gguf.path}: {kind}, not a T5 encoder (general.architecture 't5encoder' or 't5', as "
            "llama.cpp's convert_hf_to_gguf.py writes for T5EncoderModel); give FLUX.1's T5-XXL encoder GGUF"
        )
    return str(arch)


def _int(gguf: GGUFFile, key: str, default: int | None = None) -> int:
    value = gguf.metadata.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(
            f"{gguf.path}: metadata {key} is {value!r}; a T5 encoder GGUF needs a positive int"
        )
    return value


def t5_config(gguf: GGUFFile) -> dict[str, Any]:
    """T5Config's fields from the ``{arch}.*`` metadata (and the embedding's shape for the vocabulary)."""
    arch = _arch(gguf)
    if "token_embd.weight" not in gguf.tensors:
        raise CheckpointError(f"{gguf.path}: no token_embd.weight; not a T5 encoder's weights")
    d_model = _int(gguf, f"{arch}.embedding_length")
    heads = _int(gguf, f"{arch}.attention.head_count")
    eps = gguf.metadata.get(
        f"{arch}.attention.layer_norm_rms_epsilon",
        gguf.metadata.get(f"{arch}.attention.layer_norm_epsilon", 1e-6),
    )
    gated = any(name.endswith(".ffn_gate.weight") for name in gguf.tensors)
    # T5 (v1.1) has one relative position bias, in block 0 (llama.cpp writes enc.blk.0.attn_rel_b only);
    # UMT5 (Wan's umt5-xxl-encoder GGUFs, same architecture name) has one per block, which T5 cannot hold.
    own_bias = [n for n in gguf.tensors if n.startswith("enc.blk.") and ".attn_rel_b." in n]
    if any(not n.startswith("enc.blk.0.") for n in own_bias):
        raise CheckpointError(
            f"{gguf.path}: a relative attention bias in {len(own_bias)} blocks, not only in block 0: a UMT5 "
            "encoder (as Wan's umt5-xxl-encoder-*.gguf), not T5 v1.1; FLUX.1 needs its T5-XXL encoder "
            "(t5-v1_1-xxl-encoder-*.gguf)"
        )
    return {
        "vocab_size": gguf.tensors["token_embd.weight"].shape[0],
        "d_model": d_model,
        "d_kv": _int(gguf, f"{arch}.attention.key_length", d_model // heads),
        "d_ff": _int(gguf, f"{arch}.feed_forward_length"),
        "num_layers": _int(gguf, f"{arch}.block_count"),
        "num_heads": heads,
        "relative_attention_num_buckets": _int(gguf, f"{arch}.attention.relative_buckets_count", 32),
        "relative_attention_max_distance": MAX_DISTANCE,
        "layer_norm_epsilon": float(eps),
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "is_encoder_decoder": False,
        "use_cache": False,
    }


def encoder_keys(gguf: GGUFFile, gated: bool) -> dict[str, str]:
    """{llama.cpp name: transformers key} of the file's encoder tensors; a tensor that is neither an
    encoder's nor a whole T5's decoder or head is refused by name."""
    keys = {}
    for name in gguf.tensors:
        if name.startswith("dec.") or name == "output.weight":
            continue  # a whole T5's decoder and head: not used by the encoder
        key = hf_name(name, gated)
        if key is None:
            raise CheckpointError(f"{gguf.path}: tensor {name!r} is not a T5 encoder tensor llama.cpp writes")
        keys[name] = key
    return keys


def t5_weights(gguf: GGUFFile, gated: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    """{transformers key: tensor} and {linear path: GGML format} of the layers kept in blocks. Block formats
    outside the linears (a quantized token embedding, as llama.cpp writes) are dequantized here."""
    tensors: dict[str, Tensor] = {}
    formats: dict[str, str] = {}
    for name, key in encoder_keys(gguf, gated).items():
        t = gguf.tensors[name]
        linear = key.endswith(".weight") and key.rsplit(".", 2)[1] in LINEAR_NAMES
        if linear and t.format not in DENSE_FORMATS and len(t.shape) == 2:
            tensors[key], formats[key.removesuffix(".weight")] = t.data.view(t.shape[0], -1), t.format
        else:
            tensors[key] = t.to_tensor()
    return tensors, formats


def t5_tokenizer(gguf: GGUFFile) -> Any:
    """T5's tokenizer rebuilt from ``tokenizer.ggml.*``: a Unigram model over the file's pieces and scores
    with the pipeline of transformers' T5Tokenizer (precompiled normalizer, whitespace split, Metaspace,
    ``</s>`` appended), as a transformers fast tokenizer.

    llama.cpp pads the vocabulary to the embedding's rows with unused pieces (``[PAD32000]``...): the first
    100 become T5's sentinels at transformers' ids (:func:`_sentinels`); the rest keep their ids but can
    never be produced (their text holds a space, which the pre-tokenizer removes) and do not lower the
    unknown piece's score.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    meta, where = gguf.metadata, gguf.path
    model = meta.get("tokenizer.ggml.model")
    if model != "t5":
        raise CheckpointError(
            f"{where}: tokenizer.ggml.model is {model!r}, not 't5' (a SentencePiece Unigram vocabulary): the "
            "tokenizer cannot be rebuilt from this file; give a T5 tokenizer folder (tokenizer_path)"
        )
    tokens, scores = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens or []))
    if not tokens or not isinstance(scores, list) or not len(tokens) == len(scores) == len(types):
        raise CheckpointError(
            f"{where}: tokenizer.ggml.tokens / scores / token_type are missing or of different lengths; the "
            "tokenizer cannot be rebuilt; give a T5 tokenizer folder (tokenizer_path)"
        )

    def special(key: str, default: str) -> int:
        i = meta.get(f"tokenizer.ggml.{key}_token_id", tokens.index(default) if default in tokens else None)
        if not isinstance(i, int) or not 0 <= i < len(tokens):
            raise CheckpointError(
                f"{where}: no {key} token (tokenizer.ggml.{key}_token_id); cannot build the tokenizer"
            )
        return i

    eos, unk, pad = special("eos", "</s>"), special("unknown", "<unk>"), special("padding", "<pad>")
    sentinels = _sentinels(tokens, types)
    vocab, specials = [], []
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        if i in sentinels:
            vocab.append((sentinels[i], 0.0))
            specials.append(sentinels[i])
            continue
        if kind == _UNUSED:
            vocab.append((f"<unused {i}>", 0.0))
            continue
        if kind in (_CONTROL, _USER_DEFINED) or i in (eos, unk, pad):
            specials.append(piece)  # split off before the model, as transformers does for T5's special tokens
        vocab.append((piece, 0.0 if kind == _USER_DEFINED else float(score)))
    tok = Tokenizer(Unigram(vocab, unk_id=unk, byte_fallback=_BYTE in types))
    charsmap = meta.get("tokenizer.ggml.precompiled_charsmap")
    if charsmap:
        tok.normalizer = normalizers.Precompiled(bytes(b & 0xFF for b in charsmap))
    scheme = "always" if meta.get("tokenizer.ggml.add_space_prefix", True) else "never"
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
    splits = (
        [pre_tokenizers.WhitespaceSplit()]
        if meta.get("tokenizer.ggml.remove_extra_whitespaces", True)
        else []
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, metaspace])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
    if meta.get("tokenizer.ggml.add_eos_token", True):
        eos_text = tokens[eos]
        tok.post_processor = processors.TemplateProcessing(
            single=["$A", eos_text], pair=["$A", eos_text, "$B", eos_text], special_tokens=[(eos_text, eos)]
        )
    tok.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=tokens[eos], unk_token=tokens[unk], pad_token=tokens[pad]
    )


def _sentinels(tokens: list[str], types: list[int]) -> dict[int, str]:
    """{id: text} of T5's 100 sentinels where the file has llama.cpp's padding pieces in their place.

    transformers' T5 tokenizer puts ``<extra_id_99>`` ... ``<extra_id_0>`` right after spiece.model's pieces
    (32000..32099 for T5 v1.1); llama.cpp's converter writes ``[PAD{i}]`` unused pieces there (it adds the
    sentinels only from an added_tokens.json, which google/t5-v1_1-xxl does not have). A file that names its
    sentinels keeps them as they are."""
    if any(str(t).startswith("<extra_id_") for t in tokens):
        return {}
    first = next((i for i, t in enumerate(tokens) if types[i] == _UNUSED and t == f"[PAD{i}]"), None)
    if first is None or first + 100 > len(tokens):
        return {}
    if any(types[i] != _UNUSED or tokens[i] != f"[PAD{i}]" for i in range(first, first + 100)):
        return {}
    return {i: f"<extra_id_{first + 99 - i}>" for i in range(first, first + 100)}


def load_t5_gguf(
    path: str | os.PathLike[str], dtype: torch.dtype, tokenizer_path: str | os.PathLike[str] | None = None
) -> tuple[nn.Module, Any]:
    """(T5EncoderModel, tokenizer) of a T5 encoder GGUF file; the tokenizer from ``tokenizer_path`` (a
    folder with T5's tokenizer files) when given, else rebuilt from the file's metadata."""
    gguf = _read(path)
    config = t5_config(gguf)
    tensors, formats = t5_weights(gguf, config["feed_forward_proj"] == "gated-gelu")
    missing = _missing(config, set(tensors))
    if missing:
        raise CheckpointError(
            f"{gguf.path}: a T5 encoder of {config['num_layers']} blocks lacks tensors {missing}"
        )
    tokenizer = load_tokenizer(Path(tokenizer_path), "T5") if tokenizer_path else t5_tokenizer(gguf)
    try:
        model = build_t5_encoder(config, tensors, formats, dtype)
    except ValueError as exc:
        raise CheckpointError(f"{gguf.path}: {exc}") from exc
    return model, tokenizer


def _read(path: str | os.PathLike[str]) -> GGUFFile:
    """The file's header; a file that is no GGUF (ComfyUI's single-file t5xxl_fp16.safetensors) refused with
    what to give instead."""
    if Path(path).is_file() and not is_gguf(path):
        raise CheckpointError(
            f"{path}: not a GGUF file; a T5 given as one file must be a T5 encoder GGUF (city96's "
            "t5-v1_1-xxl-encoder-Q8_0.gguf). A single-file T5 in safetensors (ComfyUI's "
            "t5xxl_fp16.safetensors) is not read: give a save_pretrained() folder (diffusers' FLUX.1 "
            "text_encoder_2/, tokenizer_2/)"
        )
    return read_gguf(path)


def _missing(config: dict[str, Any], keys: set[str]) -> list[str]:
    """llama.cpp's names of the tensors a T5 encoder of ``config`` needs that are not in ``keys``."""
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        needed = T5EncoderModel(T5Config(**config)).state_dict()
    needed.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight (token_embd)
    return [gguf_name(k) for k in needed if k not in keys]


def check_t5_gguf(path: str | os.PathLike[str]) -> None:
    """Refuse, by reason, a GGUF file that is no T5 encoder with all its tensors and a tokenizer that can be
    rebuilt (headers only: no weight is read)."""
    gguf = _read(path)
    config = t5_config(gguf)
    t5_tokenizer(gguf)
    gated = config["feed_forward_proj"] == "gated-gelu"
    missing = _missing(config, set(encoder_keys(gguf, gated).values()))
    if missing:
        raise CheckpointError(
            f"{gguf.path}: a T5 encoder of {config['num_layers']} blocks lacks tensors {missing}"
        )


def t5_gguf_summary(gguf: GGUFFile) -> dict[str, Any] | None:
    """What ``pictor info`` says of a T5 encoder GGUF file (None for a file of another architecture): its
    T5 config, and whether ``--t5`` takes it (or why not)."""
    if gguf.metadata.get("general.architecture") not in T5_ARCHS:
        return None
    try:
        config = t5_config(gguf)
        check_t5_gguf(gguf.path)
        use = "yes: `pictor convert flux ... --t5 THIS_FILE` uses it as FLUX.1's T5 encoder"
    except CheckpointError as exc:
        return {"usable": f"no: {exc}"}
    keys = ("d_model", "num_layers", "num_heads", "d_kv", "d_ff", "vocab_size", "feed_forward_proj")
    return {"config": {k: config[k] for k in keys}, "usable": use}


def build_text_encoder(config: dict[str, Any]) -> TextEncoder:
    """:func:`pictor.models.text.build_text_encoder`, and a T5 (alone, or FLUX.1's) whose ``path`` is a
    GGUF file: the layers above models build their text encoders here, since reading GGUF is no model's
    business."""
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind == "t5":
        return T5TextEncoder.from_config(config, load_gguf=load_t5_gguf)
    if kind == "flux":
        return FluxTextEncoder.from_config(config, load_gguf=load_t5_gguf)
    return build_folder_text_encoder(config)
