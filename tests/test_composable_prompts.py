"""A1111's composable diffusion (`pictor.composable_prompts`): the prompt's AND parts and weights as A1111
reads them, the velocity they give (checked against passes of each part alone), records, the A1111 text,
refusals and the CLI."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pictor.composable_prompts import compose, split_and, uses_and
from pictor.generation_request import GenerationError, GenerationRequest
from pictor.guided_velocity import guided_velocity
from pictor.loading import load
from pictor.notices import PictorWarning
from pictor.pipeline import Pipeline
from pictor.provenance import parameters_text, read_record
from pictor.reproduce import reproduce
from pictor.settings_import import settings_from_parameters
from tests.test_cli_prompt_variants import cli

from tiny_bundle import saved_tiny_bundle
from tiny_bundle import velocity_32 as _velocity


@pytest.mark.parametrize(
    ("prompt", "parts"),
    [
        ("a red circle", [("a red circle", 1.0)]),
        ("a AND b", [("a", 1.0), (" b", 1.0)]),
        ("a red circle AND a blue square:0.8", [("a red circle", 1.0), (" a blue square", 0.8)]),
        ("a:1.5", [("a", 1.5)]),
        ("a red circle:1", [("a red circle", 1.0)]),  # read as "a red circle", as A1111 does
        ("two shapes \n", [("two shapes", 1.0)]),
        ("a : -0.5  AND b:+2", [("a", -0.5), (" b", 2.0)]),
        ("x:.5 AND y:5.", [("x", 0.5), (" y", 5.0)]),
        ("a and b", [("a and b", 1.0)]),  # only the upper-case word
        ("ANDROID AND BAND", [("ANDROID", 1.0), (" BAND", 1.0)]),  # whole words only
        ("a:b", [("a:b", 1.0)]),  # no number: text
        ("(a red circle:1.2)", [("(a red circle:1.2)", 1.0)]),  # a prompt weight, not a part's
        ("a AND", [("a", 1.0), ("", 1.0)]),
        ("a\nAND b:2\n", [("a", 1.0), (" b", 2.0)]),  # trailing white space dropped
    ],
)
def test_parts_are_a1111s(prompt: str, parts: list[tuple[str, float]]) -> None:
    assert split_and(prompt) == parts
    assert uses_and(prompt) == (parts != [(prompt.rstrip(), 1.0)])
    assert uses_and(prompt) == (
        prompt not in ("a red circle", "a and b", "a:b", "(a red circle:1.2)", "two shapes \n")
    )


def test_compose() -> None:
    torch.manual_seed(0)
    out = torch.randn(3, 2, 5, 4)  # two parts and the negative prompt's pass
    w = torch.tensor([[1.0] * 5, [0.5] * 5])
    c0, c1, u = out
    assert torch.allclose(compose(out, w, 7.0), u + 7.0 * ((c0 - u) + 0.5 * (c1 - u)))  # A1111's sum
    assert torch.allclose(compose(out[:2], w, None), (c0 + 0.5 * c1) / 1.5)  # ComfyUI's mean


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_bundle(tmp_path_factory.mktemp("composable"), "tiny-composable")


@pytest.fixture(scope="module")
def pipe(bundle: Path) -> Pipeline:
    return load(str(bundle), device="cpu")


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_the_velocity_follows_each_parts_own_pass(pipe: Pipeline, guidance: float) -> None:
    prompt = "a red circle AND a blue square:0.5 AND blurry:-0.3"
    torch.manual_seed(0)
    x, t = torch.randn(2, 16, 16), torch.tensor([0.6, 0.9])
    negative_prompt = "dark" if guidance != 1.0 else ""  # (a negative prompt needs CFG)
    with torch.inference_mode():
        v = _velocity(pipe, prompt, guidance=guidance, negative_prompt=negative_prompt, composable=True)(x, t)
        c = [_velocity(pipe, p, guidance=1.0)(x, t) for p in ("a red circle", " a blue square", " blurry")]
        u = _velocity(pipe, "dark", guidance=1.0)(x, t)
    if guidance != 1.0:
        want = u + guidance * ((c[0] - u) + 0.5 * (c[1] - u) - 0.3 * (c[2] - u))
    else:
        want = (c[0] + 0.5 * c[1] - 0.3 * c[2]) / 1.2
    assert torch.allclose(v, want, atol=1e-5), (v - want).abs().max()


def _generate(pipe: Pipeline, prompt: str, **kw: Any) -> list[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny encoder's notices about its vocabulary
        return pipe.generate(GenerationRequest(prompt, seed=4, steps=4, **{"num_images": 2, **kw}))


def test_images_records_reproduce_and_the_a1111_text(pipe: Pipeline) -> None:
    prompt = "a red circle AND a blue square:0.7"
    anded = _generate(pipe, prompt, composable=True)
    plain = _generate(pipe, prompt)  # off: AND is a word of the prompt
    assert anded[0].record["composable"] is True and "composable" not in plain[0].record
    for a, p in zip(anded, plain, strict=True):
        assert np.abs(np.asarray(a.image).astype(np.int16) - np.asarray(p.image)).max() > 1
        assert np.array_equal(np.asarray(reproduce(pipe, a.record).image), np.asarray(a.image))
    # a prompt without AND or a weight runs as it would without composable diffusion
    one = _generate(pipe, "a red circle", composable=True)
    assert np.array_equal(np.asarray(one[0].image), np.asarray(_generate(pipe, "a red circle")[0].image))
    text = parameters_text(anded[0].record)
    assert text.startswith(prompt + "\n")
    assert settings_from_parameters(text).values["composable"] is True
    assert settings_from_parameters("a red circle\nSteps: 4, Seed: 3").values["composable"] is False


@pytest.mark.parametrize(
    ("prompt", "settings", "words"),
    [
        ("a AND b", {"regions": [{"box": [0, 0, 1, 1], "prompt": "x"}]}, "do not go together"),
        (" AND ".join("abcdefghi"), {}, "the prompt has 9 parts joined by AND; at most 8"),
        ("a:-1 AND b:0.5", {"guidance": 1.0}, "sum to 0 or less"),
    ],
)
def test_refusals_say_what_to_do(pipe: Pipeline, prompt: str, settings: dict[str, Any], words: str) -> None:
    with pytest.raises(GenerationError, match=words):
        pipe.generate(GenerationRequest(prompt, steps=2, composable=True, **settings))


def test_the_command_line(capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = cli(
        capsys, "generate", "a red circle AND a blue square", "--composable", "--model", str(bundle),
        "--steps", "2", "--device", "cpu", "--seed", "3", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    (png,) = out.glob("*.png")
    assert read_record(png)["composable"] is True


def test_parts_are_checked_and_measured(pipe: Pipeline) -> None:
    """Each AND part is read as a prompt (its cut-off end said, named by its part); the whole prompt,
    never read as one text, is not measured."""
    long = " ".join(["word"] * 40) + " end"
    request = GenerationRequest(f"a AND {long}", steps=2, composable=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe.resolve_request(request)
    said = [str(w.message) for w in seen if issubclass(w.category, PictorWarning)]
    assert len(said) == 1 and said[0].startswith("the prompt's AND part 2 is longer than"), said
    with pytest.raises(GenerationError, match="the prompt's AND part 1: "):
        pipe.resolve_request(GenerationRequest("(a:99) AND b", steps=2, composable=True, prompt_weights=True))


def test_a_prompt_without_and_takes_regions(pipe: Pipeline) -> None:
    """Composable on for a prompt without AND reads it as one text, which regions go with."""
    regions = [{"box": [0, 0, 0.5, 1], "prompt": "a red circle"}]
    (off,) = _generate(pipe, "two shapes", regions=regions, num_images=1)
    for prompt in ("two shapes", "two shapes \n"):  # (trailing white space is no part of A1111's syntax)
        (on,) = _generate(pipe, prompt, composable=True, regions=regions, num_images=1)
        assert np.array_equal(np.asarray(on.image), np.asarray(off.image))


def test_prompt_editing_in_the_parts(pipe: Pipeline) -> None:
    """Each AND part reads its own schedule (A1111 splits at AND first, then reads each part's editing)."""
    prompt = "[a red circle:a blue square:2] AND [a star|two shapes]:0.5"
    r = pipe.resolve_request(
        GenerationRequest(prompt, width=32, height=32, steps=4, composable=True, prompt_editing=True,
                          prompt_weights=True)
    )  # fmt: skip
    ts = torch.linspace(1.0, 0.0, 5)
    torch.manual_seed(3)
    x = torch.randn(2, 16, 16)
    with torch.inference_mode():
        v = guided_velocity(pipe, r, 2, 8, 8, ts=ts)
        for step, first, second in ((1, "a red circle", " a star"), (2, "a red circle", " two shapes"),
                                    (4, "a blue square", " two shapes")):  # fmt: skip
            t = ts[step].expand(2)
            c = [_velocity(pipe, p, guidance=1.0, prompt_weights=True)(x, t) for p in (first, second)]
            u = _velocity(pipe, "", guidance=1.0)(x, t)
            want = u + r.guidance * ((c[0] - u) + 0.5 * (c[1] - u))
            assert torch.allclose(v(x, t), want, atol=1e-5), (step, (v(x, t) - want).abs().max())
