"""Guidance methods beyond plain classifier-free guidance: how one model call's conditional and unconditional
(negative prompt's) predictions make the velocity a sampler integrates, as diffusers' guiders
(`diffusers.guiders`, 0.42) make them.

- ``cfg``: classifier-free guidance, ``uncond + g (cond - uncond)`` (diffusers' `ClassifierFreeGuidance`).
- ``apg``: Adaptive Projected Guidance (Sadat et al. 2024; `AdaptiveProjectedGuidance`): the guidance
  direction ``cond - uncond``, optionally averaged over the run's calls with momentum and clipped to an L2
  norm (per image, over all its tokens and channels), is split into its part parallel to ``cond`` and the
  part orthogonal to it; the parallel part, which oversaturates at high scales, is scaled by ``eta``.
- ``cfg-zero-star``: CFG-Zero* (Fan et al. 2025; `ClassifierFreeZeroStarGuidance`): the unconditional
  prediction is first scaled by the per-image factor ``<cond, uncond> / |uncond|^2`` that makes it closest
  to the conditional one, and the first ``zero_init_steps`` steps predict zero velocity (the sample stays
  where it is).
- ``tcfg``: Tangential CFG (Kwon et al. 2025; `TangentialClassifierFreeGuidance`): the unconditional
  prediction is projected on the first right singular vector of the image's [cond; uncond] pair.

For every method, two settings of diffusers' base guider: ``rescale`` (``guidance_rescale``, Lin et al.
2023's CFG rescale: the guided prediction's std per image is pulled toward the conditional one's by that
share) and the interval ``start``-``stop``: guidance runs on the steps ``int(start N) <= i < int(stop N)``
of an N-step sampler run, and elsewhere the prediction is the conditional one, for which pictor runs no
negative pass at all (the saving). A step counts from 0 in its own sampler run (a hires fix's second pass
counts its own steps); a second-order sampler's calls of one step are one step (`StepClock`).

`GuidanceMethod` is the validated setting (a frozen dataclass; `GuidanceMethod()` is plain CFG, which the
pipeline runs by `pictor.composable_prompts.compose` exactly as without one); `Guider` is one sampler run's
combiner, with the run's momentum. Each formula is diffusers' own, in the same precision (APG's projection
in float64, CFG-Zero*'s scale and TCFG's SVD in float32), and tests/test_guidance_methods.py drives
diffusers' guiders over whole runs beside these. One difference: CFG-Zero*'s zeroed steps with a rescale are
zero here, where diffusers' rescale divides 0 by 0 and gives NaN.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "APG_FIELDS",
    "METHODS",
    "ZERO_STAR_FIELDS",
    "GuidanceMethod",
    "GuidanceMethodError",
    "Guider",
    "StepClock",
    "guidance_method_problem",
    "rescale_noise_cfg",
    "resolve_guidance_method",
]

METHODS = ("cfg", "apg", "cfg-zero-star", "tcfg")
APG_FIELDS = ("eta", "norm_threshold", "momentum")
ZERO_STAR_FIELDS = ("zero_init_steps",)
MAX_NORM_THRESHOLD = 1e6
MAX_ZERO_INIT_STEPS = 1000


class GuidanceMethodError(ValueError):
    """A guidance method's parameter out of its range; `field` names it (a `GuidanceMethod` field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


