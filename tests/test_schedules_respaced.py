"""The "karras", "exponential" and "beta" schedules against diffusers' FlowMatchEulerDiscreteScheduler with
FLUX.1's config and use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas, and their img2img rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pictor import sampling as S
from pictor.flow import resolution_mu, time_shift
from pictor.sampling_schedules import _beta_ppf

RESPACED = ("karras", "exponential", "beta")


def _diffusers_sigmas(name: str, sigmas: np.ndarray, image_seq_len: int) -> torch.Tensor:
    """diffusers' sigmas (0 appended) for base `sigmas`, as FluxPipeline sets FLUX.1-dev's scheduler up."""
    diffusers = pytest.importorskip("diffusers")
    if name == "beta":
        pytest.importorskip("scipy")  # diffusers' beta sigmas need it; pictor's do not
    sched = diffusers.FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler_config.json
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        **{f"use_{name}_sigmas": True},
    )
    sched.set_timesteps(sigmas=sigmas, mu=resolution_mu(image_seq_len))
    return sched.sigmas


@pytest.mark.parametrize("name", RESPACED)
@pytest.mark.parametrize("steps", [1, 2, 4, 20, 50])
@pytest.mark.parametrize("seq", [64, 256, 1024, 4096, 6000])
def test_respaced_schedules_match_diffusers_flux(name: str, steps: int, seq: int) -> None:
    # FluxPipeline's sigmas: linspace(1, 1/N, N). Measured max |difference|: 6e-8 (one float32 ulp) for all
    # three; diffusers shifts in float32, pictor in float64.
    ref = _diffusers_sigmas(name, np.linspace(1.0, 1 / steps, steps), seq)
    ts = S.get_schedule(name, steps, image_seq_len=seq)
    assert ts.dtype == torch.float32 and ts.shape == (steps + 1,)
    torch.testing.assert_close(ts, ref, atol=1e-6, rtol=0)
    assert ts[0].item() == 1.0 and ts[-1].item() == 0.0
    assert bool((ts.diff() < 0).all())


@pytest.mark.parametrize("name", RESPACED)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 20])
@pytest.mark.parametrize("start", [0.9, 0.5, 0.05])
def test_respaced_img2img_is_diffusers_on_the_scaled_base(name: str, steps: int, start: float) -> None:
    # start < 1: the unshifted base linspace(1, 1/N, N) scaled onto [0, u_start], u_start shifting onto
    # start, so all N steps lie in [0, start], ts[0] == start, and diffusers agrees given that base.
    seq = 1024
    u_start = time_shift(-resolution_mu(seq), 1.0, start)
    ref = _diffusers_sigmas(name, np.linspace(u_start, u_start / steps, steps), seq)
    ts = S.get_schedule(name, steps, image_seq_len=seq, start=start)
    torch.testing.assert_close(ts, ref, atol=1e-6, rtol=0)
    assert ts.shape == (steps + 1,) and ts[0].item() == torch.tensor(start).item() and ts[-1].item() == 0.0
    assert bool((ts.diff() < 0).all())


@pytest.mark.parametrize("name", RESPACED)
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 300])
@pytest.mark.parametrize("seq", [1, 256, 4096, 16384])
@pytest.mark.parametrize("start", [1.0, 0.3, 1e-3])
def test_respaced_schedules_strictly_decrease_to_zero(name: str, steps: int, seq: int, start: float) -> None:
    ts = S.get_schedule(name, steps, image_seq_len=seq, start=start)
    assert ts.shape == (steps + 1,) and ts[0].item() == torch.tensor(start).item() and ts[-1].item() == 0.0
    assert bool((ts.diff() < 0).all())


def test_respaced_shapes_and_resolution_shift() -> None:
    steps, seq = 10, 1024
    lo = time_shift(resolution_mu(seq), 1.0, 1 / steps)  # diffusers' last sigma before 0, not pictor's 0
    karras, expo = S.schedule_karras(steps, seq).double(), S.schedule_exponential(steps, seq).double()
    for ts in (karras, expo, S.schedule_beta(steps, seq).double()):
        assert ts[-2].item() == pytest.approx(lo, abs=1e-7)
    root = karras[:-1] ** (1 / 7)  # evenly spaced in sigma^(1/7) and in log sigma
    torch.testing.assert_close(root.diff(), root.diff().mean().expand(steps - 1), atol=1e-6, rtol=0)
    logs = expo[:-1].log()
    torch.testing.assert_close(logs.diff(), logs.diff().mean().expand(steps - 1), atol=1e-6, rtol=0)
    beta = S.schedule_beta(20, seq).double()  # Beta(0.6, 0.6): short steps at both ends, long in the middle
    gaps = -beta[:-1].diff()
    assert gaps[0] < gaps[9] and gaps[-1] < gaps[9]
    for name in RESPACED:  # larger images: more of the steps at high noise
        small, large = S.get_schedule(name, steps, 256), S.get_schedule(name, steps, 4096)
        assert bool((large[1:-1] > small[1:-1]).all())


def test_beta_quantiles_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    ps = np.concatenate([np.linspace(0, 1, 1001), [1e-12, 1e-6, 1 - 1e-6]])
    for a, b in [(0.6, 0.6), (0.9, 2.0), (3.0, 0.7)]:
        mine = np.array([_beta_ppf(float(p), a, b) for p in ps])
        assert np.abs(mine - stats.beta.ppf(ps, a, b)).max() < 1e-12


def test_respaced_schedules_are_known_and_refuse_bad_input() -> None:
    assert set(RESPACED) <= set(S.SCHEDULES)
    for name in RESPACED:
        with pytest.raises(ValueError, match="steps"):
            S.get_schedule(name, 0, 256)
        with pytest.raises(ValueError, match="start"):
            S.get_schedule(name, 4, 256, start=1.5)
    assert math.isclose(S.schedule_karras(1, 256, start=0.4)[0].item(), 0.4, rel_tol=1e-7)
