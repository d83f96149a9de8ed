"""A test velocity for every sampler, the CFG++ ones too (`pictor.sampling_cfg_pp`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from pictor.sampling_steps import UNCOND


def own_uncond(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """`fn` as a velocity that is its own unconditional one (nothing to guide): a CFG++ sampler runs on it as
    its plain sampler, and the others ignore the attribute."""
    last: list[Tensor] = []

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        last[:] = [fn(x, t)]
        return last[0]

    setattr(velocity, UNCOND, lambda x, t: last[0])
    return velocity


def with_cfg(
    cond: Callable[[Tensor, Tensor], Tensor], uncond: Callable[[Tensor, Tensor], Tensor], scale: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """Classifier-free guidance of two velocities that gives its last call's unconditional one (UNCOND), as
    `pictor.guided_velocity` does."""
    last: list[Tensor] = []

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        v_c, v_u = cond(x, t), uncond(x, t)
        last[:] = [v_u]
        return v_u + scale * (v_c - v_u)

    setattr(velocity, UNCOND, lambda x, t: last[0])
    return velocity