_LABELS = {
    "rescale": "guidance rescale (rescale)",
    "start": "guidance interval start (start)",
    "stop": "guidance interval stop (stop)",
    "eta": "APG eta (eta)",
    "norm_threshold": "APG norm threshold (norm_threshold)",
    "momentum": "APG momentum (momentum)",
    "zero_init_steps": "CFG-Zero* zero init steps (zero_init_steps)",
}


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class GuidanceMethod:
    """A guidance method and its parameters (module docstring); the defaults are plain CFG."""

    method: str = "cfg"  # one of METHODS
    rescale: float = 0.0  # CFG rescale (diffusers' guidance_rescale), 0 (off) to 1
    start: float = 0.0  # guidance from this share of the steps (0 <= start < 1) ...
    stop: float = 1.0  # ... to this one (start < stop <= 1); the conditional prediction elsewhere
    eta: float = 0.0  # APG: how much of the direction parallel to the prediction stays, 0 to 1
    norm_threshold: float = 15.0  # APG: the direction's L2 norm per image is clipped to this; 0: off
    momentum: float = 0.0  # APG: running average of the direction over a run's calls, -1 < m < 1; 0: off
    zero_init_steps: int = 1  # CFG-Zero*: the first steps that predict zero velocity

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise GuidanceMethodError(
                "method", f"guidance method must be one of {', '.join(METHODS)}, got {self.method!r}"
            )
        checks = (
            ("rescale", 0.0 <= self.rescale <= 1.0 if _real(self.rescale) else False, "between 0 and 1"),
            ("start", 0.0 <= self.start < 1.0 if _real(self.start) else False, "at least 0 and below 1"),
            ("stop", 0.0 < self.stop <= 1.0 if _real(self.stop) else False, "above 0 and at most 1"),
            ("eta", 0.0 <= self.eta <= 1.0 if _real(self.eta) else False, "between 0 and 1"),
            (
                "norm_threshold",
                0.0 <= self.norm_threshold <= MAX_NORM_THRESHOLD if _real(self.norm_threshold) else False,
                f"between 0 (off) and {MAX_NORM_THRESHOLD:g}",
            ),
            (
                "momentum",
                -1.0 < self.momentum < 1.0 if _real(self.momentum) else False,
                "above -1 and below 1",
            ),
        )
        for name, ok, allowed in checks:
            value = getattr(self, name)
            if not ok:
                raise GuidanceMethodError(name, f"{_LABELS[name]} must be a number {allowed}, got {value!r}")
            object.__setattr__(self, name, float(value))  # (an int from JSON records as a float)
        steps = self.zero_init_steps
        whole = isinstance(steps, numbers.Integral) and not isinstance(steps, bool)
        if not whole or not 0 <= steps <= MAX_ZERO_INIT_STEPS:
            raise GuidanceMethodError(
                "zero_init_steps",
                f"{_LABELS['zero_init_steps']} must be a whole number from 0 to {MAX_ZERO_INIT_STEPS}, got "
                f"{steps!r}",
            )
        object.__setattr__(self, "zero_init_steps", int(steps))
        if self.start >= self.stop:
            raise GuidanceMethodError(
                "start",
                f"guidance interval start {self.start:g} must be below its stop {self.stop:g} (an empty "
                "interval never guides: use guidance 1 for that)",
            )

    def normalized(self) -> GuidanceMethod:
        """The same method with the parameters of other methods at their defaults (they do nothing)."""
        default = GuidanceMethod()
        reset = {name: getattr(default, name) for name in self.unused()}
        return replace(self, **reset) if reset else self

    def unused(self) -> tuple[str, ...]:
        """Parameters that this method does not read."""
        return (() if self.method == "apg" else APG_FIELDS) + (
            () if self.method == "cfg-zero-star" else ZERO_STAR_FIELDS
        )

    @property
    def is_default(self) -> bool:
        """Plain CFG over every step: what the pipeline does without a method."""
        return self.normalized() == GuidanceMethod()

    def record(self) -> dict[str, Any]:
        """A record's ``guidance_method``: the method and every parameter it reads, spelled out."""
        skip = set(self.unused())
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    @classmethod
    def from_record(cls, value: Any) -> GuidanceMethod:
        """A record's ``guidance_method`` (`record`) read back; ValueError names what is wrong."""
        if not isinstance(value, dict) or not isinstance(value.get("method"), str):
            raise ValueError("guidance_method must be an object with a method name")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"guidance_method has unknown fields: {', '.join(unknown)}")
        return cls(**value)

    def guided_steps(self, steps: int) -> range:
        """The guided steps (from 0) of an N-step run: diffusers' ``int(start N) <= i < int(stop N)``."""
        return range(int(self.start * steps), int(self.stop * steps))


