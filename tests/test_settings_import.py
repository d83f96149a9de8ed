"""`pictor generate --settings-from IMAGE` (A1111's "send to txt2img"): the settings of A1111 / Forge text and
of pictor records, what is not taken said aloud, and the same pixels again from a pictor image's A1111
text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pictor.cli import main
from pictor.provenance import parameters_text, read_record, read_text_chunks
from pictor.settings_import import SettingsImportError, settings_from_image, settings_from_parameters
from tests.test_hires_upscaler import make_upscaler

A1111 = """a (red:1.2) circle <lora:style_v2:0.8> left of a blue square
Negative prompt: (blurry:1.3), text
Steps: 12, Sampler: DPM++ 2M Karras, CFG scale: 3.5, Seed: 42, Size: 64x64, Model hash: 3057922f99, \
Model: shapes-small, Clip skip: 2, Version: v1.10.1"""

FORGE = """a harbour at dusk
Steps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 7, \
Size: 896x1152, Model: flux1-dev-bnb-nf4, Hires upscale: 1.5, Hires steps: 10, \
Hires upscaler: 4x-UltraSharp, Denoising strength: 0.35, Version: f2.0.1"""


def test_a1111_text_gives_its_settings_and_says_what_it_leaves() -> None:
    got = settings_from_parameters(A1111)
    assert got.values == {
        "prompt": "a (red:1.2) circle left of a blue square",  # the LoRA tag out, A1111's weights kept
        "negative": "(blurry:1.3), text",
        "prompt_weights": True,  # A1111 always reads its brackets as weights
        "prompt_editing": False,  # its prompt edits nothing (on only where the text does)
        "composable": False,  # nor has it AND
        "steps": 12,
        "seed": 42,
        "guidance": 3.5,
        "size": (64, 64),
        "sampler": "dpmpp_2m",
        "schedule": "karras",  # "DPM++ 2M Karras": the old names carry the schedule
    }
    notices = " | ".join(got.notices)
    assert "LoRA tags (style_v2) are taken out" in notices and "model 'shapes-small'" in notices
    assert "not taken (no pictor equivalent, or given another way): Clip skip" in notices
    assert "Version" not in notices


def test_forge_text_gives_distilled_guidance_and_the_hires_fix() -> None:
    got = settings_from_parameters(FORGE)
    assert got.values["guidance"] == 3.5  # Forge's Distilled CFG Scale, what a distilled model reads
    # Forge's Denoising strength 0.35 over 10 steps starts at 0.637 (tests/test_a1111_denoise_strength.py)
    assert (got.values["hires"], got.values["hires_steps"], got.values["hires_strength"]) == (1.5, 10, 0.637)
    assert got.values["sampler"] == "euler" and "schedule" not in got.values
    assert got.hires_upscaler_name == "4x-UltraSharp" and got.hires_upscaler_file is None
    assert any("schedule type 'Simple' has no pictor equivalent" in n for n in got.notices)
    latent = settings_from_parameters(FORGE.replace("4x-UltraSharp", "Latent (nearest-exact)"))
    assert latent.hires_upscaler_name is None and any("enlarges latents" in n for n in latent.notices)
    assert settings_from_parameters(FORGE.replace("Sampler: Euler", "Sampler: DDIM")).sampler_name == "DDIM"
    with pytest.raises(SettingsImportError, match="the image's Steps 'many' is not readable"):
        settings_from_parameters(FORGE.replace("Steps: 20", "Steps: many"))


@pytest.mark.parametrize(
    ("shown", "sampler", "schedule"),
    [
        ("DPM++ 2M SDE", "dpmpp_2m_sde", None),  # A1111's and Forge's names
        ("DPM++ 2M SDE Karras", "dpmpp_2m_sde", "karras"),  # A1111's before its Schedule type field
        ("DPM++ 2M SDE Exponential", "dpmpp_2m_sde", "exponential"),
        ("LCM", "lcm", None),
        ("IPNDM", "ipndm", None),  # reForge's names
        ("iPNDM", "ipndm", None),
        ("Res Multistep", "res_multistep", None),  # (reForge's spelling; read in any case)
        ("RES Multistep", "res_multistep", None),
        ("res_multistep", "res_multistep", None),  # pictor's own
        ("LMS", "lms", None),  # A1111's k-diffusion samplers
        ("LMS Karras", "lms", "karras"),
        ("DPM2", "dpm_2", None),
        ("DPM2 Karras", "dpm_2", "karras"),
        ("DPM2 a", "dpm_2_ancestral", None),
        ("DPM2 a Karras", "dpm_2_ancestral", "karras"),
        ("DPM++ 2S a", "dpmpp_2s_ancestral", None),
        ("DPM++ 2S a Karras", "dpmpp_2s_ancestral", "karras"),
        ("DPM++ SDE", "dpmpp_sde", None),
        ("DPM++ SDE Karras", "dpmpp_sde", "karras"),
        ("DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun", None),
        ("DPM++ 2M SDE Heun Exponential", "dpmpp_2m_sde_heun", "exponential"),
        ("DPM++ 3M SDE", "dpmpp_3m_sde", None),
        ("DPM++ 3M SDE Karras", "dpmpp_3m_sde", "karras"),
        ("DPM++ 3M SDE Exponential", "dpmpp_3m_sde", "exponential"),
        ("HeunPP2", "heunpp2", None),  # reForge's
        ("Gradient Estimation", "gradient_estimation", None),
    ],
)
def test_a1111_names_of_the_newer_samplers(shown: str, sampler: str, schedule: str | None) -> None:
    got = settings_from_parameters(FORGE.replace("Sampler: Euler", f"Sampler: {shown}"))
    assert got.values["sampler"] == sampler and got.values.get("schedule") == schedule
    assert got.sampler_name is None
    assert settings_from_parameters(FORGE.replace("Sampler: Euler", "Sampler: Restart")).sampler_name


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (A1111.replace("DPM++ 2M Karras", "DPM2"), True),
        (A1111.replace("DPM++ 2M Karras", "DPM2 Karras"), True),
        (A1111.replace("DPM++ 2M Karras", "DPM2 a"), True),
        (A1111.replace("DPM++ 2M Karras", "DPM2 a Karras"), True),
        (A1111.replace("DPM++ 2M Karras", "DPM++ 3M SDE"), True),
        (A1111.replace("DPM++ 2M Karras", "DPM++ 3M SDE Exponential"), True),
        (FORGE.replace("Sampler: Euler", "Sampler: DPM2 a").replace("Simple", "Karras"), True),  # its field
        (FORGE.replace("Sampler: Euler", "Sampler: DPM++ 3M SDE").replace("Simple", "Automatic"), True),
        (A1111, False),  # DPM++ 2M: the whole schedule in A1111 too
        (A1111.replace("DPM++ 2M Karras", "DPM++ 2M SDE Karras"), False),
        # pictor's own text (its schedule's own name, or none): pictor made it with the whole schedule
        (FORGE.replace("Sampler: Euler", "Sampler: DPM2").replace("Simple", "karras"), False),
        (FORGE.replace("Sampler: Euler", "Sampler: DPM++ 3M SDE").replace("Simple", ""), False),
    ],
)
def test_a1111s_samplers_that_drop_the_next_to_last_sigma_are_said(text: str, said: bool) -> None:
    """A1111 runs DPM2, DPM2 a and DPM++ 3M SDE without its schedule's next-to-last sigma
    (samplers_k_diffusion's discard_next_to_last_sigma); pictor runs the whole schedule."""
    got = settings_from_parameters(text)
    assert got.values["sampler"] in ("dpm_2", "dpm_2_ancestral", "dpmpp_3m_sde", "dpmpp_2m", "dpmpp_2m_sde")
    notices = [n for n in got.notices if "next-to-last" in n]
    assert len(notices) == int(said), got.notices
    if said:
        assert "runs the whole schedule" in notices[0]
    record = {"prompt": "a", "steps": 4, "sampler": "dpm_2", "schedule": "karras", "guidance": 3, "seed": 1}
    own = settings_from_parameters(parameters_text({**record, "width": 64, "height": 64}))
    assert own.values["sampler"] == "dpm_2" and not any("next-to-last" in n for n in own.notices)


def _only_parameters(source: Path, out: Path) -> Path:
    """A copy of a pictor PNG with A1111's text and no pictor record, as other tools' images are."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", read_text_chunks(source)["parameters"])
    with Image.open(source) as im:
        im.save(out, pnginfo=info)
    return out


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("weighted", [False, True])
def test_a_pictor_image_is_made_again_from_its_a1111_text_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], weighted: bool
) -> None:
    """Brackets in a prompt read as text are escaped in A1111's text (A1111 would weigh them), so the text
    alone brings back the same prompt encoding, and the same pixels."""
    prompt = "a (red) circle [left]" if not weighted else "a (red:1.4) circle [left]"
    args = ["generate", prompt, "--steps", "3", "--seed", "5", "--guidance", "3", "--sampler", "deis"]
    args += ["--negative", "blue (square)", *(["--prompt-weights"] if weighted else [])]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    first = Path(capsys.readouterr().out.split()[0])
    text = read_text_chunks(first)["parameters"]
    assert text.startswith(
        "a \\(red\\) circle \\[left\\]\n" if not weighted else "a (red:1.4) circle [left]\n"
    )
    foreign = _only_parameters(first, tmp_path / "foreign.png")
    assert main(["generate", "--settings-from", str(foreign), "-o", str(tmp_path / "b")]) == 0
    again = Path(capsys.readouterr().out.split()[0])
    np.testing.assert_array_equal(_pixels(again), _pixels(first))
    record = read_record(again)
    assert record["prompt_weights"] is True and record["sampler"] == "deis" and record["seed"] == 5


def test_the_command_line_overrides_and_a_record_is_taken_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", "a green star", "--model", "tiny", "--steps", "2", "--seed", "3", "--size", "32x32"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    first = Path(capsys.readouterr().out.split()[0])
    assert settings_from_image(first).values["prompt_weights"] is False  # a record says what it was
    again = ["generate", "--settings-from", str(first), "--model", "tiny", "--seed", "9"]
    assert main([*again, "-o", str(tmp_path / "b")]) == 0
    record = read_record(Path(capsys.readouterr().out.split()[0]))
    assert record["seed"] == 9 and record["prompt"] == "a green star" and record["steps"] == 2
    assert (record["width"], record["height"]) == (32, 32)
    assert main([*again, "a red star", "-o", str(tmp_path / "c")]) == 0  # a prompt given replaces its own
    assert read_record(Path(capsys.readouterr().out.split()[0]))["prompt"] == "a red star"


def test_what_cannot_be_taken_is_refused_with_the_option_that_helps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def foreign(text: str, name: str) -> Path:
        info = PngImagePlugin.PngInfo()
        info.add_itxt("parameters", text)
        Image.new("RGB", (8, 8)).save(tmp_path / name, pnginfo=info)
        return tmp_path / name

    small = FORGE.replace("Size: 896x1152", "Size: 32x32").replace("Steps: 20", "Steps: 2")
    hires = foreign(small.replace("Hires steps: 10", "Hires steps: 1"), "hires.png")
    base = ["generate", "--settings-from", str(hires), "--model", "tiny"]
    assert main([*base, "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "upscale model '4x-UltraSharp'; pass its file with --hires-upscaler FILE" in err
    assert "schedule type 'Simple'" in err  # the notices come first, on stderr
    file = make_upscaler(tmp_path / "4x-UltraSharp.safetensors")
    assert main([*base, "--hires-upscaler", str(file), "-o", str(tmp_path / "y")]) == 0
    record = read_record(Path(capsys.readouterr().out.split()[0]))
    assert record["hires"]["upscaler"] == "4x-UltraSharp" and record["hires"]["scale"] == 1.5

    ddim = foreign(small.replace("Sampler: Euler", "Sampler: DDIM"), "ddim.png")
    assert main(["generate", "--settings-from", str(ddim), "--model", "tiny", "-o", str(tmp_path / "z")]) == 2
    assert "sampler 'DDIM' has no pictor equivalent; choose one with --sampler" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "bare.png")
    assert main(["generate", "--settings-from", str(tmp_path / "bare.png"), "-o", str(tmp_path / "w")]) == 2
    assert "no A1111 parameters and no pictor record" in capsys.readouterr().err


def test_prompts_read_as_text_are_escaped_for_a1111_and_weighted_ones_are_not() -> None:
    record = {"prompt": "a (red) \\ [x]", "negative_prompt": "(y)", "steps": 1, "guidance": 1.0}
    record |= {"sampler": "euler", "seed": 1, "width": 8, "height": 8}
    assert parameters_text(record).split("\n")[:2] == ["a \\(red\\) \\\\ \\[x\\]", "Negative prompt: \\(y\\)"]
    assert parameters_text({**record, "prompt_weights": True}).startswith(
        "a (red) \\ [x]\nNegative prompt: (y)"
    )


@pytest.mark.parametrize(
    ("prompt", "flags", "kept"),
    [
        ("a [red:blue:1] circle", ["--prompt-editing"], {"prompt_editing": True}),
        ("a red circle AND a blue square:0.5", ["--composable"], {"composable": True}),
        (
            "two shapes",
            ["--regions", '[{"box": [0, 0, 0.5, 1], "prompt": "a red circle", "strength": 2}]'],
            {"regions": [{"box": [0.0, 0.0, 0.5, 1.0], "prompt": "a red circle", "strength": 2.0}]},
        ),
    ],
)
def test_prompt_syntax_and_regions_are_taken_unless_a_prompt_is_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], prompt: str, flags: list[str], kept: dict[str, Any]
) -> None:
    """The image's prompt editing, AND and regions come with its prompt (from its record, and the first two
    from A1111's text alone, where A1111 always reads them); a prompt of one's own leaves them to the
    command line."""
    args = ["generate", prompt, *flags, "--model", "tiny", "--steps", "2", "--seed", "3", "--size", "32x32"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    first = Path(capsys.readouterr().out.split()[0])
    sources = [first] + ([_only_parameters(first, tmp_path / "foreign.png")] if "regions" not in kept else [])
    for i, source in enumerate(sources):
        again = ["generate", "--settings-from", str(source), "--model", "tiny", "-o", str(tmp_path / f"b{i}")]
        assert main(again) == 0
        second = Path(capsys.readouterr().out.split()[0])
        record = read_record(second)
        assert {k: record.get(k) for k in kept} == kept, source
        np.testing.assert_array_equal(_pixels(second), _pixels(first))
    own = [
        "generate",
        "--settings-from",
        str(first),
        "two shapes",
        "--model",
        "tiny",
        "-o",
        str(tmp_path / "c"),
    ]
    assert main(own) == 0
    record = read_record(Path(capsys.readouterr().out.split()[0]))
    assert not any(record.get(k) for k in kept), record
