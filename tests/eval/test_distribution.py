"""The distribution metrics against independent computations: pytorch-fid's scipy formula for FD, closed
forms, a plain double loop for KID, and constructed sets for precision/recall."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from pictor.eval.distribution import (
    _rbf_kernel_mean,
    cmmd,
    compare,
    frechet_distance,
    kernel_distance,
    mean_cov,
    precision_recall,
)


def _correlated(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """n samples of one correlated Gaussian per d (the mixing matrix is fixed), shifted by shift."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(1000 + d), dtype=torch.float64) / d**0.5
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + shift


def _scipy_fd(x: np.ndarray, y: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance: np.cov statistics and scipy's general matrix sqrt."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_pytorch_fids_scipy_formula() -> None:
    x, y = _correlated(400, 12, 0), _correlated(300, 12, 1, shift=0.3)
    ours = frechet_distance(*mean_cov(x), *mean_cov(y))
    ref = _scipy_fd(x.numpy(), y.numpy())
    assert ours == pytest.approx(ref, rel=1e-9)
    assert ours > 1.0  # the two sets differ: not a trivially small number that any formula gets right


def test_frechet_distance_closed_form_for_rotated_diagonal_gaussians() -> None:
    # For commuting covariances FD = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2, whatever the rotation.
    d = 6
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    a = torch.tensor([1.0, 2.0, 0.5, 3.0, 0.1, 4.0], dtype=torch.float64)
    b = torch.tensor([2.0, 0.5, 0.5, 1.0, 0.4, 9.0], dtype=torch.float64)
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.arange(d, dtype=torch.float64) / 3
    fd = frechet_distance(q @ mu1, q @ torch.diag(a) @ q.T, q @ mu2, q @ torch.diag(b) @ q.T)
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert fd == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_is_zero_for_one_set_and_symmetric() -> None:
    x, y = _correlated(50, 8, 3), _correlated(60, 8, 4, shift=1.0)
    assert frechet_distance(*mean_cov(x), *mean_cov(x)) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(*mean_cov(x), *mean_cov(y)) == pytest.approx(
        frechet_distance(*mean_cov(y), *mean_cov(x)), rel=1e-9
    )


def test_rank_deficient_covariances_give_a_finite_distance_and_a_note() -> None:
    x = _correlated(10, 32, 5)  # 10 images, 32 dimensions: covariance rank 9
    report = compare(x, x.clone(), kid_subset_size=10)
    assert report["fd"] == pytest.approx(0.0, abs=1e-8)
    assert any("rank-deficient" in note for note in report["notes"])
    y = _correlated(10, 32, 6, shift=2.0)
    assert np.isfinite(compare(x, y)["fd"]) and compare(x, y)["fd"] > 0


def _naive_kid(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float((a @ b / d + 1) ** 3)

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kernel_distance_on_whole_sets_equals_the_double_loop() -> None:
    x, y = _correlated(15, 5, 7), _correlated(15, 5, 8, shift=0.5)
    kid, std, size = kernel_distance(x, y, subsets=10, subset_size=100)
    assert size == 15 and std == 0.0  # sets smaller than the subset size are used whole, once
    assert kid == pytest.approx(_naive_kid(x.numpy(), y.numpy()), rel=1e-10)


def test_kernel_distance_subsets_are_seeded_and_separate_distributions() -> None:
    x, y = _correlated(300, 8, 9), _correlated(300, 8, 10)
    z = _correlated(300, 8, 11, shift=0.7)
    same = kernel_distance(x, y, subsets=20, subset_size=100, seed=1)
    assert same == kernel_distance(x, y, subsets=20, subset_size=100, seed=1)
    assert same != kernel_distance(x, y, subsets=20, subset_size=100, seed=2)
    assert same[2] == 100 and same[1] > 0
    shifted = kernel_distance(x, z, subsets=20, subset_size=100, seed=1)
    assert abs(same[0]) * 10 < shifted[0]


def test_precision_and_recall_see_fidelity_and_dropped_modes() -> None:
    g = torch.Generator().manual_seed(12)
    cluster_a = torch.randn(200, 4, generator=g, dtype=torch.float64)
    cluster_b = torch.randn(200, 4, generator=g, dtype=torch.float64) + 20
    real = torch.cat([cluster_a, cluster_b])
    assert precision_recall(real, real) == (1.0, 1.0)
    # A model that only draws mode A, but draws it well: high precision, half the recall.
    only_a = torch.randn(400, 4, generator=g, dtype=torch.float64)
    p, r = precision_recall(real, only_a)
    assert p > 0.8 and 0.4 < r < 0.6  # k=3 manifolds leave the far tails out: precision 0.885 here
    assert precision_recall(real, only_a + 100) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("real", "fake", "message"),
    [
        (torch.zeros(5, 3), torch.zeros(5, 4), "same extractor"),
        (torch.zeros(1, 3), torch.zeros(5, 3), "N >= 2"),
        (torch.full((5, 3), float("nan")), torch.zeros(5, 3), "NaN"),
    ],
)
def test_bad_features_are_refused_with_the_reason(
    real: torch.Tensor, fake: torch.Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        compare(real, fake)


def _paper_cmmd(x: np.ndarray, y: np.ndarray) -> float:
    """CMMD as the paper's code computes it (google-research cmmd: embeddings L2-normalised, then
    `distance.mmd` with sigma 10 and scale 1000), written out with numpy in float64."""
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    y = y / np.linalg.norm(y, axis=-1, keepdims=True)
    gamma = 1 / (2 * 10**2)

    def k(a: np.ndarray, b: np.ndarray) -> float:
        sq = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2 * a @ b.T
        return float(np.mean(np.exp(-gamma * sq)))

    return 1000 * (k(x, x) + k(y, y) - 2 * k(x, y))


def test_cmmd_equals_the_papers_formula_and_is_zero_for_one_set() -> None:
    real, fake = _correlated(70, 12, seed=1), _correlated(45, 12, seed=2, shift=0.3)
    assert cmmd(real, fake) == pytest.approx(_paper_cmmd(real.numpy(), fake.numpy()), rel=1e-12)
    assert cmmd(real, real) == pytest.approx(0.0, abs=1e-9)
    # the kernel means in blocks of rows equal the whole matrix's
    a, b = real / real.norm(dim=1, keepdim=True), fake / fake.norm(dim=1, keepdim=True)
    assert _rbf_kernel_mean(a, b, 0.005, rows=7) == pytest.approx(_rbf_kernel_mean(a, b, 0.005), rel=1e-13)


def test_cmmd_reads_direction_not_length_and_sees_a_shift() -> None:
    real, same = _correlated(200, 16, seed=3), _correlated(200, 16, seed=4)
    shifted = _correlated(200, 16, seed=4, shift=0.5)
    assert cmmd(real, same * 7.0) == pytest.approx(cmmd(real, same), rel=1e-12)  # unit length first
    assert cmmd(real, shifted) > 5 * cmmd(real, same)
