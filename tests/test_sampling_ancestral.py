"""euler_ancestral, the stochastic sampler: right in distribution, drawing noise only from `noise`."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from pictor import sampling as S
from pictor.edit_blending import LatentInit, anchored_velocity
from pictor.flow import interpolate

# Gaussian data x0 ~ N(MU, SD^2), noise ~ N(0, 1): x_t ~ N((1 - t) MU, V(t)), V(t) = (1 - t)^2 SD^2 + t^2,
# and the exact velocity E[noise - x0 | x_t = x] = (t - (1 - t) SD^2) / V(t) * (x - (1 - t) MU) - MU.
MU, SD = 0.5, 2.0


def gaussian_velocity(x: Tensor, t: Tensor) -> Tensor:
    tb = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    var = (1 - tb) ** 2 * SD**2 + tb**2
    return (tb - (1 - tb) * SD**2) / var * (x - (1 - tb) * MU) - MU


def _seeded_noise(shape: tuple[int, ...], seed: int) -> S.NoiseFn:
    g = torch.Generator().manual_seed(seed)
    return lambda i: torch.randn(shape, generator=g, dtype=torch.float64)


def test_ancestral_samples_the_data_distribution() -> None:
    # With the exact velocity the samples must have the data's law. Ancestral steps that use the posterior
    # mean lose variance at O(1/steps) (measured std: 1.63 at 10 steps, 1.86 at 30, 1.90 at 50, 1.995 at
    # 500), so the tight check runs many cheap steps. A renoise coefficient 5% off moves the std by about
    # 5% (measured 1.895 / 2.195 for x0.95 / x1.1); dropping the (1 - t')/(1 - t_down) factor from it gives
    # std 1.19, dropping the rescale of x gives mean 2.1: all fail here.
    n = 40_000
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = S.sample_euler_ancestral(
        gaussian_velocity, x, S.schedule_linear(400).double(), noise=_seeded_noise((n, 1), 1)
    )
    assert abs(out.mean().item() - MU) < 0.03  # 3 standard errors (SD / sqrt(n) = 0.01)
    assert abs(out.std().item() / SD - 1) < 0.015
    # and Gaussian in shape: the Kolmogorov-Smirnov distance to N(MU, SD^2) (critical value ~0.007)
    z = torch.sort((out.flatten() - MU) / SD).values
    cdf = torch.special.ndtr(z)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (cdf - grid).abs().max().item() < 0.012
    # Fewer steps: still right on the mean, and below the data's std by the expected O(1/steps) amount.
    x30 = S.sample_euler_ancestral(
        gaussian_velocity, x, S.schedule_flux(30, 1024).double(), noise=_seeded_noise((n, 1), 2)
    )
    assert abs(x30.mean().item() - MU) < 0.03 and 0.88 < x30.std().item() / SD < 0.96


def test_ancestral_needs_noise_and_checks_its_shape() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"pass noise=fn.*fn\(i\) returns standard normal noise"):
        S.sample_euler_ancestral(gaussian_velocity, x, S.schedule_linear(3))
    with pytest.raises(ValueError, match=r"noise\(0\) has shape \(3,\), but x has \(2, 3\)"):
        S.sample_euler_ancestral(gaussian_velocity, x, S.schedule_linear(3), noise=lambda i: torch.zeros(3))
    with pytest.raises(ValueError, match="strictly decreasing"):
        S.sample_euler_ancestral(gaussian_velocity, x, torch.tensor([1.0, 0.2, 0.4, 0.0]), noise=torch.randn)


def test_ancestral_draws_once_per_step_before_the_last_and_follows_its_noise() -> None:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    asked: list[int] = []

    def noise(i: int) -> Tensor:
        asked.append(i)
        return torch.randn(3, 4, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)

    ts = S.schedule_flux(6, 1024, start=0.8)
    a = S.sample_euler_ancestral(gaussian_velocity, x, ts, noise=noise)
    assert asked == [0, 1, 2, 3, 4]  # the step to t = 0 is the data prediction: no draw
    b = S.sample_euler_ancestral(gaussian_velocity, x, ts, noise=noise)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # a pure function of its noise
    c = S.sample_euler_ancestral(gaussian_velocity, x, ts, noise=lambda i: noise(i + 1))
    assert (a - c).abs().min() > 0  # and the noise matters everywhere
    d = S.sample_euler_ancestral(gaussian_velocity, x, ts, noise=lambda i: torch.zeros_like(x))
    e = S.sample_euler(gaussian_velocity, x, ts)
    assert (d - e).abs().max() > 1e-3  # without noise it is not Euler: it steps below t' and rescales


def test_ancestral_reaches_a_single_data_point_exactly() -> None:
    # For data that is one point x0 the data prediction is x0 at every step, whatever noise came in.
    g = torch.Generator().manual_seed(4)
    x0, start = (
        torch.randn(2, 5, generator=g, dtype=torch.float64),
        torch.randn(2, 5, generator=g, dtype=torch.float64),
    )

    def v(x: Tensor, t: Tensor) -> Tensor:
        return (x - x0) / t.to(x.dtype)[:, None]

    out = S.sample_euler_ancestral(v, start, S.schedule_flux(5, 256), noise=_seeded_noise((2, 5), 5))
    torch.testing.assert_close(out, x0)


def test_inpainting_with_ancestral_keeps_the_known_region_denoised_to_its_source() -> None:
    # The known region gets the anchored velocity (`pictor.edit_blending`): its data prediction is the
    # source at every step while the ancestral steps renoise it, and it ends on the source.
    gen = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 8, 16, generator=gen), torch.randn(2, 8, 16, generator=gen)
    repaint = torch.ones(1, 8, 16, dtype=torch.bool)
    repaint[:, :3] = False
    weight = torch.randn(16, 16, generator=gen)

    def model(x: Tensor, t: Tensor) -> Tensor:
        return torch.tanh(x @ weight) + t[:, None, None]

    init = LatentInit(z0=z0, strength=0.7, mask=repaint)
    fn = init.velocity(model, noise, anchored=True)
    seen: list[dict] = []
    ts = S.get_schedule("linear", 6, image_seq_len=8, start=0.7)
    out = S.sample_euler_ancestral(
        fn, init.start(noise), ts, seen.append, noise=lambda i: torch.randn(2, 8, 16, generator=gen)
    )
    for info in seen:
        torch.testing.assert_close(info["denoised"][:, :3], z0[:, :3], atol=1e-5, rtol=0)
    # off the initial noise's path after the first renoise, but at the right noise level
    later = seen[3]
    off = later["x"][:, :3] - interpolate(z0, noise, later["t"])[:, :3]
    assert off.abs().mean() > 0.05
    assert 0.7 < ((later["x"][:, :3] - (1 - later["t"]) * z0[:, :3]) / later["t"]).std() < 1.3
    torch.testing.assert_close(out[:, :3], z0[:, :3], atol=1e-5, rtol=0)
    assert (out[:, 3:] - z0[:, 3:]).abs().mean() > 0.1  # the rest was sampled
    # On the path both velocities agree, so the deterministic samplers' known region is unaffected.
    on_path = interpolate(z0, noise, 0.4)
    t = torch.full((2,), 0.4)
    blended = init.velocity(model, noise)(on_path, t)
    torch.testing.assert_close(anchored_velocity(model, z0, repaint)(on_path, t), blended, atol=1e-5, rtol=0)
