"""Timestep schedules: the times a sampler steps through, from `start` (1, or the strength of an edit) down
to exactly 0, as float32 [steps + 1]. FLUX.1's resolution-shifted schedule (BFL's), linear, SD3's constant
shift, diffusers' FLUX.1 sigmas re-spaced by Karras, exponential or Beta spacing, and ComfyUI's KL-optimal,
linear-quadratic and normal schedulers as it runs them on a FLUX.1 model. `pictor.sampling` re-exports
them with the samplers that run them."""

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
    "schedule_kl_optimal",
    "schedule_linear",
    "schedule_linear_quadratic",
    "schedule_normal",
    "schedule_shifted",
]

# ComfyUI's ModelSamplingFlux tabulates the model's sigmas at the times k / 10,000, k = 1..10,000, shifted:
# its sigma_min is the shifted 1 / 10,000.
COMFY_TABLE_SIZE = 10_000


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
    spacing: Callable[[float, float, Tensor], Tensor],
    steps: int,
    image_seq_len: int,
    start: float,
    smallest: float | None = None,
) -> Tensor:
    """diffusers' FLUX.1 schedule re-spaced (`FlowMatchEulerDiscreteScheduler.set_timesteps` with
    use_karras/exponential/beta_sigmas): FluxPipeline's sigmas linspace(1, 1/N, N) are shifted by the
    resolution mu, then N new ones are laid out by `spacing(hi, lo, ramp)`, ramp = linspace(0, 1, N), between
    the first (hi) and the last (lo) of them, and a final 0 is appended.

    lo = time_shift(mu, 1/N) > 0 is diffusers' end, not the 0 of pictor's own "flux" schedule (BFL's
    linspace(1, 0, N + 1)): karras and exponential space steps in sigma^(1/rho) and log sigma, which need a
    sigma_min > 0, so the last step always jumps from lo to 0, as in diffusers. `smallest` replaces that 1/N
    by another unshifted end (ComfyUI's 1 / 10,000 for kl_optimal).

    For start < 1 (img2img) the unshifted linspace(1, 1/N, N) is scaled by u_start = the unshifted time that
    shifts onto start, as `_shifted_schedule` does: hi = start exactly, lo = time_shift(mu, u_start / N), so
    all N steps are spent in [0, start] and the spacing keeps its character there. This is diffusers' own
    construction fed sigmas linspace(u_start, u_start / N, N) (tested); start = 1 is diffusers' FLUX.1.
    """
    mu = resolution_mu(image_seq_len)
    u_start = time_shift(-mu, 1.0, start)
    lo = time_shift(mu, 1.0, u_start * (1 / steps if smallest is None else smallest))
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


def schedule_kl_optimal(steps: int, image_seq_len: int, start: float = 1.0) -> Tensor:
    """The KL-optimal schedule of "Align Your Steps" (Sabour et al. 2024; ComfyUI's kl_optimal, A1111's KL
    Optimal): N sigmas evenly spaced in arctan(sigma) from sigma_max down to sigma_min, then 0.

    On a FLUX.1 model ComfyUI takes sigma_max and sigma_min from its ModelSamplingFlux table (the times
    k / 10,000 shifted by the model's mu): sigma_max = 1 and sigma_min = time_shift(mu, 1 / 10,000), 3.2e-4 at
    mu = 1.15; nothing else is shifted. pictor's mu is the image's (`resolution_mu(image_seq_len)`), which is
    ComfyUI's with a ModelSamplingFlux node at its defaults (max_shift 1.15, base_shift 0.5) for the image's
    size, and ComfyUI's without one (a constant 1.15) at 4096 tokens (1024x1024): there pictor gives
    ComfyUI's sigmas to float32 rounding (ComfyUI computes in float32, its table's end rounding to 0.99999994
    at some shifts; pictor in float64 from exactly 1). One step is [start, 0], where ComfyUI's formula
    divides 0 by 0.

    For start < 1 the table is scaled onto [0, u_start] as in `_respaced_schedule`: sigma_max = start,
    sigma_min = time_shift(mu, u_start / 10,000). (ComfyUI's denoise < 1 instead takes the last N + 1 of a
    schedule of int(N / denoise) steps.)
    """
    _check_steps(steps, start)

    def spacing(hi: float, lo: float, ramp: Tensor) -> Tensor:
        return torch.tan(math.atan(hi) + ramp * (math.atan(lo) - math.atan(hi)))

    return _respaced_schedule(spacing, steps, image_seq_len, start, smallest=1 / COMFY_TABLE_SIZE)


