"""iPNDM (Zhang & Chen 2022, "improved pseudo numerical methods"; ComfyUI's `ipndm`): Adams-Bashforth on the
velocity, up to fourth order, with one model call per step.

A linear multistep method: the step from t to t' is x' = x + (t' - t) * sum_j b_j v_{i-j} over the velocity
of this step and of up to three earlier ones, with the fixed-step Adams-Bashforth weights

    order 1: 1                      order 3: 23/12, -16/12, 5/12
    order 2: 3/2, -1/2              order 4: 55/24, -59/24, 37/24, -9/24

(newest first). The first steps warm up at the orders their history allows (Euler, then 2, then 3), and the
step to t' = 0 is the data prediction x - t v, which is Euler's step to 0. The weights are those of evenly
spaced steps and are used as they are on any schedule, as ComfyUI and the paper do (iPNDM_v, which reweights
for uneven steps, is another sampler). The weights of every order sum to 1, so a constant velocity (a
straight path to one data point) is followed exactly.

The Euler warm-up step's error, O(h^2), does not shrink with the number of later steps: in the limit the
global order is 2, while at the step counts people use the fourth-order steps dominate and iPNDM lands far
closer to the ODE's solution than Euler (tests/test_sampling_adams.py measures both).
"""

from __future__ import annotations

import itertools

from torch import Tensor

from pictor.flow import predict_x0
from pictor.sampling_steps import Callback, NoiseFn, VelocityFn, report, t_batch, times

__all__ = ["ADAMS_BASHFORTH", "MAX_ORDER", "sample_ipndm"]

MAX_ORDER = 4
# Adams-Bashforth weights by order, of the newest velocity first.
ADAMS_BASHFORTH: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def sample_ipndm(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """iPNDM, Adams-Bashforth up to order 4 on v (module docstring). Deterministic: `noise` is accepted for
    the common signature and ignored."""
    del noise
    history: list[Tensor] = []  # velocities of the earlier steps, newest first (at most MAX_ORDER - 1)
    for i, (t, t_next) in enumerate(itertools.pairwise(times(ts))):
        v = model_fn(x, t_batch(t, x))
        report(callback, i, x, t, t_next, predict_x0(x, v, t))
        weights = ADAMS_BASHFORTH[min(MAX_ORDER, 1 + len(history))]
        if t_next == 0.0:
            weights = ADAMS_BASHFORTH[1]  # the data prediction: x + (0 - t) v
        slope = weights[0] * v
        for w, v_old in zip(weights[1:], history, strict=False):
            slope = slope + w * v_old
        x = (x + (t_next - t) * slope).to(x.dtype)
        history = [v, *history[: MAX_ORDER - 2]]
    return x
