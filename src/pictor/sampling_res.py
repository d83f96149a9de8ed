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
"""

from __future__ import annotations

import itertools
import math

from torch import Tensor

from pictor.flow import predict_x0
from pictor.sampling_steps import Callback, NoiseFn, VelocityFn, report, strictly_decreasing, t_batch, times

__all__ = ["sample_res_multistep"]


def _h2_phi2(h: float) -> float:
    """h^2 phi_2(h) = h - 1 + e^{-h}, the weight of a linear term. Below h = 0.1, where the sum cancels,
    its series h^2 (1/2! - h/3! + h^2/4! - ...) to h^10 (the rest is below 1e-16 of it)."""
    if h < 0.1:
        series = 0.0
        for k in range(10, 1, -1):  # Horner, from the h^10 term down
            series = 1.0 / math.factorial(k) - h * series
        return h * h * series
    return h + math.expm1(-h)


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
    ts_ = times(ts)
    strictly_decreasing(ts_, "res_multistep")
    d_prev: Tensor | None = None
    h_prev = math.nan
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        v = model_fn(x, t_batch(t, x))
        d = predict_x0(x, v, t)
        report(callback, i, x, t, t_next, d)
        ratio = t_next / t
        x_new = ratio * x + (1.0 - ratio) * d
        if t_next > 0.0:
            h = math.log(t / t_next)
            if d_prev is not None:
                x_new = x_new + (_h2_phi2(h) / h_prev) * (d - d_prev)
            h_prev = h
        x, d_prev = x_new.to(x.dtype), d
    return x
