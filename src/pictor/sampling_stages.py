"""Deterministic samplers that call the model more than once per step: DPM2 and Heun++ (k-diffusion's
`sample_dpm_2`, ComfyUI's `heunpp2`), on the velocity of a flow model.

On a flow model k-diffusion's derivative (x - denoised) / sigma is the velocity v itself (its denoised is
x - t v), so these are ODE solvers in t on dx/dt = v:

- `sample_dpm_2` (A1111's "DPM2"): the midpoint method with the midpoint taken in log t, t_mid = sqrt(t t'):
  an Euler step to t_mid, the velocity there, and the whole step along that velocity,
  x' = x + (t' - t) v(x + (t_mid - t) v, t_mid). Second order; two model calls per step. The step to t' = 0
  (whose log midpoint does not exist) is Euler's, which lands on the data prediction: 2 * steps - 1 calls.
  A1111 runs DPM2 on a schedule with its next-to-last time dropped ("discard_next_to_last_sigma"); ComfyUI
  and pictor run it on the schedule as given.
- `sample_heunpp2` (ComfyUI's `heunpp2`, from the sd-webui-samplers-scheduler extension; reForge's
  "HeunPP2"): Euler predictors to the next two times of the schedule, and the step taken along a weighted
  mean of the three velocities, the later ones weighted by their time over 3 t_0 (t_0 the schedule's first
  time): x' = x + (t' - t)(w1 v + w2 v2 + w3 v3), w2 = t' / (3 t_0), w3 = t'' / (3 t_0), w1 = 1 - w2 - w3.
  The next-to-last step uses the two-velocity form with weight t' / (2 t_0), the last step is Euler. The
  weights sum to 1 (a constant velocity is followed exactly) but are not a Runge-Kutta method's: near the
  start they are close to a 3-point average, near the end to Euler, and the method is first order
  (measured in tests/test_sampling_stages.py). Three model calls per step, two on the next-to-last, one on
  the last: 3 * steps - 3 calls (1 for one step).
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
    report,
    strictly_decreasing,
    t_batch,
    times,
)

__all__ = ["dpm2_velocity", "sample_dpm_2", "sample_heunpp2"]


def dpm2_velocity(model_fn: VelocityFn, x: Tensor, v: Tensor, t: float, t_to: float) -> Tensor:
    """The velocity DPM2 steps from t to t_to (> 0) along: v at the log-midpoint sqrt(t t_to), reached by
    an Euler step with v (the velocity at x, t)."""
    t_mid = math.sqrt(t * t_to)
    x_mid = (x + (t_mid - t) * v).to(x.dtype)
    return model_fn(x_mid, t_batch(t_mid, x))


def sample_dpm_2(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """DPM2, the log-t midpoint method (module docstring). Deterministic: `noise` is accepted for the
    common signature and ignored."""
    del noise
    ts_ = times(ts)
    strictly_decreasing(ts_, "dpm_2")
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        v = model_fn(x, t_batch(t, x))
        report(callback, i, x, t, t_next, predict_x0(x, v, t))
        slope = v if t_next == 0.0 else dpm2_velocity(model_fn, x, v, t, t_next)
        x = (x + (t_next - t) * slope).to(x.dtype)
    return x


def sample_heunpp2(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """Heun++ (module docstring). Deterministic: `noise` is accepted for the common signature and
    ignored."""
    del noise
    ts_ = times(ts)
    strictly_decreasing(ts_, "heunpp2")
    t_first, t_end, n = ts_[0], ts_[-1], len(ts_) - 1
    for i in range(n):
        t, t_next = ts_[i], ts_[i + 1]
        v = model_fn(x, t_batch(t, x))
        report(callback, i, x, t, t_next, predict_x0(x, v, t))
        dt = t_next - t
        if t_next == t_end:  # the last step: Euler
            x = (x + dt * v).to(x.dtype)
            continue
        x2 = (x + dt * v).to(x.dtype)
        v2 = model_fn(x2, t_batch(t_next, x))
        t_after = ts_[i + 2]
        if t_after == t_end:  # the next-to-last step: two velocities
            w2 = t_next / (2.0 * t_first)
            slope = (1.0 - w2) * v + w2 * v2
        else:
            x3 = (x2 + (t_after - t_next) * v2).to(x.dtype)
            v3 = model_fn(x3, t_batch(t_after, x))
            w2, w3 = t_next / (3.0 * t_first), t_after / (3.0 * t_first)
            slope = (1.0 - w2 - w3) * v + w2 * v2 + w3 * v3
        x = (x + dt * slope).to(x.dtype)
    return x
