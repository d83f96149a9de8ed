"""SA-Solver (pictor.sampling_sa_solver: sa_solver, sa_solver_pece) against a float64 transcription of
ComfyUI's loop (comfy/k_diffusion/sampling.py: sample_sa_solver, sample_sa_solver_pece) and its coefficient
functions (comfy/k_diffusion/sa_solver.py: compute_exponential_coeffs,
compute_simple_stochastic_adams_b_coeffs, compute_stochastic_adams_b_coeffs, get_tau_interval_func), written
here in its own terms on a CONST (flow) model with ComfyUI's FLUX.1 percent_to_sigma (shift 1.15); then the
law it samples, its convergence as an ODE solver (tau 0), its calls, noise draws, callbacks and inpainting."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from pictor import sampling as S
from pictor.sampling_sa_solver import comfy_flux_percent_to_t, sa_solver_tau
from pictor.sampling_sa_solver_coeffs import adams_weights
from tests.test_sampling_ancestral import MU, SD, gaussian_velocity
from tests.test_sampling_ancestral_rf import _draws
from tests.test_sampling_comfy_ports2 import _Model, _offset
from tests.test_sampling_er_sde import _flux_percent_to_sigma
from tests.test_sampling_unipc import _start, toy_velocity

NAMES = ("sa_solver", "sa_solver_pece")

# ------------------------------------------------------------------------- ComfyUI, transcribed (float64)


def comfy_exponential_coeffs(s: Tensor, t: Tensor, solver_order: int, tau_t: float) -> Tensor:
    """sa_solver.py compute_exponential_coeffs."""
    tau_mul = 1 + tau_t**2
    h = t - s
    p = torch.arange(solver_order, dtype=s.dtype, device=s.device)
    product_terms_factored = t**p - s**p * (-tau_mul * h).exp()
    recursive_depth_mat = p.unsqueeze(1) - p.unsqueeze(0)
    log_factorial = (p + 1).lgamma()
    recursive_coeff_mat = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau_t > 0:
        recursive_coeff_mat = recursive_coeff_mat - (recursive_depth_mat * math.log(tau_mul))
    signs = torch.where(recursive_depth_mat % 2 == 0, 1.0, -1.0).to(s.dtype)
    recursive_coeff_mat = (recursive_coeff_mat.exp() * signs).tril()
    return recursive_coeff_mat @ product_terms_factored


def comfy_simple_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t, is_corrector_step=False):
    """sa_solver.py compute_simple_stochastic_adams_b_coeffs."""
    tau_mul = 1 + tau_t**2
    h = lambda_t - lambda_s
    alpha_t = sigma_next * lambda_t.exp()
    if is_corrector_step:
        b_1 = alpha_t * (0.5 * tau_mul * h)
        b_2 = alpha_t * (-h * tau_mul).expm1().neg() - b_1
    else:
        b_2 = alpha_t * (0.5 * tau_mul * h**2) / (curr_lambdas[-2] - lambda_s)
        b_1 = alpha_t * (-h * tau_mul).expm1().neg() - b_2
    return torch.stack([b_2, b_1])


def comfy_b_coeffs(
    sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t, simple_order_2=False, is_corrector_step=False
):
    """sa_solver.py compute_stochastic_adams_b_coeffs."""
    num_timesteps = curr_lambdas.shape[0]
    if simple_order_2 and num_timesteps == 2:
        return comfy_simple_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t, is_corrector_step)
    exp_integral_coeffs = comfy_exponential_coeffs(lambda_s, lambda_t, num_timesteps, tau_t)
    vandermonde_matrix_t = torch.vander(curr_lambdas, num_timesteps, increasing=True).T
    lagrange_integrals = torch.linalg.solve(vandermonde_matrix_t, exp_integral_coeffs)
    alpha_t = sigma_next * lambda_t.exp()
    return alpha_t * lagrange_integrals


def comfy_tau_interval_func(start_sigma: float, end_sigma: float, eta: float = 1.0) -> Any:
    """sa_solver.py get_tau_interval_func."""

    def tau_func(sigma):
        if eta <= 0:
            return 0.0
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.item()
        return eta if start_sigma >= sigma >= end_sigma else 0.0

    return tau_func


def comfy_sa_solver(
    model, x, sigmas, noise_sampler, tau_func=None, s_noise=1.0, predictor_order=3, corrector_order=4,
    use_pece=False, simple_order_2=False,
):  # fmt: skip
    """sampling.py sample_sa_solver (sample_sa_solver_pece: use_pece=True), after offset_first_sigma_for_snr
    (`_offset`); the model's percent_to_sigma is ComfyUI's ModelSamplingFlux's at shift 1.15."""
    if len(sigmas) <= 1:
        return x
    s_in = x.new_ones([x.shape[0]])
    lambdas = sigmas.logit().neg()  # sigma_to_half_log_snr on CONST
    if tau_func is None:
        start_sigma = _flux_percent_to_sigma(0.2)
        end_sigma = _flux_percent_to_sigma(0.8)
        tau_func = comfy_tau_interval_func(start_sigma, end_sigma, eta=1.0)
    max_used_order = max(predictor_order, corrector_order)
    x_pred = x
    h = 0.0
    tau_t = 0.0
    noise = 0.0
    pred_list = []
    lower_order_to_end = sigmas[-1].item() == 0
    for i in range(len(sigmas) - 1):
        denoised = model(x_pred, sigmas[i] * s_in)
        pred_list.append(denoised)
        pred_list = pred_list[-max_used_order:]
        predictor_order_used = min(predictor_order, len(pred_list))
        if i == 0 or (sigmas[i + 1] == 0 and not use_pece):
            corrector_order_used = 0
        else:
            corrector_order_used = min(corrector_order, len(pred_list))
        if lower_order_to_end:
            predictor_order_used = min(predictor_order_used, len(sigmas) - 2 - i)
            corrector_order_used = min(corrector_order_used, len(sigmas) - 1 - i)
        if corrector_order_used == 0:
            x = x_pred
        else:
            curr_lambdas = lambdas[i - corrector_order_used + 1 : i + 1]
            b_coeffs = comfy_b_coeffs(
                sigmas[i], curr_lambdas, lambdas[i - 1], lambdas[i], tau_t, simple_order_2,
                is_corrector_step=True,
            )  # fmt: skip
            pred_mat = torch.stack(pred_list[-corrector_order_used:], dim=1)
            corr_res = torch.tensordot(pred_mat, b_coeffs, dims=([1], [0]))
            x = sigmas[i] / sigmas[i - 1] * (-(tau_t**2) * h).exp() * x + corr_res
            if tau_t > 0 and s_noise > 0:
                x = x + noise
            if use_pece:
                denoised = model(x, sigmas[i] * s_in)
                pred_list[-1] = denoised
        if sigmas[i + 1] == 0:
            x_pred = denoised
        else:
            tau_t = tau_func(sigmas[i + 1])
            curr_lambdas = lambdas[i - predictor_order_used + 1 : i + 1]
            b_coeffs = comfy_b_coeffs(
                sigmas[i + 1], curr_lambdas, lambdas[i], lambdas[i + 1], tau_t, simple_order_2,
                is_corrector_step=False,
            )  # fmt: skip
            pred_mat = torch.stack(pred_list[-predictor_order_used:], dim=1)
            pred_res = torch.tensordot(pred_mat, b_coeffs, dims=([1], [0]))
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau_t**2) * h).exp() * x + pred_res
            if tau_t > 0 and s_noise > 0:
                noise = (
                    noise_sampler(sigmas[i], sigmas[i + 1])
                    * sigmas[i + 1]
                    * (-2 * tau_t**2 * h).expm1().neg().sqrt()
                    * s_noise
                )
                x_pred = x_pred + noise
    return x_pred


