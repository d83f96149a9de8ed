"""`pictor eval distribution`: featurize two image folders with one extractor and compare the sets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pictor.checkpoint import write_json
from pictor.eval.distribution import KID_SUBSET_SIZE, KID_SUBSETS, NEAREST_K, cmmd, compare
from pictor.eval.image_features import build_extractor, featurize_folder


def run_distribution_eval(
    real: str | Path,
    fake: str | Path,
    features: str = "shapes",
    device: str = "cpu",
    batch_size: int = 32,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    nearest_k: int = NEAREST_K,
    seed: int = 0,
    out: str | Path | None = None,
    progress: Callable[[str], Callable[[int, int], None]] | None = None,
) -> dict:
    """The report of `compare` plus where the features came from and which files were skipped; written to
    out (atomically) when given. progress(set_name) returns the (done, total) callback for one folder."""
    # What can be checked before featurizing (minutes on large folders), is.
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if kid_subsets < 1 or kid_subset_size < 2:
        raise ValueError(
            f"KID needs --kid-subsets >= 1 and --kid-subset-size >= 2, got {kid_subsets} and "
            f"{kid_subset_size}"
        )
    if nearest_k < 1:
        raise ValueError(f"--nearest-k must be >= 1, got {nearest_k}")
    for name, folder in (("real", real), ("fake", fake)):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"the {name} image folder {folder} does not exist or is not a folder")
    if out is not None and Path(out).is_dir():
        raise ValueError(f"--out {out}: a folder; give the report's file, e.g. {Path(out) / 'report.json'}")
    extractor = build_extractor(features, device)
    feats, skipped = {}, {}
    for name, folder in (("real", real), ("fake", fake)):
        feats[name], skipped[name] = featurize_folder(
            folder, extractor, batch_size, progress(name) if progress else None
        )
    report = {
        "real": str(real),
        "fake": str(fake),
        "features": extractor.name,
        **compare(feats["real"], feats["fake"], kid_subsets, kid_subset_size, nearest_k, seed),
        # CMMD's kernel bandwidth is set for unit-length CLIP embeddings; on other features it means nothing
        **({"cmmd": cmmd(feats["real"], feats["fake"])} if extractor.name.startswith("clip:") else {}),
        "seed": seed,
        "skipped": {name: [{"path": p, "reason": r} for p, r in s] for name, s in skipped.items()},
    }
    if out is not None:
        write_json(report, out)
    return report
