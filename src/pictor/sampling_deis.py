"""DEIS (Zhang & Chen 2022): the third-order multistep exponential integrator with log-rho polynomials, on
the flow path; diffusers' DEISMultistepScheduler (solver_order=3, algorithm_type="deis", solver_type="logrho",
lower_order_final); ComfyUI's "deis" is another variant (tabulated coefficients, no lower-order final).

DEIS integrates the noise prediction eps = x + (1 - t) v in rho = sigma / alpha = t / (1 - t):

    x' / alpha' = x / alpha + integral from rho to rho' of eps(r) dr,

with eps, as a function of log r, the Lagrange polynomial through the current and up to two earlier
steps' eps. The integral of each Lagrange basis polynomial has a closed form (`_basis_integral`). With the
current point only (first order) the step is exactly Euler's, x' = x + (t' - t) v.

Order: one more than the earlier points it may use, at most three. A point at t = 1 (rho infinite) carries
no weight in the limit of the formula, so steps that start there do not enter the history; the first step
of a schedule from t = 1 is first order, as is the second. As in diffusers, schedules of fewer than 15
steps take their last step at first order and the one before at most second; the step to t = 0 (rho = 0)
is always first order (Euler to the data prediction), as in pictor's DPM-Solver++(2M).
"""

from __future__ import annotations

import itertools
import math

from torch import Tensor

from pictor.flow import predict_x0
from pictor.sampling_steps import Callback, NoiseFn, VelocityFn, report, strictly_decreasing, t_batch, times

__all__ = ["sample_deis"]

ORDER = 3
LOWER_ORDER_FINAL_BELOW = 15  # diffusers' lower_order_final: only for schedules shorter than this


def _basis_integral(r0: float, r1: float, node: float, others: list[float]) -> float:
    """The integral over r from r0 to r1 of the Lagrange basis polynomial, in u = log r, that is 1 at
    log(node) and 0 at the log of each of `others` (one or two of them).

    With r = e^u, the integrand p(u) e^u du has the antiderivative e^u (p - p' + p'') for a polynomial p of
    degree two or less."""
    a = math.log(node)
    ends = [math.log(o) for o in others]
    scale = math.prod(a - e for e in ends)

    def antiderivative(r: float) -> float:
        u = math.log(r)
        if len(ends) == 1:  # p = u - c: p - p' = u - c - 1
            return r * (u - ends[0] - 1.0)
        c, d = ends  # p = (u - c)(u - d): p - p' + p'' = (u - c)(u - d) - (2u - c - d) + 2
        return r * ((u - c) * (u - d) - (2.0 * u - c - d) + 2.0)

    return (antiderivative(r1) - antiderivative(r0)) / scale


def _deis_step(x: Tensor, t: float, t_next: float, eps: list[Tensor], rhos: list[float]) -> Tensor:
    """x at t_next from x at t (0 < t_next < t < 1) with the eps of the current and earlier points (current
    first) at log-rho nodes `rhos`."""
    r0, r1 = t / (1.0 - t), t_next / (1.0 - t_next)
    out = x / (1.0 - t)
    for k, e in enumerate(eps):
        others = [rho for j, rho in enumerate(rhos) if j != k]
        out = out + _basis_integral(r0, r1, rhos[k], others) * e
    return ((1.0 - t_next) * out).to(x.dtype)


def sample_deis(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """DEIS 3M with log-rho polynomials (module docstring). Deterministic: `noise` is accepted for the
    common signature and ignored."""
    del noise
    ts_ = times(ts)
    strictly_decreasing(ts_, "deis")
    steps = len(ts_) - 1
    history: list[tuple[float, Tensor]] = []  # (rho, eps) of earlier steps, newest first
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        v = model_fn(x, t_batch(t, x))
        report(callback, i, x, t, t_next, predict_x0(x, v, t))
        order = min(ORDER, 1 + len(history))
        if steps < LOWER_ORDER_FINAL_BELOW:
            if i == steps - 1:
                order = 1
            elif i == steps - 2:
                order = min(order, 2)
        if t >= 1.0:  # rho is infinite here: Euler, and the point carries no weight later
            x = (x + (t_next - t) * v).to(x.dtype)
            history = []
            continue
        eps = x + (1.0 - t) * v
        if order == 1 or t_next <= 0.0:
            x = (x + (t_next - t) * v).to(x.dtype)
        else:
            points = [(t / (1.0 - t), eps), *history[: order - 1]]
            x = _deis_step(x, t, t_next, [e for _, e in points], [r for r, _ in points])
        history = [(t / (1.0 - t), eps), *history[: ORDER - 2]]
    return x
