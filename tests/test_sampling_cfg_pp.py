"""The CFG++ samplers against float64 transcriptions of ComfyUI's loops (comfy/k_diffusion/sampling.py),
written here in ComfyUI's own terms: a denoiser model(x, sigma) on a CONST (flow) model, denoised =
x - sigma v, and the post-CFG hook's uncond_denoised beside it. Where pictor moves a loop onto the flow path
differently from ComfyUI's letter (DPM++(2M) and RES multistep CFG++, which ComfyUI writes for alpha = 1),
the transcription says so on the line that differs (`pictor.sampling_cfg_pp`, `pictor.sampling_res`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import pictor.sampling as S
from pictor.provenance import SAMPLER_DISPLAY
from pictor.sampling_steps import UNCOND

CFG_PP = sorted(S.CFG_PP_SAMPLERS)
PLAIN = {
    "euler_cfg_pp": "euler",
    "euler_ancestral_cfg_pp": None,  # its ancestral split is ComfyUI's VE one, not euler_ancestral's RF one
    "dpmpp_2m_cfg_pp": "dpmpp_2m",
    "dpmpp_2s_ancestral_cfg_pp": "dpmpp_2s_ancestral",
    "res_multistep_cfg_pp": "res_multistep",
    "res_multistep_ancestral_cfg_pp": "res_multistep_ancestral",
    "gradient_estimation_cfg_pp": "gradient_estimation",
}
SCALE = 3.0


def v_cond(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tb = t.reshape(-1, *([1] * (x.ndim - 1)))
    return 0.8 * x - 0.5 + 0.3 * tb * x * x / (1 + x * x)


def v_uncond(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tb = t.reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * x + 0.2 * torch.cos(x) - 0.1 * tb


def guided(scale: float, cond: Callable = v_cond, uncond: Callable = v_uncond) -> Any:
    """A VelocityFn with CFG at `scale` that gives its last call's unconditional velocity (UNCOND)."""
    last: dict[str, torch.Tensor] = {}

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        vc, vu = cond(x, t), uncond(x, t)
        last["u"] = vu
        return vu + scale * (vc - vu)

    setattr(fn, UNCOND, lambda x, t: last["u"])
    fn.calls = 0  # type: ignore[attr-defined]
    return fn


