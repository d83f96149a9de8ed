"""RES multistep ancestral (pictor.sampling_res.sample_res_multistep_ancestral), ComfyUI's
`res_multistep_ancestral` with the rectified-flow ancestral step: against a float64 transcription of
ComfyUI's res_multistep loop (its phi functions, c2, b1, b2 and previous sigma_down) with that step, its
eta-0 form, the law of its images on Gaussian data (where ComfyUI's variance-exploding split, applied to a
flow model, falls short), and its use of `noise`."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from pictor import sampling as S
from tests.test_sampling_ancestral import MU, SD, _seeded_noise, gaussian_velocity
from tests.test_sampling_ancestral_rf import _ancestral_step, _draws, _model, _rf_down
from tests.test_sampling_unipc import _start, toy_velocity


def _reference_res_ancestral(
    x: Tensor, ts: list[float], eps: list[Tensor], eta: float = 1.0, rf: bool = True, model=None
) -> Tensor:
    """ComfyUI's res_multistep(eta, cfg_pp=False): its step to sigma_down in t = -log sigma with
    phi1(-h), phi2(-h), c2 = (t_prev - t_old) / h, then noise. With rf the split is ComfyUI's RF ancestral
    one (sigma_down, alpha ratio, renoise_coeff); without, its get_ancestral_step (sigma_down, sigma_up),
    as ComfyUI's loop runs it on every model."""
    denoise = model or _model
    old_sigma_down = old_denoised = None
    for i in range(len(ts) - 1):
        s, s_next = ts[i], ts[i + 1]
        denoised = denoise(x, s)
        scale = renoise = sigma_up = 0.0
        if s_next == 0:
            sigma_down = 0.0
        elif rf:
            sigma_down, scale, renoise = _rf_down(s, s_next, eta)
        else:
            sigma_down, sigma_up = _ancestral_step(s, s_next, eta)
        if sigma_down == 0 or old_denoised is None:
            x = x + (x - denoised) / s * (sigma_down - s)
        else:
            t, t_old, t_next, t_prev = (-math.log(v) for v in (s, old_sigma_down, sigma_down, ts[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            x = math.exp(-h) * x + h * (b1 * denoised + b2 * old_denoised)
        if s_next > 0 and eta > 0:
            x = scale * x + renoise * eps[i] if rf else x + eps[i] * sigma_up
        old_denoised, old_sigma_down = denoised, sigma_down
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_res_multistep_ancestral_is_comfyuis_loop_with_the_rf_step(
    steps: int, start: float, eta: float
) -> None:
    ts = S.schedule_flux(steps, 1024, start=start).double()
    eps = _draws(steps)
    expected = _reference_res_ancestral(_start(torch.float64), ts.tolist(), eps, eta)
    ours = S.sample_res_multistep_ancestral(
        toy_velocity, _start(torch.float64), ts, noise=lambda i: eps[i], eta=eta
    )
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)
    if steps >= 3:  # the second-order term acts: not Euler ancestral's step
        euler_a = S.sample_euler_ancestral(toy_velocity, _start(torch.float64), ts, noise=lambda i: eps[i])
        assert eta != 1.0 or (euler_a - expected).abs().max() > 1e-3


@pytest.mark.parametrize("start", [1.0, 0.6])
def test_eta_0_is_res_multistep(start: float) -> None:
    def never(i: int) -> Tensor:
        raise AssertionError(f"drew noise at eta 0 (step {i})")

    ts = S.schedule_flux(9, 1024, start=start).double()
    x = _start(torch.float64)
    torch.testing.assert_close(
        S.sample_res_multistep_ancestral(toy_velocity, x, ts, noise=never, eta=0.0),
        S.sample_res_multistep(toy_velocity, x, ts),
        atol=0,
        rtol=0,
    )


def _gaussian_model(x: Tensor, sigma: float) -> Tensor:
    return x - sigma * gaussian_velocity(x, torch.full((x.shape[0],), sigma, dtype=torch.float64))


@pytest.mark.parametrize(("steps", "low", "high"), [(10, 1.05, 1.2), (30, 0.99, 1.03), (100, 0.985, 1.01)])
def test_samples_approach_the_data_distribution(steps: int, low: float, high: float) -> None:
    # The exact velocity of Gaussian data N(MU, SD^2), 40,000 samples (3 standard errors: 0.03 on the mean,
    # 1.1% on the std), linear schedules. Measured std / SD: 1.135 at 10 steps (the second-order term
    # extrapolates through the fresh noise), 1.013 at 30, 0.998 at 100. ComfyUI's variance-exploding split,
    # as its loop runs it on this flow model, is far off at any step count (measured mean 2.02 for 0.5, std /
    # SD 2.85 at 30 and 100 steps): it leaves x's data part at 1 - sigma_down where the model expects
    # 1 - t', and the excess compounds.
    n = 40_000
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = _seeded_noise((n, 1), 1)
    memo: dict[int, Tensor] = {}
    noise = lambda i: memo.setdefault(i, draws(i))  # noqa: E731
    ts = S.schedule_linear(steps).double()
    out = S.sample_res_multistep_ancestral(gaussian_velocity, x, ts, noise=noise)
    assert abs(out.mean().item() - MU) < 0.03
    assert low < out.std().item() / SD < high, out.std().item() / SD
    if steps >= 30:
        eps = [memo.get(i, torch.zeros(n, 1, dtype=torch.float64)) for i in range(steps)]
        ve = _reference_res_ancestral(x, ts.tolist(), eps, rf=False, model=_gaussian_model)
        assert ve.mean().item() - MU > 1.0 and ve.std().item() / SD > 2.0, (ve.mean(), ve.std())


def test_res_multistep_ancestral_needs_noise_draws_once_per_step_and_follows_it() -> None:
    sampler = S.sample_res_multistep_ancestral
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"res_multistep_ancestral draws fresh noise.*pass noise=fn"):
        sampler(gaussian_velocity, x, S.schedule_linear(3))
    with pytest.raises(ValueError, match="res_multistep_ancestral needs strictly decreasing"):
        sampler(gaussian_velocity, x, torch.tensor([1.0, 0.2, 0.4, 0.0]), noise=torch.randn)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    asked: list[int] = []

    def noise(i: int) -> Tensor:
        asked.append(i)
        return torch.randn(3, 4, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)

    ts = S.schedule_flux(6, 1024)
    a = sampler(gaussian_velocity, x, ts, noise=noise)
    assert asked == [0, 1, 2, 3, 4]  # none on the step to 0
    torch.testing.assert_close(a, sampler(gaussian_velocity, x, ts, noise=noise), atol=0, rtol=0)
    assert (a - sampler(gaussian_velocity, x, ts, noise=lambda i: noise(i + 1))).abs().min() > 0


def test_res_multistep_ancestral_reaches_a_single_data_point_at_any_step_count() -> None:
    g = torch.Generator().manual_seed(4)
    x0, start = (
        torch.randn(2, 5, generator=g, dtype=torch.float64),
        torch.randn(2, 5, generator=g, dtype=torch.float64),
    )

    def v(x: Tensor, t: Tensor) -> Tensor:
        return (x - x0) / t.to(x.dtype)[:, None]

    for steps in (1, 3, 10, 40):
        out = S.sample_res_multistep_ancestral(
            v, start, S.schedule_flux(steps, 256), noise=_seeded_noise((2, 5), 5)
        )
        torch.testing.assert_close(out, x0)
