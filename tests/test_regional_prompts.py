"""Regional prompts (`pictor.regional_prompts`): the regions' reading, their weights per token, the velocity
they give (checked against passes of each prompt alone), records, reproduce, refusals and the CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.denoise_tiles import plan_windows
from pictor.editing import EditRequest
from pictor.generation_request import GenerationError, GenerationRequest
from pictor.guided_velocity import guided_velocity
from pictor.loading import load, pipeline_from_preset
from pictor.notices import PictorWarning
from pictor.pipeline import Pipeline
from pictor.provenance import read_record
from pictor.regional_prompts import RegionError, parse_regions, read_regions_arg, region_weights
from pictor.reproduce import reproduce
from tests.test_cli_prompt_variants import cli

from tiny_bundle import saved_tiny_bundle
from tiny_bundle import velocity_32 as _velocity

LEFT = {"box": [0.0, 0.0, 0.5, 1.0], "prompt": "a red circle"}
RIGHT = {"box": [0.5, 0.25, 1.0, 0.75], "prompt": "a blue square", "strength": 3}
WEIGHTED = {"prompt_weights": True}  # (every text read for A1111's weights: the negative prompt's too)


def test_regions_are_read_and_normalised() -> None:
    regions = parse_regions(json.dumps([LEFT, {**RIGHT, "prompt": "  a blue square "}]))
    assert regions == [
        {"box": [0.0, 0.0, 0.5, 1.0], "prompt": "a red circle", "strength": 1.0},
        {"box": [0.5, 0.25, 1.0, 0.75], "prompt": "a blue square", "strength": 3.0},
    ]
    # a layout's boxes read as regions: the phrase is the prompt
    assert parse_regions([{"box": [0, 0, 1, 1], "phrase": "a star"}])[0]["prompt"] == "a star"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[", "not valid JSON"),
        ("[]", "non-empty list"),
        ({"box": [0, 0, 1, 1], "prompt": "x"}, "non-empty list"),
        ([LEFT] * 9, "at most 8 regions"),
        ([{"box": [0, 0, 1, 1]}], "'prompt' must be a non-empty string"),
        ([{"box": [0, 0, 1, 1], "prompt": "  "}], "'prompt' must be a non-empty string"),
        ([{"box": [0, 0, 1, 1], "prompt": "x", "phrase": "y"}], "not both"),
        ([{"box": [0, 0, 1, 1], "prompt": "x", "weight": 2}], "optionally 'strength'"),
        ([{"box": [0, 0, 1], "prompt": "x"}], "four numbers"),
        ([{"box": [0, 0, True, 1], "prompt": "x"}], "four numbers"),
        ([{"box": [0.5, 0, 0.5, 1], "prompt": "x"}], "0 <= x0 < x1 <= 1"),
        ([{"box": [0, 0, 2, 1], "prompt": "x"}], "divide pixel coordinates"),
        ([{"box": [0, 0, 1, 1], "prompt": "x", "strength": 0}], "above 0 and at most 10"),
        ([{"box": [0, 0, 1, 1], "prompt": "x", "strength": 11}], "above 0 and at most 10"),
        ([{"box": [0, 0, 1, 1], "prompt": "x", "strength": float("nan")}], "above 0 and at most 10"),
        ([{"box": [0, 0, 1, 1], "prompt": "x", "strength": "2"}], "above 0 and at most 10"),
        ([{"box": [0, 0, 1, 1], "prompt": "x" * 2001}], "the limit is 2000"),
        ([{"box": [0, 0, 1, 1], "prompt": "\ud800"}], "lone surrogate"),
        ("[" * 100_000, "nested too deeply"),
    ],
)
def test_bad_regions_say_what_is_wrong(value: Any, message: str) -> None:
    with pytest.raises(RegionError, match=message):
        parse_regions(value)


def test_regions_from_the_command_line_text(tmp_path: Path) -> None:
    path = tmp_path / "regions.json"
    path.write_text(json.dumps([LEFT]), encoding="utf-8")
    assert read_regions_arg(str(path)) == read_regions_arg(json.dumps([LEFT])) == parse_regions([LEFT])
    with pytest.raises(RegionError, match="no such file"):
        read_regions_arg(str(tmp_path / "missing.json"))
    path.write_bytes(b"\xff\xfe[")
    with pytest.raises(RegionError, match="not UTF-8"):
        read_regions_arg(str(path))


def test_weights_follow_boxes_and_strengths() -> None:
    w = region_weights(parse_regions([LEFT, RIGHT]), 4, 4).reshape(3, 4, 4)
    assert torch.allclose(w.sum(0), torch.ones(4, 4))
    # left half: the whole prompt and the left region share equally (strength 1)
    assert torch.allclose(w[0, :, :2], torch.full((4, 2), 0.5)) and torch.allclose(w[1, :, :2], w[0, :, :2])
    # right middle rows: strength 3 against the whole prompt's 1
    assert torch.allclose(w[2, 1:3, 2:], torch.full((2, 2), 0.75))
    # right top and bottom rows: no box, the whole prompt alone
    assert torch.equal(w[0, [0, 3], 2:], torch.ones(2, 2)) and not w[1:, [0, 3], 2:].any()
    # a box edge inside a cell weighs by the covered share: 1/4 of a cell at strength 1 -> 0.25 / 1.25
    (row,) = region_weights(parse_regions([{"box": [0, 0, 0.125, 1], "prompt": "x"}]), 1, 2)[1:]
    assert torch.allclose(row, torch.tensor([0.2, 0.0]))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_bundle(tmp_path_factory.mktemp("regions"), "tiny-regions")


@pytest.fixture(scope="module")
def pipe(bundle: Path) -> Pipeline:
    return load(str(bundle), device="cpu")


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_the_velocity_blends_each_prompts_own_pass(pipe: Pipeline, guidance: float) -> None:
    """Each token's velocity is the passes' mean by its weights, each pass what the prompt alone gives;
    under CFG the blend is guided away from the negative prompt's pass."""
    regions = parse_regions([LEFT, RIGHT])
    torch.manual_seed(0)
    x, t = torch.randn(2, 16, 16), torch.tensor([0.7, 0.4])  # two images, each at its own time
    with torch.inference_mode():
        negative_prompt = "(blurry:1.3)" if guidance != 1.0 else ""  # (a negative prompt needs CFG)
        v = _velocity(
            pipe,
            "two shapes",
            guidance=guidance,
            negative_prompt=negative_prompt,
            regions=regions,
            **WEIGHTED,
        )(x, t)
        texts = ("two shapes", LEFT["prompt"], RIGHT["prompt"])
        alone = [_velocity(pipe, p, guidance=1.0, **WEIGHTED)(x, t) for p in texts]
        negative = _velocity(pipe, "(blurry:1.3)", guidance=1.0, **WEIGHTED)(x, t)
    w = region_weights(regions, 4, 4)[:, None, :, None]
    blend = (w * torch.stack(alone)).sum(0)
    want = negative + guidance * (blend - negative) if guidance != 1.0 else blend
    assert torch.allclose(v, want, atol=1e-5), (v - want).abs().max()
    assert not torch.allclose(v, alone[0] if guidance == 1.0 else want * 0, atol=1e-3)  # the regions count


