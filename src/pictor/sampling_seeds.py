"""SEEDS (Gonzalez et al. 2023, "SEEDS: Exponential SDE solvers for fast high-quality sampling from
diffusion models") and the exponential Heun method on a flow model: ComfyUI's `seeds_2`, `seeds_3`,
`exp_heun_2_x0` and `exp_heun_2_x0_sde`, with its defaults.

All four are single-step exponential integrators in the half log-SNR lambda = log((1 - t) / t) on the data
prediction D = x - t v (ComfyUI's VP data-prediction form, which on its CONST model has alpha = 1 - t, as
the flow path here, so pictor runs ComfyUI's arithmetic unchanged). A step from t to t' > 0, h = lam' - lam,
with eta the SDE's share (0: the ODE) takes stages at lam + r h; stage k lands at

    x_k = (t_k / t) e^{-r_k h eta} x - (1 - t_k) [h phi terms at -r_k h (1 + eta)] (D, D_2, ...)
          + t_k s_noise z_k,

where h phi_1(h) = e^h - 1 and h phi_2(h) = (e^h - 1 - h) / h, and the noise z_k of a stage carries the
earlier stages' noise (scaled by e^{(r_{k-1} - r_k) h eta}) plus a fresh part, so that the step's noise is
one Brownian path's. The step to t' = 0 is the data prediction.

- `seeds_2`: r = 1/2, eta 1, the second stage phi_1 with D lerped halfway ("phi_1", ComfyUI's default; its
  "phi_2" weighs D and D_2 by phi_2). Two model calls a step, one on the step to 0.
- `seeds_3`: r = 1/3, 2/3, eta 1. Three model calls a step, one on the step to 0.
- `exp_heun_2_x0`: SEEDS-2 with r = 1, phi_2, eta 0: the exponential Heun method (a DPM-Solver-1 predictor
  to t', the trapezoid of D and D(t') in phi_2 weights). Deterministic; two calls a step.
- `exp_heun_2_x0_sde`: the same at eta 1: with r = 1 the second stage adds no fresh noise (its factor is
  e^0 - 1), so one draw a step.

From t = 1 (lambda = -inf) ComfyUI starts the arithmetic at its FLUX.1 model's time of percent 1e-4
(`offset_first_sigma_for_snr`), and so does pictor (`pictor.sampling_er_sde.FIRST_START`, and halfway to
the next time should a schedule step less than that from 1); as for ER-SDE, pictor calls the model at the
schedule's t = 1 where ComfyUI calls it at that start (3.2e-5 of v in the first data prediction).
ComfyUI draws each stage's noise from its default noise sampler, independent per call; pictor draws the same
law from the image's seed: noise(i), noise(n + i) and noise(2 n + i) for stages 1 to 3 of step i, n the
number of steps.

That start puts a point of a straight path at t = 1 a little off it at the next time (1e-4 of noise - data):
an edit's known region, which a deterministic sampler keeps on its noising path with the blended velocity
(`pictor.edit_blending`), is put back on it after every stage and step (`keep_known`, as ComfyUI's inpainting
puts it back before every model call); for any other velocity that is x itself.
"""

from __future__ import annotations

import math

from torch import Tensor

from pictor.flow import predict_x0
from pictor.sampling_er_sde import FIRST_START
from pictor.sampling_steps import (
    Callback,
    NoiseFn,
    VelocityFn,
    draw,
    half_log_snr,
    keep_known,
    report,
    require_noise,
    strictly_decreasing,
    t_batch,
    times,
)

__all__ = ["sample_exp_heun_2_x0", "sample_exp_heun_2_x0_sde", "sample_seeds_2", "sample_seeds_3"]


def _phi_1(h: float) -> float:
    """h phi_1(h) = e^h - 1."""
    return math.expm1(h)


def _phi_2(h: float) -> float:
    """h phi_2(h) = (e^h - 1 - h) / h."""
    return (math.expm1(h) - h) / h