class ComfyModel:
    """ComfyUI's CFG denoiser on a CONST model, with the post-CFG hook's uncond_denoised kept (what
    set_model_options_post_cfg_function(..., disable_cfg1_optimization=True) gives the CFG++ samplers)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.uncond_denoised: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        vc, vu = v_cond(x, sigma), v_uncond(x, sigma)
        cond_denoised, uncond_denoised = x - s * vc, x - s * vu
        self.uncond_denoised = uncond_denoised
        return uncond_denoised + self.scale * (cond_denoised - uncond_denoised)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0) -> tuple[Any, Any]:
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def lambda_fn(sigma: torch.Tensor) -> torch.Tensor:  # sigma_to_half_log_snr on CONST
    return sigma.logit().neg()


def comfy_euler_ancestral_cfg_pp(model: ComfyModel, x, sigmas, eta, noise):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        uncond_denoised = model.uncond_denoised
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            alpha_s = sigmas[i] * lambda_fn(sigmas[i]).exp()
            alpha_t = sigmas[i + 1] * lambda_fn(sigmas[i + 1]).exp()
            d = to_d(x, sigmas[i], alpha_s * uncond_denoised)
            sigma_down, sigma_up = get_ancestral_step(sigmas[i] / alpha_s, sigmas[i + 1] / alpha_t, eta=eta)
            sigma_down = alpha_t * sigma_down
            x = alpha_t * denoised + sigma_down * d
            if eta > 0:
                x = x + alpha_t * noise(i) * sigma_up
    return x


def comfy_dpmpp_2m_cfg_pp(model: ComfyModel, x, sigmas, noise):
    # ComfyUI's loop is written for alpha = 1; here it runs on y = x / alpha with sigma / alpha (as its Euler
    # ancestral CFG++ moves onto a CONST model), x = alpha y.
    s_in = x.new_ones([x.shape[0]])
    alpha = 1 - sigmas
    ve = sigmas / alpha
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_uncond_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        uncond_denoised = model.uncond_denoised
        y = x / alpha[i]
        t, t_next = t_fn(ve[i]), t_fn(ve[i + 1])
        h = t_next - t
        if old_uncond_denoised is None or sigmas[i + 1] == 0:
            denoised_mix = -torch.exp(-h) * uncond_denoised
        else:
            h_last = t - t_fn(ve[i - 1])
            r = h_last / h
            denoised_mix = -torch.exp(-h) * uncond_denoised - torch.expm1(-h) * (1 / (2 * r)) * (
                denoised - old_uncond_denoised
            )
        y = denoised + denoised_mix + torch.exp(-h) * y
        x = alpha[i + 1] * y
        old_uncond_denoised = uncond_denoised
    return x


def comfy_res_multistep_cfg_pp(model: ComfyModel, x, sigmas, eta, noise):
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    phi1_fn = lambda t: torch.expm1(t) / t  # noqa: E731
    phi2_fn = lambda t: (phi1_fn(t) - 1.0) / t  # noqa: E731
    old_sigma_down = None
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        uncond_denoised = model.uncond_denoised
        # pictor's flow split (pictor.sampling_res), where ComfyUI's calls get_ancestral_step (same at eta 0)
        sigma_down, alpha_ip1, alpha_down, renoise = sigmas[i + 1], 1 - sigmas[i + 1], 1.0, 0.0
        if eta > 0 and sigmas[i + 1] > 0:
            sigma_down = sigmas[i + 1] * (1 + (sigmas[i + 1] / sigmas[i] - 1) * eta)
            alpha_down = 1 - sigma_down
            renoise = (sigmas[i + 1] ** 2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
        if sigma_down == 0 or old_denoised is None:
            d = to_d(x, sigmas[i], uncond_denoised)
            x = uncond_denoised + d * sigma_down  # ComfyUI: denoised + d * sigma_down (alpha = 1)
        else:
            t, t_old, t_next, t_prev = (
                t_fn(sigmas[i]),
                t_fn(old_sigma_down),
                t_fn(sigma_down),
                t_fn(sigmas[i - 1]),
            )
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            # ComfyUI first adds (denoised - uncond_denoised) to x here (alpha = 1)
            x = sigma_fn(h) * x + h * (b1 * uncond_denoised + b2 * old_denoised)
        x = x + (1 - sigma_down) * (denoised - uncond_denoised)  # the flow path's alpha at the landing time
        if sigmas[i + 1] > 0 and eta > 0:
            x = (alpha_ip1 / alpha_down) * x + noise(i) * renoise
        old_denoised = uncond_denoised
        old_sigma_down = sigma_down
    return x


def comfy_dpmpp_2s_ancestral_rf_cfg_pp(model: ComfyModel, x, sigmas, eta, noise):
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda lbda: (lbda.exp() + 1) ** -1  # noqa: E731
    lambda_f = lambda sigma: ((1 - sigma) / sigma).log()  # noqa: E731
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        uncond_denoised = model.uncond_denoised
        guidance_vector = denoised - uncond_denoised
        downstep_ratio = 1 + (sigmas[i + 1] / sigmas[i] - 1) * eta
        sigma_down = sigmas[i + 1] * downstep_ratio
        alpha_ip1 = 1 - sigmas[i + 1]
        alpha_down = 1 - sigma_down
        renoise_coeff = (sigmas[i + 1] ** 2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
        if sigmas[i + 1] == 0:
            d = to_d(x, sigmas[i], uncond_denoised)
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            if sigmas[i] == 1.0:
                sigma_s = torch.tensor(0.9999, dtype=sigmas.dtype)
            else:
                t_i, t_down = lambda_f(sigmas[i]), lambda_f(sigma_down)
                r = 1 / 2
                h = t_down - t_i
                s = t_i + r * h
                sigma_s = sigma_fn(s)
            sigma_s_i_ratio = sigma_s / sigmas[i]
            u = sigma_s_i_ratio * x + (1 - sigma_s_i_ratio) * uncond_denoised
            _ = model(u, sigma_s * s_in)
            uncond_d_i = model.uncond_denoised
            sigma_down_i_ratio = sigma_down / sigmas[i]
            x = sigma_down_i_ratio * x + (1 - sigma_down_i_ratio) * uncond_d_i
        if sigmas[i + 1] > 0 and eta > 0:
            x = (alpha_ip1 / alpha_down) * x + noise(i) * renoise_coeff
        x = x + (1 - sigmas[i + 1]) * guidance_vector
    return x


def comfy_gradient_estimation_cfg_pp(model: ComfyModel, x, sigmas, noise, ge_gamma=2.0):
    """ComfyUI's sample_gradient_estimation(cfg_pp=True), its Euler CFG++ line moved onto the flow path."""
    s_in = x.new_ones([x.shape[0]])
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], model.uncond_denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            # ComfyUI: x = denoised + d * sigmas[i + 1] (guidance term D - U at weight 1); pictor's weighs it
            # by the flow path's 1 - t', as for DPM++(2M) CFG++
            x = denoised + d * sigmas[i + 1] - sigmas[i + 1] * (denoised - model.uncond_denoised)
            if i >= 1:
                d_bar = (ge_gamma - 1) * (d - old_d)
                x = x + d_bar * dt
        old_d = d
    return x


