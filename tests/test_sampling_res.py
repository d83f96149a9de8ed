"""RES multistep (pictor.sampling_res), ComfyUI's `res_multistep` at eta 0: against a re-derivation by
quadrature, its convergence order, and its coefficients at short steps."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import Tensor

from pictor import sampling as S
from pictor.sampling_res import _h2_phi2
from tests.test_sampling import MU, SD, _z, gaussian_velocity
from tests.test_sampling_unipc import _start, toy_velocity

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(30)


def _integral(f, a: float, b: float) -> float:
    """Gauss-Legendre quadrature: exact to rounding for the smooth integrands below."""
    u = 0.5 * (b - a) * _NODES + 0.5 * (a + b)
    return float(0.5 * (b - a) * np.sum(_WEIGHTS * f(u)))


def _reference_res(model, x: Tensor, ts: list[float]) -> Tensor:
    """The step re-derived from its definition: in s = -log t the flow ODE is dx/ds = D - x, so over a step
    of length h = log(t / t') x' = e^{-h} x + integral_0^h e^{-(h - u)} D(u) du, with D(u) the straight line
    (in s) through the previous and the current data prediction, integrated numerically. The first step
    and the step to 0 are Euler steps."""
    d_prev, s_prev = None, math.nan
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        v = model(x, torch.full((x.shape[0],), t, dtype=torch.float64))
        d = x - t * v
        s = -math.log(t)
        if d_prev is None or t_next == 0:
            x_next = x + (t_next - t) * v
        else:
            h, h_prev = -math.log(t_next) - s, s - s_prev
            # D(u) = d + (d - d_prev) * u / h_prev
            a = _integral(lambda u, h=h: np.exp(-(h - u)), 0.0, h)
            b = _integral(lambda u, h=h, hp=h_prev: np.exp(-(h - u)) * u / hp, 0.0, h)
            x_next = math.exp(-h) * x + a * d + b * (d - d_prev)
        x, d_prev, s_prev = x_next, d, s
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_res_multistep_is_the_exponential_integrator_it_derives_from(steps: int, start: float) -> None:
    ts = S.schedule_flux(steps, 1024, start=start).double()
    expected = _reference_res(toy_velocity, _start(torch.float64), ts.tolist())
    ours = S.sample_res_multistep(toy_velocity, _start(torch.float64), ts)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)  # measured: at most 1.8e-15
    if steps >= 3:  # the second-order term acts, and it is not DPM-Solver++(2M)'s (another time variable)
        for other in ("euler", "dpmpp_2m"):
            assert (
                S.get_sampler(other)(toy_velocity, _start(torch.float64), ts) - expected
            ).abs().max() > 1e-3


def test_res_multistep_converges_at_second_order() -> None:
    # Gaussian flow, 8 to 128 even steps from t = 1 to 0. Measured RMS errors 0.13, 3.1e-2, 7.4e-3, 1.9e-3,
    # 4.7e-4 (order 2.0); Euler's 0.34 ... 2.3e-2 (order 1.0).
    z = _z()
    exact = MU + SD * z
    steps = (8, 16, 32, 64, 128)
    err = [
        (S.sample_res_multistep(gaussian_velocity, z.clone(), S.schedule_linear(n).double()) - exact)
        .pow(2)
        .mean()
        .sqrt()
        .item()
        for n in steps
    ]
    order = -float(np.polyfit(np.log(steps), np.log(err), 1)[0])
    assert 1.85 < order < 2.3, order
    euler = (S.sample_euler(gaussian_velocity, z.clone(), S.schedule_linear(32).double()) - exact).abs()
    assert err[2] < euler.pow(2).mean().sqrt().item() / 10


@pytest.mark.parametrize("h", [1e-9, 1e-6, 1e-4, 1e-3, 0.0999, 0.1, 0.5, 1.0, 7.0])
def test_second_order_weight_keeps_full_precision(h: float) -> None:
    # h - 1 + e^{-h} = sum over k >= 2 of (-h)^k / k!, in exact rational arithmetic on the float h.
    exact = sum(Fraction(-h) ** k / math.factorial(k) for k in range(2, 80))
    assert _h2_phi2(h) == pytest.approx(float(exact), rel=1e-14, abs=0)  # measured: within 1.1e-15


def test_res_multistep_refuses_schedules_it_cannot_step() -> None:
    with pytest.raises(ValueError, match="strictly decreasing"):
        S.sample_res_multistep(toy_velocity, _start(torch.float64), torch.tensor([1.0, 0.5, 0.5, 0.0]))