def schedule_normal(steps: int, image_seq_len: int, start: float = 1.0) -> Tensor:
    """ComfyUI's normal scheduler (its KSampler's long-time default) as it runs on a FLUX.1 model: N times
    evenly spaced in the model's unshifted time from 1 down to ComfyUI's sigma_min, each shifted, then 0.

    ComfyUI's normal spans the model's timesteps from timestep(sigma_max) to timestep(sigma_min), and its
    FLUX.1 model sampling takes a sigma as its own timestep (no inverse shift): so the span ends at the
    unshifted time sigma_min = time_shift(mu, 1 / 10,000) (3.2e-4 at mu 1.15), which shifts to about 1e-3,
    the last sigma before 0. Unlike pictor's flux schedule (BFL's, and ComfyUI's simple: N + 1 times evenly
    down to 0), its N - 1 intervals end near 0 and one more step goes to 0: at 4 steps the two differ by up
    to 0.5. mu is the image's, as for `schedule_kl_optimal`, with the same agreement with ComfyUI (to float32
    rounding).

    For start < 1 the unshifted span is scaled onto [0, u_start], u_start shifting onto start, as in
    `_shifted_schedule`: linspace(u_start, u_start * sigma_min, N), shifted, then 0.
    """
    _check_steps(steps, start)
    mu = resolution_mu(image_seq_len)
    u_start = time_shift(-mu, 1.0, start)
    end = u_start * time_shift(mu, 1.0, 1 / COMFY_TABLE_SIZE)
    u = torch.linspace(u_start, end, steps, dtype=torch.float64)
    ts = torch.cat([time_shift(mu, 1.0, u), torch.zeros(1, dtype=torch.float64)]).float()
    ts[0], ts[-1] = start, 0.0
    return ts


def schedule_linear_quadratic(
    steps: int, start: float = 1.0, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> Tensor:
    """Mochi's schedule (genmoai's `linear_quadratic_schedule`; ComfyUI's linear_quadratic): the first
    `linear_steps` (default steps // 2) lower the noise evenly from 1 to 1 - threshold_noise (0.975), the rest
    follow the quadratic that goes on from there with the same slope and reaches 0 at step N, each step
    longer than the one before. Half the steps are spent in the top 2.5% of the noise, where layout forms.

    Unshifted: ComfyUI multiplies it by the model's sigma_max and shifts nothing, so it is the same at every
    size and shift; pictor's is ComfyUI's bit for bit where that sigma_max is 1 (both work in float64 and
    round to float32; at shifts where ComfyUI's float32 table ends at 0.99999994, one float32 step apart).
    For start < 1 it is scaled by start (sigma_max = start), so all N steps lie in [0, start].
    """
    _check_steps(steps, start)
    if not 0.0 < threshold_noise < 1.0:
        raise ValueError(f"threshold_noise must lie in (0, 1), got {threshold_noise}")
    done = [0.0, 1.0]  # how far each step has taken the noise: 1 - sigma / sigma_max
    if steps > 1:
        lin = steps // 2 if linear_steps is None else linear_steps
        if not 1 <= lin < steps:
            raise ValueError(f"linear_steps must lie in [1, {steps - 1}] for {steps} steps, got {lin}")
        quad = steps - lin
        # q(i) = a i^2 + b i + c with q(lin) = threshold_noise, q'(lin) = threshold_noise / lin, q(steps) = 1
        excess = lin - threshold_noise * steps
        a = excess / (lin * quad**2)
        b = threshold_noise / lin - 2 * excess / quad**2
        c = a * lin**2
        done = [i * threshold_noise / lin for i in range(lin)]
        done += [a * i**2 + b * i + c for i in range(lin, steps)] + [1.0]
    ts = torch.tensor([start * (1.0 - d) for d in done], dtype=torch.float64).float()
    if not bool((ts.diff() < 0).all()):
        raise ValueError(
            f"threshold_noise {threshold_noise} with linear_steps {linear_steps} of {steps} steps does not "
            "give a schedule that keeps falling"
        )
    return ts


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


SCHEDULES: tuple[str, ...] = (
    "flux",
    "linear",
    "shifted",
    "karras",
    "exponential",
    "beta",
    "kl_optimal",
    "linear_quadratic",
    "normal",
)
_RESPACED = {
    "karras": schedule_karras,
    "exponential": schedule_exponential,
    "beta": schedule_beta,
    "kl_optimal": schedule_kl_optimal,
    "normal": schedule_normal,
}


def get_schedule(name: str, steps: int, image_seq_len: int, **kw: Any) -> Tensor:
    """Build schedule `name` (one of `SCHEDULES`): "flux", "linear", "shifted", diffusers' FLUX.1 sigmas
    re-spaced by "karras", "exponential" or "beta", or ComfyUI's "kl_optimal", "linear_quadratic" and
    "normal"; image_seq_len is used by all but "linear", "shifted" and "linear_quadratic" (FLUX.1's
    resolution shift)."""
    if name == "flux":
        return schedule_flux(steps, image_seq_len, **kw)
    if name == "linear":
        return schedule_linear(steps, **kw)
    if name == "shifted":
        return schedule_shifted(steps, **kw)
    if name == "linear_quadratic":
        return schedule_linear_quadratic(steps, **kw)
    if name in _RESPACED:
        return _RESPACED[name](steps, image_seq_len, **kw)
    raise ValueError(f"unknown schedule {name!r}; known schedules: {', '.join(SCHEDULES)}")
