"""What every sampler shares: the signature's types and the small steps of reading a schedule.

`pictor.sampling` (the registry, the one-step samplers, schedules, CFG) and the modules of the other
samplers (`pictor.sampling_multistep`, `sampling_deis`, `sampling_sde`, `sampling_adams`, `sampling_lcm`,
`sampling_res`, `sampling_er_sde`) all build on this; it imports nothing of pictor's but `pictor.flow`, so
none of them imports another's internals.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from pictor.flow import predict_x0

VelocityFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]
# NoiseFn(i) -> fresh standard normal noise shaped like x for step i (k-diffusion's `noise_sampler`).
# Taking the step index, not the times, lets the caller make it a pure function of (seed, i): the same
# image gets the same noise at any batch size and on any device (see `Pipeline.step_noise`).
NoiseFn = Callable[[int], Tensor]


class SamplerFn(Protocol):
    """sample_xxx(model_fn, x, ts, callback=None, *, noise=None) -> x at ts[-1]."""

    def __call__(
        self,
        model_fn: VelocityFn,
        x: Tensor,
        ts: Tensor,
        callback: Callback | None = None,
        *,
        noise: NoiseFn | None = None,
    ) -> Tensor: ...


def times(ts: Tensor) -> list[float]:
    """The schedule as Python floats: step sizes are then exact in float64 and no device sync per step."""
    if ts.ndim != 1 or ts.numel() < 1:
        raise ValueError(f"ts must be a non-empty 1-D tensor, got shape {tuple(ts.shape)}")
    return [float(t) for t in ts.tolist()]


def strictly_decreasing(ts: list[float], sampler: str) -> None:
    """Samplers whose coefficients divide by a step's length (in log-SNR or in t) need every step > 0."""
    for t, t_next in itertools.pairwise(ts):
        if not t > t_next:
            raise ValueError(f"{sampler} needs strictly decreasing times, got {t} followed by {t_next}")
    if ts and not (ts[-1] >= 0.0 and ts[0] <= 1.0):
        raise ValueError(f"{sampler} needs times in [0, 1], got {ts[0]} .. {ts[-1]}")


def half_log_snr(t: float) -> float:
    """lambda = log(alpha / sigma) of the flow path (alpha = 1 - t, sigma = t); -inf at t = 1, +inf at 0."""
    if t <= 0.0:
        return math.inf
    if t >= 1.0:
        return -math.inf
    return math.log1p(-t) - math.log(t)


def require_noise(noise: NoiseFn | None, sampler: str) -> NoiseFn:
    """A stochastic sampler's `noise`, or a ValueError that says how to give one (never the global RNG)."""
    if noise is None:
        raise ValueError(
            f"{sampler} draws fresh noise every step: pass noise=fn, where fn(i) returns standard "
            "normal noise shaped like x for step i (Pipeline derives it from each image's seed; for a "
            "one-off run, noise=lambda i: torch.randn_like(x))"
        )
    return noise


def draw(noise: NoiseFn, i: int, x: Tensor) -> Tensor:
    """noise(i), checked against x's shape and moved to x's device and dtype."""
    eps = noise(i)
    if eps.shape != x.shape:
        raise ValueError(f"noise({i}) has shape {tuple(eps.shape)}, but x has {tuple(x.shape)}")
    return eps.to(x.device, x.dtype)


def t_batch(t: float, x: Tensor) -> Tensor:
    """t as a [B] tensor for the model: at least float32, never the (possibly bf16) dtype of x."""
    return torch.full((x.shape[0],), t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


# The attribute of an edit's velocity (`pictor.edit_blending.blend_velocity`) that puts its known region back
# on the noising path: (x, t) -> x. A sampler that does not map that path onto itself (iPNDM_v, whose
# weights sum to 1 only on even steps) calls it after each step through `keep_known`.
KEEP_KNOWN = "keep_known"


def keep_known(model_fn: VelocityFn, x: Tensor, t: float) -> Tensor:
    """x at time t with an edit's known region back on its noising path, where `model_fn` is an edit's
    blended velocity; x itself for any other velocity (a plain generation)."""
    keep: Callable[[Tensor, float], Tensor] | None = getattr(model_fn, KEEP_KNOWN, None)
    return x if keep is None else keep(x, t)


# The attribute of a guided velocity (`pictor.guided_velocity`) that gives its last call's unconditional
# (negative prompt's) velocity: (x, t) -> v_uncond, called right after the velocity at the same (x, t). The
# CFG++ samplers (`pictor.sampling_cfg_pp`) step with the guided prediction and renoise with this one. A
# wrapper of a velocity (an edit's blending) wraps this the same way (`pictor.pipeline.Pipeline.sample`).
UNCOND = "uncond"


def uncond_velocity(model_fn: VelocityFn, x: Tensor, t: Tensor, sampler: str) -> Tensor:
    """The unconditional velocity of `model_fn`'s last call, at (x, t); a ValueError naming `sampler` where
    the velocity has none (a guidance-distilled or unguided model, a plain callable)."""
    uncond: VelocityFn | None = getattr(model_fn, UNCOND, None)
    if uncond is None:
        raise ValueError(
            f"{sampler} is a CFG++ sampler: it steps with the guided prediction and renoises with the "
            "unconditional (negative prompt's) one, and this velocity gives no unconditional prediction "
            "(a guidance-distilled or unguided model runs no negative pass); use a model with "
            f"classifier-free guidance, or the sampler without _cfg_pp (give model_fn an {UNCOND!r} "
            "attribute, (x, t) -> the last call's unconditional velocity, to call it directly)"
        )
    return uncond(x, t)


def with_uncond(
    wrapped: VelocityFn, inner: VelocityFn, wrap: Callable[[VelocityFn], VelocityFn]
) -> VelocityFn:
    """`wrapped` (a wrapper of `inner`, such as an edit's blending) given `inner`'s unconditional velocity
    wrapped by the same `wrap`, so that a CFG++ sampler sees both predictions treated alike."""
    uncond: VelocityFn | None = getattr(inner, UNCOND, None)
    if uncond is None or wrapped is inner:
        return wrapped
    setattr(wrapped, UNCOND, wrap(uncond))
    return wrapped


def report(callback: Callback | None, i: int, x: Tensor, t: float, t_next: float, denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "t": t, "t_next": t_next, "denoised": denoised})


def report_v(callback: Callback | None, i: int, x: Tensor, t: float, t_next: float, v: Tensor) -> None:
    """`report` with the data prediction computed from v only when someone listens."""
    if callback is not None:
        report(callback, i, x, t, t_next, predict_x0(x, v, t))
