"""DPM-Solver++(2M) SDE (Lu et al. 2022) on the flow path: ComfyUI's `dpmpp_2m_sde` for a flow model (eta 1,
midpoint), and diffusers' DPMSolverMultistepScheduler with algorithm_type="sde-dpmsolver++" on flow sigmas.

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

__all__ = ["sample_dpmpp_2m_sde"]


def sample_dpmpp_2m_sde(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """DPM-Solver++(2M) SDE, eta 1, midpoint (module docstring). One model call per step.

    noise(i) is called once for every step i that does not end at 0; without it this raises a ValueError.
    Like euler_ancestral it converges in distribution, not to one image.
    """
    noise = require_noise(noise, "dpmpp_2m_sde")
    ts_ = times(ts)
    strictly_decreasing(ts_, "dpmpp_2m_sde")
    d_prev: Tensor | None = None
    h_prev = math.nan
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        v = model_fn(x, t_batch(t, x))
        d = predict_x0(x, v, t)
        report(callback, i, x, t, t_next, d)
        if t_next == 0.0:
            x = d.to(x.dtype)
            continue
        h = half_log_snr(t_next) - half_log_snr(t)  # inf from t = 1
        kept = math.exp(-h)  # 0 from t = 1
        fresh = -math.expm1(-2.0 * h)  # 1 - e^{-2h}: 1 from t = 1
        d_eff = d
        if d_prev is not None and not math.isinf(h_prev):  # an h_prev of inf weighs D - D_prev by 0
            d_eff = d + (0.5 * h / h_prev) * (d - d_prev)
        eps = draw(noise, i, x)
        x = ((t_next / t) * kept * x + (1.0 - t_next) * fresh * d_eff + t_next * math.sqrt(fresh) * eps).to(
            x.dtype
        )
        d_prev, h_prev = d, h
    return x
