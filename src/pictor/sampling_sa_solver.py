"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams solver for fast sampling of diffusion models"):
ComfyUI's `sa_solver` and `sa_solver_pece` (comfy/k_diffusion/sampling.py sample_sa_solver and
sample_sa_solver_pece) with the defaults its KSampler runs them at, on a flow model.

A stochastic linear multistep method in the half log-SNR lambda = log((1 - t) / t) on the data prediction
D = x - t v (ComfyUI's CONST form: alpha = 1 - t, as the flow path here). Each step evaluates the model at
the predicted state, corrects the current state with the Adams-Moulton-like corrector through that new D
(order up to 4: the last four D, the new one among them), then predicts the next state with the
Adams-Bashforth-like predictor (order up to 3):

    x' = (t' / t) e^{-tau^2 h} x + sum_k b_k D_k + t' s_noise sqrt(1 - e^{-2 tau^2 h}) eps,

h = lambda' - lambda, b_k the Lagrange-integral weights of `pictor.sampling_sa_solver_coeffs`. The
corrector redoes the previous step from the previous state with its own weights and adds back the same
noise eps the predictor drew. tau is eta (1) where t' lies in the SDE interval, else 0 (an ODE step):
ComfyUI takes the interval's ends as its model's percent_to_sigma of 0.2 and 0.8, on a FLUX.1 model
time_shift(mu, 1, 1 - percent), 0.927 to 0.441 at FLUX.1's mu 1.15, which is pictor's too: a ComfyUI graph
whose ModelSamplingFlux shifts by another mu has its interval elsewhere (the workflow import says so). Orders
fall to what the history holds at the start, and, on a schedule that ends at 0, toward the end (the
predictor's to the steps left less one, the corrector's to the steps left); the step to t' = 0 is the data
prediction. `sa_solver_pece` evaluates the model again at the corrected state and uses that D (also on the
step to 0, where `sa_solver` corrects nothing): two model calls a step but the first.

From t = 1 (lambda = -inf) the arithmetic starts at ComfyUI's FLUX.1 start 1 - 3.2e-5
(`pictor.sampling_er_sde.FIRST_START`, halfway to the next time should a schedule step less than that from
1), and pictor calls the model at the schedule's t = 1, as its other ports of ComfyUI's log-SNR samplers.
ComfyUI draws the noise from its default (independent) noise sampler; pictor draws the same law from the
image's seed: noise(i) for every step i whose predictor adds noise. An edit's known region, which a
deterministic run keeps on its noising path with the blended velocity (`pictor.edit_blending`), is put back
on it (`keep_known`) before every model call, as for SEEDS; for any other velocity that is x itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

from pictor.flow import predict_x0, time_shift
from pictor.sampling_er_sde import FIRST_START
from pictor.sampling_sa_solver_coeffs import adams_weights
from pictor.sampling_steps import (
    Callback,
    NoiseFn,
    VelocityFn,
    draw,
    half_log_snr,
    keep_known,
    report,
    require_noise,
    strictly_decreasing,
    t_batch,
    times,
)

__all__ = ["comfy_flux_percent_to_t", "sa_solver_tau", "sample_sa_solver", "sample_sa_solver_pece"]

COMFY_FLUX_MU = 1.15  # ComfyUI's FLUX.1 [dev] shift without a ModelSamplingFlux node (and at 1024x1024)
TauFn = Callable[[float], float]


def comfy_flux_percent_to_t(percent: float, mu: float = COMFY_FLUX_MU) -> float:
    """ComfyUI's ModelSamplingFlux.percent_to_sigma: 1 at percent <= 0, 0 at >= 1, else FLUX.1's time shift
    of 1 - percent (`pictor.flow.time_shift`)."""
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    return float(time_shift(mu, 1.0, 1.0 - percent))


def sa_solver_tau(eta: float = 1.0, start_percent: float = 0.2, end_percent: float = 0.8) -> TauFn:
    """ComfyUI's get_tau_interval_func with its ends through `comfy_flux_percent_to_t` (its SamplerSASolver
    node's sde_start_percent and sde_end_percent): t -> eta inside [end, start], 0 outside or at eta <= 0."""
    start, end = comfy_flux_percent_to_t(start_percent), comfy_flux_percent_to_t(end_percent)

    def tau(t: float) -> float:
        if eta <= 0.0:
            return 0.0
        return eta if start >= t >= end else 0.0

    return tau


def _weighted(weights: list[float], preds: list[Tensor]) -> Tensor:
    """sum_k w_k D_k (ComfyUI's tensordot of the stacked predictions with the weights)."""
    out = weights[0] * preds[0]
    for w, d in zip(weights[1:], preds[1:], strict=True):
        out = out + w * d
    return out


def _check(name: str, predictor_order: int, corrector_order: int, s_noise: float) -> None:
    """ValueErrors outside what ComfyUI's SamplerSASolver node takes (predictor 1 to 6, corrector 0 to 6,
    s_noise >= 0); its loop checks nothing (a predictor of order 0 has no weights at all)."""
    if not 1 <= predictor_order <= 6:
        raise ValueError(f"{name}'s predictor_order must lie in 1 .. 6, got {predictor_order}")
    if not 0 <= corrector_order <= 6:
        raise ValueError(f"{name}'s corrector_order must lie in 0 .. 6, got {corrector_order}")
    if not (math.isfinite(s_noise) and s_noise >= 0.0):
        raise ValueError(f"{name}'s s_noise must be a finite number >= 0, got {s_noise}")


