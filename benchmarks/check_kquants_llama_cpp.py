"""pictor's K-quant writer (Q2_K ... Q6_K) against llama.cpp's reference quantizers, byte for byte, and speed.

Given a llama.cpp source tree (its root, or any folder holding `ggml/src/ggml-quants.c`; the copy vendored in
the llama-cpp-python sdist works), this compiles a small harness around `quantize_row_q{2..6}_K_ref`
(ggml-quants.c plus stubs for the four ggml symbols it links against; -DNDEBUG as release builds, so
nearest_int's range assert is off; -ffp-contract=off so that no a*b+c becomes one fused multiply-add, which
is C's own rounding and what a build for plain x86-64 does), feeds it the same float32 rows as
`pictor.models.ggml_quants.quantize`, and counts the 256-value blocks whose bytes differ.

Rows: seeded normal values (scaled like trained weights), rows with 1% outliers of 50x, all-zero,
constant, tiny (1e-20), huge (1e6), negative-only, positive-only and 90%-zero rows. Speed: one FLUX.1 MLP
matrix (3072 x 12288, std 0.02) per format, pictor's torch code against the C reference, single-threaded C.

Prints JSON. With --golden FILE it also writes the small fixture that tests/models/test_ggml_kquants.py
checks against (inputs and llama.cpp's bytes, safetensors).

Usage: python benchmarks/check_kquants_llama_cpp.py LLAMA_CPP_DIR [--rows 2048] [--speed] [--golden F]
       [--out benchmarks/results/kquants_llama_cpp.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from pictor.models.ggml_quants import FORMATS, quantize

K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "ggml-quants.h"
// harness FMT IN.f32 OUT.bin K: rows of K floats -> quantize_row_<FMT>_ref bytes; prints seconds taken
int main(int argc, char **argv) {
    const char *fmt = argv[1]; long k = atol(argv[4]);
    FILE *f = fopen(argv[2], "rb"); fseek(f, 0, SEEK_END); long n = ftell(f) / 4; fseek(f, 0, SEEK_SET);
    float *x = malloc(n * 4); if (fread(x, 4, n, f) != (size_t)n) return 2; fclose(f);
    size_t bs = !strcmp(fmt, "Q2_K") ? sizeof(block_q2_K) : !strcmp(fmt, "Q3_K") ? sizeof(block_q3_K)
              : !strcmp(fmt, "Q4_K") ? sizeof(block_q4_K) : !strcmp(fmt, "Q5_K") ? sizeof(block_q5_K)
              : sizeof(block_q6_K);
    unsigned char *y = malloc((n / 256) * bs);
    struct timespec t0, t1; clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long r = 0; r < n / k; r++) {
        const float *xr = x + r * k; void *yr = y + r * (k / 256) * bs;
        if (!strcmp(fmt, "Q2_K")) quantize_row_q2_K_ref(xr, yr, k);
        else if (!strcmp(fmt, "Q3_K")) quantize_row_q3_K_ref(xr, yr, k);
        else if (!strcmp(fmt, "Q4_K")) quantize_row_q4_K_ref(xr, yr, k);
        else if (!strcmp(fmt, "Q5_K")) quantize_row_q5_K_ref(xr, yr, k);
        else quantize_row_q6_K_ref(xr, yr, k);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%.6f\n", (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec));
    f = fopen(argv[3], "wb"); fwrite(y, bs, n / 256, f); fclose(f); return 0;
}
"""
# ggml-quants.c's only links to the rest of ggml (used by code paths the harness never calls)
_STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
void ggml_abort(const char *file, int line, const char *fmt, ...) {
    fprintf(stderr, "%s:%d\n", file, line); abort();
}
size_t ggml_row_size(int type, int64_t ne) { abort(); }
const char *ggml_type_name(int type) { return "?"; }
size_t ggml_type_size(int type) { abort(); }
"""


def build_harness(source: Path, work: Path) -> Path:
    """Compile the harness against the ggml in `source` (a llama.cpp root or a folder with ggml/src)."""
    found = sorted(source.rglob("ggml/src/ggml-quants.c"))
    if not found:
        sys.exit(f"{source}: no ggml/src/ggml-quants.c under it")
    ggml = found[0].parent.parent
    (work / "harness.c").write_text(_HARNESS)
    (work / "stubs.c").write_text(_STUBS)
    exe = work / "harness"
    flags = ["-O2", "-DNDEBUG", "-ffp-contract=off", f"-I{ggml / 'include'}", f"-I{ggml / 'src'}"]
    obj = work / "ggml-quants.o"
    subprocess.run(["gcc", *flags, "-c", str(ggml / "src" / "ggml-quants.c"), "-o", str(obj)], check=True)
    sources = [str(work / "harness.c"), str(obj), str(work / "stubs.c")]
    subprocess.run(["gcc", *flags, *sources, "-o", str(exe), "-lm"], check=True)
    return exe


def reference(exe: Path, work: Path, fmt: str, x: np.ndarray) -> tuple[np.ndarray, float]:
    """llama.cpp's bytes for rows `x` (rows, cols) as (n_blocks, type_size) uint8, and its seconds."""
    x.astype(np.float32).tofile(work / "in.f32")
    done = subprocess.run(
        [str(exe), fmt, str(work / "in.f32"), str(work / "out.bin"), str(x.shape[1])],
        check=True,
        capture_output=True,
        text=True,
    )
    raw = np.fromfile(work / "out.bin", dtype=np.uint8)
    return raw.reshape(-1, FORMATS[fmt].type_size), float(done.stdout)


