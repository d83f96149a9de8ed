"""The time convention: path, targets, inversions, timestep sampling, shifts, loss."""

from __future__ import annotations

import math

import pytest
import torch

from pictor import flow


def _pair(b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 4, 5, 5, generator=g), torch.randn(b, 4, 5, 5, generator=g)


def test_interpolate_endpoints_and_per_sample_broadcast() -> None:
    x0, noise = _pair()
    assert torch.equal(flow.interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(flow.interpolate(x0, noise, torch.ones(3)), noise)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = flow.interpolate(x0, noise, t)
    assert xt.shape == x0.shape
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    with pytest.raises(ValueError):
        flow.interpolate(x0, noise, torch.zeros(2))


def test_velocity_target_is_the_time_derivative_of_the_path() -> None:
    x0, noise = _pair()
    t = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    xt = flow.interpolate(x0, noise, t)
    # d/dt of sum(x_t * w) equals sum(v * w) per sample for any weights w.
    w = torch.randn_like(xt)
    (grad,) = torch.autograd.grad((xt * w).sum(), t)
    expected = (flow.velocity_target(x0, noise) * w).flatten(1).sum(1)
    torch.testing.assert_close(grad, expected)


def test_predictions_recover_data_and_noise_from_the_exact_velocity() -> None:
    x0, noise = _pair()
    t = torch.tensor([1.0, 0.3, 0.0])
    xt = flow.interpolate(x0, noise, t)
    v = flow.velocity_target(x0, noise)
    torch.testing.assert_close(flow.predict_x0(xt, v, t), x0)
    torch.testing.assert_close(flow.predict_noise(xt, v, t), noise)


def test_interpolate_keeps_low_precision_dtype() -> None:
    x0, noise = _pair()
    xt = flow.interpolate(x0.bfloat16(), noise.bfloat16(), torch.full((3,), 0.999))
    assert xt.dtype == torch.bfloat16


def test_add_noise_for_strength() -> None:
    x0, noise = _pair()
    torch.testing.assert_close(flow.add_noise_for_strength(x0, noise, 0.6), 0.4 * x0 + 0.6 * noise)
    with pytest.raises(ValueError):
        flow.add_noise_for_strength(x0, noise, 1.5)


def test_logit_normal_timesteps_in_open_interval_and_seeded() -> None:
    t1 = flow.sample_t(4096, "logit_normal", generator=torch.Generator().manual_seed(7))
    t2 = flow.sample_t(4096, "logit_normal", generator=torch.Generator().manual_seed(7))
    t3 = flow.sample_t(4096, "logit_normal", generator=torch.Generator().manual_seed(8))
    assert t1.dtype == torch.float32 and t1.shape == (4096,)
    assert torch.equal(t1, t2) and not torch.equal(t1, t3)
    assert bool(((t1 > 0) & (t1 < 1)).all())
    # logit(t) ~ N(mean, std): its sample moments match.
    shifted = flow.sample_t(4096, generator=torch.Generator().manual_seed(7), mean=0.5, std=0.5)
    logit = torch.logit(shifted.double())
    assert abs(logit.mean().item() - 0.5) < 0.05 and abs(logit.std().item() - 0.5) < 0.05


def test_uniform_timesteps_and_unknown_kind() -> None:
    t = flow.sample_t(4096, "uniform", generator=torch.Generator().manual_seed(0))
    assert bool(((t >= 0) & (t < 1)).all())
    assert abs(t.mean().item() - 0.5) < 0.03
    with pytest.raises(ValueError, match="logit_normal"):
        flow.sample_t(4, "beta")  # type: ignore[arg-type]


def test_resolution_mu_is_flux_linear_function() -> None:
    assert flow.resolution_mu(256) == pytest.approx(0.5)
    assert flow.resolution_mu(4096) == pytest.approx(1.15)
    assert flow.resolution_mu(2176) == pytest.approx(0.825)  # halfway
    assert flow.resolution_mu(1024, base_shift=0.0, max_shift=1.0) == pytest.approx(0.2)


def test_time_shift_ends_exact_no_nan_and_matches_flux_formula() -> None:
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for mu, sigma in [(0.0, 1.0), (1.15, 1.0), (-0.7, 2.0)]:
        out = flow.time_shift(mu, sigma, t)
        assert not torch.isnan(out).any()
        assert out[0].item() == 0.0 and out[-1].item() == 1.0
        assert bool((out.diff() > 0).all())
        inner = t[1:-1]
        ref = math.exp(mu) / (math.exp(mu) + (1 / inner - 1) ** sigma)
        torch.testing.assert_close(out[1:-1], ref)
        # the documented inverse
        torch.testing.assert_close(flow.time_shift(-mu / sigma, 1 / sigma, out), t)
    torch.testing.assert_close(flow.time_shift(0.0, 1.0, t), t)
    assert flow.time_shift(1.0, 1.0, 0.0) == 0.0 and flow.time_shift(1.0, 1.0, 1.0) == 1.0
    assert flow.time_shift(1.0, 1.0, 0.5) > 0.5


def test_time_shift_gradient_is_finite_at_the_ends() -> None:
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    flow.time_shift(0.8, 1.0, t).sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()


def test_shift_t_pushes_toward_noise_for_large_images() -> None:
    t = torch.tensor([0.25, 0.5, 0.75])
    small, large = flow.shift_t(t, 256), flow.shift_t(t, 4096)
    assert bool((large > small).all()) and bool((small > t).all())


def test_flow_loss_zero_for_exact_velocity_and_fp32() -> None:
    x0, noise = _pair()
    v = flow.velocity_target(x0, noise)
    assert flow.flow_loss(v, x0, noise).item() == 0.0
    loss = flow.flow_loss(v.bfloat16() + 0.5, x0.bfloat16(), noise.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.25, abs=0.02)
    assert flow.flow_loss(v, x0, noise, reduction="per_sample").shape == (3,)
    assert flow.flow_loss(v, x0, noise, reduction="none").shape == x0.shape
    with pytest.raises(ValueError):
        flow.flow_loss(v, x0, noise, reduction="median")  # type: ignore[arg-type]
