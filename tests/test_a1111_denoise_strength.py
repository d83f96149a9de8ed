"""A1111's and Forge's hires "Denoising strength" is taken as the noise level their second pass starts at
(pictor's hires strength), checked against a transcription of their step arithmetic written here from
their sources; pictor's own text keeps its straight reading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin

from pictor.a1111_denoise import hires_start
from pictor.cli import main
from pictor.provenance import parameters_text, read_record
from pictor.settings_import import settings_from_parameters

FORGE = """a harbour at dusk
Steps: {steps}, Sampler: {sampler}, Schedule type: {schedule}, CFG scale: 1, Distilled CFG Scale: 3.5, \
Seed: 7, Size: {size}, Model: {model}, Hires upscale: 1.5, Hires steps: {hires_steps}, \
Hires upscaler: Lanczos, Denoising strength: {denoise}, Version: f2.0.1v1.10.1-previous-665-gae278f79"""


def forge_text(**fields: object) -> str:
    values: dict[str, object] = {
        "steps": 20,
        "sampler": "Euler",
        "schedule": "Simple",
        "size": "896x1152",
        "model": "flux1-dev-bnb-nf4",
        "hires_steps": 10,
        "denoise": 0.35,
    }
    return FORGE.format(**(values | fields))


# --- Forge's arithmetic, transcribed (lllyasviel/stable-diffusion-webui-forge) -------------------------


def predictor_sigmas(mu: float) -> torch.Tensor:
    """backend/modules/k_prediction.py PredictionFlux.apply_mu_transform (diffusers' time_shift)."""
    sigmas = torch.arange(1, 10000 + 1, 1) / 10000
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)


