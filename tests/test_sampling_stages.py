"""The deterministic k-diffusion samplers added for A1111 / ComfyUI users: LMS and gradient estimation
(pictor.sampling_adams), DPM2 and Heun++ (pictor.sampling_stages). Each is checked against diffusers where
diffusers has it (LMS, DPM2), against a float64 transcription of k-diffusion's loop written in its own
terms (denoised, d = (x - denoised) / sigma), and by its empirical convergence order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from pictor import sampling as S
from tests.test_sampling import _observed_order
from tests.test_sampling_unipc import _start, toy_velocity


def _denoiser(x: Tensor, t: float) -> Tensor:
    """k-diffusion's view of the flow model: denoised = x - sigma * v."""
    return x - t * toy_velocity(x, torch.full((x.shape[0],), t, dtype=torch.float64))


def _to_d(x: Tensor, t: float, denoised: Tensor) -> Tensor:
    return (x - denoised) / t


def _schedule(steps: int, start: float) -> list[float]:
    return S.schedule_flux(steps, 1024, start=start).double().tolist()


# ------------------------------------------------------------------------------------------------- LMS


def _lagrange_integral(nodes: list[float], j: int, a: float, b: float) -> float:
    """The integral over [a, b] of the Lagrange basis polynomial of nodes[j], exactly (numpy polynomials in
    u = tau - a, which keeps the power basis well conditioned)."""
    others = [n for k, n in enumerate(nodes) if k != j]
    poly = np.polynomial.Polynomial([1.0])
    for n in others:
        poly = poly * np.polynomial.Polynomial([a - n, 1.0]) / (nodes[j] - n)
    return float(poly.integ()(b - a))


def _reference_lms(x: Tensor, ts: list[float], order: int = 4) -> Tensor:
    ds: list[Tensor] = []  # oldest first
    for i in range(len(ts) - 1):
        denoised = _denoiser(x, ts[i])
        ds = [*ds, _to_d(x, ts[i], denoised)][-order:]
        if ts[i + 1] == 0:
            x = denoised
            continue
        cur = min(i + 1, order)
        nodes = [ts[i - k] for k in range(cur)]
        coeffs = [_lagrange_integral(nodes, j, ts[i], ts[i + 1]) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=False))
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 9, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_lms_is_k_diffusions_formula(steps: int, start: float) -> None:
    ts = _schedule(steps, start)
    expected = _reference_lms(_start(torch.float64), ts)
    ours = S.sample_lms(toy_velocity, _start(torch.float64), torch.tensor(ts, dtype=torch.float64))
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)  # measured: at most 4e-16
    if steps >= 3:  # the higher orders act, with weights of the actual times (iPNDM's are fixed)
        for other in ("euler", "ipndm"):
            alt = S.get_sampler(other)(toy_velocity, _start(torch.float64), torch.tensor(ts))
            assert (alt - expected).abs().max() > 1e-5


