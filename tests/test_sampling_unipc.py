"""UniPC (bh2, order 2) against diffusers' UniPCMultistepScheduler on flow sigmas, and at its endpoints."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from pictor import sampling as S

# A fixed random nonlinear velocity: nothing about it is special to any solver, so every coefficient of
# the update shows up in the result (a linear field would hide errors that cancel).
_GEN = torch.Generator().manual_seed(0)
_W = torch.randn(6, 6, generator=_GEN, dtype=torch.float64) / 2
_B = torch.randn(6, generator=_GEN, dtype=torch.float64)


def toy_velocity(x: Tensor, t: Tensor) -> Tensor:
    tb = t.to(x.dtype)[:, None]
    return torch.tanh(x @ _W.to(x.dtype) + tb * _B.to(x.dtype)) + 0.3 * (1 + tb) * x


def _start(dtype: torch.dtype) -> Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)


def _diffusers_unipc(ts: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """diffusers' result from `_start` on schedule `ts`, and the (float32) sigmas it actually used."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(  # its defaults: order 2, predict_x0, bh2, lower_order_final
        use_flow_sigmas=True, prediction_type="flow_prediction"
    )
    # Custom sigmas go through flow_shift (1.0 by default: unchanged), are stored as float32, get 0
    # appended, and a first sigma of 1 becomes 1 - 1e-6 (diffusers cannot start at t = 1 exactly).
    sched.set_timesteps(sigmas=ts[:-1].double().numpy())
    sched.set_begin_index(0)  # timesteps are rounded to integers and can repeat; index by position
    x = _start(dtype)
    for i, timestep in enumerate(sched.timesteps):
        v = toy_velocity(x, torch.full((x.shape[0],), float(sched.sigmas[i]), dtype=torch.float64))
        x = sched.step(v.to(dtype), timestep, x).prev_sample
    return x, sched.sigmas


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside diffusers
@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_unipc_matches_diffusers(steps: int, start: float, dtype: torch.dtype, atol: float) -> None:
    # Measured max |difference|: <= 3.3e-7 in float64 (diffusers computes its coefficients in float32)
    # and <= 4.8e-7 in float32. Both samplers run on exactly the sigmas diffusers made of the schedule.
    expected, sigmas = _diffusers_unipc(S.schedule_flux(steps, 1024, start=start), dtype)
    ts = sigmas.double() if dtype == torch.float64 else sigmas
    ours = S.sample_unipc(toy_velocity, _start(dtype), ts)
    torch.testing.assert_close(ours, expected, atol=atol, rtol=0)
    if steps >= 3:  # from 3 steps on the corrector and the second-order predictor both act
        for other in ("euler", "dpmpp_2m"):
            assert (S.get_sampler(other)(toy_velocity, _start(dtype), ts) - expected).abs().max() > 1e-3


def test_unipc_starts_cleanly_at_t_one() -> None:
    # At t = 1, alpha = 0 and lambda = -inf: the first step is the Euler step, and the corrector and the
    # second-order terms after it take the limits of their formulas (finite, no NaN).
    x = _start(torch.float64)
    one = S.sample_unipc(toy_velocity, x, S.schedule_linear(1))
    torch.testing.assert_close(one, x - toy_velocity(x, torch.ones(4, dtype=torch.float64)))
    for steps in (2, 3, 4, 10):
        out = S.sample_unipc(toy_velocity, x, S.schedule_flux(steps, 1024))
        assert torch.isfinite(out).all()
    # Starting just below 1 approaches the t = 1 result as the start approaches 1. The terms that use the
    # first step's log-SNR length fall off like 1 / |lambda(start)|, i.e. slowly, so compare the trend.
    exact = S.sample_unipc(toy_velocity, x, S.schedule_flux(6, 1024))
    gaps = []
    for eps in (1e-3, 1e-6, 1e-12):
        ts = S.schedule_flux(6, 1024).double()
        ts[0] = 1 - eps
        gaps.append((S.sample_unipc(toy_velocity, x, ts) - exact).abs().max().item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.5 * gaps[0], gaps


def test_unipc_refuses_schedules_it_cannot_step() -> None:
    x = _start(torch.float64)
    with pytest.raises(ValueError, match="strictly decreasing"):
        S.sample_unipc(toy_velocity, x, torch.tensor([1.0, 0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        S.sample_unipc(toy_velocity, x, torch.tensor([1.5, 0.5, 0.0]))
