"""A1111's prompt editing (`pictor.prompt_editing`): its schedule parser against the examples of A1111's own
doctests, which text each step reads, and the pipeline, records, reproduce and CLI with it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pictor.checkpoint import save_bundle
from pictor.generation_request import GenerationError, GenerationRequest
from pictor.loading import load
from pictor.pipeline import Pipeline
from pictor.prompt_editing import has_editing, prompt_schedule, step_of_time, text_at
from pictor.provenance import parameters_text, read_record
from pictor.reproduce import reproduce
from pictor.settings_import import settings_from_parameters
from tests.test_cli_prompt_variants import cli

from tiny_bundle import tiny_models

# A1111's doctests of get_learned_conditioning_prompt_schedules (10 steps; A1111 1.6 and later): (prompt,
# schedule)
A1111_EXAMPLES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(k, "a" if k % 2 else "(b:1.1)") for k in range(1, 11)]),
    ("[fe|]male", [(k, "female" if k % 2 else "male") for k in range(1, 11)]),
    ("[fe|||]male", [(k, "female" if k % 4 == 1 else "male") for k in range(1, 11)]),
]
# ... and those of a hires fix's second pass of 10 steps after a first of 10
A1111_SECOND_PASS = [("a [b:.5] c", [(10, "a b c")]), ("a [b:1.5] c", [(5, "a  c"), (10, "a b c")])]


@pytest.mark.parametrize(("prompt", "schedule"), A1111_EXAMPLES)
def test_schedules_are_a1111s(prompt: str, schedule: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, 10) == schedule


@pytest.mark.parametrize(("prompt", "schedule"), A1111_SECOND_PASS)
def test_a_second_pass_counts_on(prompt: str, schedule: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, 10, first_pass_steps=10) == schedule


@pytest.mark.parametrize(
    ("prompt", "schedule"),
    [
        ("a [b::0.3] c", [(3, "a b c"), (10, "a  c")]),  # dropped after 30%
        ("[x:y:25]", [(10, "x")]),  # past the last step: never switches
        ("[x:y:1.0]", [(10, "x")]),  # a dot makes it a share: all of the steps (A1111 since 1.6)
        ("[x:y:2.5]", [(10, "x")]),
        ("[x:y:0]", [(10, "y")]),  # at or before step 0: the later text throughout
        ("[x:y:5e-1]", [(10, "y")]),  # no dot: a step number, 0.5, so 0
        ("[x:y:5 ]", [(5, "x"), (10, "y")]),  # a space before the bracket
        ("(a [b:c:2]:1.2) d", [(2, "(a b:1.2) d"), (10, "(a c:1.2) d")]),  # inside a weight
        ("a | b", [(10, "a | b")]),  # a bar outside brackets: the prompt as written
        ("a [b:c] \\[d:e:1\\]", [(10, "a [b:c] \\[d:e:1\\]")]),  # no number; escaped brackets
        ("trailing \\", [(10, "trailing \\")]),
    ],
)
def test_other_prompts(prompt: str, schedule: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, 10) == schedule


def test_which_text_a_step_reads() -> None:
    """A1111 counts its model calls from 0: call c reads the first text ending at step c or later, so an
    alternation reads its first option twice at the start."""
    schedule = prompt_schedule("[a|b]", 4)
    assert [schedule[text_at(schedule, i)][1] for i in range(4)] == ["a", "a", "b", "a"]
    schedule = prompt_schedule("[x:y:2]", 5)
    assert [schedule[text_at(schedule, i)][1] for i in range(5)] == ["x", "x", "x", "y", "y"]
    ts = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    # the nearest step time (calls run at step times; bf16 rounding must not move one to the step before)
    assert [step_of_time(ts, t) for t in (1.0, 0.7505, 0.7495, 0.5, 0.251, 0.249)] == [0, 1, 1, 2, 3, 3]
    assert has_editing("a [b:c:0.5]") and has_editing("[a|b]") and not has_editing("a (b:1.2) [c]")
    # (found in review) what switches nothing, or only past 100 steps, is still editing syntax
    assert has_editing("a [cat|cat] on a mat") and has_editing("a castle[ at night:120]")


def test_brackets_nested_too_deep_to_follow_are_kept_whole() -> None:
    """(Found in review: a recursive reader ran out of stack on ~500 unclosed brackets.)"""
    deep = "a [" * 2000
    assert prompt_schedule(deep, 4) == [(4, deep)] and not has_editing(deep)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("editing") / "tiny"
    cfg, flux, ae = tiny_models("tiny-editing", trained=True)
    save_bundle(path, cfg, flux.state_dict(), ae.state_dict())
    return path


@pytest.fixture(scope="module")
def pipe(bundle: Path) -> Pipeline:
    return load(str(bundle), device="cpu")


def _image(pipe: Pipeline, prompt: str, editing: bool = True, **kw: object) -> np.ndarray:
    request = GenerationRequest(prompt, seed=3, steps=4, width=16, height=16, prompt_weights=True, **kw)  # type: ignore[arg-type]
    request.prompt_editing = editing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(pipe.generate(request)[0].image).astype(np.int16)


class TextSpy:
    """Records the texts the pipeline encodes, in order."""

    def __init__(self, pipe: Pipeline) -> None:
        self.texts: list[str] = []
        self._encode = pipe.encode_text

    def __call__(self, prompts: list[str], weighted: bool = False) -> object:
        self.texts += prompts
        return self._encode(prompts, weighted)


def test_the_pipeline_reads_each_steps_text(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = "a red circle", "a blue square"
    assert np.array_equal(_image(pipe, f"[{a}:{b}:10]"), _image(pipe, a, editing=False))  # never switches
    assert np.array_equal(_image(pipe, f"[{a}|{a}]"), _image(pipe, a, editing=False))
    switched = _image(pipe, f"[{a}:{b}:1]")  # steps 0 and 1 read a, 2 and 3 b
    assert not np.array_equal(switched, _image(pipe, a, editing=False))
    assert not np.array_equal(switched, _image(pipe, b, editing=False))
    spy = TextSpy(pipe)
    monkeypatch.setattr(pipe, "encode_text", spy)
    _image(pipe, f"[{a}:{b}:1]", negative_prompt="[blurry|dark]")
    assert spy.texts == [a, b, "blurry", "dark"]  # each text encoded once for the run
    # the model calls read the texts by step: a spy on the transformer sees which text tokens each call got
    encoded = {t: pipe.encode_text([t], True).tokens for t in (a, b)}
    seen: list[str] = []
    forward = pipe.transformer.forward

    def spy_forward(img, img_ids, txt, *args, **kw):  # type: ignore[no-untyped-def]
        seen.append(next(t for t, tok in encoded.items() if torch.equal(txt[:1], tok.to(txt.dtype))))
        return forward(img, img_ids, txt, *args, **kw)

    monkeypatch.setattr(pipe.transformer, "forward", spy_forward)
    _image(pipe, f"[{a}:{b}:1]")
    assert seen == [a, a, b, b]
    seen.clear()
    _image(pipe, f"[{a}:{b}:1]", sampler="heun")  # Heun's corrector call at the next step's time
    assert seen[:4] == [a, a, a, b]
    seen.clear()
    _image(pipe, f"[{a}:{b}:1]", guidance=1.0)  # guidance 1: no CFG, one half
    assert seen == [a, a, b, b]
    seen.clear()  # a hires fix's second pass counts on: 1.5 is half way through it
    _image(pipe, f"[{a}:{b}:1.5]", hires_scale=2.0, hires_steps=4, hires_strength=0.5)
    assert seen == [a] * 4 + [a, a, a, b]


def test_records_reproduce_and_the_a1111_text(pipe: Pipeline) -> None:
    request = GenerationRequest(
        "a [red|blue] circle", seed=3, steps=4, width=16, height=16, prompt_weights=True, prompt_editing=True
    )
    (g,) = pipe.generate(request)
    assert g.record["prompt_editing"] is True
    assert np.array_equal(np.asarray(reproduce(pipe, g.record).image), np.asarray(g.image))
    text = parameters_text(g.record)
    assert text.startswith("a [red|blue] circle\n")  # A1111 reads it as written
    imported = settings_from_parameters(text)
    assert imported.values["prompt_editing"] is True and imported.values["prompt_weights"] is True
    plain = settings_from_parameters("a red circle\nSteps: 4, Seed: 3, Size: 16x16")
    assert plain.values["prompt_editing"] is False  # on only where the text uses it


def test_it_needs_prompt_weights(pipe: Pipeline) -> None:
    with pytest.raises(GenerationError, match="turn prompt weights on too"):
        pipe.generate(GenerationRequest("[a:b:1]", steps=2, width=16, height=16, prompt_editing=True))
    with pytest.raises(GenerationError, match="the negative prompt"):  # each scheduled text is checked
        pipe.generate(
            GenerationRequest(
                "x",
                negative_prompt="[a:(b:99):1]",
                steps=2,
                width=16,
                height=16,
                prompt_weights=True,
                prompt_editing=True,
            )
        )


def test_the_command_line(capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path) -> None:
    code, stdout, err = cli(
        capsys, "generate", "a [red:blue:0.5] circle", "--prompt-editing", "--model", str(bundle),
        "--steps", "4", "--size", "16x16", "--device", "cpu", "--seed", "3", "-o", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 0, err
    record = read_record(stdout.split()[0])
    assert record["prompt_editing"] is True and record["prompt_weights"] is True
