"""DPM-Solver++(2M) SDE (Lu et al. 2022) on the flow path: ComfyUI's `dpmpp_2m_sde` for a flow model (eta 1,
midpoint), and diffusers' DPMSolverMultistepScheduler with algorithm_type="sde-dpmsolver++" on flow sigmas;
with its Heun-type correction (`dpmpp_2m_sde_heun`) and at third order (`dpmpp_3m_sde`), which share its
first-order step, noise and limits (`_multistep_sde`).

In the half log-SNR lambda = log(alpha / sigma) of alpha_t = 1 - t, sigma_t = t (`half_log_snr`), with the
data prediction D = x - t v and h = lambda' - lambda > 0, a step from t to t' solves the data-prediction
SDE of the flow path exactly for a constant D (first order), corrects D by its change since the previous
step by the midpoint rule (second order), and adds the noise that SDE adds:

    x' = (t'/t) e^{-h} x + (1 - t') (1 - e^{-2h}) [D + (h / (2 h_prev)) (D - D_prev)]
         + t' sqrt(1 - e^{-2h}) eps.

The coefficients of x and D sum with x's own data part to 1 - t', and the noise parts' variances to t'^2:
a point at noise level t lands at noise level t', with a share e^{-2h} of its noise kept and the rest fresh.

- The step from t = 1 (alpha = 0, h = inf) is the limit of the formula: x' = (1 - t') D + t' eps, no part of
  x kept; the step after it has h_prev = inf, so its correction term is 0 (diffusers' result from sigma 1).
  ComfyUI starts just below 1 (1 - 3.2e-5 for FLUX at shift 1.15), so its first step keeps a share of x
  of about e^{-h} and its second a small midpoint correction that the limit sets to 0: images then differ by
  about 1e-4 at 20 steps (0.03 at 4), far below what another noise draw changes.
- The step to t' = 0 is the data prediction, D, and draws no noise (both do that).
- A schedule that does not end at 0 takes its last step at second order, as ComfyUI does; diffusers takes
  its last step at first order (final_sigmas_type "zero", lower_order_final), which on a step to 0 is the
  same D, so the two agree on every schedule that ends at 0, as all of pictor's do.

ComfyUI draws eps from a Brownian tree over its sigmas and diffusers from its generator; here eps = noise(i),
fresh standard normal noise for step i: on disjoint steps a Brownian tree's normalized increments are such
noise too, so the law of the images is the same, and each image's noise is its own (`pictor.pipeline`).
"""

from __future__ import annotations

import itertools
import math

from torch import Tensor

from pictor.flow import predict_x0
from pictor.sampling_steps import (
    Callback,
    NoiseFn,
    VelocityFn,
    draw,
    half_log_snr,
    report,
    require_noise,
    strictly_decreasing,
    t_batch,
    times,
)

__all__ = ["sample_dpmpp_2m_sde", "sample_dpmpp_2m_sde_heun", "sample_dpmpp_3m_sde"]


def _phi2(x: float) -> float:
    """1 - (1 - e^{-x}) / x, the weight of a linear term in an exponential step of length x (1 at inf)."""
    return 1.0 if math.isinf(x) else 1.0 + math.expm1(-x) / x


