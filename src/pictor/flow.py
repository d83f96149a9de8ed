"""The time convention of rectified flow, owned in one place.

- t lies in [0, 1]; t = 1 is pure noise, t = 0 is data.
- The forward path is the straight line x_t = (1 - t) * x0 + t * noise.
- The model predicts the velocity v = dx_t/dt = noise - x0, so sampling integrates from t = 1 down to t = 0.

Everything here is a pure function on tensors. Samplers (`pictor.sampling`) only step along v and use
`predict_x0` for previews; training uses `sample_t`, `interpolate` and `flow_loss`. Timesteps stay in [0, 1]
everywhere; only the model's timestep embedding rescales them.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
from torch import Tensor

TimeLike = Tensor | float

__all__ = [
    "add_noise_for_strength",
    "flow_loss",
    "interpolate",
    "predict_noise",
    "predict_x0",
    "resolution_mu",
    "sample_t",
    "shift_t",
    "time_shift",
    "velocity_target",
]


def _per_sample(t: TimeLike, like: Tensor) -> TimeLike:
    """Shape t for broadcasting against `like` [B, ...]: [B] -> [B, 1, ..., 1]; scalars pass through.

    t stays in its own (usually fp32) dtype so that t near 1 is not rounded away when x is bf16.
    """
    if isinstance(t, Tensor) and t.ndim == 1:
        if t.shape[0] != like.shape[0]:
            raise ValueError(f"t has {t.shape[0]} entries but the batch has {like.shape[0]}")
        return t.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))
    if isinstance(t, Tensor) and t.ndim != 0:
        raise ValueError(f"t must be a scalar or a 1-D tensor [B], got shape {tuple(t.shape)}")
    return t.to(like.device) if isinstance(t, Tensor) else t


def interpolate(x0: Tensor, noise: Tensor, t: TimeLike) -> Tensor:
    """x_t = (1 - t) * x0 + t * noise; t is [B] (or a scalar), broadcast over the other axes.

    This is also the img2img start point: `interpolate(x0, noise, strength)` is x0 noised to t = strength.
    """
    tb = _per_sample(t, x0)
    return ((1 - tb) * x0 + tb * noise).to(x0.dtype)


def add_noise_for_strength(x0: Tensor, noise: Tensor, strength: float) -> Tensor:
    """x0 noised to t = strength (img2img / inpainting start); strength 1 gives pure noise."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    return interpolate(x0, noise, strength)


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The regression target: d x_t / dt = noise - x0 (independent of t for straight paths)."""
    return noise - x0


def predict_x0(x_t: Tensor, v: Tensor, t: TimeLike) -> Tensor:
    """The data estimate implied by a velocity: x0 = x_t - t * v (exact at t = 1 too)."""
    tb = _per_sample(t, x_t)
    return (x_t - tb * v).to(x_t.dtype)


def predict_noise(x_t: Tensor, v: Tensor, t: TimeLike) -> Tensor:
    """The noise estimate implied by a velocity: noise = x_t + (1 - t) * v."""
    tb = _per_sample(t, x_t)
    return (x_t + (1 - tb) * v).to(x_t.dtype)


TimestepKind = Literal["logit_normal", "uniform", "shift", "flux_shift"]


def sample_t(
    batch: int,
    kind: TimestepKind = "logit_normal",
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    device: torch.device | str | None = None,
    shift: float = 1.0,
) -> Tensor:
    """Training timesteps, float32 [batch].

    "logit_normal" is sigmoid(N(mean, std)) as in SD3/FLUX training: it spends more samples on the middle
    of the path, where the velocity is hardest to predict. "uniform" is U[0, 1). "shift" and "flux_shift"
    are the logit-normal draw mapped by shift·t / (1 + (shift - 1)·t) (= `time_shift(log shift, 1, t)`),
    which moves every t toward noise for shift > 1: kohya's FLUX.1 `--timestep_sampling shift` with
    `--discrete_flow_shift shift`; for "flux_shift" the caller passes exp(resolution_mu(tokens)), the
    shift FLUX.1's sampling schedule uses at that image size. Draws happen on the generator's device (CPU
    if none) so a seeded generator gives the same t on every device; the result is then moved to `device`.
    """
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    draw_device = generator.device if generator is not None else torch.device("cpu")
    if kind in ("shift", "flux_shift"):
        t = time_shift(math.log(shift), 1.0, sample_t(batch, "logit_normal", generator, mean, std))
    elif kind == "logit_normal":
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        z = torch.randn(batch, generator=generator, device=draw_device, dtype=torch.float32)
        t = torch.sigmoid(z * std + mean)
    elif kind == "uniform":
        t = torch.rand(batch, generator=generator, device=draw_device, dtype=torch.float32)
    else:
        raise ValueError(
            f"unknown timestep distribution {kind!r}; known: 'logit_normal', 'uniform', 'shift', 'flux_shift'"
        )
    return t.to(device) if device is not None else t


def resolution_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX.1's shift parameter: linear in the number of image tokens, base_shift at base_seq_len and
    max_shift at max_seq_len (flux `sampling.get_lin_function`); extrapolates linearly outside that range.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


@overload
def time_shift(mu: float, sigma: float, t: float) -> float: ...
@overload
def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor: ...
def time_shift(mu: float, sigma: float, t: TimeLike) -> TimeLike:
    """FLUX.1's shift: exp(mu) / (exp(mu) + (1/t - 1)**sigma), mapping [0, 1] onto itself.

    Written as e^mu t^s / (e^mu t^s + (1 - t)^s), which is the same for t in (0, 1) and has no division by
    zero at the ends: 0 -> 0 and 1 -> 1 exactly. mu > 0 moves every t toward 1 (more steps at high noise).
    The inverse of time_shift(mu, sigma, .) is time_shift(-mu / sigma, 1 / sigma, .).
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if isinstance(t, Tensor):
        a = math.exp(mu) * t.clamp(0, 1) ** sigma
        return a / (a + (1 - t).clamp(0, 1) ** sigma)
    tc = min(max(float(t), 0.0), 1.0)
    a = math.exp(mu) * tc**sigma
    return a / (a + (1.0 - tc) ** sigma)