def _diffusers_lms(ts: Tensor) -> Tensor:
    """diffusers' LMSDiscreteScheduler (order 4) stepped over our times: it has no flow sigmas, but its
    step is an ODE solver in sigma on d = (x - x0) / sigma, and with prediction_type epsilon that d is the
    model output, so fed the velocity on sigmas = t it integrates dx/dt = v."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.LMSDiscreteScheduler(prediction_type="epsilon")
    sched.set_timesteps(len(ts) - 1)
    sched.sigmas = ts.double()
    sched.set_begin_index(0)
    x = _start(torch.float64)
    for i in range(len(ts) - 1):
        sched.scale_model_input(x, sched.timesteps[i])  # its input scaling; unused here (no model)
        v = toy_velocity(x, torch.full((x.shape[0],), float(ts[i]), dtype=torch.float64))
        x = sched.step(v, sched.timesteps[i], x).prev_sample
    return x


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("steps", [2, 4, 8, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_lms_matches_diffusers(steps: int, start: float) -> None:
    # Schedules ending at their last time before 0: on the step to 0 diffusers takes another LMS step where
    # k-diffusion (and pictor) take the data prediction, which test_lms_is_k_diffusions_formula covers.
    # diffusers integrates with scipy's quad (epsrel 1e-4, exact on these cubics in practice).
    ts = S.schedule_flux(steps + 1, 1024, start=start).double()[:-1]
    expected = _diffusers_lms(ts)
    ours = S.sample_lms(toy_velocity, _start(torch.float64), ts)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)  # measured: 4e-16


def test_lms_weights_integrate_polynomials_exactly() -> None:
    from pictor.sampling_adams import lms_weights

    nodes, t, t_next = [0.7, 0.8, 0.95, 1.0], 0.7, 0.55
    cubic = np.polynomial.Polynomial([0.3, -1.0, 2.0, 1.5])
    weights = lms_weights(nodes, t, t_next)
    exact = cubic.integ()(t_next) - cubic.integ()(t)
    assert sum(w * cubic(n) for w, n in zip(weights, nodes, strict=True)) == pytest.approx(exact, abs=1e-15)


# --------------------------------------------------------------------------------------- gradient estimation


def _reference_gradient_estimation(x: Tensor, ts: list[float], gamma: float = 2.0) -> Tensor:
    old_d = None
    for i in range(len(ts) - 1):
        denoised = _denoiser(x, ts[i])
        d = _to_d(x, ts[i], denoised)
        dt = ts[i + 1] - ts[i]
        if ts[i + 1] == 0:
            x = denoised
        else:
            x = x + d * dt
            if i >= 1:
                x = x + (gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 9, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_gradient_estimation_is_the_published_update(steps: int, start: float) -> None:
    ts = _schedule(steps, start)
    expected = _reference_gradient_estimation(_start(torch.float64), ts)
    ours = S.sample_gradient_estimation(toy_velocity, _start(torch.float64), torch.tensor(ts))
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)
    if steps >= 3:
        alt = S.sample_euler(toy_velocity, _start(torch.float64), torch.tensor(ts))
        assert (alt - expected).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------- DPM2


def _reference_dpm_2(x: Tensor, ts: list[float]) -> Tensor:
    for i in range(len(ts) - 1):
        sigma, sigma_next = ts[i], ts[i + 1]
        denoised = _denoiser(x, sigma)
        d = _to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            sigma_mid = math.exp(0.5 * (math.log(sigma) + math.log(sigma_next)))
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = _to_d(x_2, sigma_mid, _denoiser(x_2, sigma_mid))
            x = x + d_2 * (sigma_next - sigma)
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 9, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_dpm_2_is_k_diffusions_formula(steps: int, start: float) -> None:
    ts = _schedule(steps, start)
    expected = _reference_dpm_2(_start(torch.float64), ts)
    ours = S.sample_dpm_2(toy_velocity, _start(torch.float64), torch.tensor(ts))
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)
    if steps >= 2:
        alt = S.sample_heun(toy_velocity, _start(torch.float64), torch.tensor(ts))
        assert (alt - expected).abs().max() > 1e-4


def _diffusers_dpm_2(ts: Tensor) -> Tensor:
    """diffusers' KDPM2DiscreteScheduler over our times (its interleaved sigma tables built from them as its
    set_timesteps builds them), the velocity fed as its epsilon (see _diffusers_lms), and the model called
    at the time its table says (sigmas_interpol on the second call)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.KDPM2DiscreteScheduler(prediction_type="epsilon")
    steps = len(ts) - 1
    sched.set_timesteps(steps)
    sig = ts.double()
    interp = sig.log().lerp(sig.roll(1).log(), 0.5).exp()
    sched.sigmas = torch.cat([sig[:1], sig[1:].repeat_interleave(2), sig[-1:]])
    sched.sigmas_interpol = torch.cat([interp[:1], interp[1:].repeat_interleave(2), interp[-1:]])
    sched.set_begin_index(0)
    x = _start(torch.float64)
    for k in range(2 * steps):
        first = sched.state_in_first_order
        t = float(sched.sigmas[k] if first else sched.sigmas_interpol[k])
        v = toy_velocity(x, torch.full((x.shape[0],), t, dtype=torch.float64))
        x = sched.step(v, sched.timesteps[min(k, len(sched.timesteps) - 1)], x).prev_sample
    return x


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_dpm_2_matches_diffusers(steps: int, start: float) -> None:
    # Ending at the last time before 0: diffusers' step to 0 would call the model at its sigma_interpol 0.
    ts = S.schedule_flux(steps + 1, 1024, start=start).double()[:-1]
    expected = _diffusers_dpm_2(ts)
    ours = S.sample_dpm_2(toy_velocity, _start(torch.float64), ts)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------ Heun++


def _reference_heunpp2(x: Tensor, ts: list[float]) -> Tensor:
    s_end = ts[-1]
    for i in range(len(ts) - 1):
        denoised = _denoiser(x, ts[i])
        d = _to_d(x, ts[i], denoised)
        dt = ts[i + 1] - ts[i]
        if ts[i + 1] == s_end:
            x = x + d * dt
        elif ts[i + 2] == s_end:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, ts[i + 1], _denoiser(x_2, ts[i + 1]))
            w2 = ts[i + 1] / (2 * ts[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, ts[i + 1], _denoiser(x_2, ts[i + 1]))
            x_3 = x_2 + d_2 * (ts[i + 2] - ts[i + 1])
            d_3 = _to_d(x_3, ts[i + 2], _denoiser(x_3, ts[i + 2]))
            w2, w3 = ts[i + 1] / (3 * ts[0]), ts[i + 2] / (3 * ts[0])
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 9, 20])
@pytest.mark.parametrize("start", [1.0, 0.6])
def test_heunpp2_is_the_published_formula(steps: int, start: float) -> None:
    ts = _schedule(steps, start)
    expected = _reference_heunpp2(_start(torch.float64), ts)
    ours = S.sample_heunpp2(toy_velocity, _start(torch.float64), torch.tensor(ts))
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)
    if steps >= 3:
        alt = S.sample_heun(toy_velocity, _start(torch.float64), torch.tensor(ts))
        assert (alt - expected).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ convergence orders


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("lms", 1.8, 2.4), ("dpm_2", 1.7, 2.3), ("heunpp2", 0.5, 1.1), ("gradient_estimation", 0.8, 1.2)],
)
def test_observed_convergence_order(name: str, low: float, high: float) -> None:
    # Measured on the Gaussian flow, linear schedule, 16-128 steps: lms 2.09 (fourth-order steps, held at 2
    # by the Euler warm-up and the step to 0, as iPNDM), dpm_2 1.88, heunpp2 0.75, gradient_estimation 0.98.
    # Heun++ weighs the velocities at t, t' and t'' for a step that ends at t' (first order); gradient
    # estimation's 2 v - v_prev extrapolates to the step's end rather than integrating over it (first order).
    order = _observed_order(name, "linear")
    assert low < order < high, order