def cases(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Named families of float32 rows of 256 values (one super-block each)."""
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal((rows, 256))
    return {
        name: x.astype(np.float32)
        for name, x in {
            "normal": normal * 0.02,
            "outliers": rng.standard_normal((rows, 256)) * np.where(rng.random((rows, 256)) < 0.01, 50, 1),
            "zeros": np.zeros((4, 256)),
            "constant": np.repeat(rng.standard_normal((rows, 1)), 256, 1),
            "tiny": normal * 1e-20,
            "huge": normal * 1e6,
            "negative": -np.abs(rng.standard_normal((rows, 256))),
            "positive": np.abs(rng.standard_normal((rows, 256))) + 1,
            "sparse": rng.standard_normal((rows, 256)) * (rng.random((rows, 256)) < 0.1),
        }.items()
    }


def compare(exe: Path, work: Path, rows: int, seed: int) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    families = cases(rows, seed)
    for fmt in K_QUANTS:
        per: dict[str, list[int]] = {}
        for name, x in families.items():
            want, _ = reference(exe, work, fmt, x)
            ours = quantize(torch.from_numpy(x), fmt).numpy().reshape(want.shape)
            per[name] = [int((want != ours).any(axis=1).sum()), len(x)]
        out[fmt] = {
            "blocks": sum(n for _, n in per.values()),
            "mismatched_blocks": sum(m for m, _ in per.values()),
            "per_family": {k: f"{m}/{n}" for k, (m, n) in per.items()},
        }
    return out


def speed(exe: Path, work: Path) -> dict[str, dict[str, float]]:
    w = (np.random.default_rng(0).standard_normal((3072, 12288)) * 0.02).astype(np.float32)
    out = {}
    for fmt in K_QUANTS:
        want, c_seconds = reference(exe, work, fmt, w)
        start = time.perf_counter()
        ours = quantize(torch.from_numpy(w), fmt).numpy()
        seconds = time.perf_counter() - start
        out[fmt] = {
            "pictor_s": round(seconds, 2),
            "llama_cpp_ref_s": round(c_seconds, 2),
            "same_bytes": bool(np.array_equal(ours.reshape(want.shape), want)),
        }
    return out


def _sqrt_edges(count: int) -> np.ndarray:
    """Seeded normal rows (two super-blocks each) whose Q4_K or Q5_K bytes depend on sqrt(sum(x * x) / 32)
    being correctly rounded, as C's sqrtf is (torch's float32 sqrt on the CPU is sometimes 1 ulp off, and
    about 1 block in 200 then changes): found by quantizing a pool with that sqrt in float32 instead."""
    pool = torch.from_numpy(np.random.default_rng(2).standard_normal((2048, 512)).astype(np.float32))
    exact = {fmt: quantize(pool, fmt) for fmt in ("Q4_K", "Q5_K")}
    real_sqrt = torch.sqrt
    with mock.patch("torch.sqrt", lambda t: real_sqrt(t.float())):
        changed = [(quantize(pool, fmt) != want).any(dim=1) for fmt, want in exact.items()]
    rows = (changed[0] | changed[1]).nonzero().flatten()[:count]
    return pool[rows].numpy()


def write_golden(exe: Path, work: Path, path: Path) -> None:
    """A few rows of each family and of _sqrt_edges, two super-blocks per row, and llama.cpp's bytes of them
    per format."""
    rows = [v[:4].reshape(-1, 512) for v in cases(8, 1).values()]
    x = np.concatenate([*rows, _sqrt_edges(4)])
    tensors = {"input": torch.from_numpy(x)}
    for fmt in K_QUANTS:
        want, _ = reference(exe, work, fmt, x)
        tensors[fmt] = torch.from_numpy(want.reshape(len(x), -1).copy())
    from safetensors.torch import save_file

    save_file(tensors, str(path), {"source": "llama.cpp quantize_row_q*_K_ref, -O2 -ffp-contract=off"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("llama_cpp", type=Path, help="a llama.cpp source tree (or a folder above its ggml/)")
    ap.add_argument("--rows", type=int, default=2048, help="rows of 256 values per family")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speed", action="store_true", help="also time a 3072 x 12288 matrix per format")
    ap.add_argument("--golden", type=Path, default=None, help="write the test fixture here")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        exe = build_harness(args.llama_cpp, work)
        result: dict[str, object] = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "compare": compare(exe, work, args.rows, args.seed),
        }
        if args.speed:
            result["speed_3072x12288"] = speed(exe, work)
        if args.golden is not None:
            write_golden(exe, work, args.golden)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
