"""ER-SDE (pictor.sampling_er_sde), ComfyUI's `er_sde` on a flow model: against a float64 transcription of
ComfyUI's loop, the law of its images on Gaussian data as steps grow, and its use of `noise`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from pictor import sampling as S
from tests.test_sampling_ancestral import MU, SD, _seeded_noise, gaussian_velocity
from tests.test_sampling_ancestral_rf import _draws
from tests.test_sampling_unipc import _start, toy_velocity


def _flux_percent_to_sigma(percent: float, shift: float = 1.15) -> float:
    """ComfyUI's ModelSamplingFlux.percent_to_sigma: flux_time_shift(shift, 1, 1 - percent)."""
    t = 1.0 - percent
    return math.exp(shift) / (math.exp(shift) + (1.0 / t - 1.0))


def _reference_er_sde(
    x: Tensor, ts: list[float], eps: list[Tensor], s_noise: float = 1.0, model_at_offset: bool = False
) -> Tensor:
    """ComfyUI's sample_er_sde (max_stage 3, default noise scaler) in its own terms: er_lambda = sigma /
    alpha, alpha = sigma / er_lambda, 200-point sums. With model_at_offset the model is called at the
    offset first sigma, as ComfyUI does; otherwise at the schedule's own first time, as pictor does."""
    sigmas = list(ts)
    called = list(ts)
    if sigmas[0] >= 1:
        sigmas[0] = _flux_percent_to_sigma(1e-4)
        if model_at_offset:
            called[0] = sigmas[0]
    lams = [s / (1 - s) for s in sigmas]

    def scaler(v):
        return v * (np.exp(v**0.3) + 10.0)

    idx = np.arange(200, dtype=np.float64)
    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        t_call = called[i]
        denoised = x - t_call * toy_velocity(x, torch.full((x.shape[0],), t_call, dtype=torch.float64))
        stage = min(3, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            ls, lt = lams[i], lams[i + 1]
            alpha_s, alpha_t = sigmas[i] / ls, sigmas[i + 1] / lt
            r = scaler(lt) / scaler(ls)
            x = alpha_t / alpha_s * r * x + alpha_t * (1 - r) * denoised
            if stage >= 2:
                dt = lt - ls
                step = -dt / 200
                pos = lt + idx * step
                sp = scaler(pos)
                s = np.sum(1 / sp) * step
                denoised_d = (denoised - old_denoised) / (ls - lams[i - 1])
                x = x + alpha_t * (dt + s * scaler(lt)) * denoised_d
                if stage >= 3:
                    s_u = np.sum((pos - ls) / sp) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((ls - lams[i - 2]) / 2)
                    x = x + alpha_t * (dt**2 / 2 + s_u * scaler(lt)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                var = lt**2 - ls**2 * r**2
                x = x + alpha_t * eps[i] * s_noise * (math.sqrt(var) if var >= 0 else 0.0)
        old_denoised = denoised
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
@pytest.mark.parametrize("s_noise", [1.0, 0.0])
def test_er_sde_is_comfyuis_loop(steps: int, start: float, s_noise: float) -> None:
    ts = S.schedule_flux(steps, 1024, start=start).double()
    eps = _draws(steps)
    expected = _reference_er_sde(_start(torch.float64), ts.tolist(), eps, s_noise)
    ours = S.sample_er_sde(toy_velocity, _start(torch.float64), ts, noise=lambda i: eps[i], s_noise=s_noise)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)
    if steps >= 3:  # the higher stages act: not its first-order form
        first = S.sample_er_sde(toy_velocity, _start(torch.float64), ts, noise=lambda i: eps[i], max_stage=1)
        assert (
            first - expected
        ).abs().max() > 1e-5  # measured 5.4e-5 from t = 1 at 3 steps (tiny 1st divisors)


@pytest.mark.parametrize(("steps", "limit"), [(4, 3e-5), (20, 3e-6)])
def test_er_sde_from_t_one_is_close_to_comfyui_calling_the_model_below_one(steps: int, limit: float) -> None:
    # ComfyUI also calls the model at its offset start 1 - 3.2e-5; pictor at the schedule's t = 1. Measured
    # on this field: 9.8e-6 at 4 steps, 9.5e-7 at 20.
    ts = S.schedule_flux(steps, 1024).double()
    eps = _draws(steps)
    comfy = _reference_er_sde(_start(torch.float64), ts.tolist(), eps, model_at_offset=True)
    ours = S.sample_er_sde(toy_velocity, _start(torch.float64), ts, noise=lambda i: eps[i])
    assert 0 < (ours - comfy).abs().max().item() < limit


@pytest.mark.parametrize(("steps", "low", "high"), [(10, 0.94, 0.99), (30, 0.985, 1.015), (100, 0.99, 1.01)])
def test_er_sde_samples_have_the_data_distribution(steps: int, low: float, high: float) -> None:
    # The exact velocity of Gaussian data N(MU, SD^2): the samples' law approaches the data's as steps
    # grow (40,000 samples: 3 standard errors are 0.03 on the mean, 1.1% on the std), on FLUX.1 schedules.
    # Measured std / SD: 0.963 at 10 steps, 0.9987 at 30, 0.998 at 100 (0.993 and 0.9997 on linear ones).
    n = 40_000
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = S.sample_er_sde(
        gaussian_velocity, x, S.schedule_flux(steps, 1024).double(), noise=_seeded_noise((n, 1), 1)
    )
    assert abs(out.mean().item() - MU) < 0.03
    assert low < out.std().item() / SD < high, out.std().item() / SD


def test_er_sde_reaches_a_single_data_point_at_any_step_count() -> None:
    g = torch.Generator().manual_seed(4)
    x0, start = (
        torch.randn(2, 5, generator=g, dtype=torch.float64),
        torch.randn(2, 5, generator=g, dtype=torch.float64),
    )

    def v(x: Tensor, t: Tensor) -> Tensor:
        return (x - x0) / t.to(x.dtype)[:, None]

    for steps in (1, 3, 10, 40):
        out = S.sample_er_sde(v, start, S.schedule_flux(steps, 256), noise=_seeded_noise((2, 5), 5))
        torch.testing.assert_close(out, x0)


def test_er_sde_needs_noise_draws_once_per_step_and_follows_it() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"er_sde draws fresh noise.*pass noise=fn"):
        S.sample_er_sde(gaussian_velocity, x, S.schedule_linear(3))
    with pytest.raises(ValueError, match="er_sde needs strictly decreasing"):
        S.sample_er_sde(gaussian_velocity, x, torch.tensor([1.0, 0.2, 0.4, 0.0]), noise=torch.randn)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    asked: list[int] = []

    def noise(i: int) -> Tensor:
        asked.append(i)
        return torch.randn(3, 4, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)

    ts = S.schedule_flux(6, 1024)
    a = S.sample_er_sde(gaussian_velocity, x, ts, noise=noise)
    assert asked == [0, 1, 2, 3, 4]  # none on the step to 0
    torch.testing.assert_close(a, S.sample_er_sde(gaussian_velocity, x, ts, noise=noise), atol=0, rtol=0)
    c = S.sample_er_sde(gaussian_velocity, x, ts, noise=lambda i: noise(i + 1))
    assert (a - c).abs().min() > 0

    def never(i: int) -> Tensor:
        raise AssertionError(f"drew noise at s_noise 0 (step {i})")

    assert torch.isfinite(S.sample_er_sde(gaussian_velocity, x, ts, noise=never, s_noise=0.0)).all()


def test_er_sde_is_finite_just_below_one() -> None:
    # lam = t / (1 - t) ~ 1e12: the noise scaler's e^{lam^0.3} overflows; its ratio must not.
    x = _start(torch.float64)
    ts = torch.tensor([1 - 1e-12, 0.9, 0.5, 0.2, 0.0], dtype=torch.float64)
    out = S.sample_er_sde(toy_velocity, x, ts, noise=_seeded_noise((4, 6), 2))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("ts", [[1.0], [0.6]])
def test_er_sde_with_no_step_returns_x(ts: list[float]) -> None:
    # one time is no step: x as it is, as every other sampler gives it (no lam at t = 1)
    x = _start(torch.float64)

    def never(*_: object) -> Tensor:
        raise AssertionError("called without a step to take")

    assert S.sample_er_sde(never, x, torch.tensor(ts, dtype=torch.float64), noise=never) is x
