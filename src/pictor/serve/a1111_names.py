"""A1111's names in pictor's terms: samplers (A1111's display names, with a schedule in "DPM++ 2M Karras"),
schedule types, and the served model as A1111 lists a checkpoint (a request naming another is a 400: one
server serves one model)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pictor.provenance import SAMPLER_DISPLAY
from pictor.sampling import SAMPLERS, SCHEDULES
from pictor.serve.a1111_errors import field_error
from pictor.serve.a1111_models import A1111Common, SDModelItem
from pictor.serve.errors import APIError
from pictor.serve.service import Service
from pictor.settings_import import SAMPLER_NAMES, SCHEDULE_NAMES, SCHEDULE_SUFFIXES

# A1111's older aliases of its samplers' names (its k-diffusion ids), beside the names SAMPLER_NAMES reads.
SAMPLER_ALIASES = {
    "k_euler": "euler",
    "k_euler_a": "euler_ancestral",
    "k_euler_ancestral": "euler_ancestral",
    "k_heun": "heun",
    "k_dpmpp_2m": "dpmpp_2m",
    "k_dpmpp_2m_sde": "dpmpp_2m_sde",
    "k_lcm": "lcm",
    "k_lms": "lms",
    "k_dpm_2": "dpm_2",
    "k_dpm_2_a": "dpm_2_ancestral",
    "k_dpmpp_2s_a": "dpmpp_2s_ancestral",
    "k_dpmpp_sde": "dpmpp_sde",
    "k_dpmpp_2m_sde_heun": "dpmpp_2m_sde_heun",
    "k_dpmpp_3m_sde": "dpmpp_3m_sde",
}
# A1111's schedule types (name: label) with a pictor schedule; None is the model's own. Forge's Simple and
# SGM Uniform space the model's own shifted times evenly, as pictor's own schedule does (settings_import).
SCHEDULER_TABLE: dict[str, tuple[str, str | None]] = {
    "automatic": ("Automatic", None),
    "simple": ("Simple", None),
    "sgm_uniform": ("SGM Uniform", None),
    "karras": ("Karras", "karras"),
    "exponential": ("Exponential", "exponential"),
    "beta": ("Beta", "beta"),
    "kl_optimal": ("KL Optimal", "kl_optimal"),
    "normal": ("Normal", "normal"),
    "linear_quadratic": ("Linear Quadratic", "linear_quadratic"),
    "flux": ("FLUX (shifted by size)", "flux"),
    "linear": ("Linear", "linear"),
    "shifted": ("Shifted", "shifted"),
}
assert {v for _, v in SCHEDULER_TABLE.values() if v} == set(SCHEDULES)
assert all(SCHEDULE_NAMES[k] == SCHEDULER_TABLE[k][1] for k in SCHEDULE_NAMES)
SAME = {"", "use same sampler", "use same scheduler", "use same checkpoint"}
LANCZOS = {"lanczos", "none"}  # A1111's "None" upscaler is a plain (Lanczos) resize


def sampler_list() -> list[dict[str, Any]]:
    aliases = {name: [k for k, v in SAMPLER_ALIASES.items() if v == name] for name in SAMPLERS}
    return [{"name": SAMPLER_DISPLAY[n], "aliases": [n, *aliases[n]], "options": {}} for n in SAMPLERS]


def scheduler_list() -> list[dict[str, Any]]:
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": -1.0, "need_inner_model": False}
        for name, (label, _) in SCHEDULER_TABLE.items()
    ]


def schedule_of(text: str | None, what: str = "scheduler") -> str | None:
    """An A1111 schedule type (name or label) as pictor's schedule; None: the model's own."""
    if text is None or text.strip().lower() in SAME:
        return None
    key = text.strip().lower().replace(" ", "_")
    labels = {label.lower().replace(" ", "_"): name for name, (label, _) in SCHEDULER_TABLE.items()}
    key = labels.get(key, key)
    if key not in SCHEDULER_TABLE:
        known = ", ".join(label for label, _ in SCHEDULER_TABLE.values())
        raise field_error(
            what,
            f"schedule type {text!r} is not one pictor has; choose one of {known} (GET /sdapi/v1/schedulers)",
        )
    return SCHEDULER_TABLE[key][1]


def sampler_of(text: str | None, what: str = "sampler_name") -> tuple[str | None, str | None]:
    """An A1111 sampler name as pictor's sampler and the schedule its name carries ("DPM++ 2M Karras")."""
    if text is None or text.strip().lower() in SAME:
        return None, None
    name, schedule = text.strip().lower(), None
    for suffix, suffixed in SCHEDULE_SUFFIXES.items():
        base = name.removesuffix(suffix)
        if name.endswith(suffix) and (base in SAMPLER_NAMES or base in SAMPLER_ALIASES):
            name, schedule = base, suffixed
    sampler = SAMPLER_NAMES.get(name) or SAMPLER_ALIASES.get(name)
    if sampler is None:
        known = ", ".join(SAMPLER_DISPLAY[n] for n in SAMPLERS)
        raise field_error(
            what,
            f"sampler {text!r} is not one pictor runs; choose one of {known} (GET /sdapi/v1/samplers), "
            "with a schedule type in scheduler (or a ' Karras' / ' Exponential' ending)",
        )
    return sampler, schedule


def sampler_and_schedule(body: A1111Common) -> tuple[str | None, str | None]:
    """sampler_name (or sampler_index) and scheduler; an explicit schedule type wins over a name's ending,
    as in A1111 1.9+."""
    sampler, from_name = sampler_of(body.sampler_name or body.sampler_index)
    schedule = schedule_of(body.scheduler)
    return sampler, schedule if schedule is not None else from_name


def served_model(svc: Service) -> SDModelItem:
    """The served model as A1111's sd-models lists a checkpoint (its hash once it is loaded)."""
    pipe = svc.manager.pipeline
    preset = pipe.config.preset if pipe is not None else None
    ref = svc.settings.model or (pipe.ref if pipe is not None else None) or preset
    ref = ref or (pipe.name if pipe is not None else "pictor")
    path = Path(ref)
    name = path.stem if path.suffix.lower() in (".safetensors", ".gguf", ".ckpt", ".sft") else path.name
    full = pipe.hash if pipe is not None and pipe.hash else None
    short = full[:10] if full else None
    return SDModelItem(
        title=f"{name} [{short}]" if short else name,
        model_name=name,
        hash=short,
        sha256=full if full and re.fullmatch(r"[0-9a-f]{64}", full) else None,
        filename=str(path.resolve()) if path.exists() else ref,
        config=None,
    )


def check_checkpoint(svc: Service, name: Any, what: str) -> None:
    """A checkpoint name (override_settings' sd_model_checkpoint, hr_checkpoint_name, POST /options) must
    name the served model: one server serves one model."""
    if name is None or (isinstance(name, str) and name.strip().lower() in SAME):
        return
    card = served_model(svc)
    names = {card.title, card.model_name, card.filename, card.hash, card.sha256, *svc.model_names()}
    names |= {f"{card.model_name}.safetensors"}
    if isinstance(name, str) and name.strip() in names - {None}:
        return
    raise APIError(
        400,
        f"{what}: {name!r} is not the model this server serves ({card.title}); one pictor server serves one "
        f"model: leave {what} out, or start another `pictor serve --model ...` for that one",
        param=what,
        code="model_not_found",
    )
