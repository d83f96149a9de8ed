"""T5 GGUF files as they really are (city96's t5-v1_1-xxl-encoder-*.gguf, llama.cpp's convert_hf_to_gguf.py):
the sentinels' ids where the file has only "[PAD{i}]" pieces, a head size that is not d_model / heads (read
from attention.key_length), UMT5 files (a position bias in every block) refused, a moved file named as a
file, and `pictor info` describing a T5 encoder as one."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import test_t5_gguf as t5
import torch
import transformers
from gguf import GGUFWriter

from pictor.checkpoint import CheckpointError
from pictor.cli_inspect import _gguf_summary
from pictor.gguf_files import read_gguf
from pictor.t5_gguf_files import build_text_encoder, check_t5_gguf, load_t5_gguf, t5_tokenizer

# FLUX-style prompts: punctuation, numbers, emoji, other scripts, odd spacing, newlines and tabs
FLUX_PROMPTS = [
    'a photo of a cat, "sat" on the mat (2 cats); 3.5mm lens!',
    "  a red\tcircle\n\nblue  square  ",
    "猫 🙂 кот, the cat",
    "a <extra_id_0> cat <extra_id_99> sat <extra_id_42>",
]


def _real_vocab_file(path: Path, extra: int = 128) -> None:
    """The tokenizer.ggml.* of a file made from google/t5-v1_1-xxl (no added_tokens.json): spiece.model's
    pieces, then "[PAD{i}]" unused pieces up to the embedding's rows (32128 = 32000 + 128 there)."""
    n = len(t5._PIECES)
    w = GGUFWriter(str(path), "t5encoder")
    w.add_tokenizer_model("t5")
    w.add_token_list([p for p, _ in t5._PIECES] + [f"[PAD{i}]" for i in range(n, n + extra)])
    w.add_token_scores([s for _, s in t5._PIECES] + [-10000.0] * extra)
    w.add_token_types([3, 3, 2] + [1] * (n - 3) + [5] * extra)
    w.add_add_space_prefix(True)
    w.add_remove_extra_whitespaces(True)
    w.add_eos_token_id(1)
    w.add_unk_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_eos_token(True)
    w.add_tensor("token_embd.weight", np.zeros((n + extra, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentinels_get_transformers_ids_where_the_file_has_pad_pieces(tmp_path: Path) -> None:
    _real_vocab_file(tmp_path / "tok.gguf")
    tok = t5_tokenizer(read_gguf(tmp_path / "tok.gguf"))
    # transformers' T5 tokenizer of spiece.model: <extra_id_99> ... <extra_id_0> after its pieces
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    ref = transformers.T5Tokenizer(vocab=[*t5._PIECES, *sentinels], extra_ids=100)
    assert ref.convert_tokens_to_ids("<extra_id_0>") == len(t5._PIECES) + 99
    for prompt in [*t5.PROMPTS, *FLUX_PROMPTS]:
        assert tok(prompt)["input_ids"] == ref(prompt)["input_ids"], prompt
    # past max_length: truncated with </s> kept last, as transformers does, then padded
    long = " ".join(FLUX_PROMPTS * 60)
    for max_length in (16, 512):
        kw = {"truncation": True, "max_length": max_length, "padding": "max_length"}
        ids = tok(long, **kw)["input_ids"]
        assert ids == ref(long, **kw)["input_ids"] and len(ids) == max_length and ids[-1] == 1


def test_too_few_pad_pieces_for_the_sentinels_leave_the_vocabulary_as_it_is(tmp_path: Path) -> None:
    _real_vocab_file(tmp_path / "tok.gguf", extra=6)
    tok = t5_tokenizer(read_gguf(tmp_path / "tok.gguf"))
    assert (
        tok("a cat")["input_ids"]
        == transformers.T5Tokenizer(vocab=list(t5._PIECES), extra_ids=0)("a cat")["input_ids"]
    )
    assert len(tok) == len(t5._PIECES) + 6


def test_a_head_size_other_than_d_model_over_heads_is_read_from_key_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(t5.CONFIG, "d_kv", 8)  # 2 heads of 8 in a d_model of 32 (T5-XXL: 64 heads of 64)
    model = t5.reference_t5()
    t5.write_t5_gguf(tmp_path / "t5.gguf", model)
    loaded, _ = load_t5_gguf(tmp_path / "t5.gguf", torch.float32)
    assert loaded.config.d_kv == 8
    ids = t5._ids()
    torch.testing.assert_close(
        loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5
    )


def test_a_umt5_file_with_a_position_bias_in_every_block_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = t5.llama_cpp_tensors

    def umt5_tensors(model: transformers.T5EncoderModel) -> dict[str, torch.Tensor]:
        out = plain(model)
        out["enc.blk.1.attn_rel_b.weight"] = out["enc.blk.0.attn_rel_b.weight"].clone()
        return out

    monkeypatch.setattr(t5, "llama_cpp_tensors", umt5_tensors)
    t5.write_t5_gguf(tmp_path / "umt5.gguf", t5.reference_t5())
    for read in (check_t5_gguf, lambda p: load_t5_gguf(p, torch.float32)):
        with pytest.raises(CheckpointError, match="UMT5"):
            read(tmp_path / "umt5.gguf")
    assert "UMT5" in _gguf_summary(tmp_path / "umt5.gguf")["t5_encoder"]["usable"]


def test_a_moved_gguf_file_is_named_as_a_missing_file(tmp_path: Path) -> None:
    gone = tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf"
    for config in (
        {"kind": "t5", "path": str(gone)},
        {"kind": "flux", "t5": {"path": str(gone)}, "clip": {"path": str(tmp_path / "clip")}},
    ):
        with pytest.raises(FileNotFoundError, match=r"file .* does not exist") as err:
            build_text_encoder(config)
        assert "folder" not in str(err.value).split("(")[0]


def test_pictor_info_describes_a_t5_encoder_file(tmp_path: Path) -> None:
    t5.write_t5_gguf(tmp_path / "t5.gguf", t5.reference_t5(), "Q8_0")
    summary = _gguf_summary(tmp_path / "t5.gguf")
    assert "flux_transformer" not in summary
    assert summary["t5_encoder"]["config"] == {
        "d_model": 32,
        "num_layers": 2,
        "num_heads": 2,
        "d_kv": 16,
        "d_ff": 64,
        "vocab_size": t5.VOCAB,
        "feed_forward_proj": "gated-gelu",
    }
    assert summary["t5_encoder"]["usable"].startswith("yes")
    assert summary["formats"] == {"F16": 1, "F32": 6, "Q8_0": 14}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_equals_transformers_own(dtype: torch.dtype, tmp_path: Path) -> None:
    """T5 overflows float16: transformers keeps `wo` in float32 (_keep_in_fp32_modules); a Q8_0 `wo` runs
    in float32 there too. Big feed-forward weights make the activations large, as T5-XXL's are."""
    model = t5.reference_t5()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("wo.weight", "wi_1.weight")):
                p.mul_(300)
    held = t5.write_t5_gguf(tmp_path / "t5.gguf", model, "Q8_0")
    t5.with_weights(held).save_pretrained(tmp_path / "hf")
    ref = transformers.T5EncoderModel.from_pretrained(tmp_path / "hf", dtype=dtype).eval()
    ours, _ = load_t5_gguf(tmp_path / "t5.gguf", dtype)
    ids = torch.randint(0, len(t5._PIECES), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state
    assert a.dtype == b.dtype and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_single_file_t5_in_safetensors_is_refused_with_what_to_give(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "t5xxl_fp16.safetensors"  # ComfyUI's single-file T5
    save_file({"encoder.final_layer_norm.weight": torch.ones(4)}, str(path))
    for read in (check_t5_gguf, lambda p: build_text_encoder({"kind": "t5", "path": str(p)})):
        with pytest.raises(CheckpointError, match="save_pretrained"):
            read(path)


def test_a_saved_bundle_with_a_gguf_t5_loads_as_the_server_loads_it(tmp_path: Path) -> None:
    """`pictor.load(folder)` (what `pictor serve` and `generate` call), with model offload: the T5's GGML
    linears move with the text encoder's group (model and block offload) and give the same pixels."""
    from pictor.checkpoint import BundleConfig, save_bundle
    from pictor.loading import load
    from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
    from pictor.models.flux import Flux, FluxParams
    from pictor.pipeline import GenerationRequest
    from pictor.presets import get_preset

    from tiny_text_folders import clip_folder

    t5.write_t5_gguf(tmp_path / "t5.gguf", t5.reference_t5(), "Q8_0")
    clip_folder(tmp_path / "clip")
    text = {
        "kind": "flux",
        "t5": {"kind": "t5", "path": str(tmp_path / "t5.gguf"), "max_length": 16},
        "clip": {"kind": "clip", "path": str(tmp_path / "clip"), "max_length": 16},
    }
    preset = get_preset("tiny")
    model = {**preset["model"], "vec_in_dim": 32, "context_in_dim": 32}
    config = BundleConfig(
        name="gguf-t5", model=model, autoencoder=preset["autoencoder"], text_encoder=text, trained=True
    )
    torch.manual_seed(0)
    flux, ae = Flux(FluxParams.from_dict(model)), AutoEncoder(AutoEncoderParams.from_dict(config.autoencoder))
    save_bundle(tmp_path / "bundle", config, flux.state_dict(), ae.state_dict())
    request = GenerationRequest("a red cat", width=32, height=32, steps=2, seed=1, guidance=3.0)
    images = []
    for offload in (None, "model", "blocks"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # offload on a CPU run saves nothing, and says so
            pipe = load(tmp_path / "bundle", device="cpu", offload=offload)
        images.append(np.asarray(pipe.generate(request)[0].image))
    assert images[0].std() > 0 and all(np.array_equal(images[0], other) for other in images[1:])
    # the file moved away: the load names the file
    (tmp_path / "t5.gguf").rename(tmp_path / "elsewhere.gguf")
    with pytest.raises(FileNotFoundError, match=r"t5\.gguf does not exist"):
        load(tmp_path / "bundle", device="cpu")


def test_convert_flux_says_a_missing_t5_gguf_is_a_missing_file(tmp_path: Path) -> None:
    from pictor.checkpoint import CheckpointError
    from pictor.convert import convert_flux

    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as exc:
        convert_flux(tmp_path / "f.safetensors", None, tmp_path / "t5-Q8_0.gguf", clip, tmp_path / "out")
    assert "t5-Q8_0.gguf" in str(exc.value) and "config.json" not in str(exc.value)
    assert not (tmp_path / "out").exists()
