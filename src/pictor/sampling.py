"""Samplers, schedules and classifier-free guidance over a velocity callable.

Samplers are free functions with one signature (k-diffusion style)::

    sample_xxx(model_fn, x, ts, callback=None) -> Tensor

- model_fn(x [B, ...], t [B]) -> v, the velocity dx/dt of `pictor.flow` (t = 1 noise, t = 0 data).
  t is passed as float32 on x's device (float64 when x is float64), so low-precision latents do not round
  the timesteps.
- ts is a 1-D tensor decreasing from the start time (1.0, or the img2img strength) to 0, length steps + 1;
  the schedule functions below build one.
- callback, if given, gets dict(i, x, t, t_next, denoised) once per step before x is updated; it may raise
  to cancel sampling (the exception propagates unchanged).
- Samplers keep x's dtype and run under the caller's grad mode (wrap the call in torch.no_grad() for
  inference).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pictor.flow import predict_x0, resolution_mu, time_shift

VelocityFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]
SamplerFn = Callable[[VelocityFn, Tensor, Tensor, Callback | None], Tensor]

__all__ = [
    "MODEL_EVALS_PER_STEP",
    "SAMPLERS",
    "SCHEDULES",
    "Callback",
    "SamplerFn",
    "VelocityFn",
    "cfg",
    "get_sampler",
    "get_schedule",
    "model_evals",
    "model_evals_per_step",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
    "schedule_flux",
    "schedule_linear",
    "schedule_shifted",
]


# ---------------------------------------------------------------------------------------------- samplers


def _times(ts: Tensor) -> list[float]:
    """The schedule as Python floats: step sizes are then exact in float64 and no device sync per step."""
    if ts.ndim != 1 or ts.numel() < 1:
        raise ValueError(f"ts must be a non-empty 1-D tensor, got shape {tuple(ts.shape)}")
    return [float(t) for t in ts.tolist()]


def _t_batch(t: float, x: Tensor) -> Tensor:
    """t as a [B] tensor for the model: at least float32, never the (possibly bf16) dtype of x."""
    return torch.full((x.shape[0],), t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


def _report(callback: Callback | None, i: int, x: Tensor, t: float, t_next: float, v: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "t": t, "t_next": t_next, "denoised": predict_x0(x, v, t)})


def sample_euler(model_fn: VelocityFn, x: Tensor, ts: Tensor, callback: Callback | None = None) -> Tensor:
    """First-order Euler: x <- x + (t_next - t) * v(x, t). One model call per step."""
    times = _times(ts)
    for i, (t, t_next) in enumerate(itertools.pairwise(times)):
        v = model_fn(x, _t_batch(t, x))
        _report(callback, i, x, t, t_next, v)
        x = (x + (t_next - t) * v).to(x.dtype)
    return x


def sample_heun(model_fn: VelocityFn, x: Tensor, ts: Tensor, callback: Callback | None = None) -> Tensor:
    """Heun's second-order method: Euler predictor, trapezoid corrector.

    As in k-diffusion, the step that ends at t = 0 is a plain Euler step (it would need v at t = 0, which
    is the data itself and is where the model is least reliable): 2 * steps - 1 model calls for a schedule
    ending at 0; see `model_evals`.
    """
    times = _times(ts)
    for i, (t, t_next) in enumerate(itertools.pairwise(times)):
        v = model_fn(x, _t_batch(t, x))
        _report(callback, i, x, t, t_next, v)
        dt = t_next - t
        x_euler = (x + dt * v).to(x.dtype)
        if t_next == 0:
            x = x_euler
            continue
        v_next = model_fn(x_euler, _t_batch(t_next, x))
        x = (x + dt * 0.5 * (v + v_next)).to(x.dtype)
    return x


def _lambda(t: float) -> float:
    """Half log-SNR of the flow path, log(alpha / sigma) with alpha = 1 - t, sigma = t; +-inf at the ends."""
    if t <= 0.0:
        return math.inf
    if t >= 1.0:
        return -math.inf
    return math.log1p(-t) - math.log(t)


def sample_dpmpp_2m(model_fn: VelocityFn, x: Tensor, ts: Tensor, callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), the multistep data-prediction solver, on the flow path.

    With alpha_t = 1 - t, sigma_t = t, lambda = log(alpha / sigma) and D = x - t * v the data prediction,
    the first-order (DDIM) update is

        x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) D,   h = lambda' - lambda,

    and alpha' (1 - e^{-h}) = alpha' - alpha sigma'/sigma = 1 - t'/t, so on this path it is simply
    x' = (t'/t) x + (1 - t'/t) D, which is the Euler step. It is finite at t = 1 (alpha = 0, lambda = -inf)
    and gives x' = D at t' = 0, so no log-SNR is ever evaluated at the ends. The second-order update replaces
    D by D + (D - D_prev) / (2 r), r = h_prev / h, using the data prediction of the previous step.

    First order is used on the first step (no history) and on the step to t = 0 (h = inf there). A
    previous step that started at t = 1 has h_prev = inf, so 1 / (2 r) -> 0: the second step is first order
    too, which is exactly the limit of the formula; the global order stays two.
    """
    times = _times(ts)
    d_prev: Tensor | None = None
    h_prev = math.nan
    for i, (t, t_next) in enumerate(itertools.pairwise(times)):
        v = model_fn(x, _t_batch(t, x))
        d = predict_x0(x, v, t)
        if callback is not None:
            callback({"i": i, "x": x, "t": t, "t_next": t_next, "denoised": d})
        h = _lambda(t_next) - _lambda(t)
        d_eff = d
        if d_prev is not None and t_next > 0.0 and h_prev != 0.0:
            # h / (2 h_prev) is 1 / (2 r); it is 0 when h_prev is infinite (previous step started at t = 1).
            c = 0.5 * h / h_prev
            if c != 0.0:
                d_eff = d + c * (d - d_prev)
        ratio = t_next / t if t != t_next else 1.0
        x = (ratio * x + (1.0 - ratio) * d_eff).to(x.dtype)
        d_prev, h_prev = d, h
    return x


