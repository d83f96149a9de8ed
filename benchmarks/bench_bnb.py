"""bitsandbytes-style 4-bit weights in pictor: memory and per-layer time of one FLUX.1 MLP matrix
(3072 x 12288, random N(0, 0.02) weights) stored NF4 (pictor's rows), bf16, float32 and GGML Q4_K, computed
in float32 on the CPU; and, when bitsandbytes is importable, pictor's dequantization beside bitsandbytes' own
on the same bytes.

Per format: bytes the stored weight takes, seconds to widen it to float32 (dequantize or cast), seconds per
forward of --tokens tokens (widen + matmul, as a stored layer runs), each the best of --repeats after one
warm-up. Q4_K's bytes are random blocks with small scales (pictor does not write K-quants; the cost does not
depend on the values). With bitsandbytes: the same matrix quantized by it (nf4, blocksize 64, with and without
compress_statistics), timed in bitsandbytes' ``dequantize_4bit`` and in pictor's readers, and compared.

Usage: python benchmarks/bench_bnb.py [--tokens 256] [--repeats 3] [--threads 2]
       PYTHONPATH=src /tmp/bnbv/bin/python benchmarks/bench_bnb.py   # with bitsandbytes (its own venv)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pictor.models.bnb_quants import (
    QuantState4bit,
    dequantize_4bit,
    dequantize_rows,
    quantize_rows,
    to_rows,
)
from pictor.models.ggml_quants import FORMATS, dequantize

ROWS, COLS = 3072, 12288


def best(call: Callable[[], Any], repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return round(min(times), 4)


def q4_k_blocks() -> torch.Tensor:
    spec = FORMATS["Q4_K"]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(ROWS * COLS // spec.block_size, spec.type_size), dtype=np.uint8)
    small = np.full((len(raw), 1), 0.001, np.float16).view(np.uint8)
    raw[:, 0:2] = small  # d
    raw[:, 2:4] = small  # dmin
    return torch.from_numpy(raw.reshape(ROWS, -1))


def formats(weight: torch.Tensor, x: torch.Tensor, repeats: int) -> dict[str, Any]:
    nf4 = quantize_rows(weight, "NF4")
    q4k = q4_k_blocks()
    bf16 = weight.to(torch.bfloat16)
    widen: dict[str, Callable[[], torch.Tensor]] = {
        "fp32": lambda: weight,
        "bf16": lambda: bf16.float(),
        "NF4": lambda: dequantize_rows(nf4, "NF4", (ROWS, COLS), torch.float32),
        "Q4_K": lambda: dequantize(q4k, "Q4_K", (ROWS, COLS), torch.float32),
    }
    stored = {"fp32": weight, "bf16": bf16, "NF4": nf4, "Q4_K": q4k}
    out: dict[str, Any] = {}
    for name, make in widen.items():
        t = stored[name]
        out[name] = {
            "bytes": t.numel() * t.element_size(),
            "bits_per_weight": round(t.numel() * t.element_size() * 8 / (ROWS * COLS), 3),
            "widen_s": best(make, repeats),
            "forward_s": best(lambda m=make: F.linear(x, m()), repeats),
        }
    err = (widen["NF4"]() - weight).norm() / weight.norm()
    out["NF4"]["relative_l2_error"] = round(float(err), 4)
    return out


def against_bitsandbytes(weight: torch.Tensor, repeats: int) -> dict[str, Any] | None:
    try:
        import bitsandbytes.functional as bf
    except ImportError:
        return None
    out: dict[str, Any] = {}
    for nested in (False, True):
        packed, state = bf.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type="nf4")
        ours = QuantState4bit(
            "nf4",
            64,
            torch.float32,
            (ROWS, COLS),
            state.absmax,
            **(
                {
                    "nested_absmax": state.state2.absmax,
                    "nested_quant_map": state.state2.code,
                    "nested_blocksize": state.state2.blocksize,
                    "nested_offset": float(state.offset),
                }
                if nested
                else {}
            ),
        )
        rows = to_rows(packed, ours)
        theirs = bf.dequantize_4bit(packed, state)
        bytes_bnb = packed.numel() + state.absmax.numel() * state.absmax.element_size()
        if nested:
            bytes_bnb += state.state2.absmax.numel() * 4
        out["nested" if nested else "plain"] = {
            "bnb_bytes": bytes_bnb,
            "pictor_rows_bytes": rows.numel(),
            "bnb_dequantize_s": best(lambda p=packed, s=state: bf.dequantize_4bit(p, s), repeats),
            "pictor_dequantize_4bit_s": best(lambda p=packed, s=ours: dequantize_4bit(p, s), repeats),
            "pictor_rows_s": best(
                lambda r=rows: dequantize_rows(r, "NF4", (ROWS, COLS), torch.float32), repeats
            ),
            "pictor_equals_bnb": bool(torch.equal(dequantize_4bit(packed, ours), theirs)),
            "rows_equal_bnb": bool(
                torch.equal(dequantize_rows(rows, "NF4", (ROWS, COLS), torch.float32), theirs)
            ),
        }
    import bitsandbytes

    out["bitsandbytes"] = bitsandbytes.__version__
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(ROWS, COLS, generator=gen) * 0.02
    x = torch.randn(args.tokens, COLS, generator=gen)
    result = {
        "matrix": [ROWS, COLS],
        "tokens": args.tokens,
        "threads": args.threads,
        "torch": torch.__version__,
        "formats": formats(weight, x, args.repeats),
        "bitsandbytes": against_bitsandbytes(weight, args.repeats),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