def _multistep_sde(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None,
    noise: NoiseFn | None,
    *,
    name: str,
    order: int,
    solver: str,
    eta: float,
) -> Tensor:
    """DPM-Solver++ multistep SDE of order 2 (`solver` midpoint or heun) or 3 (heun-type terms, as
    k-diffusion's 3M SDE), with eta scaling the noise (0: the ODE solver DPM-Solver++(2M) / (3M)).

    With h = lambda' - lambda and h_eta = (1 + eta) h, a step from t to t' > 0 is

        x' = (t'/t) e^{-eta h} x + (1 - t') (1 - e^{-h_eta}) D + corrections + t' sqrt(1 - e^{-2 eta h}) eps,

    the corrections built from the earlier data predictions (module docstring; the 3M terms as the k-diffusion
    / DPM-Solver++ third-order multistep formula: phi_2 d1 - phi_3 d2). Any difference whose step length is
    infinite (a step from t = 1) weighs 0: the limits of the formula, as diffusers takes them.
    """
    noise = require_noise(noise, name)
    ts_ = times(ts)
    strictly_decreasing(ts_, name)
    ds: list[Tensor] = []  # earlier data predictions, newest first
    hs: list[float] = []  # their steps' lengths in lambda, newest first
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        v = model_fn(x, t_batch(t, x))
        d = predict_x0(x, v, t)
        report(callback, i, x, t, t_next, d)
        if t_next == 0.0:
            x = d.to(x.dtype)
            continue
        h = half_log_snr(t_next) - half_log_snr(t)  # inf from t = 1
        h_eta = (1.0 + eta) * h
        kept = math.exp(-eta * h) if eta > 0.0 else 1.0  # 0 from t = 1 (eta > 0)
        alpha = 1.0 - t_next
        fresh = -math.expm1(-h_eta)  # 1 - e^{-h_eta}: 1 from t = 1
        out = (t_next / t) * kept * x + alpha * fresh * d
        # the usable history: differences over finite earlier steps only (from t = 1 they weigh 0)
        usable = 0
        while usable < min(order - 1, len(hs)) and not math.isinf(hs[usable]):
            usable += 1
        if usable >= 1:
            r0 = hs[0] / h
            d1_0 = (d - ds[0]) / r0
            if usable >= 2:
                r1 = hs[1] / h
                d1_1 = (ds[0] - ds[1]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi2 = _phi2(h_eta)
                out = out + (alpha * phi2) * d1 - (alpha * (phi2 / h_eta - 0.5)) * d2
            elif solver == "midpoint":
                out = out + (0.5 * alpha * fresh) * d1_0
            else:
                out = out + (alpha * _phi2(h_eta)) * d1_0
        if eta > 0.0:
            out = out + (t_next * math.sqrt(-math.expm1(-2.0 * eta * h))) * draw(noise, i, x)
        x = out.to(x.dtype)
        ds, hs = [d, *ds[: order - 2]], [h, *hs[: order - 2]]
    return x


def sample_dpmpp_2m_sde(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE, eta 1, midpoint (module docstring). One model call per step.

    noise(i) is called once for every step i that does not end at 0; without it this raises a ValueError.
    Like euler_ancestral it converges in distribution, not to one image. At eta = 0 it is DPM-Solver++(2M).
    """
    return _multistep_sde(
        model_fn, x, ts, callback, noise, name="dpmpp_2m_sde", order=2, solver="midpoint", eta=eta
    )


def sample_dpmpp_2m_sde_heun(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE with the Heun-type second-order term (ComfyUI's `dpmpp_2m_sde_heun`, A1111's
    "DPM++ 2M SDE Heun"; diffusers' sde-dpmsolver++ with solver_type "heun"): the correction
    (1 - t') phi_2(2h) (h / h_prev) (D - D_prev), phi_2(x) = 1 - (1 - e^{-x}) / x, in place of the
    midpoint's (1 - t') (1 - e^{-2h}) (h / (2 h_prev)) (D - D_prev). Otherwise as `sample_dpmpp_2m_sde`."""
    return _multistep_sde(
        model_fn, x, ts, callback, noise, name="dpmpp_2m_sde_heun", order=2, solver="heun", eta=eta
    )


def sample_dpmpp_3m_sde(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
) -> Tensor:
    """DPM-Solver++(3M) SDE, eta 1 (ComfyUI's `dpmpp_3m_sde` on a flow model, A1111's "DPM++ 3M SDE").
    One model call per step.

    With the data predictions of the two steps before (lengths h_1, h_2 in lambda, r_k = h_k / h) it adds
    to the first-order SDE step (1 - t') [phi_2 d1 - phi_3 d2], phi_2 = phi_2(h_eta), phi_3 = phi_2 / h_eta
    - 1/2, d1_0 = (D - D_1) / r_1, d1_1 = (D_1 - D_2) / r_2, d1 = d1_0 + (d1_0 - d1_1) r_1 / (r_1 + r_2),
    d2 = (d1_0 - d1_1) / (r_1 + r_2); its second step (one earlier prediction) adds (1 - t') phi_2 d1_0, as
    `sample_dpmpp_2m_sde_heun`. At eta = 0 it is DPM-Solver++(3M), diffusers' DPMSolverMultistepScheduler
    with solver_order=3. From t = 1 it takes the formula's limits, as `sample_dpmpp_2m_sde` does (ComfyUI
    starts 3.2e-5 below 1 for FLUX). ComfyUI draws its noise from a Brownian tree, one increment per step
    over disjoint intervals: independent standard normals, which pictor draws as noise(i), from the image's
    seed. noise(i) is called once for every step i that does not end at 0; without it this raises a
    ValueError.
    """
    return _multistep_sde(
        model_fn, x, ts, callback, noise, name="dpmpp_3m_sde", order=3, solver="heun", eta=eta
    )
