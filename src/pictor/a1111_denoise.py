"""A1111's and Forge's hires "Denoising strength" as the noise level their second pass starts at, which is
what pictor's hires strength is (its start t after the resolution shift: `pictor.sampling_schedules`).

A1111 and Forge do not start a hires pass of denoising strength d over N steps at noise level d.
`modules/sd_samplers_common.py` `setup_img2img_steps(p, steps)`, called by the hires pass with
steps = hr_second_pass_steps or p.steps (`modules/processing.py` `sample_hr_pass`), builds a schedule of
int(N / min(d, 0.999)) steps and `modules/sd_samplers_kdiffusion.py` `sample_img2img` runs its last N
(sigmas[steps - t_enc - 1:], t_enc = N - 1), as ComfyUI's KSampler does with denoise. Forge samples FLUX.1
through `backend/modules/k_prediction.py` `PredictionFlux`, built (`backend/diffusion_engine/flux.py`) with
seq_len = max_seq_len = 4096: one shift mu = 1.15 for every size (1.0 for schnell), over 10,000 tabulated
sigmas time_shift(mu, k / 10,000). Its schedulers (`modules/sd_schedulers.py`) are transcribed below for
the ones whose sigmas follow from those numbers alone; on FLUX.1 sigma is the flow's t (const prediction).

Only text that pictor did not write is converted: pictor writes its own start level as "Denoising strength"
and reads it back as that, so its images come back pixel-identical from their text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pictor.flow import time_shift

FORGE_TABLE = 10_000  # PredictionFlux's pseudo_timestep_range: sigmas at k / 10,000, k = 1..10,000
FORGE_DEV_MU = 1.15  # calculate_shift at seq_len 4096 = max_seq_len: max_shift, whatever the size
FORGE_SCHNELL_MU = 1.0  # flux.py: PredictionFlux(mu=1.0) for a repo named schnell
# Forge's samplers that bring their own schedule under "Automatic" (sd_samplers_kdiffusion.py
# samplers_k_diffusion, options "scheduler"); the others fall to the model's uniform sigmas (below)
AUTOMATIC_SCHEDULES = {
    "dpm++ 2m": "karras",
    "dpm++ sde": "karras",
    "dpm++ 2s a": "karras",
    "dpm2": "karras",
    "dpm2 a": "karras",
    "restart": "karras",
    "dpm++ 2m sde": "exponential",
    "dpm++ 2m sde heun": "exponential",
    "dpm++ 3m sde": "exponential",
}
# ... and those that build one step more and drop the next-to-last sigma (discard_next_to_last_sigma)
DISCARDING = {"dpm2", "dpm2 a", "dpm++ 3m sde"}
# The labels of Forge's schedulers worked out here (sd_schedulers.schedulers), by their names
KNOWN_SCHEDULES = {"simple", "normal", "sgm_uniform", "karras", "exponential", "kl_optimal"}
# Fields that move a schedule off the model's sigmas (Forge writes them only where set): not worked out
SIGMA_OVERRIDES = ("Schedule min sigma", "Schedule max sigma", "Schedule rho")


def is_pictors(settings: Mapping[str, str]) -> bool:
    """Whether the text is pictor's own: provenance.parameters_text always ends in "Version: pictor ..."
    (A1111 writes "v1.10.1", Forge "f2.0.1v1.10.1-...")."""
    return settings.get("Version", "").strip().lower().startswith("pictor")


def forge_sigma(schedule: str, steps: int, index: int, mu: float) -> float:
    """Sigma `index` of Forge's `schedule` of `steps` steps on a FLUX.1 model shifted by `mu`
    (sd_schedulers.py; sigma_min, sigma_max = the model's first and last tabulated sigma)."""
    sigma_min, sigma_max = time_shift(mu, 1.0, 1 / FORGE_TABLE), 1.0
    if schedule == "simple":  # simple_scheduler: sigmas[-(1 + int(x * len(sigmas) / n))]
        return time_shift(mu, 1.0, (FORGE_TABLE - int(index * (FORGE_TABLE / steps))) / FORGE_TABLE)
    if schedule in ("normal", "sgm_uniform"):
        # normal_scheduler: linspace(sigma_to_t(max), sigma_to_t(min), n (+ 1, the last dropped, for sgm)),
        # and PredictionFlux's timestep and sigma are the identity: evenly spaced in sigma, unshifted
        intervals = steps - 1 if schedule == "normal" else steps
        return sigma_max + index * (sigma_min - sigma_max) / max(intervals, 1)
    ramp = index / (steps - 1) if steps > 1 else 0.0  # torch.linspace(0, 1, n)
    if schedule == "karras":  # k_diffusion get_sigmas_karras, rho 7
        rho = 7.0
        return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if schedule == "exponential":  # get_sigmas_exponential: linspace(log max, log min, n).exp()
        return math.exp(math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max)))
    if schedule == "kl_optimal":
        step = index / steps
        return math.tan(step * math.atan(sigma_min) + (1.0 - step) * math.atan(sigma_max))
    raise ValueError(f"Forge schedule {schedule!r} is not worked out here")