SAMPLERS: dict[str, SamplerFn] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}

MODEL_EVALS_PER_STEP: dict[str, int] = {"euler": 1, "heun": 2, "dpmpp_2m": 1}


def get_sampler(name: str) -> SamplerFn:
    """The sampler called `name`; ValueError naming the known samplers otherwise."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(sorted(SAMPLERS))}") from None


def model_evals_per_step(name: str) -> int:
    """Model calls per (non-final) step, for progress bars and cost estimates (before CFG doubling)."""
    get_sampler(name)
    return MODEL_EVALS_PER_STEP[name]


def model_evals(name: str, steps: int) -> int:
    """Exact model calls for a schedule of `steps` steps ending at 0 (Heun's last step is Euler)."""
    per = model_evals_per_step(name)
    return per * steps - (1 if name == "heun" and steps > 0 else 0)


# --------------------------------------------------------------------------------------------- schedules


def _check_steps(steps: int, start: float) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < start <= 1.0:
        raise ValueError(f"start must lie in (0, 1], got {start}")


def _shifted_schedule(steps: int, mu: float, start: float) -> Tensor:
    """linspace in the unshifted time u, mapped through time_shift(mu, 1, u).

    For start < 1 the linspace starts at the u that maps onto `start` (the inverse shift), so all `steps`
    steps are spent in [0, start] with the same spacing the full schedule has there, and ts[0] == start.
    """
    u_start = time_shift(-mu, 1.0, start)
    u = torch.linspace(u_start, 0.0, steps + 1, dtype=torch.float64)
    ts = time_shift(mu, 1.0, u).float()
    ts[0], ts[-1] = start, 0.0
    return ts


def schedule_linear(steps: int, start: float = 1.0) -> Tensor:
    """Evenly spaced times from `start` to 0, float32 [steps + 1]."""
    _check_steps(steps, start)
    return _shifted_schedule(steps, 0.0, start)


def schedule_flux(
    steps: int,
    image_seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    shift: bool = True,
    start: float = 1.0,
) -> Tensor:
    """FLUX.1's schedule (flux `sampling.get_schedule`): linspace(1, 0) then time_shift with the
    resolution-dependent mu, so larger images spend more steps at high noise. shift=False gives the linear
    schedule (as FLUX.1-schnell uses). For img2img, start < 1: see `_shifted_schedule`.
    """
    _check_steps(steps, start)
    mu = resolution_mu(image_seq_len, base_shift=base_shift, max_shift=max_shift) if shift else 0.0
    return _shifted_schedule(steps, mu, start)


def schedule_shifted(steps: int, shift: float = 3.0, start: float = 1.0) -> Tensor:
    """SD3-style constant shift t' = s t / (1 + (s - 1) t) of a linear schedule (time_shift with
    mu = log s, sigma = 1). shift > 1 moves steps toward noise; SD3 uses 3.0.
    """
    _check_steps(steps, start)
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return _shifted_schedule(steps, math.log(shift), start)


SCHEDULES: tuple[str, ...] = ("flux", "linear", "shifted")


def get_schedule(name: str, steps: int, image_seq_len: int, **kw: Any) -> Tensor:
    """Build schedule `name` ("flux", "linear", "shifted"); image_seq_len is used by "flux" only."""
    if name == "flux":
        return schedule_flux(steps, image_seq_len, **kw)
    if name == "linear":
        return schedule_linear(steps, **kw)
    if name == "shifted":
        return schedule_shifted(steps, **kw)
    raise ValueError(f"unknown schedule {name!r}; known schedules: {', '.join(SCHEDULES)}")


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
