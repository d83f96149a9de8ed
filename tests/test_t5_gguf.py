"""T5 encoders as GGUF files (FLUX.1's T5-XXL as ComfyUI-GGUF users have it): a tiny T5 written with
llama.cpp's own `gguf` package under llama.cpp's tensor names and metadata, read back by pictor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize

from pictor.checkpoint import CheckpointError
from pictor.models.ggml_quants import quantize
from pictor.models.weight_storage import QuantizedLinear
from pictor.t5_gguf_files import build_text_encoder, check_t5_gguf, load_t5_gguf

# A small SentencePiece-style Unigram vocabulary: T5's three control pieces first, then pieces of several
# lengths so that segmentation has choices to make (scores as spiece.model holds them: log-probabilities).
_WORDS = ["the", "cat", "cats", "sat", "on", "mat", "a", "red", "blue", "circle", "square", "photo", "of"]
_PIECES = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
_PIECES += [(c, -4.0 - i * 0.01) for i, c in enumerate("abcdefghijklmnopqrstuvwxyz,.!0123456789")]
_PIECES += [("▁" + w, -3.0 - i * 0.1) for i, w in enumerate(_WORDS)] + [("at", -3.5), ("ir", -3.6)]
_PIECES += [("re", -3.7), ("▁s", -3.2), ("▁c", -3.3), ("le", -3.8), ("ue", -3.9)]
# The unknown piece scores 10 below the lowest piece; here that makes "X~~" <unk> + "~~", not "X~" + "~", so
# a vocabulary whose lowest score moved (llama.cpp's -1000 placeholders) would segment it otherwise.
_PIECES += [("~", -15.0), ("X~", -16.0), ("~~", -1.0)]
SENTINELS = ["<extra_id_1>", "<extra_id_0>"]  # T5's sentinels, highest first, as transformers orders them
VOCAB = len(_PIECES) + len(SENTINELS) + 6  # llama.cpp pads to the embedding's rows with unused pieces
CONFIG = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "d_kv": 16,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 2,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 128,  # what llama.cpp assumes (not stored in the file)
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
}
PROMPTS = [
    "a red cat sat on the mat",
    "  blue   circle,  photo of cats!  ",
    "the cat's 2 squares... ",
    "Unknown UPPER case é 猫 🙂 zzz",
    "",
    "x",
    "a <extra_id_0> cat </s> sat",
    "circlecircle redblue sqare",
    "X~~ cat",
]
# llama.cpp's T5 encoder names -> transformers' (gguf-py MODEL_TENSORS[T5ENCODER], ComfyUI-GGUF T5_SD_MAP)
_NAMES = {
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
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_o", "ffn_gate", "ffn_up", "ffn_down")


def reference_t5() -> transformers.T5EncoderModel:
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(**CONFIG)).eval()
    with torch.no_grad():  # T5's init leaves norms at 1: make them count
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def llama_cpp_tensors(model: transformers.T5EncoderModel) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {
        "token_embd.weight": sd["shared.weight"],
        "enc.output_norm.weight": sd["encoder.final_layer_norm.weight"],
    }
    for i in range(CONFIG["num_layers"]):
        for short, long in _NAMES.items():
            key = f"encoder.block.{i}.{long}.weight"
            if key in sd:
                out[f"enc.blk.{i}.{short}.weight"] = sd[key]
    return out


def write_t5_gguf(
    path: Path,
    model: transformers.T5EncoderModel,
    linear_format: str = "F32",
    arch: str = "t5encoder",
    tokenizer: bool = True,
) -> dict[str, torch.Tensor]:
    """The file llama.cpp's convert_hf_to_gguf.py (T5EncoderModel) writes, made with its gguf package;
    returns the weights as the file holds them (dequantized by gguf's own numpy code)."""
    w = GGUFWriter(str(path), arch)
    w.add_context_length(512)
    w.add_embedding_length(CONFIG["d_model"])
    w.add_feed_forward_length(CONFIG["d_ff"])
    w.add_block_count(CONFIG["num_layers"])
    w.add_head_count(CONFIG["num_heads"])
    w.add_key_length(CONFIG["d_kv"])
    w.add_value_length(CONFIG["d_kv"])
    w.add_layer_norm_eps(1e-6)
    w.add_relative_attn_buckets_count(CONFIG["relative_attention_num_buckets"])
    w.add_layer_norm_rms_eps(1e-6)
    # tokenizer.ggml.*, as its set_vocab writes: sentinels from added_tokens.json as USER_DEFINED (-1000),
    # then "[PAD{i}]" UNUSED pieces up to the embedding's rows
    tokens = [p for p, _ in _PIECES] + SENTINELS
    scores = [s for _, s in _PIECES] + [-1000.0] * len(SENTINELS)
    types = [3, 3, 2] + [1] * (len(_PIECES) - 3) + [4] * len(SENTINELS)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), VOCAB)]
    scores += [-1000.0] * (VOCAB - len(scores))
    types += [5] * (VOCAB - len(types))
    w.add_tokenizer_model("t5" if tokenizer else "llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(True)
    w.add_remove_extra_whitespaces(True)
    w.add_eos_token_id(1)
    w.add_unk_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_eos_token(True)
    held = {}
    for name, t in llama_cpp_tensors(model).items():
        if linear_format != "F32" and name.split(".")[-2] in LINEARS:
            qtype = GGMLQuantizationType[linear_format]
            raw = quantize(t, linear_format).numpy()
            w.add_tensor(name, raw, raw_dtype=qtype)
            held[name] = torch.from_numpy(gguf_dequantize(raw, qtype).copy())
        elif name == "token_embd.weight" and linear_format != "F32":
            w.add_tensor(name, t.half().numpy())
            held[name] = t.half().float()
        else:
            w.add_tensor(name, t.numpy().astype(np.float32))
            held[name] = t
    if arch == "t5":  # a whole T5: llama.cpp writes the decoder too, which the encoder skips
        w.add_tensor("dec.blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
        w.add_tensor("output.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def with_weights(held: dict[str, torch.Tensor]) -> transformers.T5EncoderModel:
    """The reference T5EncoderModel holding the file's (dequantized) weights under transformers' names."""
    model = reference_t5()
    sd = model.state_dict()
    for name, t in held.items():
        key = {
            "token_embd.weight": "shared.weight",
            "enc.output_norm.weight": "encoder.final_layer_norm.weight",
        }.get(name)
        if key is None:
            _, _, block, short, _ = name.split(".")
            key = f"encoder.block.{block}.{_NAMES[short]}.weight"
        sd[key] = t
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    model.load_state_dict(sd)
    return model


def reference_tokenizer() -> transformers.T5Tokenizer:
    return transformers.T5Tokenizer(
        vocab=[*_PIECES, *((s, 0.0) for s in SENTINELS)], extra_ids=len(SENTINELS)
    )


def _ids() -> torch.Tensor:
    return torch.tensor([[5, 40, 3, 60, 61, 1, 0, 0], [7, 8, 9, 10, 11, 12, 13, 1]])


def test_f32_file_equals_transformers_t5_exactly(tmp_path: Path) -> None:
    ref = reference_t5()
    write_t5_gguf(tmp_path / "t5.gguf", ref)
    model, _ = load_t5_gguf(tmp_path / "t5.gguf", torch.float32)
    assert type(model).__name__ == "T5EncoderModel" and model.config.is_gated_act
    with torch.no_grad():
        want = ref(input_ids=_ids()).last_hidden_state
        got = model(input_ids=_ids()).last_hidden_state
        masked = model(input_ids=_ids(), attention_mask=(_ids() > 0).long()).last_hidden_state
        want_masked = ref(input_ids=_ids(), attention_mask=(_ids() > 0).long()).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(masked, want_masked, rtol=0, atol=0)


def test_q8_0_linears_stay_quantized_and_match_the_dequantized_model(tmp_path: Path) -> None:
    held = write_t5_gguf(tmp_path / "t5-Q8_0.gguf", reference_t5(), "Q8_0")
    model, _ = load_t5_gguf(tmp_path / "t5-Q8_0.gguf", torch.float32)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 7 * CONFIG["num_layers"]  # q k v o wi_0 wi_1 wo, in every block
    assert all(model.get_submodule(n).weight.dtype == torch.uint8 for n in quantized)
    assert model.shared.weight.dtype == torch.float32 and model.encoder.embed_tokens is model.shared
    ref = with_weights(held)
    with torch.no_grad():
        got = model(input_ids=_ids()).last_hidden_state
        want = ref(input_ids=_ids()).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the rounding is Q8_0's, not nothing: the original weights give other states
    assert not torch.allclose(got, reference_t5()(input_ids=_ids()).last_hidden_state, atol=1e-5)


@pytest.mark.parametrize(
    ("fmt", "dtype"), [("Q8_0", torch.bfloat16), ("Q8_0", torch.float16), ("F32", torch.float16)]
)
def test_half_precision_compute_runs_and_stays_close(fmt: str, dtype: torch.dtype, tmp_path: Path) -> None:
    held = write_t5_gguf(tmp_path / "t5.gguf", reference_t5(), fmt)
    model, _ = load_t5_gguf(tmp_path / "t5.gguf", dtype)
    with torch.no_grad():
        got = model(input_ids=_ids()).last_hidden_state.float()
        want = with_weights(held)(input_ids=_ids()).last_hidden_state
    assert got.isfinite().all() and (got - want).norm() / want.norm() < 0.05


def test_tokenizer_from_the_file_gives_transformers_t5_ids(tmp_path: Path) -> None:
    write_t5_gguf(tmp_path / "t5.gguf", reference_t5())
    _, tok = load_t5_gguf(tmp_path / "t5.gguf", torch.float32)
    ref = reference_tokenizer()
    for prompt in PROMPTS:
        assert tok(prompt)["input_ids"] == ref(prompt)["input_ids"], prompt
    for batch in (tok, ref):  # padding, truncation and masks, as pictor's T5TextEncoder asks for them
        assert batch.pad_token_id == 0 and batch.eos_token_id == 1
    kw = {"padding": "max_length", "truncation": True, "max_length": 12, "return_tensors": "pt"}
    got, want = tok(PROMPTS, **kw), ref(PROMPTS, **kw)
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    # llama.cpp's unused padding pieces keep their ids but are never produced, even when typed
    assert tok("[PAD60]")["input_ids"] == ref("[PAD60]")["input_ids"]


def test_text_encoder_from_gguf_equals_the_folder_one(tmp_path: Path) -> None:
    held = write_t5_gguf(tmp_path / "t5.gguf", reference_t5(), "Q8_0")
    folder = tmp_path / "t5"
    with_weights(held).save_pretrained(folder)
    reference_tokenizer().save_pretrained(folder)
    cfg = {"kind": "t5", "max_length": 16}
    from_file = build_text_encoder({**cfg, "path": str(tmp_path / "t5.gguf")})
    from_folder = build_text_encoder({**cfg, "path": str(folder)})
    a, b = from_file.encode(PROMPTS[:4]), from_folder.encode(PROMPTS[:4])
    torch.testing.assert_close(a.tokens, b.tokens, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.mask, b.mask)
    assert from_file.config()["path"] == str(tmp_path / "t5.gguf")
    # a tokenizer folder given beside the file is used instead of the file's vocabulary
    with_tok = build_text_encoder({**cfg, "path": str(tmp_path / "t5.gguf"), "tokenizer_path": str(folder)})
    assert with_tok.config()["tokenizer_path"] == str(folder)
    torch.testing.assert_close(with_tok.encode(PROMPTS[:4]).tokens, a.tokens, rtol=0, atol=0)


def test_a_tiny_flux_bundle_generates_with_a_gguf_t5(tmp_path: Path) -> None:
    from pictor.checkpoint import BundleConfig
    from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
    from pictor.models.flux import Flux, FluxParams
    from pictor.pipeline import GenerationRequest, Pipeline
    from pictor.presets import get_preset

    from tiny_text_folders import clip_folder

    write_t5_gguf(tmp_path / "t5.gguf", reference_t5(), "Q8_0")
    clip_folder(tmp_path / "clip")
    text = {
        "kind": "flux",
        "t5": {"kind": "t5", "path": str(tmp_path / "t5.gguf"), "max_length": 16},
        "clip": {"kind": "clip", "path": str(tmp_path / "clip"), "max_length": 16},
    }
    preset = get_preset("tiny")
    model = {**preset["model"], "vec_in_dim": 32, "context_in_dim": 32}
    config = BundleConfig(
        name="tiny-gguf-t5",
        model=model,
        autoencoder=preset["autoencoder"],
        text_encoder=text,
        defaults=preset["defaults"],
        trained=True,
    )
    torch.manual_seed(0)
    flux, ae = Flux(FluxParams.from_dict(model)), AutoEncoder(AutoEncoderParams.from_dict(config.autoencoder))
    pipe = Pipeline(flux, ae, build_text_encoder(text), config, device="cpu", dtype=torch.float32)
    result = pipe.generate(GenerationRequest("a red cat", width=32, height=32, steps=2, seed=1, guidance=3.0))
    image = np.asarray(result[0].image)
    assert image.shape[:2] == (32, 32) and image.std() > 0
    assert pipe.text_encoder.config()["t5"]["path"] == str(tmp_path / "t5.gguf")


def test_files_that_are_no_t5_encoder_are_refused_by_reason(tmp_path: Path) -> None:
    w = GGUFWriter(str(tmp_path / "flux.gguf"), "flux")
    w.add_tensor("img_in.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="'flux' model, not a T5 encoder"):
        load_t5_gguf(tmp_path / "flux.gguf", torch.float32)
    ref = reference_t5()
    write_t5_gguf(tmp_path / "t5.gguf", ref)
    check_t5_gguf(tmp_path / "t5.gguf")
    # a file that lacks a block's tensor: named by its llama.cpp name
    short = reference_t5()
    short.encoder.block[1].layer[0].SelfAttention.k = None  # type: ignore[assignment]
    write_t5_gguf(tmp_path / "short.gguf", short)
    with pytest.raises(CheckpointError, match=r"lacks tensors \['enc.blk.1.attn_k.weight'\]"):
        load_t5_gguf(tmp_path / "short.gguf", torch.float32)
    with pytest.raises(CheckpointError, match="attn_k"):
        check_t5_gguf(tmp_path / "short.gguf")


def test_convert_flux_takes_a_t5_gguf_and_records_its_path(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from pictor.checkpoint import load_bundle
    from pictor.convert import convert_flux
    from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
    from pictor.models.flux import Flux, FluxParams
    from pictor.presets import get_preset

    params = {**get_preset("tiny")["model"], "hidden_size": 64, "num_heads": 2, "axes_dim": [4, 14, 14]}
    torch.manual_seed(0)
    flux = Flux(FluxParams.from_dict(params))
    ae = AutoEncoder(AutoEncoderParams.from_dict(get_preset("tiny")["autoencoder"]))
    save_file({k: v.contiguous() for k, v in flux.state_dict().items()}, tmp_path / "flux1-dev.safetensors")
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, tmp_path / "ae.safetensors")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    write_t5_gguf(tmp_path / "t5-Q8_0.gguf", reference_t5(), "Q8_0")
    files = (tmp_path / "flux1-dev.safetensors", tmp_path / "ae.safetensors")
    out = convert_flux(*files, tmp_path / "t5-Q8_0.gguf", tmp_path / "clip", tmp_path / "bundle")
    t5 = load_bundle(out).config.text_encoder["t5"]
    assert t5["path"] == str((tmp_path / "t5-Q8_0.gguf").resolve())
    # a GGUF that is no T5 encoder (here: a FLUX.1 transformer's architecture) is refused before writing
    w = GGUFWriter(str(tmp_path / "flux.gguf"), "flux")
    w.add_tensor("img_in.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="'flux' model, not a T5 encoder"):
        convert_flux(*files, tmp_path / "flux.gguf", tmp_path / "clip", tmp_path / "other")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        convert_flux(*files, tmp_path / "ae.safetensors", tmp_path / "clip", tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_a_whole_t5_file_and_a_file_without_a_t5_vocabulary(tmp_path: Path) -> None:
    ref = reference_t5()
    write_t5_gguf(tmp_path / "whole.gguf", ref, arch="t5")
    model, _ = load_t5_gguf(tmp_path / "whole.gguf", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids())[0], ref(input_ids=_ids())[0], rtol=0, atol=0)
    write_t5_gguf(tmp_path / "novocab.gguf", ref, tokenizer=False)
    with pytest.raises(CheckpointError, match="tokenizer cannot be rebuilt"):
        load_t5_gguf(tmp_path / "novocab.gguf", torch.float32)
    with pytest.raises(CheckpointError, match="tokenizer cannot be rebuilt"):
        check_t5_gguf(tmp_path / "novocab.gguf")
    reference_tokenizer().save_pretrained(tmp_path / "tok")
    _, tok = load_t5_gguf(tmp_path / "novocab.gguf", torch.float32, tmp_path / "tok")
    assert tok("a red cat")["input_ids"] == reference_tokenizer()("a red cat")["input_ids"]


def test_models_layer_alone_points_to_the_gguf_reader(tmp_path: Path) -> None:
    from pictor.models.text import build_text_encoder as build_in_models

    write_t5_gguf(tmp_path / "t5.gguf", reference_t5())
    with pytest.raises(ValueError, match=r"read through pictor\.t5_gguf_files\.build_text_encoder"):
        build_in_models({"kind": "t5", "path": str(tmp_path / "t5.gguf")})
