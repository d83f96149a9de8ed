"""The stochastic k-diffusion samplers added for A1111 / ComfyUI users, on a flow model: DPM2 ancestral,
DPM-Solver++(2S) ancestral, DPM-Solver++ SDE (pictor.sampling_ancestral), DPM-Solver++(2M) SDE Heun and
(3M) SDE (pictor.sampling_sde). Each is checked against a float64 transcription of ComfyUI's loop written in
its own terms (lambda, alpha, k-diffusion's get_ancestral_step), diffusers where diffusers has it, its
deterministic counterpart at eta 0, the law of its images on Gaussian data, and its use of `noise`."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from pictor import sampling as S
from tests.test_sampling_ancestral import MU, SD, _seeded_noise, gaussian_velocity
from tests.test_sampling_unipc import _start, toy_velocity

NEW = ("dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")


def _model(x: Tensor, sigma: float) -> Tensor:
    """ComfyUI's denoised for a CONST (flow) model: x - sigma * v."""
    return x - sigma * toy_velocity(x, torch.full((x.shape[0],), sigma, dtype=torch.float64))


def _draws(n: int, seed: int = 5) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(n)]


def _lam(sigma: float) -> float:
    return math.log((1 - sigma) / sigma)


def _sig(lam: float) -> float:
    return 1 / (math.exp(lam) + 1)


def _rf_down(s: float, s_next: float, eta: float) -> tuple[float, float, float]:
    """ComfyUI's RF ancestral quantities: sigma_down, alpha_{i+1} / alpha_down, renoise_coeff."""
    sigma_down = s_next * (1 + (s_next / s - 1) * eta)
    a_next, a_down = 1 - s_next, 1 - sigma_down
    return sigma_down, a_next / a_down, (s_next**2 - sigma_down**2 * a_next**2 / a_down**2) ** 0.5


# ------------------------------------------------------------------------------- ComfyUI's loops, written out