COMFY = {
    "euler_cfg_pp": lambda m, x, s, n: comfy_euler_ancestral_cfg_pp(m, x, s, 0.0, n),
    "euler_ancestral_cfg_pp": lambda m, x, s, n: comfy_euler_ancestral_cfg_pp(m, x, s, 1.0, n),
    "dpmpp_2m_cfg_pp": comfy_dpmpp_2m_cfg_pp,
    "dpmpp_2s_ancestral_cfg_pp": lambda m, x, s, n: comfy_dpmpp_2s_ancestral_rf_cfg_pp(m, x, s, 1.0, n),
    "res_multistep_cfg_pp": lambda m, x, s, n: comfy_res_multistep_cfg_pp(m, x, s, 0.0, n),
    "res_multistep_ancestral_cfg_pp": lambda m, x, s, n: comfy_res_multistep_cfg_pp(m, x, s, 1.0, n),
    "gradient_estimation_cfg_pp": comfy_gradient_estimation_cfg_pp,
}


def _noise(shape: tuple[int, ...], steps: int) -> Callable[[int], torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    draws = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]
    return lambda i: draws[i]


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@pytest.mark.parametrize("name", CFG_PP)
def test_matches_comfyui_loop(name: str) -> None:
    x = _x()
    # ComfyUI's DPM++(2M) CFG++ in y = x / alpha needs alpha > 0 at the start; the others start at t = 1
    start = 0.97 if name == "dpmpp_2m_cfg_pp" else 1.0
    ts = S.schedule_flux(7, image_seq_len=256, start=start).double()
    noise = _noise(tuple(x.shape), 7)
    ours = S.get_sampler(name)(guided(SCALE), x.clone(), ts, noise=noise)
    theirs = COMFY[name](ComfyModel(SCALE), x.clone(), ts, noise)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    plain = S.get_sampler(PLAIN[name] or "euler")
    other = plain(guided(SCALE), x.clone(), ts, noise=noise)
    assert (ours - other).abs().max() > 1e-3  # CFG++ is not the plain sampler on the guided velocity


@pytest.mark.parametrize("name", [n for n in CFG_PP if PLAIN[n]])
def test_without_guidance_each_is_its_plain_sampler(name: str) -> None:
    # the guided velocity equal to the unconditional one (nothing to guide): the plain sampler exactly
    x = _x()
    ts = S.schedule_flux(6, image_seq_len=256).double()
    noise = _noise(tuple(x.shape), 6)
    same = guided(1.0, cond=v_uncond)
    ours = S.get_sampler(name)(same, x.clone(), ts, noise=noise)
    plain = S.get_sampler(PLAIN[name])(same, x.clone(), ts, noise=noise)  # type: ignore[arg-type]
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)