def shift_t(
    t: TimeLike,
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> TimeLike:
    """Apply FLUX.1's resolution-dependent shift (sigma = 1) to t."""
    mu = resolution_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    return time_shift(mu, 1.0, t)


LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential")


def huber_threshold(t: Tensor, c: float, schedule: str = "constant", scale: float = 1.0) -> Tensor:
    """kohya's Huber threshold per sample [B] at times t [B]: ``c * scale`` ("constant"), or ``scale * c**t``
    ("exponential": kohya's exp(-alpha * timestep) with alpha = -ln(c) / 1000 on FLUX.1's timesteps t *
    1000), so the loss is quadratic over a wide range of errors at t = 0 and narrows to c at pure noise.
    (kohya's "snr" schedule needs a DDPM scheduler's alphas and refuses FLUX.1; so does pictor.)"""
    if schedule == "constant":
        return torch.full_like(t, c * scale, dtype=torch.float32)
    if schedule == "exponential":
        return scale * torch.pow(torch.tensor(c, dtype=torch.float32, device=t.device), t.float())
    raise ValueError(f"unknown Huber schedule {schedule!r}; known: {', '.join(HUBER_SCHEDULES)}")


def flow_loss(
    pred_v: Tensor,
    x0: Tensor,
    noise: Tensor,
    reduction: Literal["mean", "sum", "none", "per_sample"] = "mean",
    loss_type: str = "l2",
    huber_c: Tensor | None = None,
) -> Tensor:
    """The error between the predicted velocity and noise - x0, computed in fp32 whatever the input dtype:
    squared ("l2", the flow loss), absolute ("l1"), or kohya's pseudo-Huber ``2 c (sqrt(d^2 + c^2) - c)``
    ("huber") and ``2 (sqrt(d^2 + c^2) - c)`` ("smooth_l1") with each sample's threshold c from `huber_c`
    [B] (`huber_threshold`): quadratic for errors well under c, linear past it.

    reduction: "mean" (scalar), "sum" (scalar), "none" (elementwise) or "per_sample" (mean over all but the
    batch axis, [B]; for loss weighting or logging loss against t).
    """
    target = velocity_target(x0.float(), noise.float())
    diff = pred_v.float() - target
    if loss_type == "l2":
        err = diff.square()
    elif loss_type == "l1":
        err = diff.abs()
    elif loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type!r} needs each sample's threshold huber_c [B]")
        c = huber_c.float().view(-1, *([1] * (diff.ndim - 1)))
        # sqrt(d^2 + c^2) - c, written as d^2 / (sqrt(d^2 + c^2) + c): the same number without float32's
        # cancellation for errors far under c (kohya's direct form loses most digits there)
        squared = diff.square()
        err = 2 * squared / (torch.sqrt(squared + c.square()) + c)
        if loss_type == "huber":
            err = c * err
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {', '.join(LOSS_TYPES)}")
    if reduction == "mean":
        return err.mean()
    if reduction == "sum":
        return err.sum()
    if reduction == "none":
        return err
    if reduction == "per_sample":
        return err.reshape(err.shape[0], -1).mean(dim=1)
    raise ValueError(f"unknown reduction {reduction!r}; known: 'mean', 'sum', 'none', 'per_sample'")
