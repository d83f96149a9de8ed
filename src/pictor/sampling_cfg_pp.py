"""CFG++ samplers (Chung et al. 2024, "CFG++: manifold-constrained classifier free guidance"; ComfyUI's
`*_cfg_pp` samplers) on the flow path: Euler, Euler ancestral, DPM-Solver++(2M) and DPM-Solver++(2S)
ancestral. RES multistep's two live beside their plain loop in `pictor.sampling_res`.

A CFG++ step takes the guided data prediction D = x - t v (what the sampler's velocity gives) as the step's
denoised image, but puts the noise back with the UNCONDITIONAL prediction: U = x - t v_u, its noise estimate
eps_u = x + (1 - t) v_u. The unconditional velocity of each call comes from the velocity callable's
`pictor.sampling_steps.UNCOND` attribute (`uncond_velocity`); without one these samplers raise a ValueError
that names them. On the flow path (alpha = 1 - t, sigma = t) every CFG++ step here is the plain sampler's
step taken with U (and U's history) with the guided prediction put in U's place at the landing time:

    x' = [the step with U] + (1 - t') (D - U),

so where the guided prediction equals the unconditional one (no guidance) each is its plain sampler.

- Euler CFG++: x' = (1 - t') D + t' eps_u (ComfyUI's DDIM form, alpha' D + sigma' eps_u); to t' = 0, D.
- Euler ancestral CFG++ (ComfyUI's `sample_euler_ancestral_cfg_pp`, which ComfyUI writes for any model
  through alpha = sigma e^lambda): the ancestral split of the noise-to-signal ratios s = t / (1 - t) to
  s' (s_up = min(s', eta s' sqrt(1 - (s'/s)^2)), s_down = sqrt(s'^2 - s_up^2)), then
  x' = (1 - t') (D + s_down eps_u + s_up z); at eta 0 it is Euler CFG++. This split is not the rectified-flow
  one of pictor's `euler_ancestral` (t_down = t'^2 / t): it is ComfyUI's for this sampler on a CONST model,
  and it keeps x on the flow path (noise variance (1 - t')^2 s'^2 = t'^2). From t = 1 (s = inf) s_up = s'.
- DPM-Solver++(2M) CFG++: ComfyUI's `sample_dpmpp_2m_cfg_pp` is written for alpha = 1 (no CONST branch:
  on a flow model its guidance term D - U enters with weight 1 instead of 1 - t'). Here it is that loop on
  the flow path as ComfyUI's Euler ancestral CFG++ moves its loop there (x / alpha in the noise-to-signal
  ratio, then times alpha'), with pictor's half log-SNR steps h (`pictor.sampling_multistep`):

      x' = (t'/t) x + (1 - t'/t) U + (1 - t') (D - U) + (1 - t'/t) (h / (2 h_prev)) (D - U_prev),

  first order (no last term) on the first step and the step to 0 (which lands on D), and after a step from
  t = 1 (h_prev = inf). Its last term keeps ComfyUI's mix of the guided D with the previous U.
- DPM-Solver++(2S) ancestral CFG++: ComfyUI's `sample_dpmpp_2s_ancestral_RF_cfg_pp` (its CONST branch) with
  the rectified-flow ancestral step (`pictor.sampling_ancestral.rf_ancestral_step`): U to the lambda
  midpoint of t and t_down (0.9999 from t = 1), the model's unconditional prediction U2 there (its guided
  one is not used), the first-order step to t_down with U2, rescale and renoise to t', and then
  + (1 - t') (D - U) with the first call's D and U. Two model calls per step, one on the step to 0 (D).
- Gradient estimation CFG++: ComfyUI's `sample_gradient_estimation(cfg_pp=True)`, x' = D + t' v_u +
  (gamma - 1)(t' - t)(v_u - v_u_prev) (gamma 2; its d is to_d with U, which on a flow model is v_u), is
  also written for alpha = 1: its guidance term D - U enters with weight 1. Here it is weighed by 1 - t',
  x' = (1 - t') D + t' (U + v_u) + (t' - t)(v_u - v_u_prev), which is `gradient_estimation` with U where
  D = U; the step to 0 lands on D. One model call per step.

Guidance methods (APG, CFG-Zero*, TCFG, CFG rescale) make the guided velocity; the unconditional one is the
negative prompt's raw prediction, as ComfyUI's post-CFG hook reads `uncond_denoised` (ComfyUI's TCFG
damps it before CFG, so TCFG with CFG++ renoises differently there; see `pictor.guided_velocity`).
"""

from __future__ import annotations

import itertools
import math

from torch import Tensor

from pictor.flow import predict_noise, predict_x0
from pictor.sampling_ancestral import FIRST_MIDPOINT, rf_ancestral_step
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
    uncond_velocity,
)

__all__ = [
    "predictions",
    "sample_dpmpp_2m_cfg_pp",
    "sample_dpmpp_2s_ancestral_cfg_pp",
    "sample_euler_ancestral_cfg_pp",
    "sample_euler_cfg_pp",
    "sample_gradient_estimation_cfg_pp",
]


def predictions(model_fn: VelocityFn, x: Tensor, t: float, sampler: str) -> tuple[Tensor, Tensor, Tensor]:
    """(D, U, v_u) at (x, t): the guided and unconditional data predictions and the unconditional velocity
    of one model call."""
    tb = t_batch(t, x)
    v = model_fn(x, tb)
    v_u = uncond_velocity(model_fn, x, tb, sampler)
    return predict_x0(x, v, t), predict_x0(x, v_u, t), v_u


