"""Stochastic samplers with two model calls per step, as ComfyUI runs them on a flow model (its CONST model
sampling): DPM2 ancestral, DPM-Solver++(2S) ancestral and DPM-Solver++ SDE; and the one-call Euler ancestral
(`sample_euler_ancestral`), whose rectified-flow step the others share (kept here, beside them, so that
`pictor.sampling` stays the registry).

Notation: t the noise level (alpha = 1 - t, sigma = t), v the velocity, D = x - t v the data prediction,
s = t / (1 - t) the noise-to-signal ratio (exp(-lambda), lambda the half log-SNR; s = inf at t = 1).

Ancestral steps (`sample_dpm_2_ancestral`, `sample_dpmpp_2s_ancestral`) use ComfyUI's rectified-flow
ancestral step, as pictor's `euler_ancestral`: from t to t' (> 0) the deterministic step goes down to
t_down = t' (1 + (t'/t - 1) eta) (t'^2 / t at eta 1), and the result is rescaled by (1 - t') / (1 - t_down)
and given fresh noise with the coefficient that brings its noise variance back to t'^2:
renoise^2 = t'^2 - (t_down (1 - t') / (1 - t_down))^2. The deterministic steps down to t_down are:

- DPM2: the log-t midpoint method (`pictor.sampling_stages.sample_dpm_2`), midpoint sqrt(t t_down).
- DPM-Solver++(2S): a first-order DPM-Solver++ step to the midpoint in lambda, s_mid = sqrt(s s_down)
  (on a flow model that step is u = (t_mid / t) x + (1 - t_mid / t) D), the data prediction D2 there, and
  the first-order step from x to t_down with D2: (t_down / t) x + (1 - t_down / t) D2. From t = 1, where
  lambda is -inf and the midpoint would be t = 1 itself, the midpoint is t = 0.9999, as in ComfyUI.

`sample_dpmpp_sde` is k-diffusion's DPM-Solver++ SDE (ComfyUI's `dpmpp_sde`, A1111's "DPM++ SDE", r = 1/2)
in ComfyUI's form for a flow model: two stochastic first-order DPM-Solver++ stages in lambda. A stage from t_a
to t_b with data prediction P takes k-diffusion's ancestral split of the noise-to-signal ratios s_a -> s_b,
s_up = min(s_b, eta s_b sqrt(1 - (s_b / s_a)^2)), s_down = sqrt(s_b^2 - s_up^2), and lands at

    x_b = (1 - t_b) [ (s_down / t_a) x + (1 - s_down / s_a) P + s_up eps ],

which at eta 0 is the deterministic (t_b / t_a) x + (1 - t_b / t_a) P and from t_a = 1 (s_a = inf) is
finite: (1 - t_b) P + t_b eps at eta 1. The first stage goes from t to the lambda-midpoint with D, the second
from t to t' with the midpoint's data prediction (r = 1/2 weighs it fully). The step to t' = 0 is D. From
t = 1 the midpoint is t = 0.9999 as above; ComfyUI instead starts that step at 1 - 1e-4 e^{-mu} (its
`offset_first_sigma_for_snr`, 3.2e-5 below 1 for FLUX at mu = 1.15), which puts its midpoint near 0.999: the
first step differs a little, far less than another seed changes.

Noise. ComfyUI's ancestral samplers draw independent normal noise per step, as here: eps = noise(i) for
every step i that does not end at 0 (none at eta 0). Its dpmpp_sde draws from a Brownian tree over t
(torchsde), normalised increments over [t_mid, t] and [t', t] in each step: standard normal each, increments
of disjoint steps independent, and within a step correlated by rho = sqrt((t - t_mid) / (t - t')), the
share of the step's interval the first covers. pictor has no torchsde and draws the same joint law from the
image's own generators: the full step's eps = noise(i) and the midpoint stage's
rho eps + sqrt(1 - rho^2) noise(n + i), n = len(ts) - 1 the number of steps. The images then follow the
same law as ComfyUI's, not its pixels.
"""

from __future__ import annotations

import itertools
import math

from torch import Tensor

from pictor.flow import predict_x0
from pictor.sampling_stages import dpm2_velocity
from pictor.sampling_steps import (
    Callback,
    NoiseFn,
    VelocityFn,
    draw,
    report,
    require_noise,
    strictly_decreasing,
    t_batch,
    times,
)