def _run_comfy(ts: Tensor, eps: list[Tensor], model_at_offset: bool = False, **kw: Any) -> Tensor:
    """ComfyUI's loop from `_start` on `ts`; its noise sampler's call in step i (it knows the step by the
    sigmas it is given) gets the draw pictor takes for it, noise(i)."""
    sigmas, offset = _offset(ts)
    model = _Model(toy_velocity, offset, None if model_at_offset else 1.0)

    def noise_sampler(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return eps[int((sigmas == sigma).nonzero()[0])]

    return comfy_sa_solver(model, _start(torch.float64), sigmas, noise_sampler, **kw)


# -------------------------------------------------------------------------------------------- parity

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "simple_order_2": {"simple_order_2": True, "predictor_order": 2, "corrector_order": 2},
    "orders_1_0": {"predictor_order": 1, "corrector_order": 0},
    "orders_6_6": {"predictor_order": 6, "corrector_order": 6},
    "s_noise_half": {"s_noise": 0.5},
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_matches_comfyuis_loop(name: str, steps: int, start: float) -> None:
    ts = S.schedule_flux(steps, 1024, start=start).double()
    eps = _draws(steps)
    theirs = _run_comfy(ts, eps, use_pece=name == "sa_solver_pece")
    ours = S.get_sampler(name)(toy_velocity, _start(torch.float64), ts, noise=lambda i: eps[i])
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_matches_comfyuis_loop_with_its_keywords(name: str, variant: str, start: float) -> None:
    kw = VARIANTS[variant]
    ts = S.schedule_flux(12, 1024, start=start).double()
    eps = _draws(12)
    theirs = _run_comfy(ts, eps, use_pece=name == "sa_solver_pece", **kw)
    ours = S.get_sampler(name)(toy_velocity, _start(torch.float64), ts, noise=lambda i: eps[i], **kw)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_matches_comfyuis_loop_with_another_tau_and_a_schedule_not_ending_at_0(eta: float) -> None:
    # a SamplerSASolver node's eta and interval (0.1 to 0.5), and a first pass that stops at t = 0.3
    comfy_tau = comfy_tau_interval_func(_flux_percent_to_sigma(0.1), _flux_percent_to_sigma(0.5), eta)
    ts = S.schedule_flux(10, 1024).double()[:8]
    eps = _draws(10)
    for use_pece in (False, True):
        theirs = _run_comfy(ts, eps, use_pece=use_pece, tau_func=comfy_tau)
        ours = S.sample_sa_solver(
            toy_velocity, _start(torch.float64), ts, noise=lambda i: eps[i], use_pece=use_pece,
            tau_func=sa_solver_tau(eta, 0.1, 0.5),
        )  # fmt: skip
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_from_t_one_close_to_comfyui_calling_the_model_below_one(name: str) -> None:
    # ComfyUI calls the model at its offset start 1 - 3.2e-5 too; pictor at the schedule's t = 1
    ts = S.schedule_flux(8, 1024).double()
    eps = _draws(8)
    theirs = _run_comfy(ts, eps, model_at_offset=True, use_pece=name == "sa_solver_pece")
    ours = S.get_sampler(name)(toy_velocity, _start(torch.float64), ts, noise=lambda i: eps[i])
    assert 0 < (ours - theirs).abs().max().item() < 1e-5


def test_weights_match_comfyuis_coefficient_functions() -> None:
    lams = [-2.1, -1.3, -0.4, 0.2]
    for order in range(1, 5):
        for tau in (0.0, 1.0, 0.6):
            for corrector in (False, True):
                for simple in (False, True):
                    at = lams[-order:]
                    ls, lt = (lams[-2], lams[-1]) if corrector else (lams[-1], 0.9)
                    t_next = 1 / (1 + math.exp(lt))
                    ours = adams_weights(t_next, at, ls, lt, tau, simple, corrector)
                    theirs = comfy_b_coeffs(
                        torch.tensor(t_next, dtype=torch.float64), torch.tensor(at, dtype=torch.float64),
                        torch.tensor(ls, dtype=torch.float64), torch.tensor(lt, dtype=torch.float64), tau,
                        simple, corrector,
                    )  # fmt: skip
                    torch.testing.assert_close(torch.from_numpy(ours), theirs, atol=1e-13, rtol=0)


def test_tau_interval_is_comfyuis_flux_percent_to_sigma() -> None:
    assert comfy_flux_percent_to_t(0.2) == pytest.approx(_flux_percent_to_sigma(0.2), abs=1e-15)
    assert comfy_flux_percent_to_t(0.8) == pytest.approx(_flux_percent_to_sigma(0.8), abs=1e-15)
    assert comfy_flux_percent_to_t(0.0) == 1.0 and comfy_flux_percent_to_t(1.0) == 0.0
    tau = sa_solver_tau()
    hi, lo = _flux_percent_to_sigma(0.2), _flux_percent_to_sigma(0.8)  # 0.927, 0.441
    assert 0.92 < hi < 0.93 and 0.44 < lo < 0.45
    assert [tau(t) for t in (0.95, hi, 0.7, lo, 0.4)] == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert sa_solver_tau(eta=0.0)(0.7) == 0.0 and sa_solver_tau(eta=2.0)(0.7) == 2.0


# -------------------------------------------------------------------------------- law and convergence


@pytest.mark.parametrize("name", NAMES)
def test_samples_the_data_law(name: str) -> None:
    """With the exact velocity of Gaussian data N(MU, SD^2) the images have the data's law."""
    z = torch.randn(20000, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    out = S.get_sampler(name)(
        gaussian_velocity, z, S.schedule_flux(30, 1024).double(),
        noise=lambda i: torch.randn(z.shape, generator=g, dtype=torch.float64),
    )  # fmt: skip
    assert abs(out.mean().item() - MU) < 0.06
    assert abs(out.std().item() / SD - 1.0) < 0.02


def _ode(name: str, ts: Tensor, **kw: Any) -> Tensor:
    return S.get_sampler(name)(
        toy_velocity, _start(torch.float64), ts, tau_func=lambda t: 0.0, s_noise=0.0, **kw
    )


def _orders(name: str, ref: Tensor, **kw: Any) -> list[float]:
    errs = [
        (_ode(name, torch.linspace(0.8, 0.1, n + 1, dtype=torch.float64), **kw) - ref).abs().max().item()
        for n in (16, 32, 64)
    ]
    return [math.log2(errs[i] / errs[i + 1]) for i in range(2)]


@pytest.mark.parametrize("name", NAMES)
def test_at_tau_0_it_converges_as_a_multistep_solver(name: str) -> None:
    """At tau 0 SA-Solver is a deterministic Adams method in lambda on D. On a schedule not ending at 0
    (full orders to the end) the error falls about 2^4 per halving with the corrector (measured 3.6, 3.8;
    PECE 3.7, 3.9); the predictor alone is held to order 2 by its first-order first step (an Euler step's
    O(h^2) error, which the corrector removes), and its orders 1 and 2 converge at 1 and 2."""
    ref = _ode("sa_solver", torch.linspace(0.8, 0.1, 4097, dtype=torch.float64))
    full = _orders(name, ref)
    assert all(3.4 < o < 4.5 for o in full), full
    for order, lo, hi in ((1, 0.9, 1.1), (2, 1.9, 2.3), (3, 2.0, 2.6)):
        got = _orders(name, ref, predictor_order=order, corrector_order=0)
        assert all(lo < o < hi for o in got), (order, got)
    sa = _ode(name, torch.linspace(0.8, 0.1, 17, dtype=torch.float64))
    euler = S.sample_euler(
        toy_velocity, _start(torch.float64), torch.linspace(0.8, 0.1, 17, dtype=torch.float64)
    )
    assert (sa - ref).abs().max() < (euler - ref).abs().max() / 20  # 1.6e-3 against 4.7e-2


def test_stays_put_on_a_zero_velocity_at_tau_0() -> None:
    x = _start(torch.float64)
    ts = S.schedule_flux(6, 256, start=0.8).double()[:5]
    out = S.sample_sa_solver(lambda x, t: torch.zeros_like(x), x, ts, tau_func=lambda t: 0.0, s_noise=0.0)
    torch.testing.assert_close(out, x, atol=1e-13, rtol=0)


# --------------------------------------------------------------------- calls, draws, callbacks, checks


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_calls_noise_draws_and_callbacks(name: str, start: float) -> None:
    x = _start(torch.float64)
    for steps in (1, 2, 5, 9):
        ts = S.schedule_flux(steps, 1024, start=start).double()
        called: list[float] = []

        def counted(x: Tensor, t: Tensor, called: list = called) -> Tensor:
            called.append(float(t[0]))
            return toy_velocity(x, t)

        drawn: list[int] = []

        def noise(i: int, drawn: list = drawn) -> Tensor:
            drawn.append(i)
            return torch.zeros_like(x)

        seen: list[dict] = []
        S.get_sampler(name)(counted, x.clone(), ts, seen.append, noise=noise)
        assert len(called) == S.model_evals(name, steps), (name, steps)
        tl = ts.tolist()
        assert [d["i"] for d in seen] == list(range(steps))
        assert [d["t"] for d in seen] == tl[:-1] and [d["t_next"] for d in seen] == tl[1:]
        tau = sa_solver_tau()
        assert drawn == [i for i in range(steps) if tl[i + 1] > 0 and tau(tl[i + 1]) > 0]
        if name == "sa_solver_pece":  # the second call of step i >= 1 is at the same t
            assert called[0] == tl[0] and called[1:] == [t for t in tl[1:-1] for _ in range(2)]
    assert S.is_stochastic(name) and not S.is_cfg_pp(name)
    with pytest.raises(ValueError, match=f"{name} draws fresh noise"):
        S.get_sampler(name)(toy_velocity, x, S.schedule_linear(3).double())


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"predictor_order": 0}, r"sa_solver's predictor_order must lie in 1 \.\. 6, got 0"),
        ({"corrector_order": 7}, r"sa_solver's corrector_order must lie in 0 \.\. 6, got 7"),
        ({"s_noise": -1.0}, r"sa_solver's s_noise must be a finite number >= 0, got -1.0"),
    ],
)
def test_bad_keywords_are_refused_by_name(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        S.sample_sa_solver(toy_velocity, _start(torch.float64), S.schedule_linear(3).double(),
                           noise=lambda i: torch.zeros(4, 6), **kwargs)  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_keeps_an_inpaintings_known_region(name: str, start: float) -> None:
    """The pipeline gives a stochastic sampler an edit's anchored velocity: the known region's data
    prediction is z0, and every SA-Solver step (weights summing to the flow path's) lands it at z0. With the
    blended velocity at tau 0 (deterministic), the region stays on its noising path at every model call,
    from t = 1 too, where the offset start alone would leave it 1e-4 off (`keep_known`)."""
    from pictor.edit_blending import anchored_velocity, blend_velocity
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

    ts = S.get_schedule("flux", 6, image_seq_len=8, start=start)
    x = interpolate(z0, noise, float(ts[0]))
    sampler = S.get_sampler(name)
    draws = torch.Generator().manual_seed(3)
    fresh = lambda i: torch.randn(z0.shape, generator=draws)  # noqa: E731
    out = sampler(anchored_velocity(model, z0, repaint), x, ts, noise=fresh)
    torch.testing.assert_close(out[:, :3], z0[:, :3], atol=2e-6, rtol=0)
    seen.clear()
    out = sampler(blend_velocity(model, z0, noise, repaint), x, ts, tau_func=lambda t: 0.0, s_noise=0.0)
    assert len(seen) == S.model_evals(name, 6)
    for x_call, t in seen:
        torch.testing.assert_close(x_call[:, :3], interpolate(z0, noise, t)[:, :3], atol=2e-6, rtol=0)
    torch.testing.assert_close(out[:, :3], z0[:, :3], atol=2e-6, rtol=0)
    assert (out[:, 3:] - z0[:, 3:]).abs().mean() > 0.1  # the rest was sampled