def forge_start(denoise: float, steps: int, schedule: str, mu: float, discard: bool = False) -> float:
    """The noise level a Forge hires pass of `denoise` over `steps` steps starts at (module docstring)."""
    total = int(steps / min(denoise, 0.999))  # setup_img2img_steps, the hires pass's branch
    built = total + 1 if discard else total  # get_sigmas: steps += 1, then the next-to-last dropped
    return forge_sigma(schedule, built, total - steps, mu)  # sigmas[steps - t_enc - 1], t_enc = N - 1


def hires_start(settings: Mapping[str, str], denoise: float) -> tuple[float, str]:
    """The hires strength pictor takes for an A1111/Forge text's "Denoising strength" `denoise`, and a
    notice that says how: the level Forge's pass starts at where the text shows FLUX.1 and a schedule
    worked out here, else `denoise` itself, with why."""
    # processing.py: steps=self.hr_second_pass_steps or self.steps (0, or not written: the first pass's)
    steps_text = settings.get("Hires steps", "").strip().lstrip("0") or settings.get("Steps", "").strip()
    keep = f"taken as --hires-strength {denoise:g}, which may redraw less or more than the image's pass did"
    rule = f"A1111 and Forge start a pass of Denoising strength {denoise:g} at the last N of int(N / d)"
    if not steps_text.isdigit() or int(steps_text) < 1 or denoise <= 0:
        return denoise, f"{rule} steps of their schedule; the image's hires steps are unknown: {keep}"
    steps = int(steps_text)
    model = (settings.get("Model", "") + " " + settings.get("Hires checkpoint", "")).lower()
    if "Distilled CFG Scale" not in settings and "flux" not in model:
        return denoise, (
            f"{rule} steps of their model's schedule, and by its text the image's model is not FLUX.1 as "
            f"Forge runs it, so the noise level it started at is not known: {keep}"
        )
    mu = FORGE_SCHNELL_MU if "schnell" in model else FORGE_DEV_MU
    sampler = _hires_field(settings, "Hires sampler", "Sampler").lower()
    schedule = _hires_field(settings, "Hires schedule type", "Schedule type").lower()
    for suffix in (" karras", " exponential"):  # A1111's older names carry their schedule
        if sampler.endswith(suffix):
            sampler = sampler.removesuffix(suffix)
            schedule = suffix.strip() if schedule in ("", "automatic") else schedule
    schedule = schedule.replace(" ", "_") or "automatic"
    if schedule == "automatic":
        schedule = AUTOMATIC_SCHEDULES.get(sampler, "automatic")
    overridden = [key for key in SIGMA_OVERRIDES if key in settings]
    if schedule not in KNOWN_SCHEDULES or overridden:
        why = f"its {', '.join(overridden)}" if overridden else f"its schedule type {schedule}"
        if schedule == "automatic":
            why = f"Forge's Automatic schedule for the sampler {sampler or 'named nowhere'} (the model's own)"
        return denoise, f"{rule} steps of their schedule, and pictor cannot work that out for {why}: {keep}"
    discard = sampler in DISCARDING or settings.get("Discard penultimate sigma", "").strip() == "True"
    start = round(forge_start(denoise, steps, schedule, mu, discard), 4)
    return start, (
        f"Denoising strength {denoise:g} over {steps} hires steps starts at t = {start:g} in Forge (the last "
        f"{steps} of {int(steps / min(denoise, 0.999))} steps of its {schedule} schedule on FLUX.1, shift mu "
        f"{mu:g} at every size): taken as --hires-strength {start:g} (pictor's strength is that noise level; "
        "its steps below it follow pictor's own schedule)"
    )


def _hires_field(settings: Mapping[str, str], hires_key: str, key: str) -> str:
    """The hires pass's own setting where the text has one (Forge writes it where it differs), else the
    first pass's."""
    own = settings.get(hires_key, "").strip()
    if own and not own.lower().startswith("use same"):
        return own
    return settings.get(key, "").strip()
