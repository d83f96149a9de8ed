"""Samplers on analytic flows, schedules, CFG and the small contracts around them."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from pictor import sampling as S
from pictor.flow import interpolate

from cfg_pp_velocity import own_uncond

# the deterministic samplers
NAMES = (
    "euler",
    "heun",
    "dpmpp_2m",
    "unipc",
    "deis",
    "ipndm",
    "res_multistep",
    "lms",
    "dpm_2",
    "heunpp2",
    "gradient_estimation",
    "ipndm_v",
)
STOCHASTIC = (
    "euler_ancestral",
    "dpmpp_2m_sde",
    "lcm",
    "dpm_2_ancestral",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_2m_sde_heun",
    "dpmpp_3m_sde",
    "res_multistep_ancestral",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "exp_heun_2_x0_sde",
    "sa_solver",
    "sa_solver_pece",
)
# Deterministic, but from t = 1 it starts its arithmetic at ComfyUI's 1 - 3.2e-5 (pictor.sampling_seeds),
# so it follows a straight path only to that offset and stays out of NAMES' exactness tests
# (tests/test_sampling_comfy_ports2.py tests it against ComfyUI's loop and its order).
OFFSET_START = ("exp_heun_2_x0",)


# Gaussian data x0 ~ N(MU, SD^2) per coordinate, noise ~ N(0, 1). x_t is Gaussian with mean (1 - t) MU and
# variance V(t) = (1 - t)^2 SD^2 + t^2, and the rectified-flow velocity E[noise - x0 | x_t = x] is
#   v(x, t) = (t - (1 - t) SD^2) / V(t) * (x - (1 - t) MU) - MU.
# Its ODE moves quantiles: x_t = (1 - t) MU + sqrt(V(t)) z with z = x_1, so x_0 = MU + SD * z exactly.
MU, SD = 0.5, 2.0


def gaussian_velocity(x: Tensor, t: Tensor) -> Tensor:
    tb = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    var = (1 - tb) ** 2 * SD**2 + tb**2
    return (tb - (1 - tb) * SD**2) / var * (x - (1 - tb) * MU) - MU


def _z(n: int = 64, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _observed_order(name: str, schedule: str, steps: tuple[int, ...] = (16, 32, 64, 128)) -> float:
    z = _z()
    exact = MU + SD * z
    errors = []
    for n in steps:
        out = S.get_sampler(name)(gaussian_velocity, z.clone(), S.get_schedule(schedule, n, 1024))
        errors.append((out - exact).pow(2).mean().sqrt().item())
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return -float(slope)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("euler", 0.8, 1.3),
        ("heun", 1.7, 2.4),
        ("dpmpp_2m", 1.6, 2.4),
        ("unipc", 1.8, 2.6),
        ("deis", 1.7, 2.6),
        ("ipndm", 1.8, 2.4),
        ("res_multistep", 1.8, 2.4),
    ],
)
def test_observed_convergence_order_on_gaussian_flow(name: str, low: float, high: float) -> None:
    # Measured (linear schedule): euler 0.98, heun 2.05, dpmpp_2m 1.73, unipc 2.09, deis 1.97, ipndm 2.08,
    # res_multistep 2.01 (ipndm's fourth-order steps are held at 2 by its Euler warm-up). DPM++(2M) sits
    # below 2 at these step counts: near t = 1 and t = 0 its log-SNR steps stay O(1) long, costing a
    # log(steps) factor. UniPC is that predictor plus its corrector. DEIS's steps are third order once it has
    # two earlier points, but its first-order warm-up caps the global order at 2 (2.1 measured on 0.9 -> 0.1).
    order = _observed_order(name, "linear")
    assert low < order < high, order


def test_second_order_samplers_beat_euler_on_flux_schedule() -> None:
    z = _z()
    exact = MU + SD * z
    ts = S.schedule_flux(32, 1024)
    err = {n: (S.get_sampler(n)(gaussian_velocity, z.clone(), ts) - exact).abs().max().item() for n in NAMES}
    assert err["heun"] < err["euler"] / 10 and err["dpmpp_2m"] < err["euler"] / 10, err


# ipndm_v's fourth-order weights sum to 1 only on even (or geometric) steps, as ComfyUI's: on this uneven
# schedule it is off the straight path by O(h^3) per step (tests/test_sampling_ipndm_v.py measures it).
@pytest.mark.parametrize("name", [n for n in NAMES if n != "ipndm_v"])
def test_straight_line_flow_is_integrated_exactly(name: str) -> None:
    # One data point x0: v(x, t) = (x - x0) / t is the straight path from the noise to x0; every sampler's
    # update is exact on it (Euler along a constant velocity; DPM++ sees a constant data prediction).
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)

    def v(x: Tensor, t: Tensor) -> Tensor:
        return (x - x0) / t.to(x.dtype).reshape(-1, 1, 1, 1)

    seen: list[Tensor] = []
    out = S.get_sampler(name)(v, noise.clone(), S.schedule_flux(5, 4096), lambda d: seen.append(d["x"]))
    torch.testing.assert_close(out, x0)
    ts = S.schedule_flux(5, 4096)
    for i, x in enumerate(seen):  # on the path at every step, not only at the end
        torch.testing.assert_close(x, interpolate(x0, noise, ts[i].double().expand(2)))


@pytest.mark.parametrize("name", NAMES)
def test_img2img_start_below_one(name: str) -> None:
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 3, generator=g, dtype=torch.float64)
    ts = S.schedule_flux(4, 256, start=0.6)
    xs = interpolate(x0, noise, 0.6)
    out = S.get_sampler(name)(lambda x, t: noise - x0, xs, ts)
    torch.testing.assert_close(out, x0)


def _never(i: int) -> Tensor:
    raise AssertionError(f"a deterministic sampler drew noise (step {i})")


def _noise_for(name: str, like: Tensor) -> Callable[[int], Tensor]:
    """What the tests pass as `noise`: real draws for a stochastic sampler, a tripwire for the others."""
    if name not in S.STOCHASTIC_SAMPLERS:
        return _never
    g = torch.Generator().manual_seed(7)
    return lambda i: torch.randn(like.shape, generator=g, dtype=like.dtype)


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_callback_once_per_step_and_can_cancel(name: str) -> None:
    ts = S.schedule_linear(6)
    calls: list[dict] = []
    evals = 0

    def v(x: Tensor, t: Tensor) -> Tensor:
        nonlocal evals
        evals += 1
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        return torch.ones_like(x)

    x = torch.zeros(2, 3)
    S.get_sampler(name)(own_uncond(v), x, ts, calls.append, noise=_noise_for(name, x))
    assert [c["i"] for c in calls] == list(range(6))
    assert [c["t"] for c in calls] == pytest.approx(ts[:-1].tolist())
    assert [c["t_next"] for c in calls] == pytest.approx(ts[1:].tolist())
    assert all(c["denoised"].shape == x.shape for c in calls)
    assert evals == S.model_evals(name, 6)

    class Cancelled(Exception):
        pass

    def cancel_at_2(d: dict) -> None:
        if d["i"] == 2:
            raise Cancelled

    evals = 0
    with pytest.raises(Cancelled):
        S.get_sampler(name)(own_uncond(v), x, ts, cancel_at_2, noise=_noise_for(name, x))
    assert evals <= 3 * S.model_evals_per_step(name)


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_samplers_keep_dtype_and_grad_mode(name: str) -> None:
    def v_fp32(x: Tensor, t: Tensor) -> Tensor:
        return (x.float() * 0.5 + t[:, None]).float()

    x = torch.randn(2, 3)
    sampler, ts = S.get_sampler(name), S.schedule_linear(3)
    out = sampler(own_uncond(v_fp32), x.bfloat16(), ts, noise=_noise_for(name, x))
    assert out.dtype == torch.bfloat16

    w = torch.tensor(0.3, requires_grad=True)
    out = sampler(own_uncond(lambda x, t: w * x), x, ts, noise=_noise_for(name, x))
    assert out.requires_grad
    with torch.no_grad():
        assert not sampler(own_uncond(lambda x, t: w * x), x, ts, noise=_noise_for(name, x)).requires_grad


def test_dpmpp_2m_has_no_nan_at_t_one() -> None:
    # A field whose first step starts at exactly t = 1 where alpha = 0 and the log-SNR is -inf.
    z = _z(8, torch.float32)
    out = S.sample_dpmpp_2m(gaussian_velocity, z, S.schedule_linear(2))
    assert torch.isfinite(out).all()
    one_step = S.sample_dpmpp_2m(gaussian_velocity, z, S.schedule_linear(1))
    torch.testing.assert_close(one_step, z - gaussian_velocity(z, torch.ones(8)))  # x0 = x - t v at t = 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside diffusers
def test_dpmpp_2m_matches_diffusers_multistep_solver() -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=3.0,
        final_sigmas_type="zero",
        solver_order=2,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
    )
    sched.set_timesteps(10)
    z = _z(4)
    x = z.clone()
    for i, timestep in enumerate(sched.timesteps):
        v = gaussian_velocity(x, torch.full((4,), float(sched.sigmas[i]), dtype=torch.float64))
        x = sched.step(v, timestep, x).prev_sample
    ts = sched.sigmas.double()  # starts just below 1, so the second step is second order too
    ours = S.sample_dpmpp_2m(gaussian_velocity, z.clone(), ts)
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=0)
    assert (S.sample_euler(gaussian_velocity, z.clone(), ts) - x).abs().max() > 1e-3


def test_registry_and_unknown_names() -> None:
    # the deterministic CFG++ ones
    cfg_pp = {"euler_cfg_pp", "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp", "gradient_estimation_cfg_pp"}
    stochastic_cfg_pp = {f"{name}_cfg_pp" for name in ("euler_ancestral", "dpmpp_2s_ancestral")}
    stochastic_cfg_pp.add("res_multistep_ancestral_cfg_pp")
    assert set(S.SAMPLERS) == {*NAMES, *OFFSET_START, *STOCHASTIC, *cfg_pp, *stochastic_cfg_pp}
    assert frozenset({*STOCHASTIC, *stochastic_cfg_pp}) == S.STOCHASTIC_SAMPLERS
    assert {*cfg_pp, *stochastic_cfg_pp} == S.CFG_PP_SAMPLERS
    assert S.is_stochastic("euler_ancestral") and S.is_stochastic("lcm") and not S.is_stochastic("unipc")
    assert S.get_sampler("heun") is S.sample_heun and S.get_sampler("ipndm") is S.sample_ipndm
    with pytest.raises(
        ValueError,
        match=r"deis, dpm_2, dpm_2_ancestral, dpmpp_2m, dpmpp_2m_cfg_pp, dpmpp_2m_sde, dpmpp_2m_sde_heun, "
        r"dpmpp_2s_ancestral, dpmpp_2s_ancestral_cfg_pp, dpmpp_3m_sde, dpmpp_sde, er_sde, euler, "
        r"euler_ancestral, euler_ancestral_cfg_pp, euler_cfg_pp, exp_heun_2_x0, exp_heun_2_x0_sde, "
        r"gradient_estimation, gradient_estimation_cfg_pp, heun, heunpp2, ipndm, "
        r"ipndm_v, lcm, lms, res_multistep, res_multistep_ancestral, res_multistep_ancestral_cfg_pp, "
        r"res_multistep_cfg_pp, sa_solver, sa_solver_pece, seeds_2, seeds_3, unipc",
    ):
        S.get_sampler("ddim")
    with pytest.raises(ValueError, match="unknown sampler"):
        S.is_stochastic("ddim")
    assert {n: S.model_evals_per_step(n) for n in S.SAMPLERS} == {
        "euler": 1,
        "heun": 2,
        "dpmpp_2m": 1,
        "unipc": 1,
        "deis": 1,
        "ipndm": 1,
        "res_multistep": 1,
        "lms": 1,
        "dpm_2": 2,
        "heunpp2": 3,
        "gradient_estimation": 1,
        "euler_ancestral": 1,
        "dpmpp_2m_sde": 1,
        "lcm": 1,
        "dpm_2_ancestral": 2,
        "dpmpp_2s_ancestral": 2,
        "dpmpp_sde": 2,
        "dpmpp_2m_sde_heun": 1,
        "dpmpp_3m_sde": 1,
        "ipndm_v": 1,
        "res_multistep_ancestral": 1,
        "er_sde": 1,
        "euler_cfg_pp": 1,
        "euler_ancestral_cfg_pp": 1,
        "dpmpp_2m_cfg_pp": 1,
        "dpmpp_2s_ancestral_cfg_pp": 2,
        "res_multistep_cfg_pp": 1,
        "res_multistep_ancestral_cfg_pp": 1,
        "gradient_estimation_cfg_pp": 1,
        "exp_heun_2_x0": 2,
        "exp_heun_2_x0_sde": 2,
        "seeds_2": 2,
        "seeds_3": 3,
        "sa_solver": 1,
        "sa_solver_pece": 2,
    }
    assert S.model_evals("dpmpp_2s_ancestral_cfg_pp", 10) == 19
    assert S.model_evals("seeds_3", 10) == 28 and S.model_evals("exp_heun_2_x0", 10) == 19
    assert S.model_evals("sa_solver", 10) == 10 and S.model_evals("sa_solver_pece", 10) == 19
    assert S.model_evals("heun", 10) == 19 and S.model_evals("unipc", 10) == 10
    assert S.model_evals("dpm_2", 10) == 19 and S.model_evals("dpmpp_sde", 10) == 19
    assert [S.model_evals("heunpp2", n) for n in (1, 2, 3, 10)] == [1, 3, 6, 27]
    with pytest.raises(ValueError, match="flux"):
        S.get_schedule("no_such_schedule", 10, 256)


@pytest.mark.parametrize("name", S.SCHEDULES)
@pytest.mark.parametrize("steps", [1, 4, 50])
def test_schedules_start_end_and_decrease(name: str, steps: int) -> None:
    ts = S.get_schedule(name, steps, 4096)
    assert ts.dtype == torch.float32 and ts.shape == (steps + 1,)
    assert ts[0].item() == 1.0 and ts[-1].item() == 0.0
    assert bool((ts.diff() < 0).all())
    part = S.get_schedule(name, steps, 4096, start=0.35)
    assert part.shape == (steps + 1,) and part[0].item() == pytest.approx(0.35) and part[-1].item() == 0.0
    assert bool((part.diff() < 0).all())


def test_flux_schedule_matches_reference_and_shifts_with_resolution() -> None:
    steps, seq = 8, 1024
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq - 256)
    ref = [
        math.exp(mu) / (math.exp(mu) + (1 / t - 1)) if t > 0 else 0.0 for t in np.linspace(1, 0, steps + 1)
    ]
    torch.testing.assert_close(S.schedule_flux(steps, seq), torch.tensor(ref, dtype=torch.float32))
    small, large = S.schedule_flux(steps, 256), S.schedule_flux(steps, 4096)
    assert bool((large[1:-1] > small[1:-1]).all())
    assert bool((small[1:-1] > S.schedule_linear(steps)[1:-1]).all())
    torch.testing.assert_close(S.schedule_flux(steps, 4096, shift=False), S.schedule_linear(steps))


def test_flux_img2img_schedule_is_the_tail_of_the_same_spacing() -> None:
    # With start < 1 the steps keep the full schedule's shape below start: shifting back gives a linspace.
    part = S.schedule_flux(6, 1024, start=0.5).double()
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256)
    unshifted = math.exp(-mu) * part / (math.exp(-mu) * part + 1 - part)
    torch.testing.assert_close(
        unshifted.diff(), torch.full((6,), unshifted.diff()[0].item(), dtype=torch.float64)
    )


def test_shifted_schedule_is_sd3_formula() -> None:
    s, t = 3.0, S.schedule_linear(10).double()
    torch.testing.assert_close(
        S.schedule_shifted(10, s).double(), s * t / (1 + (s - 1) * t), atol=1e-7, rtol=0
    )
    torch.testing.assert_close(S.schedule_shifted(10, 1.0), S.schedule_linear(10))


def test_cfg_batches_once_and_mixes() -> None:
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, generator=g), torch.rand(2, generator=g)
    cond_bias, uncond_bias = torch.randn(4, generator=g), torch.randn(4, generator=g)
    batch_sizes: list[int] = []

    def batched(x2: Tensor, t2: Tensor) -> Tensor:
        batch_sizes.append(x2.shape[0])
        torch.testing.assert_close(t2, torch.cat([t, t]))
        return x2 + torch.cat([cond_bias.expand(2, 4), uncond_bias.expand(2, 4)])

    v_cond, v_uncond = x + cond_bias, x + uncond_bias
    torch.testing.assert_close(S.cfg(batched, 1.0)(x, t), v_cond)
    torch.testing.assert_close(S.cfg(batched, 0.0)(x, t), v_uncond)
    torch.testing.assert_close(S.cfg(batched, 4.0)(x, t), v_uncond + 4.0 * (v_cond - v_uncond))
    assert batch_sizes == [4, 4, 4]
