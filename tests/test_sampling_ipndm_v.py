"""iPNDM_v (pictor.sampling_adams.sample_ipndm_v), ComfyUI's `ipndm_v`: against a float64 transcription of
ComfyUI's loop (its coefficients as diff-sampler writes them), at even steps iPNDM itself, its weights' sum
on uneven steps, and its convergence on the Gaussian flow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from pictor import sampling as S
from pictor.sampling_adams import ipndm_v_slope
from tests.test_sampling import MU, SD, _z, gaussian_velocity
from tests.test_sampling_unipc import _start, toy_velocity


def _comfy_weights(ts: list[float], i: int, order: int) -> list[float]:
    """ComfyUI's coeff1 ... coeff4 for step i at `order`, newest velocity first, in its own expressions."""
    hn = ts[i + 1] - ts[i]
    if order == 1:
        return [1.0]
    hn1 = ts[i] - ts[i - 1]
    if order == 2:
        return [(2 + hn / hn1) / 2, -(hn / hn1) / 2]
    hn2 = ts[i - 1] - ts[i - 2]
    temp1 = (1 - hn / (3 * (hn + hn1)) * (hn * (hn + hn1)) / (hn1 * (hn1 + hn2))) / 2
    if order == 3:
        return [
            (2 + hn / hn1) / 2 + temp1,
            -(hn / hn1) / 2 - (1 + hn1 / hn2) * temp1,
            temp1 * hn1 / hn2,
        ]
    hn3 = ts[i - 2] - ts[i - 3]
    temp2 = (
        ((1 - hn / (3 * (hn + hn1))) / 2 + (1 - hn / (2 * (hn + hn1))) * hn / (6 * (hn + hn1 + hn2)))
        * (hn * (hn + hn1) * (hn + hn1 + hn2))
        / (hn1 * (hn1 + hn2) * (hn1 + hn2 + hn3))
    )
    ratio = hn1 * (hn1 + hn2) / (hn2 * (hn2 + hn3))
    return [
        (2 + hn / hn1) / 2 + temp1 + temp2,
        -(hn / hn1) / 2 - (1 + hn1 / hn2) * temp1 - (1 + hn1 / hn2 + ratio) * temp2,
        temp1 * hn1 / hn2 + (hn1 / hn2 + ratio * (1 + hn2 / hn3)) * temp2,
        -temp2 * ratio * hn1 / hn2,
    ]


def _reference_ipndm_v(model, x: Tensor, ts: list[float]) -> Tensor:
    """ComfyUI's loop: denoised = x - t v, d = (x - denoised) / t, order min(4, i + 1), denoised itself on
    the step to 0, a buffer of the last three d."""
    buffer: list[Tensor] = []  # oldest first
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        denoised = x - t * model(x, torch.full((x.shape[0],), t, dtype=torch.float64))
        d = (x - denoised) / t
        if t_next == 0:
            x_next = denoised
        else:
            w = _comfy_weights(ts, i, min(4, i + 1))
            x_next = x + (t_next - t) * (w[0] * d + sum(w[k] * buffer[-k] for k in range(1, len(w))))
        buffer = [*buffer, d][-3:]
        x = x_next
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 9, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_ipndm_v_is_comfyuis_loop(steps: int, start: float) -> None:
    ts = S.schedule_flux(steps, 1024, start=start).double()
    expected = _reference_ipndm_v(toy_velocity, _start(torch.float64), ts.tolist())
    ours = S.sample_ipndm_v(toy_velocity, _start(torch.float64), ts)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)  # measured: at most 1e-15
    if steps >= 5:  # the uneven weights act: not iPNDM's fixed ones (nor LMS's from the third order)
        for other in ("ipndm", "lms"):
            assert (
                S.get_sampler(other)(toy_velocity, _start(torch.float64), ts) - expected
            ).abs().max() > 1e-5


