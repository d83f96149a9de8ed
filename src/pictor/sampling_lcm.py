"""LCM's multistep sampling on the flow path: diffusers' FlowMatchLCMScheduler, ComfyUI's `lcm` for a flow
model.

Each step predicts the data, D = x - t v, and puts it back on the noising path at the next time with fresh
noise: x' = (1 - t') D + t' eps. Nothing of x's own noise is kept (where DPM-Solver++(2M) SDE keeps a share
e^{-2h} of it), so every step is a fresh start from the model's current prediction: what a consistency-
distilled model (LCM and similar few-step LoRAs) expects. For a model that predicts the mean of the data
given x_t, as a flow model does, it averages: on Gaussian data it ends with 70% of the data's spread
(tests/test_sampling_sde.py). The step to t' = 0 is D itself and draws nothing.
"""

from __future__ import annotations

import itertools

from torch import Tensor

from pictor.flow import predict_x0
from pictor.sampling_steps import (
    Callback,
    NoiseFn,
    VelocityFn,
    draw,
    report,
    require_noise,
    strictly_decreasing,
    t_batch,
    times,
)

__all__ = ["sample_lcm"]


def sample_lcm(
    model_fn: VelocityFn,
    x: Tensor,
    ts: Tensor,
    callback: Callback | None = None,
    *,
    noise: NoiseFn | None = None,
) -> Tensor:
    """LCM: data prediction, then renoise to the next time (module docstring). One model call per step.

    noise(i) is called once for every step i that does not end at 0; without it this raises a ValueError.
    """
    noise = require_noise(noise, "lcm")
    ts_ = times(ts)
    strictly_decreasing(ts_, "lcm")
    for i, (t, t_next) in enumerate(itertools.pairwise(ts_)):
        v = model_fn(x, t_batch(t, x))
        d = predict_x0(x, v, t)
        report(callback, i, x, t, t_next, d)
        if t_next == 0.0:
            x = d.to(x.dtype)
            continue
        x = ((1.0 - t_next) * d + t_next * draw(noise, i, x)).to(x.dtype)
    return x
