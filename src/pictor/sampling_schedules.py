"""Timestep schedules: the times a sampler steps through, from `start` (1, or the strength of an edit) down
to exactly 0, as float32 [steps + 1]. FLUX.1's resolution-shifted schedule (BFL's), linear, SD3's constant
shift, and diffusers' FLUX.1 sigmas re-spaced by Karras, exponential or Beta spacing. `pictor.sampling`
re-exports them with the samplers that run them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pictor.flow import resolution_mu, time_shift

__all__ = [
    "SCHEDULES",
    "get_schedule",
    "schedule_beta",
    "schedule_exponential",
    "schedule_flux",
    "schedule_karras",
    "schedule_linear",
    "schedule_shifted",
]


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


def _respaced_schedule(
    spacing: Callable[[float, float, Tensor], Tensor], steps: int, image_seq_len: int, start: float
) -> Tensor:
    """diffusers' FLUX.1 schedule re-spaced (`FlowMatchEulerDiscreteScheduler.set_timesteps` with
    use_karras/exponential/beta_sigmas): FluxPipeline's sigmas linspace(1, 1/N, N) are shifted by the
    resolution mu, then N new ones are laid out by `spacing(hi, lo, ramp)`, ramp = linspace(0, 1, N), between
    the first (hi) and the last (lo) of them, and a final 0 is appended.

    lo = time_shift(mu, 1/N) > 0 is diffusers' end, not the 0 of pictor's own "flux" schedule (BFL's
    linspace(1, 0, N + 1)): karras and exponential space steps in sigma^(1/rho) and log sigma, which need a
    sigma_min > 0, so the last step always jumps from lo to 0, as in diffusers.

    For start < 1 (img2img) the unshifted linspace(1, 1/N, N) is scaled by u_start = the unshifted time that
    shifts onto start, as `_shifted_schedule` does: hi = start exactly, lo = time_shift(mu, u_start / N), so
    all N steps are spent in [0, start] and the spacing keeps its character there. This is diffusers' own
    construction fed sigmas linspace(u_start, u_start / N, N) (tested); start = 1 is diffusers' FLUX.1.
    """
    mu = resolution_mu(image_seq_len)
    u_start = time_shift(-mu, 1.0, start)
    lo = time_shift(mu, 1.0, u_start / steps)
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    ts = torch.cat([spacing(start, lo, ramp), torch.zeros(1, dtype=torch.float64)]).float()
    ts[0], ts[-1] = start, 0.0
    return ts


def schedule_karras(steps: int, image_seq_len: int, start: float = 1.0, rho: float = 7.0) -> Tensor:
    """Karras et al.'s spacing (evenly in sigma^(1/rho)) of FLUX.1's shifted sigmas: diffusers'
    use_karras_sigmas=True with FLUX.1's config; more steps near the end. See `_respaced_schedule`."""
    _check_steps(steps, start)

    def spacing(hi: float, lo: float, ramp: Tensor) -> Tensor:
        return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho

    return _respaced_schedule(spacing, steps, image_seq_len, start)


def schedule_exponential(steps: int, image_seq_len: int, start: float = 1.0) -> Tensor:
    """Evenly spaced in log sigma between FLUX.1's shifted ends: diffusers' use_exponential_sigmas=True with
    FLUX.1's config. See `_respaced_schedule`."""
    _check_steps(steps, start)

    def spacing(hi: float, lo: float, ramp: Tensor) -> Tensor:
        return torch.exp(math.log(hi) + ramp * (math.log(lo) - math.log(hi)))

    return _respaced_schedule(spacing, steps, image_seq_len, start)


def schedule_beta(
    steps: int, image_seq_len: int, start: float = 1.0, alpha: float = 0.6, beta: float = 0.6
) -> Tensor:
    """Quantiles of Beta(alpha, beta) (Lee et al., "Beta Sampling is All You Need") between FLUX.1's shifted
    ends: diffusers' use_beta_sigmas=True with FLUX.1's config; at 0.6/0.6 dense near both ends. See
    `_respaced_schedule`."""
    _check_steps(steps, start)

    def spacing(hi: float, lo: float, ramp: Tensor) -> Tensor:
        q = torch.tensor([_beta_ppf(1.0 - r, alpha, beta) for r in ramp.tolist()], dtype=torch.float64)
        return lo + q * (hi - lo)

    return _respaced_schedule(spacing, steps, image_seq_len, start)


def _beta_cdf(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (modified Lentz), float64."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below this point: use the symmetry
        return 1.0 - _beta_cdf(1.0 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d, c = 1.0 + num * d, 1.0 + num / c
            d, c = 1.0 / (d if abs(d) > tiny else tiny), c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return math.exp(log_front) * h / a


def _beta_ppf(p: float, a: float, b: float) -> float:
    """The inverse of `_beta_cdf` (scipy.stats.beta.ppf, without scipy): Newton kept inside a bisection
    bracket, to float64 precision."""
    if p <= 0.0 or p >= 1.0:
        return 0.0 if p <= 0.0 else 1.0
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    lo, hi, x = 0.0, 1.0, p
    for _ in range(200):
        f = _beta_cdf(x, a, b) - p
        if f == 0.0:
            return x
        lo, hi = (x, hi) if f < 0 else (lo, x)
        pdf = math.exp(log_norm + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x))
        nxt = x - f / pdf
        if not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        if abs(nxt - x) <= 1e-16 or nxt in (lo, hi):
            return nxt
        x = nxt
    return x


SCHEDULES: tuple[str, ...] = ("flux", "linear", "shifted", "karras", "exponential", "beta")
_RESPACED = {"karras": schedule_karras, "exponential": schedule_exponential, "beta": schedule_beta}


def get_schedule(name: str, steps: int, image_seq_len: int, **kw: Any) -> Tensor:
    """Build schedule `name` (one of `SCHEDULES`): "flux", "linear", "shifted", or diffusers' FLUX.1
    sigmas re-spaced by "karras", "exponential" or "beta"; image_seq_len is used by "flux" and the
    re-spaced three only (FLUX.1's resolution shift)."""
    if name == "flux":
        return schedule_flux(steps, image_seq_len, **kw)
    if name == "linear":
        return schedule_linear(steps, **kw)
    if name == "shifted":
        return schedule_shifted(steps, **kw)
    if name in _RESPACED:
        return _RESPACED[name](steps, image_seq_len, **kw)
    raise ValueError(f"unknown schedule {name!r}; known schedules: {', '.join(SCHEDULES)}")
