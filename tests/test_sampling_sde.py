"""The stochastic samplers dpmpp_2m_sde (pictor.sampling_sde) and lcm (pictor.sampling_lcm): diffusers'
results on the same sigmas with the same noise, the right law on Gaussian data, noise drawn only from
`noise`, and inpainting's known region (shared with euler_ancestral)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from pictor import sampling as S
from pictor.edit_blending import LatentInit
from tests.test_sampling_ancestral import MU, SD, _seeded_noise, gaussian_velocity
from tests.test_sampling_unipc import _start, toy_velocity

from cfg_pp_velocity import own_uncond

NEW_STOCHASTIC = ("dpmpp_2m_sde", "lcm")


def _draws(steps: int, dtype: torch.dtype, seed: int = 5) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 6, generator=g, dtype=torch.float64).to(dtype) for _ in range(steps)]


# ------------------------------------------------------------------------------------ DPM-Solver++(2M) SDE


def _diffusers_dpmpp_2m_sde(ts: Tensor, draws: list[Tensor], dtype: torch.dtype) -> Tensor:
    """diffusers' DPMSolverMultistepScheduler, sde-dpmsolver++ (midpoint, order 2, lower_order_final,
    final_sigmas_type zero) on flow sigmas, stepped by hand over `ts` with step i's noise draws[i]."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    steps = len(ts) - 1
    sched.set_timesteps(steps)  # its set_timesteps takes no sigmas: the same count, then ours put in place
    sched.sigmas = ts.double()  # (float64: its coefficients are then computed from exactly our times)
    sched.set_begin_index(0)
    x = _start(dtype)
    for i, timestep in enumerate(sched.timesteps):
        v = toy_velocity(x, torch.full((x.shape[0],), float(ts[i]), dtype=torch.float64)).to(dtype)
        # `variance_noise` is diffusers' own way to give the step its noise (its generator otherwise); the
        # step to 0 multiplies it by sigma = 0, and pictor draws none there.
        eps = draws[i] if i < steps - 1 else torch.zeros_like(x)
        x = sched.step(v, timestep, x, variance_noise=eps).prev_sample
    return x


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside diffusers
@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-6), (torch.float32, 3e-6)])
def test_dpmpp_2m_sde_matches_diffusers(steps: int, start: float, dtype: torch.dtype, atol: float) -> None:
    # Measured max |difference|: 2.0e-7 in float64 (diffusers rounds the sample to float32 in every step)
    # and 8.3e-7 in float32. From t = 1 exactly (diffusers then takes the limits of its formulas too).
    ts = S.schedule_flux(steps, 1024, start=start)
    draws = _draws(steps, dtype)
    expected = _diffusers_dpmpp_2m_sde(ts, draws, dtype)
    ours = S.sample_dpmpp_2m_sde(toy_velocity, _start(dtype), ts, noise=lambda i: draws[i])
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, expected, atol=atol, rtol=0)
    if steps >= 2:  # the noise and (from 3 steps) the second-order term matter
        other = S.sample_dpmpp_2m_sde(toy_velocity, _start(dtype), ts, noise=lambda i: draws[i] * 0.9)
        assert (other - expected).abs().max() > 1e-3
    if steps >= 3:
        for name in ("euler_ancestral", "lcm"):
            alt = S.get_sampler(name)(toy_velocity, _start(dtype), ts, noise=lambda i: draws[i])
            assert (alt - expected).abs().max() > 1e-3


def test_dpmpp_2m_sde_samples_the_data_distribution() -> None:
    # Exact velocity of Gaussian data: the samples must have the data's law. Measured at 30 linear steps:
    # mean 0.4905, std / SD 1.002, Kolmogorov-Smirnov distance 0.0044 (euler_ancestral: std 7% short there);
    # at 10 steps std 1.013. A noise coefficient 5% off gives std 1.052 / 0.952, no second-order term 0.925.
    n = 40_000
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = S.sample_dpmpp_2m_sde(
        gaussian_velocity, x, S.schedule_linear(30).double(), noise=_seeded_noise((n, 1), 1)
    )
    assert abs(out.mean().item() - MU) < 0.03  # 3 standard errors
    assert abs(out.std().item() / SD - 1) < 0.015
    z = torch.sort((out.flatten() - MU) / SD).values
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (torch.special.ndtr(z) - grid).abs().max().item() < 0.012


