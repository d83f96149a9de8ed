"""The K-quant writer (Q2_K ... Q6_K): llama.cpp's reference bytes, round-trip error, chunking, refusals.

tests/kquant_golden.safetensors holds float32 rows (normal, outliers, zero, constant, tiny, huge,
negative-only, positive-only, sparse, and 4 rows whose Q4_K/Q5_K bytes hang on a correctly rounded square
root; two super-blocks a row) and the bytes llama.cpp's quantize_row_q*_K_ref made of them (written by
benchmarks/check_kquants_llama_cpp.py --golden from llama.cpp's C source, compiled without fused
multiply-adds).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pictor.models.ggml_kquants import quantize_k
from pictor.models.ggml_quants import GGMLError, dequantize, quantize, row_bytes

K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
GOLDEN = Path(__file__).resolve().parent.parent / "kquant_golden.safetensors"


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN))


@pytest.mark.parametrize("fmt", K_QUANTS)
def test_bytes_equal_llama_cpps_reference(golden: dict[str, torch.Tensor], fmt: str) -> None:
    x = golden["input"]
    assert x.shape == (22, 512)
    ours = quantize(x, fmt)
    want = golden[fmt]
    bad = [i for i in range(len(x)) if not torch.equal(ours[i], want[i])]
    assert not bad, f"{fmt}: rows {bad} differ from llama.cpp's bytes"


@pytest.mark.parametrize("fmt", K_QUANTS)
def test_the_golden_bytes_decode_as_ggufs_reference_does(golden: dict[str, torch.Tensor], fmt: str) -> None:
    # the fixture is what its name says: gguf's numpy decoder reads it as the same values as pictor's (the
    # 1e6-scale rows overflow float16 scales to inf, in llama.cpp as here, hence a few NaNs on both sides)
    data = golden[fmt]
    with np.errstate(invalid="ignore"):
        ref = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[fmt])
    assert np.array_equal(dequantize(data, fmt, (22, 512)).numpy(), ref, equal_nan=True)


# Relative RMS error of dequantize(quantize(x)) on N(0, 1) rows, measured 0.297, 0.150, 0.072, 0.036, 0.018
# (Q2_K ... Q6_K); Q4_0 gives 0.086, Q8_0 0.005. The bounds leave a little room, not a format's worth.
_BOUNDS = {"Q2_K": 0.32, "Q3_K": 0.17, "Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02}


def test_round_trip_error_is_in_llama_cpps_range_and_ordered() -> None:
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    errors = {}
    for fmt in K_QUANTS:
        data = quantize(x, fmt)
        assert data.shape == (64, row_bytes(fmt, 1024)) and data.dtype == torch.uint8
        y = dequantize(data, fmt, x.shape)
        errors[fmt] = float((y - x).norm() / x.norm())
        assert errors[fmt] < _BOUNDS[fmt], errors
    assert list(errors.values()) == sorted(errors.values(), reverse=True)  # more bits, less error
    # Q4_K beats Q4_0 and Q5_K beats Q5_0 at about the same size: what the K-quants' searches are for
    for k, simple in (("Q4_K", "Q4_0"), ("Q5_K", "Q5_0")):
        y = dequantize(quantize(x, simple), simple, x.shape)
        assert errors[k] < float((y - x).norm() / x.norm())


@pytest.mark.parametrize("fmt", K_QUANTS)
def test_chunks_and_leading_dims_do_not_change_the_bytes(fmt: str) -> None:
    x = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(3)) * 0.02
    whole = quantize(x, fmt)
    assert whole.shape == (2, 3, row_bytes(fmt, 512))
    blocks = x.reshape(-1, 256)
    assert torch.equal(quantize_k(blocks, fmt, chunk=5).reshape(whole.shape), whole)
    assert torch.equal(quantize(x.reshape(6, 512).double(), fmt).reshape(whole.shape), whole)


@pytest.mark.parametrize("fmt", K_QUANTS)
def test_zero_and_constant_rows_come_back_exactly(fmt: str) -> None:
    x = torch.zeros(2, 256)
    x[1] = -0.5  # one level of the affine formats; the signed ones scale to it exactly too
    y = dequantize(quantize(x, fmt), fmt, x.shape)
    assert torch.equal(y[0], x[0])
    torch.testing.assert_close(y[1], x[1], rtol=2e-3, atol=0)


def test_rows_that_are_not_whole_super_blocks_are_refused() -> None:
    for fmt in K_QUANTS:
        with pytest.raises(GGMLError, match=f"{fmt} rows must hold a multiple of 256 values, got 96"):
            quantize(torch.zeros(2, 96), fmt)
    with pytest.raises(GGMLError, match="unknown GGML format 'IQ4_XS'"):
        quantize(torch.zeros(1, 256), "IQ4_XS")