__all__ = [
    "rf_ancestral_step",
    "sample_dpm_2_ancestral",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
    "sample_euler_ancestral",
]

FIRST_MIDPOINT = 0.9999  # the intermediate time of a step from t = 1, where lambda's midpoint is t = 1
# Where ComfyUI starts DPM++ SDE's half-log-SNR arithmetic instead of t = 1 on a FLUX.1 model
# (offset_first_sigma_for_snr: 1e-4 * e^-1.15 below 1), for a first step that ends above FIRST_MIDPOINT
SDE_FIRST_START = 1.0 - 1e-4 * math.exp(-1.15)


def rf_ancestral_step(t: float, t_next: float, eta: float) -> tuple[float, float, float]:
    """(t_down, scale, renoise) of ComfyUI's rectified-flow ancestral step from t to t_next > 0 (module
    docstring): step deterministically to t_down, then x <- scale * x + renoise * eps."""
    t_down = t_next * (1.0 + (t_next / t - 1.0) * eta)
    scale = (1.0 - t_next) / (1.0 - t_down)
    renoise = math.sqrt(max(t_next * t_next - (t_down * scale) ** 2, 0.0))  # max: rounding only
    return t_down, scale, renoise


def _nsr(t: float) -> float:
    """s = t / (1 - t) = exp(-lambda); inf at t = 1."""
    return math.inf if t >= 1.0 else t / (1.0 - t)


def _lambda_midpoint(t: float, t_to: float) -> float:
    """The time halfway from t to t_to in lambda: s_mid = sqrt(s s_to); FIRST_MIDPOINT from t = 1."""
    if t >= 1.0:
        return FIRST_MIDPOINT
    s_mid = math.sqrt(_nsr(t) * _nsr(t_to))
    return s_mid / (1.0 + s_mid)


def sample_dpm_2_ancestral(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
) -> Tensor:
    """DPM2 ancestral for rectified flow (ComfyUI's `sample_dpm_2_ancestral_RF`; A1111's "DPM2 a"): DPM2 to
    t_down, rescale and renoise to t' (module docstring). Two model calls per step, one on the step to 0
    (Euler, landing on D). At eta = 0 it is `sample_dpm_2`.

    noise(i) is called once for every step i that does not end at 0 (eta > 0); without it this raises a
    ValueError.
    """
    noise = require_noise(noise, "dpm_2_ancestral")
    ts_ = times(ts)
    strictly_decreasing(ts_, "dpm_2_ancestral")
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        v = model_fn(x, t_batch(t, x))
        report(callback, i, x, t, t_next, predict_x0(x, v, t))
        if t_next == 0.0:
            x = (x - t * v).to(x.dtype)
            continue
        t_down, scale, renoise = rf_ancestral_step(t, t_next, eta)
        x_down = x + (t_down - t) * dpm2_velocity(model_fn, x, v, t, t_down)
        if eta > 0.0:
            x_down = scale * x_down + renoise * draw(noise, i, x)
        x = x_down.to(x.dtype)
    return x