def _t_of(lam: float) -> float:
    """The flow time of half log-SNR lam: t = 1 / (1 + e^lam)."""
    return 1.0 / (1.0 + math.exp(lam))


def _starts(ts_: list[float]) -> list[float]:
    """The times of the arithmetic: ts_ with ComfyUI's start below 1 (module docstring)."""
    starts = list(ts_)
    if len(ts_) > 1 and ts_[0] >= 1.0:
        starts[0] = FIRST_START if ts_[1] < FIRST_START else 0.5 * (1.0 + ts_[1])
    return starts


def _seeds(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None,
    noise: NoiseFn | None,
    name: str,
    rs: tuple[float, ...],
    eta: float,
    s_noise: float,
    phi_2_last: bool,
) -> Tensor:
    """SEEDS with stages at r in `rs` (one or two of them) and the last stage at r = 1; `phi_2_last`: the
    last stage weighs D and the last stage's prediction by phi_2 (else: phi_1 on D lerped by 1 / (2 r),
    SEEDS-2's "phi_1", used with one stage only)."""
    _check(name, rs, eta, s_noise)
    inject = eta > 0.0 and s_noise > 0.0
    if inject:
        noise = require_noise(noise, name)
    ts_ = times(ts)
    strictly_decreasing(ts_, name)
    starts = _starts(ts_)
    n = len(ts_) - 1
    for i in range(n):
        t, t_next = ts_[i], ts_[i + 1]
        d = predict_x0(x, model_fn(x, t_batch(t, x)), t)
        report(callback, i, x, t, t_next, d)
        if t_next == 0.0:
            x = d.to(x.dtype)
            continue
        s = starts[i]
        lam = half_log_snr(s)
        h = half_log_snr(t_next) - lam
        h_eta = h * (eta + 1.0)
        sde: Tensor | None = None  # the step's Brownian noise so far, in units of the landing time's t
        preds = [d]
        r_prev = 0.0
        for k, r in enumerate(rs):  # the intermediate stages
            t_k = _t_of(lam + r * h)
            if k == 0:
                x_k = (t_k / s * math.exp(-r * h * eta)) * x - ((1.0 - t_k) * _phi_1(-r * h_eta)) * d
            else:  # SEEDS-3's second stage: phi_2 on the first stage's prediction
                a2 = r / rs[0] * _phi_2(-r * h_eta)
                a1 = _phi_1(-r * h_eta) - a2
                x_k = (t_k / s * math.exp(-r * h * eta)) * x - (1.0 - t_k) * (a1 * d + a2 * preds[-1])
            if inject:
                sde = _carry(sde, noise, k * n + i, x, (r_prev - r) * h * eta)  # type: ignore[arg-type]
                x_k = x_k + (t_k * s_noise) * sde
            x_k = keep_known(model_fn, x_k.to(x.dtype), t_k)
            preds.append(predict_x0(x_k, model_fn(x_k, t_batch(t_k, x)), t_k))
            r_prev = r
        if phi_2_last:
            b2 = _phi_2(-h_eta) / rs[-1]
            b1 = _phi_1(-h_eta) - b2
            mix = b1 * d + b2 * preds[-1]
        else:
            mix = d + (preds[-1] - d) / (2.0 * rs[0])
            mix = _phi_1(-h_eta) * mix
        x_new = (t_next / s * math.exp(-h * eta)) * x - (1.0 - t_next) * mix
        if inject and rs[-1] != 1.0:  # at r = 1 the last segment is empty: no fresh noise
            sde = _carry(sde, noise, len(rs) * n + i, x, (r_prev - 1.0) * h * eta)  # type: ignore[arg-type]
        if inject and sde is not None:
            x_new = x_new + (t_next * s_noise) * sde
        x = keep_known(model_fn, x_new.to(x.dtype), t_next)
    return x