def _ref_dpm_2_ancestral(x: Tensor, ts: list[float], eps: list[Tensor], eta: float = 1.0) -> Tensor:
    for i in range(len(ts) - 1):
        denoised = _model(x, ts[i])
        sigma_down, ratio, renoise = _rf_down(ts[i], ts[i + 1], eta)
        d = (x - denoised) / ts[i]
        if sigma_down == 0:
            x = x + d * (sigma_down - ts[i])
        else:
            sigma_mid = math.exp((math.log(ts[i]) + math.log(sigma_down)) / 2)
            x_2 = x + d * (sigma_mid - ts[i])
            d_2 = (x_2 - _model(x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (sigma_down - ts[i])
            x = ratio * x + eps[i] * renoise
    return x


def _ref_dpmpp_2s_ancestral(x: Tensor, ts: list[float], eps: list[Tensor], eta: float = 1.0) -> Tensor:
    for i in range(len(ts) - 1):
        denoised = _model(x, ts[i])
        sigma_down, ratio, renoise = _rf_down(ts[i], ts[i + 1], eta)
        if ts[i + 1] == 0:
            x = x + (x - denoised) / ts[i] * (sigma_down - ts[i])
        else:
            if ts[i] == 1.0:
                sigma_s = 0.9999
            else:
                lam_i, lam_down = _lam(ts[i]), _lam(sigma_down)
                sigma_s = _sig(lam_i + 0.5 * (lam_down - lam_i))
            u = (sigma_s / ts[i]) * x + (1 - sigma_s / ts[i]) * denoised
            d_i = _model(u, sigma_s)
            x = (sigma_down / ts[i]) * x + (1 - sigma_down / ts[i]) * d_i
        if ts[i + 1] > 0 and eta > 0:
            x = ratio * x + eps[i] * renoise
    return x


def _ancestral_step(sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]:
    """k-diffusion's get_ancestral_step (VE sigmas)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def _ref_dpmpp_sde(
    x: Tensor, ts: list[float], noise_sampler: Callable[[int, str], Tensor], eta: float = 1.0
) -> Tensor:
    """k-diffusion's sample_dpmpp_sde (r = 1/2) in ComfyUI's half-log-SNR form for CONST models; starts < 1
    only (alpha_s = 0 at t = 1 divides by 0 in this form)."""
    for i in range(len(ts) - 1):
        denoised = _model(x, ts[i])
        if ts[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = _lam(ts[i]), _lam(ts[i + 1])
        h = lam_t - lam_s
        lam_s1 = lam_s + 0.5 * h
        sigma_s1 = _sig(lam_s1)
        alpha_s, alpha_s1, alpha_t = ts[i] * math.exp(lam_s), sigma_s1 * math.exp(lam_s1), 1 - ts[i + 1]
        sd, su = _ancestral_step(math.exp(-lam_s), math.exp(-lam_s1), eta)
        h_ = -math.log(sd) - lam_s
        x_2 = (alpha_s1 / alpha_s) * math.exp(-h_) * x - alpha_s1 * math.expm1(-h_) * denoised
        if eta > 0:
            x_2 = x_2 + alpha_s1 * noise_sampler(i, "mid") * su
        denoised_2 = _model(x_2, sigma_s1)
        sd, su = _ancestral_step(math.exp(-lam_s), math.exp(-lam_t), eta)
        h_ = -math.log(sd) - lam_s
        x = (alpha_t / alpha_s) * math.exp(-h_) * x - alpha_t * math.expm1(-h_) * denoised_2
        if eta > 0:
            x = x + alpha_t * noise_sampler(i, "step") * su
    return x


def _ref_dpmpp_3m_sde(x: Tensor, ts: list[float], eps: list[Tensor], eta: float = 1.0) -> Tensor:
    """k-diffusion's sample_dpmpp_3m_sde for CONST models, from a start below 1."""
    d_1 = d_2 = None
    h = h_1 = h_2 = None
    for i in range(len(ts) - 1):
        denoised = _model(x, ts[i])
        if ts[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = _lam(ts[i]), _lam(ts[i + 1])
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = ts[i + 1] * math.exp(lam_t)
            x = ts[i + 1] / ts[i] * math.exp(-h * eta) * x + alpha_t * -math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + alpha_t * phi_2 * d1 - alpha_t * (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + alpha_t * phi_2 * (denoised - d_1) / (h_1 / h)
            if eta > 0:
                x = x + eps[i] * ts[i + 1] * math.sqrt(-math.expm1(-2 * h * eta))
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x


def _ref_dpmpp_2m_sde_heun(x: Tensor, ts: list[float], eps: list[Tensor], eta: float = 1.0) -> Tensor:
    old, h_last = None, None
    for i in range(len(ts) - 1):
        denoised = _model(x, ts[i])
        h = None
        if ts[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = _lam(ts[i]), _lam(ts[i + 1])
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = ts[i + 1] * math.exp(lam_t)
            x = ts[i + 1] / ts[i] * math.exp(-h * eta) * x + alpha_t * -math.expm1(-h_eta) * denoised
            if old is not None:
                x = x + alpha_t * (-math.expm1(-h_eta) / -h_eta + 1) * (h / h_last) * (denoised - old)
            if eta > 0:
                x = x + eps[i] * ts[i + 1] * math.sqrt(-math.expm1(-2 * h * eta))
        old, h_last = denoised, h
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ancestral_rf_samplers_are_comfyuis_loops(steps: int, start: float, eta: float) -> None:
    ts = S.schedule_flux(steps, 1024, start=start).double()
    draws = _draws(steps)
    for name, ref in (
        ("dpm_2_ancestral", _ref_dpm_2_ancestral),
        ("dpmpp_2s_ancestral", _ref_dpmpp_2s_ancestral),
    ):
        expected = ref(_start(torch.float64), ts.tolist(), draws, eta)
        ours = S.get_sampler(name)(toy_velocity, _start(torch.float64), ts, noise=lambda i: draws[i], eta=eta)
        torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0, msg=name)
        if steps >= 2:  # the noise acts
            other = S.get_sampler(name)(
                toy_velocity, _start(torch.float64), ts, noise=lambda i: 0.9 * draws[i]
            )
            assert (other - expected).abs().max() > 1e-3, name


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20])
@pytest.mark.parametrize("start", [0.999, 0.6])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_dpmpp_sde_is_comfyuis_loop_with_brownian_increments(steps: int, start: float, eta: float) -> None:
    # The reference gets the normalised increments of a Brownian path over [t_mid, t] and [t', t] (built
    # from independent increments over [t_mid, t] and [t', t_mid]), as ComfyUI's Brownian tree gives them;
    # pictor gets the step's increment as noise(i) and the rest of the midpoint's as noise(n + i).
    ts = S.schedule_flux(steps, 1024, start=start).double().tolist()
    g = torch.Generator().manual_seed(11)
    inc: dict[tuple[int, str], Tensor] = {}
    ours_noise: dict[int, Tensor] = {}
    for i in range(steps - 1):
        t, t_next = ts[i], ts[i + 1]
        s_mid = math.sqrt(t / (1 - t) * t_next / (1 - t_next))
        t_mid = s_mid / (1 + s_mid)
        w_a = torch.randn(4, 6, generator=g, dtype=torch.float64) * math.sqrt(t - t_mid)
        w_b = torch.randn(4, 6, generator=g, dtype=torch.float64) * math.sqrt(t_mid - t_next)
        inc[i, "mid"] = w_a / math.sqrt(t - t_mid)
        inc[i, "step"] = (w_a + w_b) / math.sqrt(t - t_next)
        rho = math.sqrt((t - t_mid) / (t - t_next))
        ours_noise[i] = inc[i, "step"]
        ours_noise[steps + i] = (inc[i, "mid"] - rho * inc[i, "step"]) / math.sqrt(1 - rho * rho)
    expected = _ref_dpmpp_sde(_start(torch.float64), ts, lambda i, k: inc[i, k], eta)
    ours = S.sample_dpmpp_sde(
        toy_velocity, _start(torch.float64), torch.tensor(ts), noise=lambda i: ours_noise[i], eta=eta
    )
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)


def test_dpmpp_sde_noise_has_the_brownian_joint_law() -> None:
    # What pictor draws per step, (eps, rho eps + sqrt(1 - rho^2) eps'), against the normalised increments of
    # a Brownian path: unit variances and correlation rho = sqrt((t - t_mid) / (t - t')).
    t, t_next = 0.8, 0.5
    s_mid = math.sqrt(t / (1 - t) * t_next / (1 - t_next))
    t_mid = s_mid / (1 + s_mid)
    rho = math.sqrt((t - t_mid) / (t - t_next))
    g = torch.Generator().manual_seed(0)
    n = 200_000
    w_a = torch.randn(n, generator=g, dtype=torch.float64) * math.sqrt(t - t_mid)
    w_b = torch.randn(n, generator=g, dtype=torch.float64) * math.sqrt(t_mid - t_next)
    brownian_corr = torch.corrcoef(
        torch.stack([w_a / math.sqrt(t - t_mid), (w_a + w_b) / math.sqrt(t - t_next)])
    )
    assert brownian_corr[0, 1].item() == pytest.approx(rho, abs=0.01)

    seen: dict[int, Tensor] = {}
    captured: list[Tensor] = []

    def noise(i: int) -> Tensor:
        seen[i] = torch.randn(n, 1, generator=g, dtype=torch.float64)
        return seen[i]

    def spy(x: Tensor, tt: Tensor) -> Tensor:
        captured.append(x)
        return torch.zeros_like(x)  # D = x: the first stage's noise part is visible in x_mid

    x = torch.zeros(n, 1, dtype=torch.float64)
    S.sample_dpmpp_sde(spy, x, torch.tensor([t, t_next, 0.0], dtype=torch.float64), noise=noise)
    assert sorted(seen) == [0, 2]  # noise(i) and noise(n + i), n = 2 steps
    mid_noise = captured[1] / captured[1].std()  # from x = 0 the midpoint is pure (scaled) noise
    corr = torch.corrcoef(torch.stack([mid_noise.flatten(), seen[0].flatten()]))[0, 1].item()
    assert corr == pytest.approx(rho, abs=0.01)


def test_dpmpp_sde_first_step_from_t_one_is_its_limit() -> None:
    # From t = 1 (eta 1) both stages keep nothing of x: x_mid = (1 - t_mid) D + t_mid eps_mid at the
    # midpoint 0.9999, and x' = (1 - t') D_mid + t' eps.
    ts = S.schedule_flux(3, 1024).double()
    draws = _draws(6)
    seen: list[Tensor] = []

    def spy(x: Tensor, t: Tensor) -> Tensor:
        seen.append(x)
        return toy_velocity(x, t)

    S.sample_dpmpp_sde(spy, _start(torch.float64), ts, noise=lambda i: draws[i])
    x0 = _start(torch.float64)
    d = x0 - toy_velocity(x0, torch.ones(4, dtype=torch.float64))
    t1, tm = float(ts[1]), 0.9999
    rho = math.sqrt((1 - tm) / (1 - t1))
    eps_mid = rho * draws[0] + math.sqrt(1 - rho * rho) * draws[3]
    torch.testing.assert_close(seen[1], (1 - tm) * d + tm * eps_mid)
    d_mid = seen[1] - tm * toy_velocity(seen[1], torch.full((4,), tm, dtype=torch.float64))
    torch.testing.assert_close(seen[2], (1 - t1) * d_mid + t1 * draws[0])


@pytest.mark.parametrize("schedule", ["tiny first step", "beta, 400 steps"])
def test_dpmpp_sde_from_t_one_with_a_first_step_above_the_fixed_midpoint(schedule: str) -> None:
    """A first step from t = 1 that ends above 0.9999 (long schedules: beta at 400 steps) takes its midpoint
    halfway in lambda from ComfyUI's start just below 1, inside the step, instead of failing."""
    if schedule == "tiny first step":
        ts = torch.tensor([1.0, 0.99995, 0.5, 0.0], dtype=torch.float64)
    else:
        ts = S.get_schedule("beta", 400, 4096).double()
        assert float(ts[1]) > 0.9999
    draws = _draws(2 * (len(ts) - 1))
    seen: list[float] = []

    def spy(x: Tensor, t: Tensor) -> Tensor:
        seen.append(float(t.reshape(-1)[0]))
        return toy_velocity(x, t)

    out = S.sample_dpmpp_sde(spy, _start(torch.float64), ts, noise=lambda i: draws[i])
    assert bool(torch.isfinite(out).all())
    start = 1 - 1e-4 * math.exp(-1.15)
    s = math.sqrt(start / (1 - start) * float(ts[1]) / (1 - float(ts[1])))
    assert seen[1] == pytest.approx(s / (1 + s), abs=1e-12) and float(ts[1]) < seen[1] < 1.0


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 20])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_multistep_sdes_are_comfyuis_loops(steps: int, eta: float) -> None:
    # From 0.999 (ComfyUI's form divides by alpha = 0 at t = 1; from t = 1 pictor takes the limits, which
    # diffusers' comparisons below cover).
    ts = S.schedule_flux(steps, 1024, start=0.999).double()
    draws = _draws(steps)
    for name, ref in (("dpmpp_3m_sde", _ref_dpmpp_3m_sde), ("dpmpp_2m_sde_heun", _ref_dpmpp_2m_sde_heun)):
        expected = ref(_start(torch.float64), ts.tolist(), draws, eta)
        ours = S.get_sampler(name)(toy_velocity, _start(torch.float64), ts, noise=lambda i: draws[i], eta=eta)
        torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0, msg=name)
    if steps >= 4:  # the third-order terms act
        a = S.sample_dpmpp_3m_sde(toy_velocity, _start(torch.float64), ts, noise=lambda i: draws[i])
        b = S.sample_dpmpp_2m_sde_heun(toy_velocity, _start(torch.float64), ts, noise=lambda i: draws[i])
        assert (a - b).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------- diffusers