def test_images_records_and_reproduce(pipe: Pipeline) -> None:
    def generate(**kw: Any) -> list[Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tiny encoder's notices about its vocabulary
            return pipe.generate(GenerationRequest("two shapes", seed=5, steps=4, num_images=2, **kw))

    plain = generate()
    regional = generate(regions=[LEFT, RIGHT])
    assert regional[0].record["regions"] == parse_regions([LEFT, RIGHT])
    assert "regions" not in plain[0].record
    for p, g in zip(plain, regional, strict=True):
        a, b = (np.asarray(im.image).astype(np.int16) for im in (p, g))
        assert np.abs(a - b).max() > 1  # the regions' prompts change the picture (beyond rounding, below)
        assert np.array_equal(np.asarray(reproduce(pipe, g.record).image), b)
    # regions whose prompt is the whole prompt change nothing but float rounding
    same = generate(regions=[{"box": [0, 0, 0.5, 1], "prompt": "two shapes", "strength": 2}])
    for p, g in zip(plain, same, strict=True):
        assert np.abs(np.asarray(p.image).astype(np.int16) - np.asarray(g.image)).max() <= 1


def test_edits_take_regions(pipe: Pipeline) -> None:
    source = Image.new("RGB", (32, 32), (128, 128, 128))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (g,) = pipe.edit(EditRequest(source, "two shapes", strength=0.8, steps=4, seed=2, regions=[LEFT]))
    assert g.record["regions"] == parse_regions([LEFT]) and g.record["mode"] == "img2img"
    assert np.array_equal(np.asarray(reproduce(pipe, g.record, source=source).image), np.asarray(g.image))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    request = EditRequest(source, "x", mask=mask, inpaint_area="masked", steps=2, regions=[LEFT])
    with pytest.raises(ValueError, match="regions cover the whole image"):
        pipe.edit(request)


def test_bad_regions_are_refused_by_the_pipeline(pipe: Pipeline) -> None:
    with pytest.raises(GenerationError, match="'box' must be four numbers"):
        pipe.generate(GenerationRequest("x", steps=2, regions=[{"box": [0, 1], "prompt": "x"}]))


def test_the_first_block_cache_counts_every_pass(pipe: Pipeline) -> None:
    """The cache decides per row, and each pass is a row of its own: regions of the whole prompt make the
    same decisions and picture as none, and the record counts the passes (3 a step: two prompts' and the
    negative prompt's)."""
    same = [{"box": [0, 0, 0.5, 1], "prompt": "two shapes", "strength": 2}]
    cached = {"seed": 5, "steps": 6, "cache_threshold": 0.5}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (plain,) = pipe.generate(GenerationRequest("two shapes", **cached))
        (regional,) = pipe.generate(GenerationRequest("two shapes", regions=same, **cached))
    assert np.abs(np.asarray(plain.image).astype(np.int16) - np.asarray(regional.image)).max() <= 1
    full, total = plain.record["cache_passes"]["full"], plain.record["cache_passes"]["total"]
    assert 0 < full < total == 2 * 6  # some steps skipped; the prompt's and the negative's row each step
    assert regional.record["cache_passes"] == {"full": full * 3 // 2, "total": 3 * 6}
    assert np.array_equal(np.asarray(reproduce(pipe, regional.record).image), np.asarray(regional.image))


def test_denoise_tiles_blend_each_passes_windows(pipe: Pipeline) -> None:
    """Windows and regions both blend linearly per token, so a composed run in windows is the regions' blend
    of each prompt's windowed pass (a 32x32 picture: 4x4 tokens, windows of 2 tokens overlapping by 1)."""
    regions = parse_regions([LEFT, RIGHT])
    windows = plan_windows(4, 4, 2, 1)
    assert windows is not None and len(windows) > 1
    torch.manual_seed(4)
    x, t = torch.randn(2, 16, 16), torch.tensor([0.5, 0.2])

    def velocity(prompt: str, **kw: Any) -> torch.Tensor:
        r = pipe.resolve_request(GenerationRequest(prompt, width=32, height=32, steps=4, seed=1, **kw))
        with torch.inference_mode():
            return guided_velocity(pipe, r, 2, 8, 8, windows=windows)(x, t)

    got = velocity("two shapes", regions=regions, negative_prompt="blurry")
    alone = [velocity(p, guidance=1.0) for p in ("two shapes", LEFT["prompt"], RIGHT["prompt"])]
    u = velocity("blurry", guidance=1.0)
    g = float(pipe.defaults["guidance"])
    want = u + g * ((region_weights(regions, 4, 4)[:, None, :, None] * torch.stack(alone)).sum(0) - u)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # and through generate: windows of 16 pixels (2 tokens), regions of the whole prompt change nothing
    tiles = {"seed": 5, "steps": 3, "denoise_tile": 16, "denoise_tile_overlap": 8}
    same = [{"box": [0, 0, 0.5, 1], "prompt": "two shapes"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a pass from noise in windows is warned about)
        (plain,) = pipe.generate(GenerationRequest("two shapes", **tiles))
        (regional,) = pipe.generate(GenerationRequest("two shapes", regions=same, **tiles))
    assert np.abs(np.asarray(plain.image).astype(np.int16) - np.asarray(regional.image)).max() <= 1


def test_the_command_line(capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path) -> None:
    regions = tmp_path / "regions.json"
    regions.write_text(json.dumps([LEFT, RIGHT]), encoding="utf-8")
    out = tmp_path / "out"
    code, _, err = cli(
        capsys, "generate", "two shapes", "--regions", str(regions), "--model", str(bundle),
        "--steps", "2", "--device", "cpu", "--seed", "3", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    (png,) = out.glob("*.png")
    assert read_record(png)["regions"] == parse_regions([LEFT, RIGHT])
    code, _, err = cli(
        capsys, "generate", "two shapes", "--regions", '[{"box": [0, 0, 1, 1]}]', "--model", str(bundle),
        "--steps", "2", "--device", "cpu", "-o", str(tmp_path / "bad"),
    )  # fmt: skip
    assert code != 0 and "'prompt' must be a non-empty string" in err and "Traceback" not in err


@pytest.mark.filterwarnings("ignore:model 'tiny:UserWarning")
def test_with_a_layout_and_a_reference_picture() -> None:
    """The layout's residuals go with every pass, the reference picture with the prompts' passes and not
    the negative prompt's (as without regions)."""
    from tests.test_layout_generation import _adapter as layout_adapter
    from tests.test_reference_generation import _adapter as reference_adapter
    from tests.test_reference_generation import _picture

    pipe = pipeline_from_preset("tiny", device="cpu")
    torch.manual_seed(0)
    for module in pipe.transformer.modules():  # (as test_reference_generation: the text reaches the image)
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    pipe.layout_adapter, pipe.reference_adapter = layout_adapter(pipe), reference_adapter(pipe)
    layout = [{"box": [0.0, 0.5, 1.0, 1.0], "phrase": "grass"}]
    picture = np.asarray(_picture())
    regions = parse_regions([LEFT, RIGHT])
    torch.manual_seed(1)
    x, t = torch.randn(2, 16, 16), torch.tensor([0.8, 0.3])
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny preset's untrained-model notices
        v = _velocity(
            pipe, "two shapes", guidance=3.0, negative_prompt="blurry", regions=regions, layout=layout,
            reference=picture,
        )(x, t)  # fmt: skip
        alone = [
            _velocity(pipe, p, guidance=1.0, layout=layout, reference=picture)(x, t)
            for p in ("two shapes", LEFT["prompt"], RIGHT["prompt"])
        ]
        negative = _velocity(pipe, "blurry", guidance=1.0, layout=layout)(x, t)
        without = _velocity(pipe, "blurry", guidance=1.0)(x, t)
    assert not torch.allclose(negative, without, atol=1e-3)  # the layout speaks in this model
    blend = (region_weights(regions, 4, 4)[:, None, :, None] * torch.stack(alone)).sum(0)
    want = negative + 3.0 * (blend - negative)
    assert torch.allclose(v, want, atol=1e-5), (v - want).abs().max()


def test_region_prompts_are_checked_and_measured(pipe: Pipeline) -> None:
    """Each region's prompt is read as the prompt is: its weights are checked and a cut-off end is said,
    named by its region."""
    long = "a " + " ".join(["word"] * 40) + " end"
    request = GenerationRequest("x", steps=2, regions=[LEFT, {"box": [0, 0, 1, 1], "prompt": long}])
    with pytest.warns(PictorWarning, match="the prompt of region 1 is longer than the text encoder's"):
        pipe.resolve_request(request)
    weighted = GenerationRequest(
        "x", steps=2, prompt_weights=True, regions=[{"box": [0, 0, 1, 1], "prompt": "(a:99)"}]
    )
    with pytest.raises(GenerationError, match="the prompt of region 0: "):
        pipe.resolve_request(weighted)


def test_prompt_editing_in_the_whole_prompt_and_the_regions(pipe: Pipeline) -> None:
    """With prompt editing each pass reads its own text's schedule: at each step the velocity is the blend of
    passes of the texts that step reads (4 steps: "[x:y:2]" reads x at steps 0 to 2, then y; "[a|b]" a, a,
    b, a, b), and the negative prompt's pass its own ("[blurry:dark:1]": blurry at steps 0 and 1)."""
    regions = parse_regions([{"box": [0, 0, 0.5, 1], "prompt": "[a red circle|a blue square]"}])
    editing = {"prompt_weights": True, "prompt_editing": True, "negative_prompt": "[blurry:dark:1]"}
    r = pipe.resolve_request(
        GenerationRequest("[two shapes:a star:2]", width=32, height=32, steps=4, regions=regions, **editing)
    )
    ts = torch.linspace(1.0, 0.0, 5)
    torch.manual_seed(2)
    x = torch.randn(2, 16, 16)
    w = region_weights(regions, 4, 4)[:, None, :, None]
    with torch.inference_mode():
        v = guided_velocity(pipe, r, 2, 8, 8, ts=ts)
        for step, whole, region, negative in ((0, "two shapes", "a red circle", "blurry"),
                                              (2, "two shapes", "a blue square", "dark"),
                                              (3, "a star", "a red circle", "dark")):  # fmt: skip
            t = ts[step].expand(2)
            alone = [_velocity(pipe, p, guidance=1.0, prompt_weights=True)(x, t) for p in (whole, region)]
            u = _velocity(pipe, negative, guidance=1.0, prompt_weights=True)(x, t)
            want = u + r.guidance * ((w * torch.stack(alone)).sum(0) - u)
            assert torch.allclose(v(x, t), want, atol=1e-5), (step, (v(x, t) - want).abs().max())


def test_a_regions_scheduled_texts_are_measured(pipe: Pipeline) -> None:
    """With prompt editing a region's prompt is measured as each text its schedule reaches, not as written."""
    words = " ".join(["word"] * 40)
    regions = [{"box": [0, 0, 1, 1], "prompt": f"[{words} end:x:2]"}]
    request = GenerationRequest("x", steps=4, regions=regions, prompt_weights=True, prompt_editing=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe.resolve_request(request)
    said = [str(w.message) for w in seen if issubclass(w.category, PictorWarning)]
    assert len(said) == 1 and said[0].endswith(" end'"), said
