"""Prompt weights in A1111's / ComfyUI's syntax: the parse (A1111's rules), the weighing of token states
(ComfyUI's: from the empty prompt's state), and requests, records and the command line."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pictor
from pictor.cli import main
from pictor.models.text_encoder import TextEmbeddings, TextEncoder
from pictor.models.text_folders import CLIPTextEncoder, FluxTextEncoder, T5TextEncoder
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.prompt_weights import PromptWeightError, parse_weights, plain_text
from pictor.provenance import ProvenanceError, read_record, read_text_chunks, save_png
from pictor.reproduce import check_record, reproduce
from tests.tiny_text_folders import clip_folder, t5_folder

R, S = 1.1, 1 / 1.1


@pytest.mark.parametrize(
    ("prompt", "pieces"),
    [
        ("a red circle", [("a red circle", 1.0)]),
        ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
        ("a (red) [blue]", [("a ", 1.0), ("red", R), (" ", 1.0), ("blue", S)]),
        ("((red))", [("red", R * R)]),
        ("[[red]]", [("red", S * S)]),
        ("a (b (c:2) d) e", [("a ", 1.0), ("b ", R), ("c", 2 * R), (" d", R), (" e", 1.0)]),
        ("(a [b] c:1.5)", [("a ", 1.5), ("b", 1.5 * S), (" c", 1.5)]),
        ("a (red circle", [("a ", 1.0), ("red circle", R)]),  # unclosed: the rest, as A1111
        ("a [red", [("a ", 1.0), ("red", S)]),
        ("x) y] z", [("x) y] z", 1.0)]),  # closers without an opener are text
        (r"\(red\) \[x\] a\\b", [("(red) [x] a\\b", 1.0)]),
        (r"a \b", [("a b", 1.0)]),  # any other backslash is dropped, as A1111 drops it
        ("(style: ink)", [("style: ink", R)]),  # not a number: text, as A1111 reads it
        ("a:1.5) b", [("a:1.5) b", 1.0)]),  # a weight without its "(" is text
        ("(red: .5 )", [("red", 0.5)]),
        ("(red:-1)", [("red", -1.0)]),
        ("(red:0)", [("red", 0.0)]),
        ("(red:1)(blue:1)", [("redblue", 1.0)]),  # pieces of one weight merge
        ("", []),
        ("()", []),
    ],
)
def test_the_parse_follows_a1111(prompt: str, pieces: list[tuple[str, float]]) -> None:
    parsed = parse_weights(prompt)
    assert [t for t, _ in parsed.pieces] == [t for t, _ in pieces]
    np.testing.assert_allclose([w for _, w in parsed.pieces], [w for _, w in pieces])
    assert parsed.text == "".join(t for t, _ in pieces)
    assert parsed.weighted == any(w != 1.0 for _, w in pieces)
    assert plain_text(prompt, True) == parsed.text and plain_text(prompt, False) == prompt


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("(red:1.2.3)", r"prompt weight '1\.2\.3' at character 6 is not a number"),  # counted from 1
        ("a (red: .)", r"prompt weight '\.' at character 9 is not a number"),
        ("(red:11)", r"prompt weight 11 at character 6 is outside \[-10, 10\]"),
        ("(red:-20)", r"outside \[-10, 10\]"),
    ],
)
def test_bad_weights_say_where(prompt: str, message: str) -> None:
    with pytest.raises(PromptWeightError, match=message):
        parse_weights(prompt)


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return pictor.load("default", device="cpu")


def _check_weighing(encoder: TextEncoder, prompt: str, weighted_tokens: dict[int, float]) -> None:
    """`prompt`'s weighted encoding against its plain one: the tokens at `weighted_tokens` (place ->
    weight) moved from the empty prompt's states; every other state, the mask and the pooled vector bit for
    bit."""
    parsed = parse_weights(prompt)
    got = encoder.encode_weighted([parsed.pieces])
    plain, empty = encoder.encode([parsed.text]), encoder.encode([""])
    torch.testing.assert_close(got.mask, plain.mask, rtol=0, atol=0)
    torch.testing.assert_close(got.pooled, plain.pooled, rtol=0, atol=0)
    for i in range(plain.tokens.shape[1]):
        if i in weighted_tokens:
            want = empty.tokens[0, i] + weighted_tokens[i] * (plain.tokens[0, i] - empty.tokens[0, i])
            torch.testing.assert_close(got.tokens[0, i], want)
            assert not torch.equal(got.tokens[0, i], plain.tokens[0, i])
        else:
            torch.testing.assert_close(got.tokens[0, i], plain.tokens[0, i], rtol=0, atol=0)


def test_minilm_weighs_the_tokens_of_each_piece(pipe: Pipeline) -> None:
    encoder = pipe.text_encoder
    # [CLS] a red circle left of a blue square [SEP]: "red" is token 2, "blue" token 7
    _check_weighing(encoder, "a (red:1.5) circle left of a [blue] square", {2: 1.5, 7: S})
    _check_weighing(encoder, "a (red circle:0) left", {2: 0.0, 3: 0.0})  # weight 0: the empty prompt's states
    none = parse_weights("a red circle")
    torch.testing.assert_close(
        encoder.encode_weighted([none.pieces]).tokens, encoder.encode(["a red circle"]).tokens, rtol=0, atol=0
    )


def test_a_word_split_across_pieces_takes_its_first_characters_weight(pipe: Pipeline) -> None:
    # "reddish" is one word but its start is weighted: wordpieces "red", "##dish" -> each by its first char
    parsed = parse_weights("a (red:2)dish circle")
    spans = pipe.text_encoder.token_spans([parsed.text])[0]
    assert spans[1] == (0, 1) and spans[0] == (0, 0)
    got = pipe.text_encoder.encode_weighted([parsed.pieces]).tokens
    plain = pipe.text_encoder.encode([parsed.text]).tokens
    weighted = [i for i in range(got.shape[1]) if not torch.equal(got[0, i], plain[0, i])]
    starts = [spans[i][0] for i in weighted]
    assert weighted and all(2 <= s < 5 for s in starts)  # only tokens that start inside "red"


@pytest.fixture(scope="module")
def folder_encoders(tmp_path_factory: pytest.TempPathFactory) -> tuple[T5TextEncoder, CLIPTextEncoder]:
    root = tmp_path_factory.mktemp("text")
    t5_folder(root / "t5")
    clip_folder(root / "clip")
    return T5TextEncoder(root / "t5", max_length=12), CLIPTextEncoder(root / "clip", max_length=12)


def test_t5_clip_and_flux_encoders_weigh_by_token_offsets(
    folder_encoders: tuple[T5TextEncoder, CLIPTextEncoder],
) -> None:
    t5, clip = folder_encoders
    # the tiny tokenizers spell words letter by letter: T5 "▁a ▁b c ▁d </s>", CLIP "<s> a</w> b c</w> d</w>"
    _check_weighing(t5, "a (bc:1.5) d", {1: 1.5, 2: 1.5})
    _check_weighing(clip, "a (bc:1.5) d", {2: 1.5, 3: 1.5})
    flux = FluxTextEncoder(t5, clip)
    _check_weighing(flux, "a (bc:1.5) d", {1: 1.5, 2: 1.5})  # T5's tokens; CLIP's pooled vector as it is


def test_requests_record_and_reproduce_weights(pipe: Pipeline, tmp_path: Path) -> None:
    plain = GenerationRequest("a red circle", seed=3, steps=4)
    (a,) = pipe.generate(plain)
    (b,) = pipe.generate(GenerationRequest("a red circle", seed=3, steps=4, prompt_weights=True))
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))  # no weights: the same image
    assert "prompt_weights" not in a.record and b.record["prompt_weights"] is True

    request = GenerationRequest("a (red:1.8) circle", seed=3, steps=4, prompt_weights=True)
    (c,) = pipe.generate(request)
    (text,) = pipe.generate(GenerationRequest("a (red:1.8) circle", seed=3, steps=4))  # brackets as text
    for other in (a, text):
        assert np.abs(np.asarray(c.image, int) - np.asarray(other.image, int)).mean() > 1
    path = save_png(c.image, c.record, tmp_path / "weighted.png")
    assert read_text_chunks(path)["parameters"].startswith("a (red:1.8) circle\n")  # as A1111 reads it
    again = reproduce(pipe, read_record(path))
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(c.image))
    record = read_record(path)
    record["prompt_weights"] = "yes"
    with pytest.raises(ProvenanceError, match="'prompt_weights' is 'yes', not true or false"):
        check_record(record)


def test_the_negative_prompt_is_weighed_too(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[tuple[str, float]]] = []
    original = pipe.text_encoder.encode_weighted

    def spy(prompts):  # type: ignore[no-untyped-def]
        seen.extend(list(p) for p in prompts)
        return original(prompts)

    monkeypatch.setattr(pipe.text_encoder, "encode_weighted", spy)
    request = GenerationRequest("a circle", negative_prompt="(blue:1.4)", guidance=3.0, steps=2, seed=1)
    pipe.generate(GenerationRequest(**{**request.__dict__, "prompt_weights": True}))
    assert [("blue", 1.4)] in seen and [("a circle", 1.0)] in seen
    with pytest.raises(GenerationError, match=r"the negative prompt: prompt weight '1\.\.5' at character 7"):
        pipe.generate(
            GenerationRequest(
                "a circle", negative_prompt="(blue:1..5)", steps=2, guidance=3.0, prompt_weights=True
            )
        )


def test_prompts_of_a_batch_are_weighed_each_by_its_own_pieces(pipe: Pipeline) -> None:
    prompts = ["a (red:1.5) circle left of a big blue square", "(star:0.5)", "two green circles"]
    pieces = [parse_weights(p).pieces for p in prompts]
    together = pipe.text_encoder.encode_weighted(pieces)
    for k, one in enumerate(pieces):
        alone = pipe.text_encoder.encode_weighted([one])
        torch.testing.assert_close(together.tokens[k], alone.tokens[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(together.pooled[k], alone.pooled[0], rtol=0, atol=1e-6)


def test_a_token_whose_offsets_take_the_space_before_it_weighs_by_its_word() -> None:
    """Some tokenizers (sentencepiece's "▁word") may count the space before a word as the token's; that space
    belongs to the piece before, so the word's first visible character decides."""

    class Spaced(TextEncoder):
        kind = "spaced"
        max_length, context_dim, pooled_dim = 4, 2, 2

        def _device(self) -> torch.device:
            return torch.device("cpu")

        def _encode(self, prompts: list[str]) -> TextEmbeddings:
            tokens = torch.stack([torch.full((4, 2), float(len(p))) for p in prompts])
            return TextEmbeddings(
                tokens, torch.ones(len(prompts), 4, dtype=torch.bool), torch.zeros(len(prompts), 2)
            )

        def token_spans(self, prompts: list[str]) -> list[list[tuple[int, int]]]:
            return [[(0, 0), (0, 1), (1, 5), (0, 0)] for _ in prompts]  # "a", " red" (space included)

    got = Spaced().encode_weighted([parse_weights("a (red:2)").pieces]).tokens[0, :, 0]
    assert got.tolist() == [5.0, 5.0, 10.0, 5.0]  # "red": 0 + 2 * (5 - 0); "a" not weighed by the space


def test_the_empty_prompt_is_encoded_once(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = pipe.text_encoder
    encoder.__dict__.pop("_empty_cache", None)
    seen: list[list[str]] = []
    original = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda prompts: seen.append(list(prompts)) or original(prompts))
    for _ in range(3):
        encoder.encode_weighted([parse_weights("a (red:1.5) circle").pieces])
    assert seen.count([""]) == 1 and len(seen) == 4


def test_a_weight_that_cannot_be_read_gives_no_length_notice_but_an_error(pipe: Pipeline) -> None:
    # The server asks for notices before it resolves a job queued while the model loaded: they must not fail.
    assert pipe.prompt_notices("(a:1.2.3)", "(b:x)", weighted=True) == []
    with pytest.raises(GenerationError, match=r"the prompt: prompt weight '1\.2\.3'"):
        pipe.resolve_request(GenerationRequest("(a:1.2.3)", prompt_weights=True))


def test_cut_off_notices_count_the_text_the_encoder_reads(pipe: Pipeline) -> None:
    words = " ".join(["circle"] * 28)  # 28 of the 30 tokens the default model's MiniLM reads (32 less 2)
    assert pipe.prompt_notices(f"((((({words})))))", weighted=True) == []
    assert pipe.prompt_notices(f"((((({words})))))", weighted=False)  # the brackets are tokens too
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.resolve_request(GenerationRequest(f"((((({words})))))", prompt_weights=True, steps=1))
    assert not [w for w in caught if "longer than the text encoder" in str(w.message)]


def test_the_command_line_reads_weights_only_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", "a (red:1.5) circle", "--model", "tiny", "--steps", "2", "--seed", "4"]
    assert main([*args, "--prompt-weights", "-o", str(tmp_path / "w")]) == 0
    weighted = Path(capsys.readouterr().out.split()[0])
    assert read_record(weighted)["prompt_weights"] is True
    assert main([*args, "-o", str(tmp_path / "t")]) == 0
    assert "prompt_weights" not in read_record(Path(capsys.readouterr().out.split()[0]))
    assert main(["reproduce", str(weighted), "--model", "tiny", "-o", str(tmp_path / "r")]) == 0
    assert "the pixels are identical" in capsys.readouterr().err
    assert (
        main([*args[:1], "a (red:99) circle", *args[2:], "--prompt-weights", "-o", str(tmp_path / "x")]) == 2
    )
    assert "outside [-10, 10]" in capsys.readouterr().err