def _diffusers_multistep(ts: Tensor, draws: list[Tensor] | None, **config: object) -> Tensor:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", final_sigmas_type="zero", **config
    )
    steps = len(ts) - 1
    sched.set_timesteps(steps)
    sched.sigmas = ts.double()
    sched.set_begin_index(0)
    x = _start(torch.float64)
    for i, timestep in enumerate(sched.timesteps):
        v = toy_velocity(x, torch.full((x.shape[0],), float(ts[i]), dtype=torch.float64))
        if draws is None:
            x = sched.step(v, timestep, x).prev_sample
        else:
            eps = draws[i] if i < steps - 1 else torch.zeros_like(x)
            x = sched.step(v, timestep, x, variance_noise=eps).prev_sample
    return x


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_dpmpp_2m_sde_heun_matches_diffusers(steps: int, start: float) -> None:
    ts = S.schedule_flux(steps, 1024, start=start)
    draws = _draws(steps)
    expected = _diffusers_multistep(
        ts,
        draws,
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
        solver_type="heun",
        lower_order_final=True,
    )
    ours = S.sample_dpmpp_2m_sde_heun(toy_velocity, _start(torch.float64), ts, noise=lambda i: draws[i])
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)  # diffusers rounds x to float32 per step


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_dpmpp_3m_sde_at_eta_0_is_diffusers_third_order_dpmsolver(steps: int, start: float) -> None:
    # diffusers has no third-order SDE step; at eta 0 ComfyUI's 3M SDE is DPM-Solver++(3M), diffusers'
    # solver_order=3 (lower_order_final off: ComfyUI lowers only the step to 0, which is D in both), with
    # the Heun-type second-order warm-up step (solver_type "heun"; "midpoint" differs by 1e-5 here).
    ts = S.schedule_flux(steps, 1024, start=start)
    expected = _diffusers_multistep(
        ts, None, algorithm_type="dpmsolver++", solver_order=3, solver_type="heun", lower_order_final=False
    )
    ours = S.sample_dpmpp_3m_sde(toy_velocity, _start(torch.float64), ts, noise=_never, eta=0.0)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    if steps >= 4:
        second = S.sample_dpmpp_2m(toy_velocity, _start(torch.float64), ts)
        assert (second - expected).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------ eta 0, law, noise


