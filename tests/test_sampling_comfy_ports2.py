"""ComfyUI's samplers of 2025 (pictor.sampling_seeds: seeds_2, seeds_3, exp_heun_2_x0, exp_heun_2_x0_sde)
against float64 transcriptions of ComfyUI's loops (comfy/k_diffusion/sampling.py), written here in its own
terms on a CONST (flow) model: denoised = x - sigma v, lambda = -logit(sigma), alpha = sigma e^lambda.
(Their names: tests/test_sampling_comfy_ports2_names.py; gradient_estimation_cfg_pp's loop is in
tests/test_sampling_cfg_pp.py beside the other CFG++ ones.)"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from pictor import sampling as S
from tests.test_sampling_ancestral import MU, SD, gaussian_velocity
from tests.test_sampling_ancestral_rf import _draws
from tests.test_sampling_er_sde import _flux_percent_to_sigma
from tests.test_sampling_unipc import _start, toy_velocity

NEW = ("exp_heun_2_x0", "exp_heun_2_x0_sde", "seeds_2", "seeds_3")


def _ei_h_phi_1(h: Tensor) -> Tensor:
    return torch.expm1(h)


def _ei_h_phi_2(h: Tensor) -> Tensor:
    return (torch.expm1(h) - h) / h


def _lambda_fn(sigma: Tensor) -> Tensor:  # sigma_to_half_log_snr on CONST
    return sigma.logit().neg()


def _sigma_fn(lam: Tensor) -> Tensor:  # half_log_snr_to_sigma on CONST
    return lam.neg().sigmoid()


class _Model:
    """ComfyUI's denoiser on a CONST model over `toy_velocity`; `called_first` replaces the offset first
    sigma in the model's call (pictor calls the model at the schedule's t = 1)."""

    def __init__(self, velocity: Any, offset: float | None, called_first: float | None) -> None:
        self.velocity, self.offset, self.called_first = velocity, offset, called_first

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        called = sigma
        if self.offset is not None and self.called_first is not None and float(sigma[0]) == self.offset:
            called = torch.full_like(sigma, self.called_first)
        return x - called.reshape(-1, 1) * self.velocity(x, called)


def _offset(sigmas: Tensor) -> tuple[Tensor, float | None]:
    """offset_first_sigma_for_snr on ComfyUI's FLUX.1 model (percent 1e-4)."""
    if sigmas[0] >= 1:
        sigmas = sigmas.clone()
        sigmas[0] = _flux_percent_to_sigma(1e-4)
        return sigmas, float(sigmas[0])
    return sigmas, None


def comfy_seeds_2(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, r=0.5, solver_type="phi_1"):
    """ComfyUI's sample_seeds_2; exp_heun_2_x0 is it at eta 0, s_noise 0, r 1, phi_2; its _sde at r 1."""
    s_in = x.new_ones([x.shape[0]])
    inject_noise = eta > 0 and s_noise > 0
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = _lambda_fn(sigmas[i]), _lambda_fn(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r)
        sigma_s_1 = _sigma_fn(lambda_s_1)
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        x_2 = (
            sigma_s_1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_s_1 * _ei_h_phi_1(-r * h_eta) * denoised
        )
        if inject_noise:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * s_in)
        if solver_type == "phi_1":
            denoised_d = torch.lerp(denoised, denoised_2, fac)
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * _ei_h_phi_1(-h_eta) * denoised_d
        else:
            b2 = _ei_h_phi_2(-h_eta) / r
            b1 = _ei_h_phi_1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b2 * denoised_2)
        if inject_noise:
            segment_factor = (r - 1) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            fresh = noise_sampler(sigma_s_1, sigmas[i + 1])
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * fresh
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


