"""DEIS (pictor.sampling_deis) against diffusers' DEISMultistepScheduler with flow sigmas, and its limits."""

from __future__ import annotations

import pytest
import torch

from pictor import sampling as S
from pictor.sampling_deis import _basis_integral
from tests.test_sampling import MU, SD, _z, gaussian_velocity


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside diffusers
@pytest.mark.parametrize("start", [None, 0.6])  # None: diffusers' flow sigmas from just below 1; 0.6: img2img
@pytest.mark.parametrize("steps", [4, 8, 12, 15, 20])  # below 15: lower orders at the end, as diffusers does
def test_deis_matches_diffusers_multistep_scheduler(steps: int, start: float | None) -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DEISMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, solver_order=3
    )
    sched.set_timesteps(steps)
    # diffusers' flow sigmas end with a step of length 0 (the last sigma repeated), which would make its
    # "last step" a no-op; a real last step (to 0.02) keeps its lower-order ending where ours is.
    ts = torch.cat([sched.sigmas[:-1].double(), torch.tensor([0.02], dtype=torch.float64)])
    if start is not None:  # the same number of steps on an img2img range, evenly from `start`
        ts = torch.linspace(start, 0.02, steps + 1, dtype=torch.float64)
    sched.sigmas = ts  # float64 coefficients, so the two agree to rounding
    z = _z(4)
    x = z.clone()
    for i, timestep in enumerate(sched.timesteps):
        v = gaussian_velocity(x, torch.full((4,), float(ts[i]), dtype=torch.float64))
        x = sched.step(v, timestep, x).prev_sample
    ours = S.sample_deis(gaussian_velocity, z.clone(), ts)
    torch.testing.assert_close(ours, x, atol=1e-10, rtol=0)
    assert (S.sample_euler(gaussian_velocity, z.clone(), ts) - x).abs().max() > 1e-3


def test_basis_integrals_integrate_polynomials_in_log_rho_exactly() -> None:
    # The basis polynomials sum to one, and with weights p(node) they integrate any p of degree <= 2 in u.
    nodes, r0, r1 = [0.5, 0.9, 1.7], 0.6, 0.35
    weights = [_basis_integral(r0, r1, n, [m for m in nodes if m != n]) for n in nodes]
    assert sum(weights) == pytest.approx(r1 - r0, rel=1e-12)
    u = torch.linspace(torch.log(torch.tensor(r0)).item(), torch.log(torch.tensor(r1)).item(), 200_001)
    p = (u - 0.3) ** 2 + 0.5 * u
    numeric = torch.trapezoid(p * torch.exp(u), u.double()).item()
    exact = sum(w * ((torch.log(torch.tensor(n)) - 0.3) ** 2 + 0.5 * torch.log(torch.tensor(n))).item()
                for w, n in zip(weights, nodes, strict=True))  # fmt: skip
    assert exact == pytest.approx(numeric, rel=1e-6)


def test_deis_from_t_one_is_finite_and_beats_euler_tenfold() -> None:
    z = _z()
    exact = MU + SD * z
    ts = S.schedule_flux(32, 1024)  # starts at exactly t = 1 (rho infinite) and ends at 0
    err = (S.sample_deis(gaussian_velocity, z.clone(), ts) - exact).abs().max().item()
    euler = (S.sample_euler(gaussian_velocity, z.clone(), ts) - exact).abs().max().item()
    assert err < euler / 10, (err, euler)