def test_on_even_steps_ipndm_v_is_ipndm_to_third_order_and_not_at_the_fourth() -> None:
    # Even steps: orders 1 to 3 are Adams-Bashforth's (iPNDM's), so up to the fourth step (its last, to 0,
    # is the data prediction) the two agree; the fourth-order weights are (57, -65, 43, -11) / 24, not
    # Adams-Bashforth's (55, -59, 37, -9) / 24: ComfyUI's (diff-sampler's) c4 is 11/24 where 3/8 would be.
    x = _start(torch.float64)
    four = torch.linspace(1.0, 0.0, 5, dtype=torch.float64)
    torch.testing.assert_close(
        S.sample_ipndm_v(toy_velocity, x, four), S.sample_ipndm(toy_velocity, x, four), atol=1e-14, rtol=0
    )
    twelve = torch.linspace(1.0, 0.0, 13, dtype=torch.float64)
    assert (
        S.sample_ipndm_v(toy_velocity, x, twelve) - S.sample_ipndm(toy_velocity, x, twelve)
    ).abs().max() > 1e-5
    ts = [0.9, 0.8, 0.7, 0.6, 0.5]
    basis = [torch.eye(4, dtype=torch.float64)[k] for k in range(4)]  # velocity k picks out weight k
    weights = ipndm_v_slope(basis, ts[:4][::-1], ts[4]).tolist()
    np.testing.assert_allclose(weights, [57 / 24, -65 / 24, 43 / 24, -11 / 24], atol=1e-12, rtol=0)
    np.testing.assert_allclose(_comfy_weights(ts, 3, 4), weights, atol=1e-12, rtol=0)


def test_fourth_order_weights_sum_to_one_only_on_even_or_geometric_steps() -> None:
    # The slope of constant velocities 1 is the weights' sum: 1 + c4 q (h2 / h3 - h1 / h2) (module
    # docstring of pictor.sampling_adams), as ComfyUI's coefficients give it.
    ones = [torch.ones(1, dtype=torch.float64)] * 4
    for ts in ([0.9, 0.7, 0.5, 0.3, 0.1], [0.8, 0.4, 0.2, 0.1, 0.05]):  # even, geometric
        assert ipndm_v_slope(ones, ts[:4][::-1], ts[4]).item() == pytest.approx(1.0, abs=1e-14)
    ts = S.schedule_flux(20, 1024).double().tolist()
    off = [ipndm_v_slope(ones, ts[i - 3 : i + 1][::-1], ts[i + 1]).item() - 1 for i in range(3, 19)]
    comfy = [sum(_comfy_weights(ts, i, 4)) - 1 for i in range(3, 19)]
    np.testing.assert_allclose(off, comfy, atol=1e-14, rtol=0)
    assert 1e-3 < max(map(abs, off)) < 3e-3  # measured 2.1e-3 on the 20-step FLUX.1 schedule


def test_ipndm_v_converges_at_second_order_on_the_flux_schedule() -> None:
    # The Gaussian flow (exact solution MU + SD z), FLUX.1 schedules of 8 to 128 steps. Measured RMS errors
    # (see the assertion message) fall at order 2.0, as iPNDM's: its Euler warm-up and its weights' O(h^2)
    # inconsistency on uneven steps both hold it there.
    z = _z()
    exact = MU + SD * z
    steps = (8, 16, 32, 64, 128)
    err = {
        name: [
            (S.get_sampler(name)(gaussian_velocity, z.clone(), S.schedule_flux(n, 1024).double()) - exact)
            .pow(2)
            .mean()
            .sqrt()
            .item()
            for n in steps
        ]
        for name in ("ipndm_v", "euler")
    }
    order = -float(np.polyfit(np.log(steps), np.log(err["ipndm_v"]), 1)[0])
    assert 1.8 < order < 2.4, (order, err)
    for ours, euler in zip(err["ipndm_v"][1:], err["euler"][1:], strict=True):
        assert ours < euler / 8, err
    assert math.isfinite(err["ipndm_v"][0])


def test_ipndm_v_refuses_schedules_it_cannot_step() -> None:
    with pytest.raises(ValueError, match="ipndm_v needs strictly decreasing"):
        S.sample_ipndm_v(toy_velocity, _start(torch.float64), torch.tensor([1.0, 0.5, 0.5, 0.0]))
