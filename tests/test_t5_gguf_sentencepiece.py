"""T5's tokenizer rebuilt from a GGUF file's metadata against SentencePiece itself: a tiny model trained with
T5's normalization, put into GGUF the way llama.cpp's convert_hf_to_gguf.py (T5EncoderModel.set_vocab) does.
Skipped where sentencepiece is not installed (it is not among pictor's test requirements)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import transformers
from gguf import GGUFWriter

from pictor.gguf_files import read_gguf
from pictor.t5_gguf_files import t5_tokenizer


def _spm_t5_vocab() -> tuple[bytes, list[str]]:
    """A tiny SentencePiece Unigram model trained with T5's normalization (nmt_nfkc: a precompiled character
    map), and prompts that need that map (full-width letters, ligatures, NFKC digits, odd spaces)."""
    import io
    import random

    import sentencepiece as spm  # a test dependency (pyproject.toml [test])

    words = ["a", "red", "cat", "sat", "on", "the", "mat", "blue", "circle", "photo", "of", "cats"]
    words += ["square", "green", "big", "small", "bright", "dark"]
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(400)]
    lines += ["Café naïve résumé ﬁne ＡＢＣ ① ½ straße"] * 5
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=60,
        hard_vocab_limit=False,  # as many pieces as this small corpus gives
        model_type="unigram",
        normalization_rule_name="nmt_nfkc",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    prompts = ["  Café  ＡＢＣ ﬁne  cats", "red\u00a0cat\u3000sat", "naïve ① ½", "big  dark   square "]
    prompts += ["Ｃａｔ ｓａｔ", "résumé straße"]
    return buf.getvalue(), prompts


def test_tokenizer_with_t5s_precompiled_normalizer_equals_sentencepiece(tmp_path: Path) -> None:
    """llama.cpp's set_vocab (T5EncoderModel) applied to a SentencePiece model: the rebuilt tokenizer gives
    sentencepiece's own ids (plus </s>), and transformers' T5Tokenizer's from the same vocabulary."""
    model_bytes, prompts = _spm_t5_vocab()
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb

    sp = SentencePieceProcessor(model_proto=model_bytes)
    proto = pb.ModelProto()
    proto.ParseFromString(model_bytes)
    n = sp.vocab_size()
    types = {"unknown": 2, "control": 3, "unused": 5, "byte": 6}  # llama.cpp's SentencePieceTokenTypes
    kinds = [next((v for k, v in types.items() if getattr(sp, f"is_{k}")(i)), 1) for i in range(n)]
    w = GGUFWriter(str(tmp_path / "tok.gguf"), "t5encoder")
    w.add_tokenizer_model("t5")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)] + [f"[PAD{i}]" for i in range(n, n + 5)])
    w.add_token_scores([sp.get_score(i) for i in range(n)] + [-1000.0] * 5)
    w.add_token_types(kinds + [5] * 5)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    w.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)
    w.add_precompiled_charsmap(proto.normalizer_spec.precompiled_charsmap)
    w.add_eos_token_id(1)
    w.add_unk_token_id(2)
    w.add_pad_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((n + 5, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = t5_tokenizer(read_gguf(tmp_path / "tok.gguf"))
    ref = transformers.T5Tokenizer(
        vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(n)],
        extra_ids=0,
        _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap,
    )
    for prompt in prompts:
        assert tok(prompt)["input_ids"] == [*sp.encode(prompt), 1], prompt
        assert tok(prompt)["input_ids"] == ref(prompt)["input_ids"], prompt
