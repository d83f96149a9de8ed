"""Samplers, schedules and classifier-free guidance over a velocity callable.

Samplers are free functions with one signature (k-diffusion style)::

    sample_xxx(model_fn, x, ts, callback=None, *, noise=None) -> Tensor

- model_fn(x [B, ...], t [B]) -> v, the velocity dx/dt of `pictor.flow` (t = 1 noise, t = 0 data).
  t is passed as float32 on x's device (float64 when x is float64), so low-precision latents do not round
  the timesteps.
- ts is a 1-D tensor decreasing from the start time (1.0, or the img2img strength) to 0, length steps + 1;
  the schedule functions below build one.
- callback, if given, gets dict(i, x, t, t_next, denoised) once per step before x is updated; it may raise
  to cancel sampling (the exception propagates unchanged).
- noise, a NoiseFn: noise(i) returns fresh standard normal noise shaped like x for step i. Only the
  stochastic samplers (`STOCHASTIC_SAMPLERS`) draw from it, and they refuse to run without it, so that no
  sampler falls back on the global RNG, which would tie an image to its batch-mates and device. The
  deterministic ones accept and ignore it, so a caller can always pass one.
- Samplers keep x's dtype and run under the caller's grad mode (wrap the call in torch.no_grad() for
  inference).

The multistep solvers live in modules of their own: DPM-Solver++(2M) and UniPC in
`pictor.sampling_multistep`, DEIS in `sampling_deis`, iPNDM (Adams-Bashforth), its variable-step iPNDM_v,
LMS and gradient estimation (linear multistep on v) in `sampling_adams`, RES multistep and its ancestral
variant in `sampling_res`, DPM2 and Heun++ (several model calls per step) in `sampling_stages`; the
stochastic DPM-Solver++(2M) SDE, its Heun variant and (3M) SDE in `sampling_sde`, DPM2 ancestral, DPM++(2S)
ancestral, DPM++ SDE and Euler ancestral in `sampling_ancestral`, ER-SDE in `sampling_er_sde`, SEEDS-2/3 and
the exponential Heun method (ODE and SDE) in `sampling_seeds`, SA-Solver (stochastic Adams, and its PECE
mode) in `sampling_sa_solver`, and LCM in `sampling_lcm`.
The CFG++ samplers (`CFG_PP_SAMPLERS`: Euler, Euler ancestral, DPM++(2M), DPM++(2S) ancestral, gradient
estimation in `sampling_cfg_pp`, RES multistep and its ancestral variant in `sampling_res`) also read the
unconditional velocity of each call from the velocity callable (`pictor.sampling_steps.UNCOND`).
The shared types and step helpers are in `pictor.sampling_steps`. All are registered in `SAMPLERS` here.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from pictor.sampling_adams import sample_gradient_estimation, sample_ipndm, sample_ipndm_v, sample_lms
from pictor.sampling_ancestral import (
    sample_dpm_2_ancestral,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_sde,
    sample_euler_ancestral,
)
from pictor.sampling_cfg_pp import (
    sample_dpmpp_2m_cfg_pp,
    sample_dpmpp_2s_ancestral_cfg_pp,
    sample_euler_ancestral_cfg_pp,
    sample_euler_cfg_pp,
    sample_gradient_estimation_cfg_pp,
)
from pictor.sampling_deis import sample_deis
from pictor.sampling_er_sde import sample_er_sde
from pictor.sampling_lcm import sample_lcm
from pictor.sampling_multistep import sample_dpmpp_2m, sample_unipc
from pictor.sampling_res import (
    sample_res_multistep,
    sample_res_multistep_ancestral,
    sample_res_multistep_ancestral_cfg_pp,
    sample_res_multistep_cfg_pp,
)
from pictor.sampling_sa_solver import sample_sa_solver, sample_sa_solver_pece
from pictor.sampling_schedules import (
    SCHEDULES,
    get_schedule,
    schedule_beta,
    schedule_exponential,
    schedule_flux,
    schedule_karras,
    schedule_kl_optimal,
    schedule_linear,
    schedule_linear_quadratic,
    schedule_normal,
    schedule_shifted,
)
from pictor.sampling_sde import sample_dpmpp_2m_sde, sample_dpmpp_2m_sde_heun, sample_dpmpp_3m_sde
from pictor.sampling_seeds import (
    sample_exp_heun_2_x0,
    sample_exp_heun_2_x0_sde,
    sample_seeds_2,
    sample_seeds_3,
)
from pictor.sampling_stages import sample_dpm_2, sample_heunpp2
from pictor.sampling_steps import (
    Callback,
    NoiseFn,
    SamplerFn,
    VelocityFn,
    report_v,
    t_batch,
    times,
)

__all__ = [
    "CFG_PP_SAMPLERS",
    "MODEL_EVALS_PER_STEP",
    "SAMPLERS",
    "SCHEDULES",
    "STOCHASTIC_SAMPLERS",
    "Callback",
    "NoiseFn",
    "SamplerFn",
    "VelocityFn",
    "cfg",
    "clock_calls_per_step",
    "get_sampler",
    "get_schedule",
    "is_cfg_pp",
    "is_stochastic",
    "model_evals",
    "model_evals_per_step",
    "sample_deis",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_cfg_pp",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2m_sde_heun",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_2s_ancestral_cfg_pp",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
    "sample_er_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_euler_ancestral_cfg_pp",
    "sample_euler_cfg_pp",
    "sample_exp_heun_2_x0",
    "sample_exp_heun_2_x0_sde",
    "sample_gradient_estimation",
    "sample_gradient_estimation_cfg_pp",
    "sample_heun",
    "sample_heunpp2",
    "sample_ipndm",
    "sample_ipndm_v",
    "sample_lcm",
    "sample_lms",
    "sample_res_multistep",
    "sample_res_multistep_ancestral",
    "sample_res_multistep_ancestral_cfg_pp",
    "sample_res_multistep_cfg_pp",
    "sample_sa_solver",
    "sample_sa_solver_pece",
    "sample_seeds_2",
    "sample_seeds_3",
    "sample_unipc",
    "schedule_beta",
    "schedule_exponential",
    "schedule_flux",
    "schedule_karras",
    "schedule_kl_optimal",
    "schedule_linear",
    "schedule_linear_quadratic",
    "schedule_normal",
    "schedule_shifted",
]


# ---------------------------------------------------------------------------------------------- samplers


def sample_euler(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """First-order Euler: x <- x + (t_next - t) * v(x, t). One model call per step. Ignores `noise`."""
    for i, (t, t_next) in enumerate(itertools.pairwise(times(ts))):
        v = model_fn(x, t_batch(t, x))
        report_v(callback, i, x, t, t_next, v)
        x = (x + (t_next - t) * v).to(x.dtype)
    return x


def sample_heun(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """Heun's second-order method: Euler predictor, trapezoid corrector. Ignores `noise`.

    As in k-diffusion, the step that ends at t = 0 is a plain Euler step (it would need v at t = 0, which
    is the data itself and is where the model is least reliable): 2 * steps - 1 model calls for a schedule
    ending at 0; see `model_evals`.
    """
    for i, (t, t_next) in enumerate(itertools.pairwise(times(ts))):
        v = model_fn(x, t_batch(t, x))
        report_v(callback, i, x, t, t_next, v)
        dt = t_next - t
        x_euler = (x + dt * v).to(x.dtype)
        if t_next == 0:
            x = x_euler
            continue
        v_next = model_fn(x_euler, t_batch(t_next, x))
        x = (x + dt * 0.5 * (v + v_next)).to(x.dtype)
    return x


SAMPLERS: dict[str, SamplerFn] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "unipc": sample_unipc,
    "deis": sample_deis,
    "ipndm": sample_ipndm,
    "res_multistep": sample_res_multistep,
    "lms": sample_lms,
    "dpm_2": sample_dpm_2,
    "heunpp2": sample_heunpp2,
    "gradient_estimation": sample_gradient_estimation,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "lcm": sample_lcm,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "ipndm_v": sample_ipndm_v,
    "res_multistep_ancestral": sample_res_multistep_ancestral,
    "er_sde": sample_er_sde,
    "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
    "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
    "dpmpp_2s_ancestral_cfg_pp": sample_dpmpp_2s_ancestral_cfg_pp,
    "res_multistep_cfg_pp": sample_res_multistep_cfg_pp,
    "res_multistep_ancestral_cfg_pp": sample_res_multistep_ancestral_cfg_pp,
    "gradient_estimation_cfg_pp": sample_gradient_estimation_cfg_pp,
    "exp_heun_2_x0": sample_exp_heun_2_x0,
    "exp_heun_2_x0_sde": sample_exp_heun_2_x0_sde,
    "seeds_2": sample_seeds_2,
    "seeds_3": sample_seeds_3,
    "sa_solver": sample_sa_solver,
    "sa_solver_pece": sample_sa_solver_pece,
}

MODEL_EVALS_PER_STEP: dict[str, int] = {
    "euler": 1,
    "heun": 2,
    "dpmpp_2m": 1,
    "unipc": 1,
    "deis": 1,
    "ipndm": 1,
    "res_multistep": 1,
    "lms": 1,
    "dpm_2": 2,
    "heunpp2": 3,
    "gradient_estimation": 1,
    "euler_ancestral": 1,
    "dpmpp_2m_sde": 1,
    "lcm": 1,
    "dpm_2_ancestral": 2,
    "dpmpp_2s_ancestral": 2,
    "dpmpp_sde": 2,
    "dpmpp_2m_sde_heun": 1,
    "dpmpp_3m_sde": 1,
    "ipndm_v": 1,
    "res_multistep_ancestral": 1,
    "er_sde": 1,
    "euler_cfg_pp": 1,
    "euler_ancestral_cfg_pp": 1,
    "dpmpp_2m_cfg_pp": 1,
    "dpmpp_2s_ancestral_cfg_pp": 2,
    "res_multistep_cfg_pp": 1,
    "res_multistep_ancestral_cfg_pp": 1,
    "gradient_estimation_cfg_pp": 1,
    "exp_heun_2_x0": 2,
    "exp_heun_2_x0_sde": 2,
    "seeds_2": 2,
    "seeds_3": 3,
    "sa_solver": 1,
    "sa_solver_pece": 2,
}
# Calls a schedule ending at 0 saves on its last steps, where a sampler takes a cheaper step: the step to 0
# (Euler, or the data prediction) of the two- and three-call samplers, and Heun++'s last two steps (1 and 2
# calls); SA-Solver PECE's saved call is its first step's, which has nothing to correct (on any schedule).
_SAVED_AT_END: dict[str, int] = {
    "heun": 1,
    "dpm_2": 1,
    "dpm_2_ancestral": 1,
    "dpmpp_2s_ancestral": 1,
    "dpmpp_sde": 1,
    "dpmpp_2s_ancestral_cfg_pp": 1,
    "exp_heun_2_x0": 1,
    "exp_heun_2_x0_sde": 1,
    "seeds_2": 1,
    "seeds_3": 2,
    "sa_solver_pece": 1,
}

# Samplers that draw from `noise`: their images depend on it, so callers must make it reproducible.
STOCHASTIC_SAMPLERS: frozenset[str] = frozenset(
    {
        "euler_ancestral",
        "dpmpp_2m_sde",
        "lcm",
        "dpm_2_ancestral",
        "dpmpp_2s_ancestral",
        "dpmpp_sde",
        "dpmpp_2m_sde_heun",
        "dpmpp_3m_sde",
        "res_multistep_ancestral",
        "er_sde",
        "euler_ancestral_cfg_pp",
        "dpmpp_2s_ancestral_cfg_pp",
        "res_multistep_ancestral_cfg_pp",
        "exp_heun_2_x0_sde",
        "seeds_2",
        "seeds_3",
        "sa_solver",
        "sa_solver_pece",
    }
)

# CFG++ samplers: they need each call's unconditional velocity beside the guided one (module docstring);
# the pipeline runs the negative pass for them even at guidance 1 (as ComfyUI's disable_cfg1_optimization).
CFG_PP_SAMPLERS: frozenset[str] = frozenset(
    {
        "euler_cfg_pp",
        "euler_ancestral_cfg_pp",
        "dpmpp_2m_cfg_pp",
        "dpmpp_2s_ancestral_cfg_pp",
        "res_multistep_cfg_pp",
        "res_multistep_ancestral_cfg_pp",
        "gradient_estimation_cfg_pp",
    }
)


def get_sampler(name: str) -> SamplerFn:
    """The sampler called `name`; ValueError naming the known samplers otherwise."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(sorted(SAMPLERS))}") from None