def comfy_seeds_3(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, r_1=1.0 / 3, r_2=2.0 / 3):
    """ComfyUI's sample_seeds_3."""
    s_in = x.new_ones([x.shape[0]])
    inject_noise = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = _lambda_fn(sigmas[i]), _lambda_fn(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r_1)
        lambda_s_2 = torch.lerp(lambda_s, lambda_t, r_2)
        sigma_s_1, sigma_s_2 = _sigma_fn(lambda_s_1), _sigma_fn(lambda_s_2)
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_s_2 = sigma_s_2 * lambda_s_2.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        x_2 = (
            sigma_s_1 / sigmas[i] * (-r_1 * h * eta).exp() * x
            - alpha_s_1 * _ei_h_phi_1(-r_1 * h_eta) * denoised
        )
        if inject_noise:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * s_in)
        a3_2 = r_2 / r_1 * _ei_h_phi_2(-r_2 * h_eta)
        a3_1 = _ei_h_phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_s_2 * (
            a3_1 * denoised + a3_2 * denoised_2
        )
        if inject_noise:
            segment_factor = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            fresh = noise_sampler(sigma_s_1, sigma_s_2)
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * fresh
            x_3 = x_3 + sde_noise * sigma_s_2 * s_noise
        denoised_3 = model(x_3, sigma_s_2 * s_in)
        b3 = _ei_h_phi_2(-h_eta) / r_2
        b1 = _ei_h_phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject_noise:
            segment_factor = (r_2 - 1) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            fresh = noise_sampler(sigma_s_2, sigmas[i + 1])
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * fresh
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


# ComfyUI's loop per name (its wrappers' arguments), and how pictor indexes the noise of stage k of step i
COMFY = {
    "seeds_2": lambda m, x, s, ns: comfy_seeds_2(m, x, s, ns),
    "seeds_3": lambda m, x, s, ns: comfy_seeds_3(m, x, s, ns),
    "exp_heun_2_x0": lambda m, x, s, ns: comfy_seeds_2(m, x, s, ns, 0.0, 0.0, 1.0, "phi_2"),
    "exp_heun_2_x0_sde": lambda m, x, s, ns: comfy_seeds_2(m, x, s, ns, 1.0, 1.0, 1.0, "phi_2"),
}


