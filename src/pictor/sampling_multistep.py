"""Multistep solvers on the flow path: DPM-Solver++(2M) and UniPC (bh2, order 2).

Both work in the half log-SNR lambda = log(alpha / sigma) of the path alpha_t = 1 - t, sigma_t = t, on the
data prediction D = x - t * v, and reuse earlier steps' D instead of extra model calls: one model call per
step. Their first-order update is the same, and on this path it is exactly the Euler step:

    x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) D,   h = lambda' - lambda,

and alpha' (1 - e^{-h}) = alpha' - alpha sigma'/sigma = 1 - t'/t, so x' = (t'/t) x + (1 - t'/t) D. That form
is finite at t = 1 (alpha = 0, lambda = -inf) and gives x' = D at t' = 0 (lambda' = +inf), so no log-SNR
is ever evaluated at the ends; the higher-order terms only use ratios of step lengths h, and a step
that started at t = 1 (h = inf) enters them as the limit of the formula (see each solver).

`pictor.sampling` registers these under "dpmpp_2m" and "unipc" and documents the shared signature.
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
    half_log_snr,
    report,
    strictly_decreasing,
    t_batch,
    times,
)

__all__ = ["sample_dpmpp_2m", "sample_unipc"]


_lambda = half_log_snr  # log(alpha / sigma) with alpha = 1 - t, sigma = t; +-inf at the ends


def sample_dpmpp_2m(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), the multistep data-prediction solver, on the flow path.

    The first-order update (module docstring) with D replaced by D + (D - D_prev) / (2 r), r = h_prev / h,
    using the data prediction of the previous step.

    First order is used on the first step (no history) and on the step to t = 0 (h = inf there). A
    previous step that started at t = 1 has h_prev = inf, so 1 / (2 r) -> 0: the second step is first order
    too, which is exactly the limit of the formula; the global order stays two. Deterministic: `noise` is
    accepted for the common signature and ignored.
    """
    del noise
    ts_ = times(ts)
    d_prev: Tensor | None = None
    h_prev = math.nan
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        v = model_fn(x, t_batch(t, x))
        d = predict_x0(x, v, t)
        report(callback, i, x, t, t_next, d)
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


def _unic_weights(h: float, h_prev: float) -> tuple[float, float]:
    """The order-2 UniC weights (of D_prev - D0 and of D_t - D0) for the B(h) = e^{-h} - 1 ("bh2") variant.

    UniC solves R rho = b with R = [[1, 1], [r_k, 1]], r_k = -h_prev / h, and
    b_1 = phi_2 / B(h), b_2 = 2 phi_3 / B(h) in the data-prediction phi functions of hh = -h
    (phi_2 = (e^hh - 1)/hh - 1, phi_3 = phi_2 / hh - 1/2). rho_1 multiplies (D_prev - D0) / r_k, so the
    weight of D_prev - D0 is rho_1 / r_k; when the step before started at t = 1 (h_prev = inf, r_k = -inf)
    rho_1 -> 0 and rho_1 / r_k -> 0: only the new point corrects, with weight b_1. h is finite here: an
    order-2 correction never covers a step that starts at t = 1 or ends at t = 0.
    """
    hh = -h
    b_h = math.expm1(hh)
    phi_2 = b_h / hh - 1.0
    b1 = phi_2 / b_h
    b2 = 2.0 * (phi_2 / hh - 0.5) / b_h
    if math.isinf(h_prev):
        return 0.0, b1
    r_k = -h_prev / h
    rho_1 = (b2 - b1) / (r_k - 1.0)
    return rho_1 / r_k, b1 - rho_1


def sample_unipc(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """UniPC (Zhao et al. 2023): the bh2 predictor-corrector of order 2 on the flow path, as diffusers'
    UniPCMultistepScheduler with its defaults (solver_order=2, predict_x0, solver_type="bh2",
    lower_order_final, corrector on every step it can be) and flow sigmas.

    Step i from t to t' with ratio = t'/t, c = 1 - ratio (module docstring):

    - corrector (UniC): the model's D at the start of step i is also the end point of step i - 1, so that
      step is redone from its start x_prev with D_i in the formula: order 1 (after a first-order step)
      x = ratio x_prev + c (D0 + D_i) / 2; order 2 adds the previous D with the weights of
      `_unic_weights`. The model was evaluated at the uncorrected point; it is not called again, so the
      corrector costs nothing, and it is skipped after the last step, where no model call follows.
    - predictor (UniP): order 1 on the first step (no history) and on the last (lower_order_final: the
      step to t = 0 has h = inf); order 2 otherwise, which for bh2 is DPM-Solver++(2M)'s update
      D + (D - D_prev) h / (2 h_prev), 0 when the previous step started at t = 1.

    The callback gets the corrected x and the data prediction D_i of the model call at step i.
    Deterministic: `noise` is accepted for the common signature and ignored.
    """
    del noise
    ts_ = times(ts)
    strictly_decreasing(ts_, "unipc")
    lam = [_lambda(t) for t in ts_]
    steps = len(ts_) - 1
    x_start = x  # x at the start of the previous step, which the corrector redoes
    d_prev: Tensor | None = None  # D at the start of the step before the previous one (order-2 history)
    d_last: Tensor | None = None  # D at the start of the previous step
    last_order = 0
    for i in range(steps):
        t, t_next = ts_[i], ts_[i + 1]
        v = model_fn(x, t_batch(t, x))
        d = predict_x0(x, v, t)
        if d_last is not None:
            x = _unic(x_start, d_last, d_prev, d, ts_, lam, i - 1, last_order)
        report(callback, i, x, t, t_next, d)
        order = 1 if d_last is None or i == steps - 1 else 2
        x_start, d_prev, d_last = x, d_last, d
        ratio = t_next / t
        d_eff = d
        if order == 2 and not math.isinf(lam[i - 1]):
            assert d_prev is not None
            d_eff = d + (0.5 * (lam[i + 1] - lam[i]) / (lam[i] - lam[i - 1])) * (d - d_prev)
        x = (ratio * x + (1.0 - ratio) * d_eff).to(x.dtype)
        last_order = order
    return x


def _unic(
    x_start: Tensor,
    d0: Tensor,
    d_before: Tensor | None,
    d_end: Tensor,
    ts: list[float],
    lam: list[float],
    k: int,
    order: int,
) -> Tensor:
    """Step k (ts[k] -> ts[k + 1]) redone from x_start with the data prediction d_end at its end point."""
    ratio = ts[k + 1] / ts[k]
    if order == 1:
        d_eff = d0 + 0.5 * (d_end - d0)
    else:
        assert d_before is not None
        w_before, w_end = _unic_weights(lam[k + 1] - lam[k], lam[k] - lam[k - 1])
        d_eff = d0 + w_end * (d_end - d0)
        if w_before != 0.0:
            d_eff = d_eff + w_before * (d_before - d0)
    return (ratio * x_start + (1.0 - ratio) * d_eff).to(x_start.dtype)