def guidance_method_problem(
    method: GuidanceMethod | None, guidance_mode: str, guidance: float | None, passes: dict[str, int]
) -> str | None:
    """What stops a method from running on a model and request (None: nothing). `passes`: each sampler
    run's name and step count (the request's, a hires fix's second pass)."""
    if method is None or method.is_default:
        return None
    if guidance_mode != "cfg":
        kind = (
            "guidance-distilled (guidance is an input of the model)"
            if guidance_mode == "distilled"
            else "unguided"
        )
        return (
            f"guidance method {method.method} (and guidance rescale or interval) acts on classifier-free "
            f"guidance's two predictions, and this model is {kind}: it runs no negative pass to combine; "
            "drop the guidance method"
        )
    if guidance is not None and guidance == 1.0:
        return (
            f"guidance method {method.method} (and guidance rescale or interval) acts through "
            "classifier-free guidance, which is off at guidance 1: raise the guidance (e.g. 4) or drop the "
            "guidance method"
        )
    m = method.normalized()
    for name, steps in passes.items():
        if not m.guided_steps(steps):
            return (
                f"guidance interval {m.start:g}-{m.stop:g} holds none of the {steps} steps of {name} (steps "
                f"int({m.start:g} x {steps}) to int({m.stop:g} x {steps}) - 1): widen it, or use guidance 1"
            )
        if m.method == "cfg-zero-star" and m.zero_init_steps >= steps:
            return (
                f"zero init steps {m.zero_init_steps} would zero every one of the {steps} steps of {name}, "
                "leaving the noise as it is: use fewer (CFG-Zero*'s authors suggest about 4% of the steps)"
            )
    return None


def resolve_guidance_method(
    method: Any, guidance_mode: str, guidance: float | None, passes: dict[str, int]
) -> GuidanceMethod | None:
    """A request's method checked against its model and runs (`guidance_method_problem`; ValueError says
    what to change): None for plain CFG (so its records are those of a request without one), else the
    method with other methods' parameters at their defaults."""
    if method is None:
        return None
    if not isinstance(method, GuidanceMethod):
        raise ValueError(f"guidance method must be a GuidanceMethod, got {type(method).__name__}")
    if method.is_default:
        return None
    problem = guidance_method_problem(method, guidance_mode, guidance, passes)
    if problem:
        raise ValueError(problem)
    return method.normalized()


def cfg_pp_problem(sampler: str, guidance_mode: str, method: GuidanceMethod | None) -> str | None:
    """Why CFG++ sampler `sampler` (`pictor.sampling.is_cfg_pp`) would find no unconditional prediction in
    a run of this model and method (None: it finds one). It steps with the guided prediction and renoises
    with the negative pass's, so a model without that pass, or steps outside a guidance interval, leave it
    nothing to renoise with."""
    why = None
    if guidance_mode != "cfg":
        distilled = guidance_mode == "distilled"
        kind = "guidance-distilled (guidance is an input of the model)" if distilled else "unguided"
        why = f"this model is {kind} and runs no negative pass: use the sampler without _cfg_pp"
    elif method is not None and (method.start > 0.0 or method.stop < 1.0):
        why = (
            f"the guidance interval {method.start:g}-{method.stop:g} runs no negative pass outside it: drop "
            "the interval (start 0, stop 1) or use the sampler without _cfg_pp"
        )
    if why is None:
        return None
    return (
        f"sampler {sampler} is a CFG++ sampler: it steps with the guided prediction and renoises with the "
        f"unconditional (negative prompt's) one, but {why}"
    )


def rescale_noise_cfg(guided: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """Lin et al.'s CFG rescale (diffusers' `rescale_noise_cfg`): the guided prediction's std per image pulled
    toward the conditional one's by `rescale`."""
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1 - rescale) * guided