def scheduler(name: str, n: int, table: torch.Tensor) -> torch.Tensor:
    """modules/sd_schedulers.py, and k_diffusion/sampling.py's karras and exponential, with sigma_min and
    sigma_max = model_wrap.sigmas[0] and [-1] (sd_samplers_kdiffusion.py get_sigmas); PredictionFlux's
    timestep() and sigma() are the identity."""
    sigma_min, sigma_max = table[0].item(), table[-1].item()
    if name == "simple":  # simple_scheduler
        ss = len(table) / n
        return torch.FloatTensor([float(table[-(1 + int(x * ss))]) for x in range(n)] + [0.0])
    if name in ("normal", "sgm_uniform"):  # normal_scheduler, sgm_uniform
        sgm = name == "sgm_uniform"
        ts = (
            torch.linspace(sigma_max, sigma_min, n + 1)[:-1]
            if sgm
            else torch.linspace(sigma_max, sigma_min, n)
        )
        return torch.FloatTensor([float(t) for t in ts] + [0.0])
    if name == "karras":  # get_sigmas_karras, rho 7
        ramp = torch.linspace(0, 1, n)
        sigmas = (sigma_max ** (1 / 7) + ramp * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7
        return torch.cat([sigmas, sigmas.new_zeros([1])])
    if name == "exponential":  # get_sigmas_exponential
        sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp()
        return torch.cat([sigmas, sigmas.new_zeros([1])])
    assert name == "kl_optimal"  # kl_optimal
    alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    steps = torch.arange(n + 1)
    return torch.tan(steps / n * alpha_min + (1.0 - steps / n) * alpha_max)


def forge_hires_first_sigma(denoise: float, hr_steps: int, name: str, mu: float, discard: bool) -> float:
    # modules/sd_samplers_common.py setup_img2img_steps; the hires pass passes steps (processing.py
    # sample_hr_pass: steps=self.hr_second_pass_steps or self.steps), so this branch always
    requested_steps = hr_steps
    steps = int(requested_steps / min(denoise, 0.999)) if denoise > 0 else 0
    t_enc = requested_steps - 1
    # sd_samplers_kdiffusion.py get_sigmas: one step more and the next-to-last dropped where discarding
    sigmas = scheduler(name, steps + (1 if discard else 0), predictor_sigmas(mu))
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    sigma_sched = sigmas[steps - t_enc - 1 :]  # sample_img2img
    assert len(sigma_sched) == hr_steps + 1  # the pass runs the hires steps asked for
    return float(sigma_sched[0])


# --- pictor's conversion against it ------------------------------------------------------------------

SCHEDULE_LABELS = {
    "simple": "Simple",
    "normal": "Normal",
    "sgm_uniform": "SGM Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "kl_optimal": "KL Optimal",
}


@pytest.mark.parametrize("schedule", list(SCHEDULE_LABELS))
@pytest.mark.parametrize(
    ("denoise", "steps"), [(0.2, 4), (0.35, 10), (0.5, 20), (0.7, 3), (0.95, 1), (1.0, 8)]
)
def test_the_start_level_is_forges_first_sigma(schedule: str, denoise: float, steps: int) -> None:
    text = forge_text(schedule=SCHEDULE_LABELS[schedule], hires_steps=steps, denoise=denoise)
    got = settings_from_parameters(text).values["hires_strength"]
    assert got == pytest.approx(forge_hires_first_sigma(denoise, steps, schedule, 1.15, False), abs=1e-4)


@pytest.mark.parametrize(
    ("sampler", "schedule", "model", "mu", "name", "discard"),
    [
        ("DPM2", "Simple", "flux1-dev", 1.15, "simple", True),  # discard_next_to_last_sigma
        ("DPM++ 3M SDE", "Normal", "flux1-dev", 1.15, "normal", True),
        ("DPM++ 2M", "Automatic", "flux1-dev", 1.15, "karras", False),  # its own schedule under Automatic
        ("DPM++ 2M SDE", "Automatic", "flux1-dev", 1.15, "exponential", False),
        ("Euler", "Simple", "flux1-schnell-fp8", 1.0, "simple", False),  # flux.py: PredictionFlux(mu=1.0)
        ("DPM2 Karras", "Automatic", "flux1-dev", 1.15, "karras", True),  # A1111's older name: its schedule
    ],
)
def test_samplers_and_schnell(
    sampler: str, schedule: str, model: str, mu: float, name: str, discard: bool
) -> None:
    for denoise, steps in ((0.3, 6), (0.6, 12)):
        text = forge_text(sampler=sampler, schedule=schedule, model=model, hires_steps=steps, denoise=denoise)
        want = forge_hires_first_sigma(denoise, steps, name, mu, discard)
        assert settings_from_parameters(text).values["hires_strength"] == pytest.approx(want, abs=1e-4)


def test_forges_shift_is_the_same_at_every_size_and_hires_steps_0_are_the_first_passes() -> None:
    # PredictionFlux is built at seq_len 4096 (diffusion_engine/flux.py): the size does not move the start
    starts = {
        settings_from_parameters(forge_text(size=s)).values["hires_strength"]
        for s in ("512x512", "1536x1024")
    }
    assert starts == {0.637}  # the reviewer's example: 0.35 over 10 steps, about 0.64
    # processing.py: steps=self.hr_second_pass_steps or self.steps; Forge writes "Hires steps" only where set
    first = forge_text(steps=10).replace(" Hires steps: 10,", "")
    assert settings_from_parameters(first).values["hires_strength"] == 0.637
    zero = forge_text(steps=10, hires_steps=0)
    assert settings_from_parameters(zero).values["hires_strength"] == 0.637


def test_the_notice_says_the_conversion() -> None:
    notices = settings_from_parameters(forge_text()).notices
    assert any(
        "Denoising strength 0.35 over 10 hires steps starts at t = 0.637 in Forge" in n
        and "taken as --hires-strength 0.637" in n
        for n in notices
    )


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"schedule": "Beta"}, "its schedule type beta"),
        # Euler has no schedule of its own: Forge's model's uniform one, which pictor does not work out
        ({"schedule": "Automatic"}, "Forge's Automatic schedule for the sampler euler"),
        ({"model": "sd_xl_base_1.0"}, "model is not FLUX.1"),  # Distilled CFG Scale taken out below
    ],
)
def test_what_cannot_be_worked_out_keeps_the_strength_and_says_so(change: dict[str, str], why: str) -> None:
    text = forge_text(**change)
    if "model" in change:
        text = text.replace(" Distilled CFG Scale: 3.5,", "")
    got = settings_from_parameters(text)
    assert got.values["hires_strength"] == 0.35
    assert any(why in n and "taken as --hires-strength 0.35" in n for n in got.notices), got.notices
    overridden = settings_from_parameters(forge_text().replace("Seed: 7", "Schedule rho: 5, Seed: 7"))
    assert overridden.values["hires_strength"] == 0.35
    assert hires_start({"Distilled CFG Scale": "3.5"}, 0.35)[0] == 0.35  # no steps at all


def test_pictors_own_text_keeps_its_start_level() -> None:
    record = {
        "prompt": "a red circle",
        "steps": 4,
        "sampler": "euler",
        "guidance": 3.5,
        "guidance_mode": "distilled",
        "seed": 3,
        "width": 64,
        "height": 64,
        "hires": {"scale": 2, "strength": 0.55, "steps": 3, "upscaler": "lanczos"},
        "pictor_version": "0.1.0",
    }
    text = parameters_text(record)  # "Denoising strength" written as pictor's start level, as before
    assert "Denoising strength: 0.55" in text and "Version: pictor 0.1.0" in text
    got = settings_from_parameters(text)
    assert got.values["hires_strength"] == 0.55
    assert not any("hires-strength" in n for n in got.notices)


def test_generate_from_a_forge_image_records_the_converted_strength(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", forge_text(size="32x32", steps=2, hires_steps=2, denoise=0.5))
    Image.new("RGB", (8, 8)).save(tmp_path / "forge.png", pnginfo=info)
    image = tmp_path / "forge.png"
    assert main(["generate", "--settings-from", str(image), "--model", "tiny", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr()
    want = round(forge_hires_first_sigma(0.5, 2, "simple", 1.15, False), 4)  # the last 2 of 4 Simple steps
    assert f"starts at t = {want:g} in Forge" in out.err
    hires = read_record(Path(out.out.split()[0]))["hires"]
    assert (hires["strength"], hires["steps"]) == (want, 2)
