"""ER-SDE (Cui et al. 2023, "Elucidating the solution space of extended reverse-time SDE for diffusion
models", VP ER-SDE-Solver-3; ComfyUI's `er_sde` with its defaults) on a flow model, one model call per step.

In ComfyUI's CONST (flow) form: alpha = 1 - t, and the solver's time is the noise-to-signal ratio
lam = t / (1 - t) (its er_lambda, exp(-lambda) of the half log-SNR). The noise scaler is ComfyUI's default,
f(lam) = lam (e^{lam^0.3} + 10). A step from t to t' > 0, with D the data prediction x - t v, is

    r = f(lam') / f(lam),
    x' = (1 - t') / (1 - t) r x + (1 - t') (1 - r) D                                   (stage 1)
       + (1 - t') (dlam + S1 f(lam')) (D - D_1) / (lam - lam_1)                         (stage 2)
       + (1 - t') (dlam^2 / 2 + S2 f(lam')) (Dd - Dd_1) / ((lam - lam_2) / 2)             (stage 3)
       + (1 - t') s_noise sqrt(lam'^2 - lam^2 r^2) eps,

dlam = lam' - lam, D_1 and lam_1 the previous step's data prediction and lam (lam_2 the one before), Dd the
stage-2 difference quotient (D - D_1) / (lam - lam_1) and Dd_1 the previous step's. S1 and S2 are
integrals over [lam', lam] of 1 / f and of (u - lam) / f(u), which ComfyUI (and the paper's code) take as
left Riemann sums on 200 even points, as here (in float64). Stage 2 acts from the second step, stage 3 from
the third; the step to t' = 0 is the data prediction. At s_noise 0 no noise is added (the SDE's drift is
kept: that is not an ODE solver). The noise term keeps the variance of x's noise part at t'^2: for x on the
flow path at t, (1 - t') (lam r) stays of the old noise and the fresh one adds its square's complement.

From t = 1 (lam infinite) ComfyUI starts the arithmetic at its FLUX.1 model's time of percent 1e-4
(`offset_first_sigma_for_snr`: e^mu / (e^mu + 1e-4 / (1 - 1e-4)), 1 - 3.2e-5 at mu = 1.15), as here
(`FIRST_START`): that start sets
the first step's 1 - t and lam, and lam_1 and lam_2, the divisors of the next two steps' higher-stage terms.
ComfyUI also calls the model there; pictor calls it at the schedule's t = 1 (and reports that t), as every
sampler of its does: the first data prediction differs by 3.2e-5 of v (a test measures the end result
against ComfyUI's form). ComfyUI draws its noise from its
default (per-step, independent) noise sampler: here noise(i) for every step i that does not end at 0.
"""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from pictor.flow import predict_x0
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

__all__ = ["FIRST_START", "er_sde_noise_scaler", "sample_er_sde"]

INTEGRATION_POINTS = 200  # ComfyUI's (and the paper's code's) Riemann sum
# ComfyUI's start for t = 1 on a FLUX.1 model (its ModelSamplingFlux.percent_to_sigma(1e-4), shift 1.15)
FIRST_START = math.exp(1.15) / (math.exp(1.15) + 1e-4 / (1.0 - 1e-4))


def er_sde_noise_scaler(lam: np.ndarray | float) -> np.ndarray | float:
    """ComfyUI's default ER-SDE noise scaler f(lam) = lam (e^{lam^0.3} + 10)."""
    return lam * (np.exp(np.power(lam, 0.3)) + 10.0)


def _scaler_ratio(lam_to: float, lam_from: float) -> float:
    """f(lam_to) / f(lam_from) for lam_to < lam_from, without overflow at large lam (near t = 1)."""
    a_to, a_from = lam_to**0.3, lam_from**0.3
    return (
        (lam_to / lam_from)
        * math.exp(a_to - a_from)
        * (1.0 + 10.0 * math.exp(-a_to))
        / (1.0 + 10.0 * math.exp(-a_from))
    )


def _integrals(lam: float, lam_to: float) -> tuple[float, float]:
    """S1, S2 (module docstring): left Riemann sums from lam_to up to lam on INTEGRATION_POINTS points."""
    step = (lam - lam_to) / INTEGRATION_POINTS
    u = lam_to + np.arange(INTEGRATION_POINTS, dtype=np.float64) * step
    with np.errstate(over="ignore"):
        f = er_sde_noise_scaler(u)
    return float(np.sum(1.0 / f) * step), float(np.sum((u - lam) / f) * step)


def _nsr(t: float) -> float:
    return t / (1.0 - t)


def sample_er_sde(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    s_noise: float = 1.0,
    max_stage: int = 3,
) -> Tensor:
    """ER-SDE-Solver-3 (module docstring). One model call per step.

    noise(i) is called once for every step i that does not end at 0 (s_noise > 0); without `noise` this
    raises a ValueError.
    """
    noise = require_noise(noise, "er_sde")
    ts_ = times(ts)
    strictly_decreasing(ts_, "er_sde")
    if len(ts_) < 2:  # no step to take (and no lam at t = 1 to compute): x as it is, as the others do
        return x
    starts = list(ts_)  # the times of the solver's arithmetic: ts_ with ComfyUI's start below 1
    if ts_[0] >= 1.0:
        # halfway to the next time should a schedule step less than that from 1
        starts[0] = FIRST_START if ts_[1] < FIRST_START else 0.5 * (1.0 + ts_[1])
    lams = [_nsr(t) for t in starts]
    d_prev: Tensor | None = None
    dd_prev: Tensor | None = None
    for i in range(len(ts_) - 1):
        t, t_next = ts_[i], ts_[i + 1]
        v = model_fn(x, t_batch(t, x))
        d = predict_x0(x, v, t)
        report(callback, i, x, t, t_next, d)
        stage = min(max_stage, i + 1)
        if t_next == 0.0:
            x, d_prev = d.to(x.dtype), d
            continue
        lam, lam_next = lams[i], lams[i + 1]
        alpha_next = 1.0 - t_next
        r = _scaler_ratio(lam_next, lam)
        x_new = (alpha_next / (1.0 - starts[i]) * r) * x + (alpha_next * (1.0 - r)) * d
        if stage >= 2 and d_prev is not None:
            dlam = lam_next - lam
            s1, s2 = _integrals(lam, lam_next)
            f_next = float(er_sde_noise_scaler(lam_next))
            dd = (d - d_prev) / (lam - lams[i - 1])
            x_new = x_new + (alpha_next * (dlam + s1 * f_next)) * dd
            if stage >= 3 and dd_prev is not None:
                du = (dd - dd_prev) / ((lam - lams[i - 2]) / 2.0)
                x_new = x_new + (alpha_next * (dlam * dlam / 2.0 + s2 * f_next)) * du
            dd_prev = dd
        if s_noise > 0.0:
            sd = math.sqrt(max(lam_next * lam_next - (lam * r) ** 2, 0.0))
            x_new = x_new + (alpha_next * s_noise * sd) * draw(noise, i, x)
        x, d_prev = x_new.to(x.dtype), d
    return x