class StepClock:
    """Which step of a sampler run ``ts`` (length steps + 1) each model call belongs to, for a sampler of
    at most `calls_per_step` calls a step (`pictor.sampling.MODEL_EVALS_PER_STEP`). Every step's first call
    is at its own time (`step_of_time`'s rule: the nearest step time); the calls after it belong to it while
    their times go down and the step has calls left, so Heun's corrector at t_{i+1}, a midpoint's call (DPM2,
    DPM++ SDE) and Heun++'s call at t_{i+2} belong to step i. A call at the same time as the one before it
    is the next step's first where that time is the next step's (Heun++'s last steps), else this step's (a
    midpoint at t_i, as DPM++ SDE's first step has)."""

    def __init__(self, ts: Tensor, calls_per_step: int = 1) -> None:
        self.ts = ts.detach().double().cpu()
        self.per = max(1, int(calls_per_step))
        self.step = -1
        self.calls = 0
        self.last = math.inf

    def __call__(self, t: float) -> int:
        ts, s = self.ts, self.step
        tol = 1e-6
        same = abs(t - self.last) <= tol
        if 0 <= s < len(ts) - 1 and self.calls < self.per and t < self.last + tol:
            at_next = abs(t - float(ts[s + 1])) <= tol
            if not (same and at_next):
                self.calls += 1
                self.last = t
                return s
        self.step = int(torch.argmin((ts - t).abs()).item())
        self.calls = 1
        self.last = t
        return self.step


class Guider:
    """One sampler run's combiner of conditional and unconditional predictions ``[B, ...]`` (per image over
    all non-batch dims), with the run's APG momentum. `steps`: the run's steps, for the interval."""

    def __init__(self, method: GuidanceMethod, scale: float, steps: int) -> None:
        self.method = method.normalized()
        self.scale = float(scale)
        self.guided = self.method.guided_steps(steps)
        self.running: Tensor | None = None  # APG's momentum buffer (diffusers' MomentumBuffer)

    def zeroed(self, step: int) -> bool:
        """CFG-Zero*'s zero-init steps: the prediction is zero whatever the model says."""
        return self.method.method == "cfg-zero-star" and step < self.method.zero_init_steps

    def guides(self, step: int) -> bool:
        """Whether this step combines two predictions (else it needs the conditional one only)."""
        return step in self.guided

    def __call__(self, step: int, cond: Tensor, uncond: Tensor | None) -> Tensor:
        """The prediction at `step` (diffusers' guider `forward`); `uncond` is needed where `guides`."""
        m = self.method
        if self.zeroed(step):
            return torch.zeros_like(cond)
        if not self.guides(step):
            pred = cond
        else:
            assert uncond is not None
            pred = self._guided(cond, uncond)
        if m.rescale > 0.0:
            pred = rescale_noise_cfg(pred, cond, m.rescale)
        return pred

    def _guided(self, cond: Tensor, uncond: Tensor) -> Tensor:
        g, name = self.scale, self.method.method
        if name == "cfg":
            return uncond + g * (cond - uncond)
        if name == "apg":
            return uncond + g * self._apg_direction(cond, uncond)
        if name == "cfg-zero-star":
            flat_c, flat_u = cond.flatten(1).float(), uncond.flatten(1).float()
            alpha = (flat_c * flat_u).sum(1, keepdim=True) / ((flat_u**2).sum(1, keepdim=True) + 1e-8)
            uncond = uncond * alpha.to(cond.dtype).view(-1, *(1,) * (cond.ndim - 1))
            return uncond + g * (cond - uncond)
        # tcfg: uncond projected on the first right singular vector of [cond; uncond]
        pair = torch.stack([cond, uncond], dim=1).float().flatten(2)  # [B, 2, D]
        _, _, vh = torch.linalg.svd(pair, full_matrices=False)
        kept = vh.clone()
        kept[:, 1] = 0
        flat_u = uncond.reshape(uncond.shape[0], 1, -1).float()
        uncond = (flat_u @ vh.transpose(-2, -1) @ kept).reshape(uncond.shape).to(cond.dtype)
        return uncond + g * (cond - uncond)

    def _apg_direction(self, cond: Tensor, uncond: Tensor) -> Tensor:
        m = self.method
        diff = cond - uncond
        dims = list(range(1, diff.ndim))
        if m.momentum:
            self.running = diff + m.momentum * self.running if self.running is not None else diff
            diff = self.running
        if m.norm_threshold > 0:
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * torch.minimum(torch.ones_like(diff), m.norm_threshold / norm)
        v0, v1 = diff.double(), torch.nn.functional.normalize(cond.double(), dim=dims)
        parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
        orthogonal = (v0 - parallel).to(diff.dtype)
        return orthogonal + m.eta * parallel.to(diff.dtype)