def is_stochastic(name: str) -> bool:
    """Whether sampler `name` draws fresh noise (from its `noise` argument) during sampling."""
    get_sampler(name)
    return name in STOCHASTIC_SAMPLERS


def is_cfg_pp(name: str) -> bool:
    """Whether sampler `name` is a CFG++ sampler, which needs the unconditional prediction of every call."""
    get_sampler(name)
    return name in CFG_PP_SAMPLERS


def model_evals_per_step(name: str) -> int:
    """Model calls per (non-final) step, for progress bars and cost estimates (before CFG doubling)."""
    get_sampler(name)
    return MODEL_EVALS_PER_STEP[name]


def clock_calls_per_step(name: str) -> int:
    """The calls a step may have for `pictor.guidance_methods.StepClock`, which gives a step's calls after
    its first to it while their times go down. SA-Solver PECE calls the model twice at each step's own time
    (on the predicted sample, then on the corrected one), ComfyUI's loop iteration at that sigma, so its
    clock counts one call a step and each call goes to the step whose time it is at."""
    return 1 if name == "sa_solver_pece" else model_evals_per_step(name)


def model_evals(name: str, steps: int) -> int:
    """Exact model calls for a schedule of `steps` steps ending at 0 (the last step of Heun, DPM2, SEEDS,
    exponential Heun and the two-call stochastic samplers is a one-call step; Heun++'s last two take 1 and
    2 calls; SA-Solver PECE's first step takes 1)."""
    per = model_evals_per_step(name)
    if steps <= 0:
        return 0
    if name == "heunpp2":
        return 1 if steps == 1 else per * steps - 3
    return per * steps - _SAVED_AT_END.get(name, 0)


# ------------------------------------------------------------------------------ classifier-free guidance


def cfg(batched_fn: VelocityFn, scale: float) -> VelocityFn:
    """Classifier-free guidance as a VelocityFn: v_uncond + scale * (v_cond - v_uncond).

    batched_fn(x2 [2B, ...], t2 [2B]) must return the velocities of the conditional half first and the
    unconditional half second (the caller concatenates cond/uncond text the same way). Both halves go
    through one batched forward per call. At scale == 1 the result equals v_cond, and the caller should not
    use cfg at all but call the conditional model directly, saving the unconditional half.
    """

    def guided(x: Tensor, t: Tensor) -> Tensor:
        v_cond, v_uncond = batched_fn(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        if scale == 1.0:
            return v_cond
        return v_uncond + scale * (v_cond - v_uncond)

    return guided