def _nsr(t: float) -> float:
    """s = t / (1 - t), the noise-to-signal ratio; inf at t = 1."""
    return math.inf if t >= 1.0 else t / (1.0 - t)


def _euler_ancestral_cfg_pp(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None,
    noise: NoiseFn | None,
    eta: float,
    name: str,
) -> Tensor:
    ts_ = times(ts)
    strictly_decreasing(ts_, name)
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        d, _, v_u = predictions(model_fn, x, t, name)
        report(callback, i, x, t, t_next, d)
        if t_next == 0.0:
            x = d.to(x.dtype)
            continue
        s_next = _nsr(t_next)
        ratio = s_next / _nsr(t)  # 0 from t = 1
        s_up = min(s_next, eta * s_next * math.sqrt(max(1.0 - ratio * ratio, 0.0)))
        s_down = math.sqrt(max(s_next * s_next - s_up * s_up, 0.0))
        alpha = 1.0 - t_next
        x_new = alpha * d + (alpha * s_down) * predict_noise(x, v_u, t)
        if s_up > 0.0:
            assert noise is not None
            x_new = x_new + (alpha * s_up) * draw(noise, i, x)
        x = x_new.to(x.dtype)
    return x


def sample_euler_cfg_pp(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """Euler CFG++ (module docstring): x' = (1 - t') D + t' eps_u. One model call per step. Ignores
    `noise`."""
    del noise
    return _euler_ancestral_cfg_pp(model_fn, x, ts, callback, None, 0.0, "euler_cfg_pp")


def sample_euler_ancestral_cfg_pp(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
) -> Tensor:
    """Euler ancestral CFG++ (module docstring). One model call per step.

    noise(i) is called once for every step i that does not end at 0 (eta > 0); without it this raises a
    ValueError.
    """
    noise = require_noise(noise, "euler_ancestral_cfg_pp")
    return _euler_ancestral_cfg_pp(model_fn, x, ts, callback, noise, eta, "euler_ancestral_cfg_pp")


def sample_dpmpp_2m_cfg_pp(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """DPM-Solver++(2M) CFG++ (module docstring). One model call per step. Ignores `noise`."""
    del noise
    name = "dpmpp_2m_cfg_pp"
    ts_ = times(ts)
    strictly_decreasing(ts_, name)
    u_prev: Tensor | None = None
    h_prev = math.nan
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        d, u, _ = predictions(model_fn, x, t, name)
        report(callback, i, x, t, t_next, d)
        h = half_log_snr(t_next) - half_log_snr(t)
        ratio = t_next / t
        x_new = ratio * x + (1.0 - ratio) * u + (1.0 - t_next) * (d - u)
        if u_prev is not None and t_next > 0.0 and not math.isinf(h_prev):
            x_new = x_new + ((1.0 - ratio) * 0.5 * h / h_prev) * (d - u_prev)
        x, u_prev, h_prev = x_new.to(x.dtype), u, h
    return x


def sample_dpmpp_2s_ancestral_cfg_pp(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2S) ancestral CFG++ (module docstring). Two model calls per step, one on the step to 0.

    noise(i) is called once for every step i that does not end at 0 (eta > 0); without it this raises a
    ValueError.
    """
    name = "dpmpp_2s_ancestral_cfg_pp"
    noise = require_noise(noise, name)
    ts_ = times(ts)
    strictly_decreasing(ts_, name)
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        d, u, _ = predictions(model_fn, x, t, name)
        report(callback, i, x, t, t_next, d)
        if t_next == 0.0:
            x = d.to(x.dtype)
            continue
        t_down, scale, renoise = rf_ancestral_step(t, t_next, eta)
        if t >= 1.0:
            t_mid = FIRST_MIDPOINT
        else:
            s_mid = math.sqrt(_nsr(t) * _nsr(t_down))
            t_mid = s_mid / (1.0 + s_mid)
        x_mid = ((t_mid / t) * x + (1.0 - t_mid / t) * u).to(x.dtype)
        _, u_mid, _ = predictions(model_fn, x_mid, t_mid, name)
        x_new = (t_down / t) * x + (1.0 - t_down / t) * u_mid
        if eta > 0.0:
            x_new = scale * x_new + renoise * draw(noise, i, x)
        x = (x_new + (1.0 - t_next) * (d - u)).to(x.dtype)
    return x


def sample_gradient_estimation_cfg_pp(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """Gradient estimation CFG++, gamma 2 (module docstring). One model call per step. Ignores `noise`."""
    del noise
    name = "gradient_estimation_cfg_pp"
    gamma = 2.0
    v_u_prev: Tensor | None = None
    for i, (t, t_next) in enumerate(itertools.pairwise(times(ts))):
        d, u, v_u = predictions(model_fn, x, t, name)
        report(callback, i, x, t, t_next, d)
        if t_next == 0.0:
            x = d.to(x.dtype)
        else:
            # ComfyUI's D + t' v_u with its guidance term D - U weighed by the flow path's 1 - t'
            x_new = (1.0 - t_next) * d + t_next * (u + v_u)
            if v_u_prev is not None:  # ComfyUI's i >= 1, also after a step that was not to 0
                x_new = x_new + ((gamma - 1.0) * (t_next - t)) * (v_u - v_u_prev)
            x = x_new.to(x.dtype)
        v_u_prev = v_u
    return x