def test_dpmpp_2m_sde_first_step_from_t_one_is_its_limit() -> None:
    # From t = 1 nothing of x is kept: x' = (1 - t') D + t' eps, exactly what lcm does on its first step.
    ts = S.schedule_flux(4, 1024)
    draws = _draws(4, torch.float64)
    seen: list[Tensor] = []

    def spy(x: Tensor, t: Tensor) -> Tensor:
        seen.append(x)
        return toy_velocity(x, t)

    S.sample_dpmpp_2m_sde(spy, _start(torch.float64), ts, noise=lambda i: draws[i])
    x0 = _start(torch.float64)
    d = x0 - toy_velocity(x0, torch.ones(4, dtype=torch.float64))
    t1 = float(ts[1])
    torch.testing.assert_close(seen[1], (1 - t1) * d + t1 * draws[0])


# ------------------------------------------------------------------------------------------------------- LCM


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_lcm_matches_diffusers_flow_match_lcm_scheduler(
    steps: int, start: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FlowMatchLCMScheduler takes explicit sigmas (set_timesteps(sigmas=...), float32, shift 1: unchanged,
    # then 0 appended) and draws its noise with randn_tensor in every step, the last too (times sigma 0):
    # that draw is replaced by ours, in order. Measured: bit-identical.
    diffusers = pytest.importorskip("diffusers")
    import diffusers.schedulers.scheduling_flow_match_lcm as lcm_module

    draws = _draws(steps, torch.float32)
    calls: list[int] = []

    def our_noise(shape, generator=None, device=None, dtype=None, **_: object) -> Tensor:
        k = len(calls)
        calls.append(k)
        return draws[k].to(dtype) if k < steps - 1 else torch.zeros(shape, dtype=dtype)

    monkeypatch.setattr(lcm_module, "randn_tensor", our_noise)
    ts = S.schedule_flux(steps, 1024, start=start)
    sched = diffusers.FlowMatchLCMScheduler()
    sched.set_timesteps(sigmas=ts[:-1].numpy())
    sched.set_begin_index(0)
    assert torch.equal(sched.sigmas, ts)
    x = _start(torch.float32)
    for i, timestep in enumerate(sched.timesteps):
        v = toy_velocity(x, torch.full((4,), float(sched.sigmas[i])))
        x = sched.step(v, timestep, x).prev_sample
    assert calls == list(range(steps))
    asked: list[int] = []

    def noise(i: int) -> Tensor:
        asked.append(i)
        return draws[i]

    ours = S.sample_lcm(toy_velocity, _start(torch.float32), ts, noise=noise)
    assert asked == list(range(steps - 1))  # the step to 0 draws nothing
    torch.testing.assert_close(ours, x, atol=0, rtol=0)


def test_lcm_is_prediction_then_renoise() -> None:
    # ComfyUI's sample_lcm for a flow model, written out: x <- D; if t' > 0: x <- (1 - t') D + t' eps.
    ts = S.schedule_flux(5, 1024, start=0.8).double()
    draws = _draws(5, torch.float64, seed=9)
    x = _start(torch.float64)
    for i in range(5):
        t, t_next = float(ts[i]), float(ts[i + 1])
        denoised = x - t * toy_velocity(x, torch.full((4,), t, dtype=torch.float64))
        x = denoised if t_next == 0 else t_next * draws[i] + (1.0 - t_next) * denoised
    ours = S.sample_lcm(toy_velocity, _start(torch.float64), ts, noise=lambda i: draws[i])
    torch.testing.assert_close(ours, x, atol=1e-15, rtol=0)


def test_lcm_averages_with_a_mean_predicting_model() -> None:
    # A flow model predicts E[x0 | x_t]; LCM renoises that prediction, which has less spread than the data,
    # and keeps none of x's own noise, so the spread it loses is never restored (measured std / SD: 0.64 at
    # 10 steps, 0.68 at 30, 0.70 at 400), while DPM-Solver++(2M) SDE keeps a share of it and is right.
    n = 40_000
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = S.sample_lcm(gaussian_velocity, x, S.schedule_linear(30).double(), noise=_seeded_noise((n, 1), 1))
    assert abs(out.mean().item() - MU) < 0.03 and 0.6 < out.std().item() / SD < 0.75


# ------------------------------------------------------------------------------------- all three stochastic


@pytest.mark.parametrize("name", NEW_STOCHASTIC)
def test_stochastic_samplers_need_noise_and_draw_once_per_step_before_the_last(name: str) -> None:
    sampler = S.get_sampler(name)
    assert S.is_stochastic(name) and S.model_evals(name, 7) == 7
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=rf"{name} draws fresh noise.*pass noise=fn"):
        sampler(gaussian_velocity, x, S.schedule_linear(3))
    with pytest.raises(ValueError, match=r"noise\(0\) has shape \(3,\), but x has \(2, 3\)"):
        sampler(gaussian_velocity, x, S.schedule_linear(3), noise=lambda i: torch.zeros(3))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sampler(gaussian_velocity, x, torch.tensor([1.0, 0.2, 0.4, 0.0]), noise=torch.randn)

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    asked: list[int] = []

    def noise(i: int) -> Tensor:
        asked.append(i)
        return torch.randn(3, 4, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)

    ts = S.schedule_flux(6, 1024, start=0.8)
    a = sampler(gaussian_velocity, x, ts, noise=noise)
    assert asked == [0, 1, 2, 3, 4]
    torch.testing.assert_close(a, sampler(gaussian_velocity, x, ts, noise=noise), atol=0, rtol=0)
    c = sampler(gaussian_velocity, x, ts, noise=lambda i: noise(i + 1))
    assert (a - c).abs().min() > 0  # the noise matters everywhere


@pytest.mark.parametrize("name", NEW_STOCHASTIC)
def test_stochastic_samplers_reach_a_single_data_point_exactly(name: str) -> None:
    g = torch.Generator().manual_seed(4)
    x0, start = (
        torch.randn(2, 5, generator=g, dtype=torch.float64),
        torch.randn(2, 5, generator=g, dtype=torch.float64),
    )

    def v(x: Tensor, t: Tensor) -> Tensor:
        return (x - x0) / t.to(x.dtype)[:, None]

    out = S.get_sampler(name)(v, start, S.schedule_flux(5, 256), noise=_seeded_noise((2, 5), 5))
    torch.testing.assert_close(out, x0)


@pytest.mark.parametrize("name", sorted(S.STOCHASTIC_SAMPLERS))
def test_inpainting_keeps_the_known_region_denoised_and_at_its_noise_level(name: str) -> None:
    # The anchored velocity (`pictor.edit_blending`) makes the known region's data prediction the source;
    # every stochastic sampler then keeps it at the source noised to the current t with noise of its own
    # (variance t^2), and ends on the source.
    gen = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 64, 16, generator=gen), torch.randn(2, 64, 16, generator=gen)
    repaint = torch.ones(1, 64, 16, dtype=torch.bool)
    repaint[:, :24] = False
    weight = torch.randn(16, 16, generator=gen)

    def model(x: Tensor, t: Tensor) -> Tensor:
        return torch.tanh(x @ weight) + t[:, None, None]

    init = LatentInit(z0=z0, strength=0.7, mask=repaint)
    seen: list[dict] = []
    ts = S.get_schedule("linear", 6, image_seq_len=64, start=0.7)
    out = S.get_sampler(name)(
        own_uncond(init.velocity(model, noise, anchored=True)),
        init.start(noise),
        ts,
        seen.append,
        noise=lambda i: torch.randn(2, 64, 16, generator=gen),
    )
    for info in seen:
        torch.testing.assert_close(info["denoised"][:, :24], z0[:, :24], atol=1e-5, rtol=0)
        t = info["t"]
        scaled = (info["x"][:, :24] - (1 - t) * z0[:, :24]) / t  # the known region's noise, per unit t
        assert 0.9 < scaled.std().item() < 1.1 and abs(scaled.mean().item()) < 0.1, (info["i"], scaled.std())
    torch.testing.assert_close(out[:, :24], z0[:, :24], atol=1e-5, rtol=0)
    assert (out[:, 24:] - z0[:, 24:]).abs().mean() > 0.1  # the rest was sampled
