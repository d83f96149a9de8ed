"""Distribution metrics between two sets of image features: how alike are the *sets*, whatever each image is.

Prompt adherence (`pictor.eval.shapes`) asks whether each image shows what its prompt says; these ask
whether generated images as a whole look like real ones. Given features [N, D] of the two sets (from any
extractor in `pictor.eval.image_features`):

- Fréchet distance (FD; "FID" when the features are Inception's, Heusel et al. 2017): the distance between
  Gaussians fitted to each set, |mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2)).
- Kernel distance (KID, Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / D + 1)^3, averaged over random subsets; unbiased at any N, unlike FD, which is biased
  upwards at small N (compare FDs only at equal set sizes).
- Precision and recall (Kynkäänniemi et al. 2019): the share of generated samples that fall inside the
  real set's k-nearest-neighbour manifold (fidelity), and of real samples inside the generated one's
  (diversity: a model that drops modes loses recall, not precision).
- CMMD (Jayasumana et al. 2024, "Rethinking FID"): 1000 x MMD^2 with a Gaussian RBF kernel of bandwidth
  10 between unit-length CLIP embeddings. It assumes no Gaussian; the paper's estimator counts each
  embedding's kernel with itself, so two samples of one distribution score a little above 0 at small N.
  Reported for CLIP features only (its bandwidth is set for them).

Everything is float64: FD subtracts traces of large matrices, and float32 loses the small differences.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

KID_SUBSETS = 100
# CMMD's kernel bandwidth and display scale, as the paper's code (google-research cmmd/distance.py) has them
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
KID_SUBSET_SIZE = 1000
NEAREST_K = 3


def _as_features(x: Tensor | object, what: str) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.float64, device="cpu")
    if t.ndim != 2 or t.shape[0] < 2 or t.shape[1] < 1:
        raise ValueError(f"{what} features must be [N, D] with N >= 2 images, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} features contain NaN or inf")
    return t


def mean_cov(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    x = _as_features(x, "the")
    mu = x.mean(dim=0)
    centered = x - mu
    return mu, centered.T @ centered / (x.shape[0] - 1)


def _psd_sqrt(s: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues below 0 are rounding: 0)."""
    vals, vecs = torch.linalg.eigh((s + s.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """FD between N(mu1, sigma1) and N(mu2, sigma2).

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which are those of
    L^T S2 L for any L with L L^T = S1: a symmetric PSD matrix, so eigvalsh gives them without the complex
    parts and the "singular product" fudge of a general matrix square root (pytorch-fid's scipy sqrtm).
    L is S1's Cholesky factor, or its symmetric square root when S1 is singular (fewer images than
    dimensions), where Cholesky fails.
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (*mu1.shape, *mu1.shape):
        raise ValueError(
            f"mismatched statistics: means {tuple(mu1.shape)} / {tuple(mu2.shape)}, covariances "
            f"{tuple(sigma1.shape)} / {tuple(sigma2.shape)}; were both sets featurized by the same extractor?"
        )
    factor, info = torch.linalg.cholesky_ex(sigma1)
    if int(info) != 0:
        factor = _psd_sqrt(sigma1)
    middle = factor.T @ sigma2 @ factor
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    fd = diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return max(float(fd), 0.0)  # rounding can take an FD of identical sets a hair below 0


def _cubic_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    k = a @ b.T  # numpy runs a @ a.T as a symmetric rank-k update: half the work of torch's general mm
    k /= a.shape[1]
    k += 1
    return np.power(k, 3, out=k)


def _mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    xn, yn = x.numpy(), y.numpy()
    m, n = len(xn), len(yn)
    kxx, kyy = _cubic_kernel(xn, xn), _cubic_kernel(yn, yn)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2 * _cubic_kernel(xn, yn).mean())


def kernel_distance(
    real: Tensor,
    fake: Tensor,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float, int]:
    """KID: (mean, standard deviation over subsets, the subset size used).

    Each subset draws subset_size samples of each set without replacement (as clean-fid and torchmetrics
    do); a set smaller than subset_size is used whole, and then one subset is enough: the estimate no
    longer depends on the draw.
    """
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    size = min(subset_size, real.shape[0], fake.shape[0])
    whole = size == real.shape[0] == fake.shape[0]
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(1 if whole else subsets):
        r = real[torch.randperm(real.shape[0], generator=gen)[:size]]
        f = fake[torch.randperm(fake.shape[0], generator=gen)[:size]]
        values.append(_mmd2_unbiased(r, f))
    v = np.array(values)
    return float(v.mean()), float(v.std()), size


def _rbf_kernel_mean(a: Tensor, b: Tensor, gamma: float, rows: int = 2048) -> float:
    """mean over all pairs of exp(-gamma |a_i - b_j|^2), in blocks of `rows` so memory stays rows x len(b)."""
    b_sq = (b * b).sum(dim=1)
    total = 0.0
    for start in range(0, a.shape[0], rows):
        x = a[start : start + rows]
        dist2 = (x * x).sum(dim=1)[:, None] + b_sq[None, :] - 2 * x @ b.T
        total += float(torch.exp(-gamma * dist2).sum())
    return total / (a.shape[0] * b.shape[0])


def cmmd(real: Tensor, fake: Tensor, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    """CMMD: `scale` x MMD^2 between the two sets' embeddings, each scaled to unit length first (as the
    paper's embedding code does), with the Gaussian RBF kernel exp(-|x - y|^2 / (2 sigma^2)). The paper's
    estimator: the mean of every kernel value, diagonals included, as its `mmd` computes it."""
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    real = real / real.norm(dim=1, keepdim=True).clamp_min(1e-12)
    fake = fake / fake.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gamma = 1 / (2 * sigma**2)
    xx, yy = _rbf_kernel_mean(real, real, gamma), _rbf_kernel_mean(fake, fake, gamma)
    return scale * (xx + yy - 2 * _rbf_kernel_mean(real, fake, gamma))


def _knn_radii(x: Tensor, k: int) -> Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    dist = torch.cdist(x, x)
    return dist.kthvalue(k + 1, dim=1).values  # +1: the row itself is at distance 0


def precision_recall(real: Tensor, fake: Tensor, k: int = NEAREST_K) -> tuple[float, float]:
    """(precision, recall) with k-nearest-neighbour manifolds; O(N^2) memory, fine to ~20k per set."""
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    if not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise ValueError(f"k must be in 1..{min(real.shape[0], fake.shape[0]) - 1} (set size - 1), got {k}")

    def coverage(ref: Tensor, query: Tensor) -> float:
        inside = torch.cdist(query, ref) <= _knn_radii(ref, k)[None, :]
        return float(inside.any(dim=1).double().mean())

    return coverage(real, fake), coverage(fake, real)


def compare(
    real: Tensor,
    fake: Tensor,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    nearest_k: int = NEAREST_K,
    seed: int = 0,
) -> dict:
    """All the metrics above as one JSON-ready dict, with notes on what limits them."""
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real features have {real.shape[1]} dimensions and fake {fake.shape[1]}: "
            "featurize both sets with the same extractor"
        )
    fd = frechet_distance(*mean_cov(real), *mean_cov(fake))
    kid, kid_std, size = kernel_distance(real, fake, kid_subsets, kid_subset_size, seed)
    k = min(nearest_k, real.shape[0] - 1, fake.shape[0] - 1)
    precision, recall = precision_recall(real, fake, k)
    dim = real.shape[1]
    notes = []
    if min(real.shape[0], fake.shape[0]) <= dim:
        notes.append(
            f"fewer images ({min(real.shape[0], fake.shape[0])}) than feature dimensions ({dim}): "
            "the covariances are rank-deficient and FD is biased upwards; compare FDs only at equal sizes"
        )
    if k != nearest_k:
        notes.append(f"precision/recall used k={k}: the sets are too small for k={nearest_k}")
    return {
        "fd": fd,
        "kid": kid,
        "kid_std": kid_std,
        "kid_subset_size": size,
        "precision": precision,
        "recall": recall,
        "nearest_k": k,
        "n_real": int(real.shape[0]),
        "n_fake": int(fake.shape[0]),
        "dim": int(dim),
        "notes": notes,
    }