def test_euler_ancestral_cfg_pp_at_eta_0_is_euler_cfg_pp_and_stays_on_the_path() -> None:
    x = _x()
    ts = S.schedule_linear(5).double()
    a = S.sample_euler_ancestral_cfg_pp(
        guided(SCALE), x.clone(), ts, noise=_noise(tuple(x.shape), 5), eta=0.0
    )
    b = S.sample_euler_cfg_pp(guided(SCALE), x.clone(), ts)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # on data N(mu, 1) (exact velocity), Euler ancestral CFG++ without guidance lands near N(mu, 1) (as
    # euler_ancestral does: 0.90 at 20 steps, 0.98 at 100)
    mu = 0.7

    def exact(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tb = t.reshape(-1, *([1] * (x.ndim - 1)))
        var = (1 - tb) ** 2 + tb**2
        d = mu + (1 - tb) * (x - (1 - tb) * mu) / var
        return (x - d) / tb

    z = torch.randn(20000, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    out = S.sample_euler_ancestral_cfg_pp(
        guided(1.0, cond=exact, uncond=exact), z, S.schedule_linear(100).double(),
        noise=lambda i: torch.randn(z.shape, generator=g, dtype=torch.float64),
    )  # fmt: skip
    assert abs(out.mean().item() - mu) < 0.06 and abs(out.std().item() - 1.0) < 0.04


@pytest.mark.parametrize("name", CFG_PP)
def test_refuses_a_velocity_without_an_unconditional_prediction(name: str) -> None:
    x = _x()
    with pytest.raises(ValueError, match=rf"{name} is a CFG\+\+ sampler.*no unconditional prediction"):
        S.get_sampler(name)(lambda x, t: v_cond(x, t), x, S.schedule_linear(3).double(), noise=lambda i: x)


def test_registry() -> None:
    assert set(S.SAMPLERS) >= S.CFG_PP_SAMPLERS
    assert {n for n in CFG_PP if S.is_stochastic(n)} == {
        "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "res_multistep_ancestral_cfg_pp",
    }  # fmt: skip
    assert S.is_cfg_pp("euler_cfg_pp") and not S.is_cfg_pp("euler")
    assert SAMPLER_DISPLAY["euler_cfg_pp"] == "Euler CFG++"
    assert all(n in SAMPLER_DISPLAY for n in CFG_PP)
    x = _x()
    for name in CFG_PP:  # the registered model calls are the calls made
        for steps in (1, 4):
            fn = guided(SCALE)
            calls = [0]

            def counted(x: torch.Tensor, t: torch.Tensor, fn: Any = fn, calls: list = calls) -> torch.Tensor:
                calls[0] += 1
                return fn(x, t)

            setattr(counted, UNCOND, getattr(fn, UNCOND))
            S.get_sampler(name)(counted, x.clone(), S.schedule_linear(steps).double(), noise=lambda i: x)
            assert calls[0] == S.model_evals(name, steps), (name, steps)


def test_noise_draws_per_step() -> None:
    x = _x()
    for name in CFG_PP:
        drawn: list[int] = []

        def noise(i: int, drawn: list = drawn) -> torch.Tensor:
            drawn.append(i)
            return torch.zeros_like(x)

        S.get_sampler(name)(guided(SCALE), x.clone(), S.schedule_linear(4).double(), noise=noise)
        assert drawn == ([0, 1, 2] if S.is_stochastic(name) else []), name
        if S.is_stochastic(name):
            with pytest.raises(ValueError, match="draws fresh noise"):
                S.get_sampler(name)(guided(SCALE), x, S.schedule_linear(4).double())
    assert math.isfinite(float(S.sample_dpmpp_2m_cfg_pp(guided(SCALE), x, S.schedule_linear(4)).sum()))