def sample_dpmpp_2s_ancestral(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2S) ancestral for rectified flow (ComfyUI's `sample_dpmpp_2s_ancestral_RF`; A1111's
    "DPM++ 2S a"; module docstring). Two model calls per step, one on the step to 0 (landing on D).

    noise(i) is called once for every step i that does not end at 0 (eta > 0); without it this raises a
    ValueError.
    """
    noise = require_noise(noise, "dpmpp_2s_ancestral")
    ts_ = times(ts)
    strictly_decreasing(ts_, "dpmpp_2s_ancestral")
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        v = model_fn(x, t_batch(t, x))
        d = predict_x0(x, v, t)
        report(callback, i, x, t, t_next, d)
        if t_next == 0.0:
            x = d.to(x.dtype)
            continue
        t_down, scale, renoise = rf_ancestral_step(t, t_next, eta)
        t_mid = _lambda_midpoint(t, t_down)
        u = ((t_mid / t) * x + (1.0 - t_mid / t) * d).to(x.dtype)
        d_mid = predict_x0(u, model_fn(u, t_batch(t_mid, x)), t_mid)
        x_down = (t_down / t) * x + (1.0 - t_down / t) * d_mid
        if eta > 0.0:
            x_down = scale * x_down + renoise * draw(noise, i, x)
        x = x_down.to(x.dtype)
    return x


def _sde_stage(x: Tensor, pred: Tensor, t_a: float, t_b: float, eta: float, eps: Tensor | None) -> Tensor:
    """One stochastic first-order DPM-Solver++ stage from t_a to t_b > 0 (module docstring)."""
    s_a, s_b = _nsr(t_a), _nsr(t_b)
    ratio = s_b / s_a  # 0 from t_a = 1
    s_up = min(s_b, eta * s_b * math.sqrt(max(1.0 - ratio * ratio, 0.0)))
    s_down = math.sqrt(max(s_b * s_b - s_up * s_up, 0.0))
    alpha_b = 1.0 - t_b
    out = (alpha_b * s_down / t_a) * x + alpha_b * (1.0 - s_down / s_a) * pred
    if eps is not None and s_up > 0.0:
        out = out + (alpha_b * s_up) * eps
    return out


def sample_dpmpp_sde(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
) -> Tensor:
    """DPM-Solver++ SDE, r = 1/2 (module docstring). Two model calls per step, one on the step to 0 (D).

    For every step i that does not end at 0 (eta > 0) it calls noise(i) and noise(n + i), n the number of
    steps (the Brownian increments' joint law, module docstring); without `noise` it raises a ValueError.
    """
    noise = require_noise(noise, "dpmpp_sde")
    ts_ = times(ts)
    strictly_decreasing(ts_, "dpmpp_sde")
    n = len(ts_) - 1
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        v = model_fn(x, t_batch(t, x))
        d = predict_x0(x, v, t)
        report(callback, i, x, t, t_next, d)
        if t_next == 0.0:
            x = d.to(x.dtype)
            continue
        t_mid = _lambda_midpoint(t, t_next)
        if not t_next < t_mid < t:  # from t = 1, a first step that ends above FIRST_MIDPOINT (long schedules)
            start = SDE_FIRST_START
            t_mid = _lambda_midpoint(start, t_next) if t_next < start else 0.5 * (t + t_next)
        eps_step = eps_mid = None
        if eta > 0.0:
            rho = math.sqrt((t - t_mid) / (t - t_next))
            eps_step = draw(noise, i, x)
            eps_mid = rho * eps_step + math.sqrt(1.0 - rho * rho) * draw(noise, n + i, x)
        x_mid = _sde_stage(x, d, t, t_mid, eta, eps_mid).to(x.dtype)
        d_mid = predict_x0(x_mid, model_fn(x_mid, t_batch(t_mid, x)), t_mid)
        x = _sde_stage(x, d_mid, t, t_next, eta, eps_step).to(x.dtype)
    return x


def sample_euler_ancestral(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """Euler ancestral for rectified flow (as ComfyUI's `sample_euler_ancestral_RF` with eta = 1).

    Each step from t to t' (> 0) takes a deterministic Euler step to the lower time t_down = t'^2 / t and
    then puts noise back up to t': x_t_down = (1 - t_down) D + t_down n is rescaled by
    (1 - t') / (1 - t_down), which makes its data part (1 - t') D, and fresh noise is added with the
    coefficient that makes the noise variance t'^2 again:

        renoise^2 = t'^2 - (t_down (1 - t') / (1 - t_down))^2,

    which is >= 0 because s / (1 - s) grows with s and t_down <= t'. The step to t' = 0 is the data
    prediction itself and draws nothing. It is not an ODE solver: results depend on the noise, and more
    steps converge in distribution, not to one image. One model call per step.

    noise(i) is called once for every step i that does not end at 0; without it this raises a ValueError.
    """
    noise = require_noise(noise, "euler_ancestral")
    ts_ = times(ts)
    strictly_decreasing(ts_, "euler_ancestral")
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        v = model_fn(x, t_batch(t, x))
        d = predict_x0(x, v, t)
        report(callback, i, x, t, t_next, d)
        if t_next == 0.0:
            x = d
            continue
        t_down = t_next * t_next / t
        scale = (1.0 - t_next) / (1.0 - t_down)
        renoise = math.sqrt(max(t_next * t_next - (t_down * scale) ** 2, 0.0))  # max: rounding only
        eps = draw(noise, i, x)
        x_down = x + (t_down - t) * v  # Euler to t_down: the same as (t_down/t) x + (1 - t_down/t) D
        x = (scale * x_down + renoise * eps).to(x.dtype)
    return x
