"""SA-Solver's step coefficients (Xue et al. 2023, "SA-Solver: Stochastic Adams solver for fast sampling of
diffusion models"; ComfyUI's comfy/k_diffusion/sa_solver.py), in float64 on the host.

A stochastic Adams step from lambda_s to lambda_t (the half log-SNR) with noise strength tau integrates the
data prediction D, interpolated by the Lagrange polynomial through the last K steps' (lambda_k, D_k), against
e^{(1 + tau^2)(lambda - lambda_t)}: the step's weight of D_k is

    b_k = alpha_t (1 + tau^2) integral_{lambda_s}^{lambda_t} e^{(1 + tau^2)(u - lambda_t)} l_k(u) du,

alpha_t = 1 - t on a flow model. ComfyUI (and the paper's code) get the integrals of e^{..} u^p, p < K, by
parts (`exponential_moments`) and the Lagrange weights from them through the transposed Vandermonde system
of the lambda_k (`adams_weights`), as here; its "simple order 2" (`simple_order_2`) replaces the K = 2
weights by the paper's Appendix D approximations.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["adams_weights", "exponential_moments"]


def exponential_moments(lam_s: float, lam_t: float, order: int, tau: float) -> np.ndarray:
    """(1 + tau^2) times the integrals of e^{(1 + tau^2)(u - lam_t)} u^p over [lam_s, lam_t], p = 0 ..
    order - 1 (ComfyUI's compute_exponential_coeffs): integration by parts unrolled into a lower-triangular
    matrix of (-1)^{p-q} p! / q! / (1 + tau^2)^{p-q} acting on the boundary terms
    t^q - s^q e^{-(1 + tau^2) h}."""
    tau_mul = 1.0 + tau * tau
    h = lam_t - lam_s
    p = np.arange(order, dtype=np.float64)
    boundary = lam_t**p - lam_s**p * math.exp(-tau_mul * h)
    depth = p[:, None] - p[None, :]
    log_fact = np.array([math.lgamma(k + 1.0) for k in range(order)])
    log_coeff = log_fact[:, None] - log_fact[None, :]
    if tau > 0.0:
        log_coeff = log_coeff - depth * math.log(tau_mul)
    signs = np.where(depth % 2 == 0, 1.0, -1.0)
    with np.errstate(over="ignore"):  # only the upper triangle, which tril drops, can overflow
        recursion = np.tril(np.exp(log_coeff) * signs)
    return recursion @ boundary


def adams_weights(
    t_next: float,
    lams: list[float],
    lam_s: float,
    lam_t: float,
    tau: float,
    simple_order_2: bool = False,
    corrector: bool = False,
) -> np.ndarray:
    """The weights b_k of the data predictions at `lams` (oldest first) for a step from lam_s to lam_t that
    lands at flow time t_next (ComfyUI's compute_stochastic_adams_b_coeffs); `corrector` picks the simple
    order-2 corrector's form over the predictor's (only where simple_order_2 and two points)."""
    alpha_t = t_next * math.exp(lam_t)  # = 1 - t_next, written as ComfyUI does
    tau_mul = 1.0 + tau * tau
    h = lam_t - lam_s
    if simple_order_2 and len(lams) == 2:
        # the paper's Appendix D: the exact weight sum alpha_t (1 - e^{-(1+tau^2)h}), split with a
        # first-order estimate of the slope term
        total = alpha_t * -math.expm1(-h * tau_mul)
        if corrector:
            b_new = alpha_t * (0.5 * tau_mul * h)
            return np.array([total - b_new, b_new])
        b_old = alpha_t * (0.5 * tau_mul * h * h) / (lams[0] - lam_s)
        return np.array([b_old, total - b_old])
    moments = exponential_moments(lam_s, lam_t, len(lams), tau)
    vander_t = np.vander(np.asarray(lams, dtype=np.float64), len(lams), increasing=True).T
    return alpha_t * np.linalg.solve(vander_t, moments)