def _run_comfy(name: str, ts: Tensor, model_at_offset: bool) -> tuple[Tensor, list[Tensor]]:
    """ComfyUI's loop from `_start` on `ts`, the k-th call of its noise sampler in step i given the draw
    pictor takes for it, noise(k n + i), n the steps (ComfyUI calls it in step order, K times a step; the
    call pictor skips, r = 1's zero-weighted last segment, gets zeros)."""
    n = len(ts) - 1
    eps = _draws(3 * n)
    sigmas, offset = _offset(ts)
    model = _Model(toy_velocity, offset, None if model_at_offset else 1.0)
    per_step = 3 if name == "seeds_3" else 2
    calls = [0]

    def noise_sampler(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        i, k = divmod(calls[0], per_step)
        calls[0] += 1
        if name == "exp_heun_2_x0_sde" and k == 1:
            return torch.zeros_like(eps[0])
        return eps[k * n + i]

    return COMFY[name](model, _start(torch.float64), sigmas, noise_sampler), eps


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_matches_comfyuis_loop(name: str, steps: int, start: float) -> None:
    ts = S.schedule_flux(steps, 1024, start=start).double()
    theirs, eps = _run_comfy(name, ts, model_at_offset=False)
    ours = S.get_sampler(name)(toy_velocity, _start(torch.float64), ts, noise=lambda i: eps[i])
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", NEW)
def test_from_t_one_close_to_comfyui_calling_the_model_below_one(name: str) -> None:
    # ComfyUI calls the model at its offset start 1 - 3.2e-5 too; pictor at the schedule's t = 1
    ts = S.schedule_flux(8, 1024).double()
    theirs, eps = _run_comfy(name, ts, model_at_offset=True)
    ours = S.get_sampler(name)(toy_velocity, _start(torch.float64), ts, noise=lambda i: eps[i])
    assert 0 < (ours - theirs).abs().max().item() < 1e-5  # measured 9.7e-7 (exp_heun_2_x0) and less


def test_seeds_2_phi_2_and_exp_heun_are_seeds_2_variants() -> None:
    ts = S.schedule_flux(6, 1024, start=0.8).double()
    eps = _draws(12)
    x = _start(torch.float64)
    a = S.sample_exp_heun_2_x0(toy_velocity, x, ts)
    b = S.sample_seeds_2(toy_velocity, x, ts, eta=0.0, r=1.0, solver_type="phi_2")
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    c = S.sample_exp_heun_2_x0_sde(toy_velocity, x, ts, noise=lambda i: eps[i], eta=0.0)
    torch.testing.assert_close(a, c, atol=0, rtol=0)  # at eta 0 the SDE is the ODE
    with pytest.raises(ValueError, match="solver_type"):
        S.sample_seeds_2(toy_velocity, x, ts, noise=lambda i: eps[i], solver_type="phi_3")
    # ComfyUI's exp_heun_2_x0(_sde) take its SEEDS-2 solver_type too ("phi_2" by default)
    d = S.sample_exp_heun_2_x0(toy_velocity, x, ts, solver_type="phi_1")
    e = S.sample_seeds_2(toy_velocity, x, ts, eta=0.0, r=1.0, solver_type="phi_1")
    torch.testing.assert_close(d, e, atol=0, rtol=0)
    assert (d - a).abs().max() > 1e-6
    with pytest.raises(ValueError, match="solver_type must be 'phi_1' or 'phi_2', got 'midpoint'"):
        S.sample_exp_heun_2_x0_sde(toy_velocity, x, ts, noise=lambda i: eps[i], solver_type="midpoint")


def test_exp_heun_converges_at_order_two() -> None:
    """The deterministic exponential Heun step is second order: the error falls about 4x per halving."""
    x = _start(torch.float64)
    ref = S.sample_exp_heun_2_x0(toy_velocity, x, torch.linspace(0.8, 0.1, 2049, dtype=torch.float64))
    errs = []
    for steps in (16, 32, 64):
        ts = torch.linspace(0.8, 0.1, steps + 1, dtype=torch.float64)
        errs.append((S.sample_exp_heun_2_x0(toy_velocity, x, ts) - ref).abs().max().item())
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(1.8 < o < 2.3 for o in orders), orders


@pytest.mark.parametrize("name", ["seeds_2", "seeds_3", "exp_heun_2_x0_sde"])
def test_stochastic_ones_sample_the_data_law(name: str) -> None:
    """With the exact velocity of Gaussian data N(MU, SD^2) the images have the data's law."""
    z = torch.randn(20000, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    out = S.get_sampler(name)(
        gaussian_velocity, z, S.schedule_flux(30, 1024).double(),
        noise=lambda i: torch.randn(z.shape, generator=g, dtype=torch.float64),
    )  # fmt: skip
    assert abs(out.mean().item() - MU) < 0.06
    assert abs(out.std().item() / SD - 1.0) < 0.02


def test_registry_calls_and_noise_draws() -> None:
    x = _start(torch.float64)
    for name in NEW:
        for steps in (1, 4):
            calls = [0]

            def counted(x: Tensor, t: Tensor, calls: list = calls) -> Tensor:
                calls[0] += 1
                return toy_velocity(x, t)

            drawn: list[int] = []

            def noise(i: int, drawn: list = drawn) -> Tensor:
                drawn.append(i)
                return torch.zeros_like(x)

            S.get_sampler(name)(counted, x.clone(), S.schedule_linear(steps).double(), noise=noise)
            assert calls[0] == S.model_evals(name, steps), (name, steps)
            stages = {"seeds_2": 2, "seeds_3": 3, "exp_heun_2_x0_sde": 1}.get(name, 0)
            n = steps
            assert sorted(drawn) == sorted(k * n + i for k in range(stages) for i in range(steps - 1)), name
        assert S.is_stochastic(name) == (name != "exp_heun_2_x0")
        if S.is_stochastic(name):
            with pytest.raises(ValueError, match=f"{name} draws fresh noise"):
                S.get_sampler(name)(toy_velocity, x, S.schedule_linear(3).double())
    assert S.is_cfg_pp("gradient_estimation_cfg_pp") and not S.is_stochastic("gradient_estimation_cfg_pp")


def test_exp_heun_follows_a_straight_path() -> None:
    # one data point x0: on the path at every step from 0.6; from t = 1 only to ComfyUI's offset start
    # (1 - 3.2e-5), at which it takes the noise to be
    g = torch.Generator().manual_seed(1)
    x0, noise = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(2))

    def v(x: Tensor, t: Tensor) -> Tensor:
        return (x - x0) / t.to(x.dtype).reshape(-1, 1)

    for start, tol in ((0.6, 1e-12), (1.0, 1e-4)):
        ts = S.schedule_flux(4, 256, start=start).double()
        seen: list[dict] = []
        t0 = float(ts[0])  # float32's 0.6
        S.sample_exp_heun_2_x0(v, (1 - t0) * x0 + t0 * noise, ts, seen.append)
        for t, x in ((d["t"], d["x"]) for d in seen):
            torch.testing.assert_close(x, (1 - t) * x0 + t * noise, atol=tol, rtol=0)


@pytest.mark.parametrize("start", [1.0, 0.6])
def test_exp_heun_keeps_an_inpaintings_known_region_on_its_path(start: float) -> None:
    """The pipeline gives the deterministic exp_heun_2_x0 an edit's blended velocity (`blend_velocity`): its
    known region must stay on the noising path at every model call and step. From t = 1 the offset start
    (1 - 3.2e-5) alone would leave it 1e-4 off (inpainting starts at 1); the sampler puts it back
    (`keep_known`) after every stage and step."""
    from pictor.edit_blending import blend_velocity
    from pictor.flow import interpolate

    gen = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 8, 16, generator=gen), torch.randn(2, 8, 16, generator=gen)
    repaint = torch.ones(1, 8, 16, dtype=torch.bool)
    repaint[:, :3] = False
    weight = torch.randn(16, 16, generator=gen)
    seen: list[tuple[Tensor, float]] = []

    def model(x: Tensor, t: Tensor) -> Tensor:
        seen.append((x.clone(), float(t[0])))
        return torch.tanh(x @ weight) + t[:, None, None]

    ts = S.get_schedule("flux", 5, image_seq_len=8, start=start)
    x = interpolate(z0, noise, float(ts[0]))
    out = S.sample_exp_heun_2_x0(blend_velocity(model, z0, noise, repaint), x, ts)
    assert len(seen) == S.model_evals("exp_heun_2_x0", 5)
    for x_call, t in seen:
        on_path = interpolate(z0, noise, t)
        torch.testing.assert_close(x_call[:, :3], on_path[:, :3], atol=2e-6, rtol=0, msg=f"t={t}")
    torch.testing.assert_close(out[:, :3], z0[:, :3], atol=2e-6, rtol=0)
    assert (out[:, 3:] - z0[:, 3:]).abs().mean() > 0.1  # the rest was sampled