def _never(i: int) -> Tensor:
    raise AssertionError(f"drew noise at eta 0 (step {i})")


@pytest.mark.parametrize("start", [1.0, 0.6])
def test_eta_0_gives_the_deterministic_counterparts(start: float) -> None:
    ts = S.schedule_flux(9, 1024, start=start).double()
    x = _start(torch.float64)
    run = lambda name: S.get_sampler(name)(toy_velocity, x, ts, noise=_never, eta=0.0)  # noqa: E731
    torch.testing.assert_close(
        run("dpm_2_ancestral"), S.sample_dpm_2(toy_velocity, x, ts), atol=1e-15, rtol=0
    )
    torch.testing.assert_close(
        run("dpmpp_2m_sde"), S.sample_dpmpp_2m(toy_velocity, x, ts), atol=1e-12, rtol=0
    )
    # DPM-Solver++(2S) at r = 1/2 both ways: DPM++ SDE's second stage then uses the midpoint's D alone
    torch.testing.assert_close(run("dpmpp_sde"), run("dpmpp_2s_ancestral"), atol=1e-14, rtol=0)
    assert (run("dpmpp_sde") - S.sample_dpm_2(toy_velocity, x, ts)).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("name", "steps", "std_low", "std_high"),
    [
        ("dpm_2_ancestral", 30, 0.985, 1.015),
        ("dpmpp_2s_ancestral", 30, 0.985, 1.015),
        ("dpmpp_sde", 30, 0.985, 1.015),
        ("dpmpp_2m_sde_heun", 30, 0.985, 1.015),
        ("dpmpp_3m_sde", 30, 0.985, 1.015),
    ],
)
def test_samples_have_the_data_distribution(name: str, steps: int, std_low: float, std_high: float) -> None:
    # The exact velocity of Gaussian data N(MU, SD^2): the samples must have the data's law (40,000 of them:
    # 3 standard errors are 0.03 on the mean, 1.1% on the std), here at 30 linear steps. Measured std / SD:
    # dpm_2_ancestral 1.001, dpmpp_2s_ancestral 0.993, dpmpp_sde 0.995, dpmpp_2m_sde_heun 1.008, dpmpp_3m_sde
    # 0.999 (Euler ancestral: 0.93, its first-order steps lose variance); at 10 steps dpmpp_sde 0.966 and
    # dpmpp_3m_sde 0.990.
    n = 40_000
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = _seeded_noise((n, 1), 1)
    memo: dict[int, Tensor] = {}
    noise = lambda i: memo.setdefault(i, draws(i))  # noqa: E731
    out = S.get_sampler(name)(gaussian_velocity, x, S.schedule_linear(steps).double(), noise=noise)
    assert abs(out.mean().item() - MU) < 0.03
    assert std_low < out.std().item() / SD < std_high, out.std().item() / SD


