"""RES multistep (Zhang et al. 2023, "Improved order analysis and design of exponential integrator for
diffusion models", the refined exponential solver; ComfyUI's `res_multistep` with eta 0, for a flow model):
a second-order multistep exponential integrator on the data prediction, one model call per step.

It integrates the ODE in s = -log t, where the flow ODE dx/dt = v = (x - D) / t reads dx/ds = D - x, with
D = x - t v the data prediction. Over a step from t to t' (length h = log(t / t')) that is exactly

    x' = e^{-h} x + integral over u from 0 to h of e^{-(h - u)} D(s + u) du,   e^{-h} = t' / t,

and with D linear in s through this step's D and the previous step's D_prev (h_prev = log(t_prev / t)):

    x' = (t'/t) x + h phi_1(h) D + h^2 phi_2(h) (D - D_prev) / h_prev,
    h phi_1(h) = 1 - e^{-h} = 1 - t'/t,   h^2 phi_2(h) = h - 1 + e^{-h},

the first two terms being the Euler step. The first step (no history) and the step to t' = 0 are Euler
steps, the latter landing on D. Its time variable is log t, not DPM-Solver++'s log-SNR log((1 - t) / t), so
t = 1 is an ordinary point here (s = 0) and nothing needs a limit. The phi functions are evaluated with
expm1 and, for very short steps, their series, so they keep full precision at any step length.

`sample_res_multistep_ancestral` (ComfyUI's `res_multistep_ancestral`, eta 1) takes that step down to a
lower time t_down and puts fresh noise back up to t'. ComfyUI's loop splits the step with its
variance-exploding `get_ancestral_step` on every model, which on a flow model leaves x off the flow path
(data part 1 - t_down where the model expects 1 - t' at t'; with the exact velocity of Gaussian data
N(0.5, 2^2) its samples come out near N(2.0, 5.7^2), tests/test_sampling_res_ancestral.py). Here, as in
pictor's other ancestral samplers and ComfyUI's `_RF` ancestral ones on a CONST (flow) model, the split is
the rectified-flow one (`pictor.sampling_ancestral.rf_ancestral_step`): t_down = t'^2 / t at eta 1, then
x <- (1 - t') / (1 - t_down) x + renoise * eps with renoise^2 = t'^2 - (t_down (1 - t') / (1 - t_down))^2.
The rest is ComfyUI's: the deterministic step is the RES step above from t to t_down (h = log(t / t_down)),
and its second-order term divides by the previous step's own h (log of its t over its t_down), as ComfyUI's
uses the previous sigma_down. At eta 0 it is `sample_res_multistep` exactly.

`sample_res_multistep_cfg_pp` and `sample_res_multistep_ancestral_cfg_pp` (ComfyUI's `res_multistep` with
cfg_pp, `pictor.sampling_cfg_pp` for CFG++) take the step above with the unconditional data prediction U in
place of D (and U as the history, as ComfyUI keeps), and then put the guided D in U's place at the step's
landing time: + (1 - t_down) (D - U) before the rescale, which makes it (1 - t') (D - U) at t'. ComfyUI's
loop, written for alpha = 1 (no CONST branch), adds D - U with weight 1 on its Euler steps and t'/t on its
second-order ones; on the flow path the data part of x at t' is (1 - t') times the prediction, hence
1 - t' here, as ComfyUI's own flow (RF) CFG++ sampler, DPM++(2S) ancestral CFG++, weighs it.
"""

from __future__ import annotations

import itertools
import math

from torch import Tensor

from pictor.flow import predict_x0
from pictor.sampling_ancestral import rf_ancestral_step
from pictor.sampling_cfg_pp import predictions
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
    "sample_res_multistep",
    "sample_res_multistep_ancestral",
    "sample_res_multistep_ancestral_cfg_pp",
    "sample_res_multistep_cfg_pp",
]


def _h2_phi2(h: float) -> float:
    """h^2 phi_2(h) = h - 1 + e^{-h}, the weight of a linear term. Below h = 0.1, where the sum cancels,
    its series h^2 (1/2! - h/3! + h^2/4! - ...) to h^10 (the rest is below 1e-16 of it)."""
    if h < 0.1:
        series = 0.0
        for k in range(10, 1, -1):  # Horner, from the h^10 term down
            series = 1.0 / math.factorial(k) - h * series
        return h * h * series
    return h + math.expm1(-h)


def _res_multistep(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None,
    noise: NoiseFn | None,
    eta: float,
    name: str,
    cfg_pp: bool = False,
) -> Tensor:
    """The RES multistep loop (module docstring), ancestral for eta > 0 (then `noise` is drawn from),
    CFG++ with `cfg_pp`."""
    ts_ = times(ts)
    strictly_decreasing(ts_, name)
    d_prev: Tensor | None = None
    h_prev = math.nan
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        if cfg_pp:
            d, u, _ = predictions(model_fn, x, t, name)
        else:
            d = u = predict_x0(x, model_fn(x, t_batch(t, x)), t)
        report(callback, i, x, t, t_next, d)
        if t_next == 0.0:
            x, d_prev = d.to(x.dtype), u  # the Euler step to 0 lands on the data prediction
            continue
        t_down, scale, renoise = rf_ancestral_step(t, t_next, eta)
        ratio = t_down / t
        x_new = ratio * x + (1.0 - ratio) * u
        h = math.log(t / t_down)
        if d_prev is not None:
            x_new = x_new + (_h2_phi2(h) / h_prev) * (u - d_prev)
        if cfg_pp:
            x_new = x_new + (1.0 - t_down) * (d - u)
        if eta > 0.0:
            x_new = scale * x_new + renoise * draw(require_noise(noise, name), i, x)
        x, d_prev, h_prev = x_new.to(x.dtype), u, h
    return x


def sample_res_multistep(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """RES multistep, second order, eta 0 (module docstring). Deterministic: `noise` is accepted for the
    common signature and ignored."""
    del noise
    return _res_multistep(model_fn, x, ts, callback, None, 0.0, "res_multistep")


def sample_res_multistep_ancestral(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
) -> Tensor:
    """RES multistep ancestral (module docstring): the RES step down to t_down, then the rectified-flow
    renoise up to t'. One model call per step.

    noise(i) is called once for every step i that does not end at 0 (eta > 0); without it this raises a
    ValueError.
    """
    noise = require_noise(noise, "res_multistep_ancestral")
    return _res_multistep(model_fn, x, ts, callback, noise, eta, "res_multistep_ancestral")


def sample_res_multistep_cfg_pp(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """RES multistep CFG++ (module docstring). One model call per step. Ignores `noise`."""
    del noise
    return _res_multistep(model_fn, x, ts, callback, None, 0.0, "res_multistep_cfg_pp", cfg_pp=True)


def sample_res_multistep_ancestral_cfg_pp(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
) -> Tensor:
    """RES multistep ancestral CFG++ (module docstring). One model call per step.

    noise(i) is called once for every step i that does not end at 0 (eta > 0); without it this raises a
    ValueError.
    """
    name = "res_multistep_ancestral_cfg_pp"
    noise = require_noise(noise, name)
    return _res_multistep(model_fn, x, ts, callback, noise, eta, name, cfg_pp=True)