@pytest.mark.parametrize(
    ("name", "kwargs", "words"),
    [
        ("seeds_2", {"r": 0.0}, r"seeds_2's r must lie in \(0, 1\], got 0.0"),
        ("seeds_2", {"r": 1.5}, r"seeds_2's r must lie in \(0, 1\], got 1.5"),
        ("seeds_2", {"r": math.nan}, r"seeds_2's r must lie in \(0, 1\], got nan"),
        ("seeds_3", {"r_1": 0.0}, r"seeds_3's stages need 0 < r_1 < r_2 <= 1, got r_1 0.0, r_2 0.66"),
        ("seeds_3", {"r_1": 0.7}, r"seeds_3's stages need 0 < r_1 < r_2 <= 1, got r_1 0.7, r_2 0.66"),
        ("seeds_3", {"r_2": 1.2}, r"seeds_3's stages need 0 < r_1 < r_2 <= 1, got r_1 0.33.*, r_2 1.2"),
        ("seeds_2", {"eta": -0.5}, r"seeds_2's eta must be a finite number >= 0, got -0.5"),
        ("seeds_3", {"s_noise": math.inf}, r"seeds_3's s_noise must be a finite number >= 0, got inf"),
        ("exp_heun_2_x0_sde", {"eta": math.nan}, r"exp_heun_2_x0_sde's eta must be a finite number >= 0"),
    ],
)
def test_bad_keywords_are_refused_by_name(name: str, kwargs: dict, words: str) -> None:
    # ComfyUI's SEEDS node takes r in [0.01, 1], eta and s_noise in [0, 100]; its loops check nothing, and
    # r = 0 divided by zero here before
    if "r_1" in kwargs or "r_2" in kwargs:
        kwargs = {"r_1": 1 / 3, "r_2": 0.66, **kwargs}
    with pytest.raises(ValueError, match=words):
        S.get_sampler(name)(toy_velocity, _start(torch.float64), S.schedule_linear(3).double(),
                            noise=lambda i: torch.zeros(1), **kwargs)  # fmt: skip


@pytest.mark.parametrize("start", [1.0, 0.6])
def test_exp_heun_stays_put_on_a_zero_velocity(start: float) -> None:
    # CFG-Zero*'s zero-init steps predict zero velocity: the deterministic exp_heun_2_x0 keeps the sample
    # where it is (README: guidance methods), from t = 1 too despite its offset start
    x = _start(torch.float64)
    ts = S.schedule_flux(4, 256, start=start).double()[:3]
    out = S.sample_exp_heun_2_x0(lambda x, t: torch.zeros_like(x), x, ts)
    torch.testing.assert_close(out, x, atol=1e-14, rtol=0)
