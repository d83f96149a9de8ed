"""iPNDM (Zhang & Chen 2022, "improved pseudo numerical methods"; ComfyUI's `ipndm`): Adams-Bashforth on the
velocity, up to fourth order, with one model call per step.

A linear multistep method: the step from t to t' is x' = x + (t' - t) * sum_j b_j v_{i-j} over the velocity
of this step and of up to three earlier ones, with the fixed-step Adams-Bashforth weights

    order 1: 1                      order 3: 23/12, -16/12, 5/12
    order 2: 3/2, -1/2              order 4: 55/24, -59/24, 37/24, -9/24

(newest first). The first steps warm up at the orders their history allows (Euler, then 2, then 3), and the
step to t' = 0 is the data prediction x - t v, which is Euler's step to 0. The weights are those of evenly
spaced steps and are used as they are on any schedule, as ComfyUI and the paper do (iPNDM_v, which reweights
for uneven steps, is another sampler). The weights of every order sum to 1, so a constant velocity (a
straight path to one data point) is followed exactly.

The Euler warm-up step's error, O(h^2), does not shrink with the number of later steps: in the limit the
global order is 2, while at the step counts people use the fourth-order steps dominate and iPNDM lands far
closer to the ODE's solution than Euler (tests/test_sampling_adams.py measures both).

Two more linear multistep methods on v live here:

- `sample_lms`, k-diffusion's LMS (A1111's "LMS", ComfyUI's `lms`): Adams-Bashforth of order up to 4 with
  the weights of the actual, uneven times. The step from t_i to t_{i+1} integrates the polynomial through
  the velocities at t_i, t_{i-1}, ... exactly: weight_j = integral over [t_i, t_{i+1}] of the Lagrange
  basis polynomial of node t_{i-j}. k-diffusion integrates it with scipy's adaptive quadrature (to 1e-4
  relative, which on a cubic is exact in practice); here Gauss-Legendre with 4 nodes, exact for these
  polynomials (degree at most 3). The step to t' = 0 is the data prediction, as in k-diffusion.
- `sample_gradient_estimation` (Permenter & Yuan, "Interpreting and improving diffusion models from an
  optimization perspective"; ComfyUI's `gradient_estimation` with its default gamma 2): the Euler step
  with the velocity v extrapolated by (gamma - 1) (v - v_prev), i.e. 2 v - v_prev. Its weights (2, -1)
  are not Adams-Bashforth's (3/2, -1/2): the local error stays O(h^2), so it is first order (measured in
  tests/test_sampling_adams.py), trading accuracy for the paper's denoiser-error correction. The first step
  is Euler, the step to t' = 0 the data prediction.
- `sample_ipndm_v`, iPNDM_v (ComfyUI's `ipndm_v`, from zju-pi/diff-sampler's `ipndm_v_sampler`): iPNDM with
  weights that depend on the actual step lengths. With h = t' - t and the earlier steps' lengths
  h1 = t - t_{i-1}, h2 = t_{i-1} - t_{i-2}, h3 = t_{i-2} - t_{i-3} (all negative), the slope is

      v + (h / h1) / 2 * (v - v1) + c3 * [(v - v1) - b (v1 - v2)] + c4 * [v - (1 + b + q) v1
        + (b + q (1 + h2 / h3)) v2 - q b v3],
      b = h1 / h2,   q = h1 (h1 + h2) / (h2 (h2 + h3)),
      c3 = (1 - h^2 / (3 h1 (h1 + h2))) / 2,
      c4 = [(1 - h / (3 (h + h1))) / 2 + (1 - h / (2 (h + h1))) h / (6 (h + h1 + h2))]
           * h (h + h1) (h + h1 + h2) / (h1 (h1 + h2) (h1 + h2 + h3)),

  the second-order term from the second step on, the c3 term from the third, the c4 term from the fourth:
  ComfyUI's coefficients (which are diff-sampler's), regrouped. The second-order weights are the
  variable-step Adams-Bashforth ones (LMS's); the third-order ones are Adams-Bashforth's only on even steps
  (on uneven steps they differ from `lms_weights`); the fourth-order ones are not Adams-Bashforth's even on
  even steps, where they are (57, -65, 43, -11) / 24 (c4 = 11/24 where AB4 has 3/8), and the c4 bracket
  vanishes on a constant velocity only if h1 / h2 = h2 / h3: the fourth-order weights sum to
  1 + c4 q (h2 / h3 - h1 / h2), 1 only on even or geometric steps (2e-3 off on a 20-step FLUX.1 schedule,
  0.045 at 5 steps). That is the method as ComfyUI runs it; its error is still O(h^3) per step (order 2
  measured, tests/test_sampling_ipndm_v.py). The first step is Euler, the step to t' = 0 the data
  prediction. Since a constant velocity is not followed exactly, an edit's known region (whose velocity
  `pictor.edit_blending.blend_velocity` makes the straight path's) would drift off its noising path on
  uneven steps (about 1e-2); the step puts it back after each step (`keep_known`), as the blended-latent
  rule does.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from torch import Tensor

from pictor.flow import predict_x0
from pictor.sampling_steps import (
    Callback,
    NoiseFn,
    VelocityFn,
    keep_known,
    report,
    strictly_decreasing,
    t_batch,
    times,
)

__all__ = [
    "ADAMS_BASHFORTH",
    "MAX_ORDER",
    "ipndm_v_slope",
    "lms_weights",
    "sample_gradient_estimation",
    "sample_ipndm",
    "sample_ipndm_v",
    "sample_lms",
]

MAX_ORDER = 4
# Adams-Bashforth weights by order, of the newest velocity first.
ADAMS_BASHFORTH: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def sample_ipndm(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """iPNDM, Adams-Bashforth up to order 4 on v (module docstring). Deterministic: `noise` is accepted for
    the common signature and ignored."""
    del noise
    history: list[Tensor] = []  # velocities of the earlier steps, newest first (at most MAX_ORDER - 1)
    for i, (t, t_next) in enumerate(itertools.pairwise(times(ts))):
        v = model_fn(x, t_batch(t, x))
        report(callback, i, x, t, t_next, predict_x0(x, v, t))
        weights = ADAMS_BASHFORTH[min(MAX_ORDER, 1 + len(history))]
        if t_next == 0.0:
            weights = ADAMS_BASHFORTH[1]  # the data prediction: x + (0 - t) v
        slope = weights[0] * v
        for w, v_old in zip(weights[1:], history, strict=False):
            slope = slope + w * v_old
        x = (x + (t_next - t) * slope).to(x.dtype)
        history = [v, *history[: MAX_ORDER - 2]]
    return x


def ipndm_v_slope(velocities: list[Tensor], times_: list[float], t_next: float) -> Tensor:
    """iPNDM_v's slope for the step from times_[0] to t_next (module docstring): velocities and their times
    newest first, velocities[0] at times_[0]; as many as there are (at most MAX_ORDER) set the order."""
    v = velocities[0]
    if len(velocities) == 1:
        return v
    t = times_[0]
    h, h1 = t_next - t, t - times_[1]
    slope = v + (0.5 * h / h1) * (v - velocities[1])
    if len(velocities) == 2:
        return slope
    h2 = times_[1] - times_[2]
    b = h1 / h2
    c3 = 0.5 * (1.0 - h * h / (3.0 * h1 * (h1 + h2)))
    slope = slope + c3 * ((v - velocities[1]) - b * (velocities[1] - velocities[2]))
    if len(velocities) == 3:
        return slope
    h3 = times_[2] - times_[3]
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    s1, s2 = h + h1, h + h1 + h2
    c4 = (0.5 * (1.0 - h / (3.0 * s1)) + (1.0 - h / (2.0 * s1)) * h / (6.0 * s2)) * (
        h * s1 * s2 / (h1 * (h1 + h2) * (h1 + h2 + h3))
    )
    third = (
        v - (1.0 + b + q) * velocities[1] + (b + q * (1.0 + h2 / h3)) * velocities[2] - q * b * velocities[3]
    )
    return slope + c4 * third


def sample_ipndm_v(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """iPNDM_v, variable-step iPNDM up to order 4 on v (module docstring). One model call per step.
    Deterministic: `noise` is accepted for the common signature and ignored."""
    del noise
    ts_ = times(ts)
    strictly_decreasing(ts_, "ipndm_v")
    history: list[tuple[float, Tensor]] = []  # (time, velocity), newest first, at most MAX_ORDER
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        v = model_fn(x, t_batch(t, x))
        report(callback, i, x, t, t_next, predict_x0(x, v, t))
        history = [(t, v), *history[: MAX_ORDER - 1]]
        if t_next == 0.0:
            x = (x - t * v).to(x.dtype)  # the data prediction
            continue
        slope = ipndm_v_slope([u for _, u in history], [s for s, _ in history], t_next)
        # An edit's known region back on its path: these weights do not follow it exactly (module docstring)
        x = keep_known(model_fn, (x + (t_next - t) * slope).to(x.dtype), t_next)
    return x


# Gauss-Legendre nodes and weights on [-1, 1]: exact for polynomials of degree up to 7.
_GL_NODES, _GL_WEIGHTS = (tuple(float(v) for v in a) for a in np.polynomial.legendre.leggauss(4))


def lms_weights(nodes: list[float], t: float, t_next: float) -> list[float]:
    """The weights of the velocities at `nodes` (newest first, nodes[0] = t) for the step from t to t_next:
    the integrals over [t, t_next] of their Lagrange basis polynomials (signed: t_next < t)."""
    half, mid = 0.5 * (t_next - t), 0.5 * (t_next + t)
    weights = []
    for j, t_j in enumerate(nodes):
        total = 0.0
        for u, w in zip(_GL_NODES, _GL_WEIGHTS, strict=True):
            tau = mid + half * u
            total += w * math.prod((tau - t_k) / (t_j - t_k) for k, t_k in enumerate(nodes) if k != j)
        weights.append(half * total)
    return weights


def sample_lms(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """k-diffusion's LMS, order up to 4 on the actual times (module docstring). One model call per step.
    Deterministic: `noise` is accepted for the common signature and ignored."""
    del noise
    ts_ = times(ts)
    strictly_decreasing(ts_, "lms")
    history: list[tuple[float, Tensor]] = []  # (time, velocity), newest first, at most MAX_ORDER
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        v = model_fn(x, t_batch(t, x))
        report(callback, i, x, t, t_next, predict_x0(x, v, t))
        history = [(t, v), *history[: MAX_ORDER - 1]]
        if t_next == 0.0:
            x = (x - t * v).to(x.dtype)  # the data prediction
            continue
        weights = lms_weights([s for s, _ in history], t, t_next)
        step = weights[0] * v
        for w, (_, v_old) in zip(weights[1:], history[1:], strict=True):
            step = step + w * v_old
        x = (x + step).to(x.dtype)
    return x


def sample_gradient_estimation(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """Gradient estimation, gamma 2 (module docstring): x' = x + (t' - t)(2 v - v_prev). One model call per
    step. Deterministic: `noise` is accepted for the common signature and ignored."""
    del noise
    gamma = 2.0
    v_prev: Tensor | None = None
    for i, (t, t_next) in enumerate(itertools.pairwise(times(ts))):
        v = model_fn(x, t_batch(t, x))
        report(callback, i, x, t, t_next, predict_x0(x, v, t))
        if t_next == 0.0:
            x = (x - t * v).to(x.dtype)
        else:
            slope = v if v_prev is None else v + (gamma - 1.0) * (v - v_prev)
            x = (x + (t_next - t) * slope).to(x.dtype)
        v_prev = v
    return x