@pytest.mark.parametrize("name", NEW)
def test_new_stochastic_samplers_need_noise_and_follow_it(name: str) -> None:
    sampler = S.get_sampler(name)
    assert S.is_stochastic(name)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=rf"{name} draws fresh noise.*pass noise=fn"):
        sampler(gaussian_velocity, x, S.schedule_linear(3))
    with pytest.raises(ValueError, match=r"noise\(\d+\) has shape \(3,\), but x has \(2, 3\)"):
        sampler(gaussian_velocity, x, S.schedule_linear(3), noise=lambda i: torch.zeros(3))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    asked: list[int] = []

    def noise(i: int) -> Tensor:
        asked.append(i)
        return torch.randn(3, 4, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)

    ts = S.schedule_flux(6, 1024, start=0.8)
    a = sampler(gaussian_velocity, x, ts, noise=noise)
    # one draw per step before the last (the step to 0 is the data prediction); DPM++ SDE two
    expected = [0, 1, 2, 3, 4] if name != "dpmpp_sde" else [0, 6, 1, 7, 2, 8, 3, 9, 4, 10]
    assert asked == expected
    b = sampler(gaussian_velocity, x, ts, noise=noise)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    c = sampler(gaussian_velocity, x, ts, noise=lambda i: noise(i + 1))
    assert (a - c).abs().min() > 0


@pytest.mark.parametrize("name", NEW)
def test_new_stochastic_samplers_reach_a_single_data_point_exactly(name: str) -> None:
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 5, generator=g, dtype=torch.float64)
    start = torch.randn(2, 5, generator=g, dtype=torch.float64)

    def v(x: Tensor, t: Tensor) -> Tensor:
        return (x - x0) / t.to(x.dtype)[:, None]

    out = S.get_sampler(name)(v, start, S.schedule_flux(5, 256), noise=_seeded_noise((2, 5), 5))
    torch.testing.assert_close(out, x0)
