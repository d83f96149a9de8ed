"""iPNDM (pictor.sampling_adams): Adams-Bashforth up to order 4 on the velocity, as ComfyUI's `ipndm`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from pictor import sampling as S
from tests.test_sampling import MU, SD, _z, gaussian_velocity
from tests.test_sampling_unipc import _start, toy_velocity

# The published Adams-Bashforth weights (newest velocity first), written out here, not imported.
AB = [
    [1.0],
    [3 / 2, -1 / 2],
    [23 / 12, -16 / 12, 5 / 12],
    [55 / 24, -59 / 24, 37 / 24, -9 / 24],
]


def _reference_ipndm(model, x: Tensor, ts: list[float]) -> Tensor:
    """ComfyUI's loop, written from its description: d = (x - D) / t with D the data prediction, order
    min(4, i + 1), the data prediction itself on the step to 0, a buffer of the last three d."""
    buffer: list[Tensor] = []  # oldest first
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        v = model(x, torch.full((x.shape[0],), t, dtype=torch.float64))
        denoised = x - t * v
        d = (x - denoised) / t
        order = min(4, i + 1)
        if t_next == 0:
            x_next = denoised
        else:
            w = AB[order - 1]
            slope = w[0] * d + sum(w[k] * buffer[-k] for k in range(1, order))
            x_next = x + (t_next - t) * slope
        buffer = [*buffer, d][-3:]
        x = x_next
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 9, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_ipndm_is_the_published_formula(steps: int, start: float) -> None:
    # Every warm-up order (1 to 3), the fourth-order steps and the step to 0, on a nonlinear field.
    ts = S.schedule_flux(steps, 1024, start=start).double()
    expected = _reference_ipndm(toy_velocity, _start(torch.float64), ts.tolist())
    ours = S.sample_ipndm(toy_velocity, _start(torch.float64), ts)
    # measured: at most 1.3e-15 (the reference divides (x - D) by t, pictor uses v as it comes)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)
    if steps >= 3:  # the higher orders act: not Euler, not DPM-Solver++(2M)
        for other in ("euler", "dpmpp_2m"):
            assert (
                S.get_sampler(other)(toy_velocity, _start(torch.float64), ts) - expected
            ).abs().max() > 1e-3


def test_fourth_order_steps_integrate_a_cubic_velocity_exactly() -> None:
    # v = p(t), a cubic: Adams-Bashforth of order 4 integrates it exactly, so once the three warm-up steps
    # are done, further steps of the same length add no error at all. Euler's error keeps growing.
    def cubic(x: Tensor, t: Tensor) -> Tensor:
        tb = t.to(x.dtype)[:, None]
        return (1.5 - 2.0 * tb + 3.0 * tb**2 - 4.0 * tb**3).expand_as(x)

    def integral(t: float) -> float:  # of p from 0 to t
        return 1.5 * t - t**2 + t**3 - t**4

    h, x0 = 0.02, torch.zeros(2, 3, dtype=torch.float64)
    errors: dict[str, list[float]] = {"ipndm": [], "euler": []}
    for n in (4, 8, 16, 32):
        ts = torch.tensor([0.9 - h * k for k in range(n + 1)], dtype=torch.float64)
        exact = integral(float(ts[-1])) - integral(0.9)
        for name in errors:
            out = S.get_sampler(name)(cubic, x0, ts)
            errors[name].append((out - exact).abs().max().item())
    assert errors["ipndm"][0] > 1e-6  # the warm-up steps err...
    assert max(errors["ipndm"]) - min(errors["ipndm"]) < 1e-14  # ...and nothing after them does
    assert errors["euler"][-1] > 4 * errors["euler"][0]


def test_ipndm_converges_at_second_order_and_far_closer_than_euler() -> None:
    # On the Gaussian flow (a linear ODE with the exact solution x_t = (1 - t) MU + sqrt(V(t)) z), 8 to 128
    # even steps. Measured RMS errors 8.9e-2, 2.0e-2, 4.6e-3, 1.1e-3, 2.7e-4 (Euler: 0.34 ... 2.3e-2): the
    # observed order is 2.1, not 4, because the Euler warm-up step's O(h^2) error is never made up; that is
    # the method as published and as ComfyUI runs it. From 16 steps on it is 8.6 to 86 times closer than
    # Euler.
    z = _z()
    exact = MU + SD * z
    steps = (8, 16, 32, 64, 128)
    err = {}
    for name in ("ipndm", "euler"):
        err[name] = [
            (S.get_sampler(name)(gaussian_velocity, z.clone(), S.schedule_linear(n).double()) - exact)
            .pow(2)
            .mean()
            .sqrt()
            .item()
            for n in steps
        ]
    order = -float(np.polyfit(np.log(steps), np.log(err["ipndm"]), 1)[0])
    assert 1.9 < order < 2.3, order
    euler_order = -float(np.polyfit(np.log(steps), np.log(err["euler"]), 1)[0])
    assert 0.9 < euler_order < 1.1, euler_order
    for n, ours, euler in zip(steps[1:], err["ipndm"][1:], err["euler"][1:], strict=True):
        assert ours < euler / 8, (n, ours, euler)
    assert math.isfinite(err["ipndm"][0])