def _check(name: str, rs: tuple[float, ...], eta: float, s_noise: float) -> None:
    """ValueErrors for keywords outside what the arithmetic takes (ComfyUI's SEEDS node: r in [0.01, 1], eta
    and s_noise in [0, 100]; its loops check nothing: r = 0 divides by zero, r_1 > r_2 takes a square root
    of a negative number)."""
    for key, value in (("eta", eta), ("s_noise", s_noise)):
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{name}'s {key} must be a finite number >= 0, got {value}")
    if len(rs) == 1 and not 0.0 < rs[0] <= 1.0:
        raise ValueError(f"{name}'s r must lie in (0, 1], got {rs[0]}")
    if len(rs) == 2 and not 0.0 < rs[0] < rs[1] <= 1.0:
        raise ValueError(f"{name}'s stages need 0 < r_1 < r_2 <= 1, got r_1 {rs[0]}, r_2 {rs[1]}")


def _carry(sde: Tensor | None, noise: NoiseFn, index: int, x: Tensor, seg: float) -> Tensor:
    """The Brownian noise at the end of a segment of length -seg / eta in lambda: the earlier part decays by
    e^seg, and fresh noise of variance 1 - e^{2 seg} fills it up (ComfyUI's segment_factor; seg <= 0)."""
    fresh = math.sqrt(-math.expm1(2.0 * seg)) * draw(noise, index, x)
    return fresh if sde is None else sde * math.exp(seg) + fresh


def sample_seeds_2(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    solver_type: str = "phi_1",
) -> Tensor:
    """SEEDS-2 (module docstring; ComfyUI's `seeds_2`). Two model calls a step, one on the step to 0.

    noise(i) and noise(n + i) for every step i that does not end at 0 (eta, s_noise > 0); without `noise`
    this raises a ValueError, as do r outside (0, 1], a negative eta or s_noise and another solver_type.
    """
    return _seeds(model_fn, x, ts, callback, noise, "seeds_2", (r,), eta, s_noise, _phi_2_last(solver_type))


def _phi_2_last(solver_type: str) -> bool:
    """ComfyUI's SEEDS-2 solver_type: "phi_2" weighs D and D_2 by phi_2, "phi_1" lerps them (True, False)."""
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError(f"SEEDS-2's solver_type must be 'phi_1' or 'phi_2', got {solver_type!r}")
    return solver_type == "phi_2"


def sample_seeds_3(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r_1: float = 1.0 / 3.0,
    r_2: float = 2.0 / 3.0,
) -> Tensor:
    """SEEDS-3 (module docstring; ComfyUI's `seeds_3`). Three model calls a step, one on the step to 0.

    noise(i), noise(n + i) and noise(2 n + i) for every step i that does not end at 0 (eta, s_noise > 0);
    without `noise` this raises a ValueError, as do stages not 0 < r_1 < r_2 <= 1 and a negative eta or
    s_noise.
    """
    return _seeds(model_fn, x, ts, callback, noise, "seeds_3", (r_1, r_2), eta, s_noise, True)


def sample_exp_heun_2_x0(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    solver_type: str = "phi_2",
) -> Tensor:
    """The exponential Heun method on the data prediction (module docstring; ComfyUI's `exp_heun_2_x0`,
    its keyword `solver_type` too). Two model calls a step, one on the step to 0. Deterministic: `noise` is
    accepted and ignored."""
    del noise
    last = _phi_2_last(solver_type)
    return _seeds(model_fn, x, ts, callback, None, "exp_heun_2_x0", (1.0,), 0.0, 0.0, last)


def sample_exp_heun_2_x0_sde(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "phi_2",
) -> Tensor:
    """The exponential Heun method as an SDE (module docstring; ComfyUI's `exp_heun_2_x0_sde` with its
    keywords). Two model calls a step, one on the step to 0; noise(i) for every step i that does not end
    at 0."""
    last = _phi_2_last(solver_type)
    return _seeds(model_fn, x, ts, callback, noise, "exp_heun_2_x0_sde", (1.0,), eta, s_noise, last)
