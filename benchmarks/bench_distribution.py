"""Distribution metrics (`pictor eval distribution`): agreement with and speed against the reference
formulas, and how far the shipped model's images are from the shapes world as a whole.

reference: two sets of random Inception-sized features (--n x 2048, Gaussians with different means and
covariances). FD by pictor vs pytorch-fid's formula (numpy statistics + scipy.linalg.sqrtm); KID by pictor
vs clean-fid's formula written out in numpy, on the whole sets (one subset of all samples: no sampling, so
the two must agree) and timed at the default 100 subsets of 1000. Values, relative difference, seconds.
cmmd: CMMD by pictor (kernel means in blocks of rows) vs the paper's `mmd` (google-research cmmd, whole
N x N kernel matrices) written out in numpy, on two sets of --n unit-length CLIP ViT-L-sized (768) features.

shapes: the weightless "shapes" features (what the scorer's detector finds) of K images per dev prompt:
- floor: renders at seed 1 vs renders at seed 0 (two samples of one distribution: FD's small-set bias);
- autoencoder: the seed-0 renders after an encode/decode by the model's autoencoder, vs the renders;
- model: the model's images (eval seeds, default sampler and steps) vs the renders;
with each set's mean features (objects per image, area, ...) so that the distance can be read.

    python benchmarks/bench_distribution.py [--model default] [-k 2] [--n 5000] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import scipy.linalg
import torch

from pictor.eval.distribution import cmmd, compare, frechet_distance, kernel_distance, mean_cov
from pictor.eval.image_features import SHAPES_FEATURE_NAMES, ShapesFeatures
from pictor.eval.shapes import ground_truth_images, load_prompts
from pictor.eval.shapes_run import autoencoder_roundtrip, generate_for_specs
from pictor.loading import load


def reference_fd(x: np.ndarray, y: np.ndarray) -> float:
    """pytorch-fid: np.cov statistics, scipy's general matrix square root, the real part of the trace."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def reference_kid(x: np.ndarray, y: np.ndarray, subsets: int, size: int, seed: int) -> float:
    """clean-fid's KID: cubic kernel, unbiased MMD^2 over subsets drawn without replacement."""
    rng = np.random.default_rng(seed)
    d, total = x.shape[1], 0.0
    for _ in range(subsets):
        a = x[rng.choice(len(x), size, replace=False)] if size < len(x) else x
        b = y[rng.choice(len(y), size, replace=False)] if size < len(y) else y
        kaa, kbb, kab = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
        off = kaa.sum() - np.trace(kaa) + kbb.sum() - np.trace(kbb)
        total += off / (size * (size - 1)) - 2 * kab.sum() / size**2
    return total / subsets


def reference_cmmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """The CMMD paper's `distance.mmd` on L2-normalised embeddings, in numpy: whole kernel matrices."""
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    y = y / np.linalg.norm(y, axis=-1, keepdims=True)
    gamma = 1 / (2 * sigma**2)
    xs, ys = np.diag(x @ x.T), np.diag(y @ y.T)
    k_xx = np.mean(np.exp(-gamma * (-2 * x @ x.T + xs[:, None] + xs[None, :])))
    k_xy = np.mean(np.exp(-gamma * (-2 * x @ y.T + xs[:, None] + ys[None, :])))
    k_yy = np.mean(np.exp(-gamma * (-2 * y @ y.T + ys[:, None] + ys[None, :])))
    return float(scale * (k_xx + k_yy - 2 * k_xy))


def bench_cmmd(n: int, dim: int = 768) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    y = torch.randn(n, dim, generator=g, dtype=torch.float64) + 0.02
    ours, t_ours = timed(lambda: cmmd(x, y))
    ref, t_ref = timed(lambda: reference_cmmd(x.numpy(), y.numpy()))
    return {
        "n_per_set": n,
        "dim": dim,
        "pictor": ours,
        "reference": ref,
        "rel_diff": abs(ours - ref) / abs(ref),
        "seconds": {"pictor": t_ours, "reference": t_ref, "speedup": t_ref / t_ours},
    }


def timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench_reference(n: int, dim: int = 2048) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) @ mix
    y = torch.randn(n, dim, generator=g, dtype=torch.float64) @ (mix * 1.1) + 0.05
    xn, yn = x.numpy(), y.numpy()
    ours_fd, t_ours_fd = timed(lambda: frechet_distance(*mean_cov(x), *mean_cov(y)))
    ref_fd, t_ref_fd = timed(lambda: reference_fd(xn, yn))
    whole = min(n, 2000)  # KID on whole sets: both sides compute the same number
    ours_kid = kernel_distance(x[:whole], y[:whole], subsets=1, subset_size=whole)[0]
    ref_kid = reference_kid(xn[:whole], yn[:whole], 1, whole, 0)
    size = min(1000, n // 2)  # below the set size, so that both draw 100 subsets
    _, t_ours_kid = timed(lambda: kernel_distance(x, y, subsets=100, subset_size=size))
    _, t_ref_kid = timed(lambda: reference_kid(xn, yn, 100, size, 0))
    return {
        "n_per_set": n,
        "dim": dim,
        "fd": {"pictor": ours_fd, "reference": ref_fd, "rel_diff": abs(ours_fd - ref_fd) / abs(ref_fd)},
        "fd_seconds": {"pictor": t_ours_fd, "reference": t_ref_fd, "speedup": t_ref_fd / t_ours_fd},
        "kid_whole_sets": {
            "n": whole,
            "pictor": ours_kid,
            "reference": ref_kid,
            "rel_diff": abs(ours_kid - ref_kid) / abs(ref_kid),
        },
        "kid_seconds_100_subsets": {
            "subset_size": size,
            "pictor": t_ours_kid,
            "reference": t_ref_kid,
            "speedup": t_ref_kid / t_ours_kid,
        },
    }


def bench_shapes(model: str, k: int) -> dict[str, Any]:
    pipe = load(model, device="cpu")
    specs = load_prompts()
    extract = ShapesFeatures()

    def features(rows: list[list[np.ndarray]]) -> torch.Tensor:
        return extract([im for row in rows for im in row])

    renders = ground_truth_images(specs, k, seed=0)
    real = features(renders)
    sets = {"floor": features(ground_truth_images(specs, k, seed=1))}
    sets["autoencoder"], t_ae = timed(lambda: features(autoencoder_roundtrip(pipe, renders)))
    sets["model"], t_model = timed(lambda: features(generate_for_specs(pipe, specs, k, seed=0)))

    def means(f: torch.Tensor) -> dict[str, float]:
        return {name: round(float(v), 4) for name, v in zip(SHAPES_FEATURE_NAMES, f.mean(0), strict=True)}

    out: dict[str, Any] = {
        "model": {"name": pipe.name, "hash": pipe.hash},
        "images_per_prompt": k,
        "prompts": len(specs),
        "renders_mean_features": means(real),
    }
    for name, feats in sets.items():
        report = compare(real, feats)
        out[name] = {key: report[key] for key in ("fd", "kid", "kid_std", "precision", "recall", "n_fake")}
        out[name]["mean_features"] = means(feats)
    out["seconds"] = {"generate_and_featurize": t_model, "autoencoder_and_featurize": t_ae}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("-k", "--images-per-prompt", type=int, default=2)
    ap.add_argument("--n", type=int, default=5000, help="features per set in the reference comparison")
    ap.add_argument("--skip-shapes", action="store_true", help="only the reference comparison")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result: dict[str, Any] = {"reference": bench_reference(args.n), "cmmd": bench_cmmd(args.n)}
    if not args.skip_shapes:
        result["shapes"] = bench_shapes(args.model, args.images_per_prompt)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