def _sa_solver(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None,
    noise: NoiseFn | None,
    name: str,
    use_pece: bool,
    tau_func: TauFn,
    s_noise: float,
    predictor_order: int,
    corrector_order: int,
    simple_order_2: bool,
) -> Tensor:
    _check(name, predictor_order, corrector_order, s_noise)
    if s_noise > 0.0:  # refused up front, as every stochastic sampler, whether or not tau_func adds noise
        noise = require_noise(noise, name)
    ts_ = times(ts)
    strictly_decreasing(ts_, name)
    n = len(ts_) - 1
    if n < 1:
        return x
    starts = list(ts_)  # the times of the arithmetic: ts_ with ComfyUI's start below 1
    if ts_[0] >= 1.0:
        starts[0] = FIRST_START if ts_[1] < FIRST_START else 0.5 * (1.0 + ts_[1])
    lams = [half_log_snr(s) for s in starts]
    max_order = max(predictor_order, corrector_order)
    to_end = ts_[-1] == 0.0  # lower the orders toward the end, as ComfyUI (for stability)
    x_pred = x  # the predicted state at ts_[i], where the model is called; x: the corrected one
    h, tau = 0.0, 0.0
    fresh: Tensor | None = None  # the last predictor's noise, which its corrector adds back
    preds: list[Tensor] = []
    for i in range(n):
        t, t_next, s = ts_[i], ts_[i + 1], starts[i]
        d = predict_x0(x_pred, model_fn(x_pred, t_batch(t, x)), t)
        report(callback, i, x_pred, t, t_next, d)
        preds = [*preds, d][-max_order:]
        p_used = min(predictor_order, len(preds))
        c_used = 0 if i == 0 or (t_next == 0.0 and not use_pece) else min(corrector_order, len(preds))
        if to_end:
            p_used = min(p_used, n - 1 - i)
            c_used = min(c_used, n - i)
        if c_used == 0:
            x = x_pred
        else:
            at = lams[i - c_used + 1 : i + 1]
            b = adams_weights(s, at, lams[i - 1], lams[i], tau, simple_order_2, corrector=True)
            decay = s / starts[i - 1] * math.exp(-tau * tau * h)
            x_new = decay * x + _weighted(b.tolist(), preds[-c_used:])
            if tau > 0.0 and s_noise > 0.0 and fresh is not None:
                x_new = x_new + fresh
            x = keep_known(model_fn, x_new.to(x.dtype), s)
            if use_pece:
                d = predict_x0(x, model_fn(x, t_batch(t, x)), t)
                preds[-1] = d
        if t_next == 0.0:
            x_pred = d.to(x.dtype)
            continue
        tau = float(tau_func(t_next))
        b = adams_weights(t_next, lams[i - p_used + 1 : i + 1], lams[i], lams[i + 1], tau, simple_order_2)
        h = lams[i + 1] - lams[i]
        x_new = (t_next / s * math.exp(-tau * tau * h)) * x + _weighted(b.tolist(), preds[-p_used:])
        if tau > 0.0 and s_noise > 0.0:
            scale = t_next * math.sqrt(-math.expm1(-2.0 * tau * tau * h)) * s_noise
            fresh = scale * draw(noise, i, x)  # type: ignore[arg-type]
            x_new = x_new + fresh
        x_pred = keep_known(model_fn, x_new.to(x.dtype), t_next)
    return x_pred


def sample_sa_solver(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    tau_func: TauFn | None = None,
    s_noise: float = 1.0,
    predictor_order: int = 3,
    corrector_order: int = 4,
    use_pece: bool = False,
    simple_order_2: bool = False,
) -> Tensor:
    """SA-Solver (module docstring; ComfyUI's `sa_solver`, its keywords and defaults). One model call a
    step (two a step but the first with use_pece).

    tau_func(t') gives the noise strength of the step landing at t' (default `sa_solver_tau()`: 1 in
    ComfyUI's SDE interval, 0 outside). noise(i) is called for every step i whose predictor adds noise;
    without `noise` this raises a ValueError (at s_noise > 0), as do orders or s_noise outside ComfyUI's
    node's ranges.
    """
    tau = sa_solver_tau() if tau_func is None else tau_func
    return _sa_solver(
        model_fn, x, ts, callback, noise, "sa_solver_pece" if use_pece else "sa_solver", use_pece, tau,
        s_noise, predictor_order, corrector_order, simple_order_2,
    )  # fmt: skip


def sample_sa_solver_pece(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    tau_func: TauFn | None = None,
    s_noise: float = 1.0,
    predictor_order: int = 3,
    corrector_order: int = 4,
    simple_order_2: bool = False,
) -> Tensor:
    """SA-Solver in PECE mode (predict, evaluate, correct, evaluate: ComfyUI's `sa_solver_pece`): the model
    is evaluated again at each corrected state. Two model calls a step but the first (2 n - 1 in all)."""
    return sample_sa_solver(
        model_fn, x, ts, callback, noise=noise, tau_func=tau_func, s_noise=s_noise,
        predictor_order=predictor_order, corrector_order=corrector_order, use_pece=True,
        simple_order_2=simple_order_2,
    )  # fmt: skip
