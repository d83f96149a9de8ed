"""GGML block formats in torch, checked against gguf-py's numpy reference (llama.cpp's Python package):
dequantized values equal to the bit, quantized bytes identical."""

from __future__ import annotations

import math

import gguf.quants
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from pictor.models.ggml_quants import (
    FORMATS,
    GGMLError,
    GGMLFormat,
    dequantize,
    format_by_id,
    quantize,
    row_bytes,
)

QUANTIZABLE = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
BLOCK_FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]

# Byte offsets of the float16 fields (d, and m / dmin where there is one) inside one block.
F16_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gguf_type(fmt: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[fmt]


def _gguf_quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """gguf-py's bytes for x (F32/F16 come back as float arrays: their raw bytes are the encoding)."""
    out = gguf.quants.quantize(x.numpy(), _gguf_type(fmt))
    return torch.from_numpy(np.ascontiguousarray(out).view(np.uint8).copy())


def _gguf_dequantize(data: torch.Tensor, fmt: str) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(data.numpy(), _gguf_type(fmt)), dtype=np.float32))


def _random_blocks(fmt: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random raw bytes of a `fmt` tensor [rows, cols]: every packed bit pattern, with finite float16 scales
    of every magnitude (subnormals too) and both signs in the d / dmin fields."""
    f = FORMATS[fmt]
    n = rows * cols // f.block_size
    gen = _gen(seed)
    blocks = torch.randint(0, 256, (n, f.type_size), generator=gen, dtype=torch.uint8)
    for start in F16_FIELDS[fmt]:
        bits = torch.randint(0, 1 << 16, (n,), generator=gen, dtype=torch.int32)
        bits = torch.where((bits & 0x7C00) == 0x7C00, bits & ~0x4000, bits)  # no inf / NaN exponent
        blocks[:, start : start + 2] = bits.to(torch.int16).view(torch.uint8).view(n, 2)
    return blocks.reshape(rows, -1)


def _values(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Float data with a different scale per row (weights of very different sizes), plus edge-case rows."""
    gen = _gen(seed)
    x = torch.randn(rows, cols, generator=gen) * torch.logspace(-4, 2, rows).unsqueeze(1)
    x[0] = 0.0  # all-zero blocks: scale 0, reciprocal taken as 0
    x[1] = 0.0
    x[1, 5] = 1e4  # one large value: it alone sets the block's scale
    x[1, 40] = -3e3
    x[2, :32] = torch.arange(-16, 16) + 0.5  # exact halves after scaling: the rounding rule decides
    x[2, 31] = 127.0
    return x


def test_format_table_matches_ggml() -> None:
    assert len(FORMATS) == 13
    for name, f in FORMATS.items():
        assert isinstance(f, GGMLFormat) and f.name == name
        assert f.type_id == _gguf_type(name).value
        assert (f.block_size, f.type_size) == GGML_QUANT_SIZES[_gguf_type(name)]
        assert format_by_id(f.type_id) is f


@pytest.mark.parametrize("fmt", QUANTIZABLE)
def test_dequantize_matches_gguf_on_its_quantized_bytes(fmt: str) -> None:
    data = _gguf_quantize(_values(6, 512, seed=1), fmt)
    ours = dequantize(data, fmt, (6, 512))
    torch.testing.assert_close(ours, _gguf_dequantize(data, fmt), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(6, 512), (3, 256)])
@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_dequantize_matches_gguf_on_random_bytes(fmt: str, shape: tuple[int, int]) -> None:
    # All float products in the decoders are exact, so the only rounding is the final add of a min, done in
    # the same place as gguf-py: the values must agree to the bit.
    data = _random_blocks(fmt, *shape, seed=2)
    ours = dequantize(data, fmt, shape)
    assert ours.dtype == torch.float32 and ours.shape == shape
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, _gguf_dequantize(data, fmt), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["F32", "F16", "BF16"])
def test_dense_formats_keep_special_values(fmt: str) -> None:
    x = torch.tensor([[0.0, -0.0, 1.5, -2.25, math.inf, -math.inf, math.nan, 1e-40]])
    data = _gguf_quantize(x, fmt)
    assert torch.equal(quantize(x, fmt), data)
    torch.testing.assert_close(dequantize(data, fmt, x.shape), _gguf_dequantize(data, fmt), equal_nan=True)


@pytest.mark.parametrize("fmt", ["F32", "BF16"])
def test_signalling_nan(fmt: str) -> None:
    # BF16 must quiet it first: rounding 0x7F800001 to nearest even would turn the NaN into infinity.
    # (F16 is left out: torch writes a canonical quiet NaN where numpy keeps the payload bits.)
    x = torch.tensor([[0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x3F800000]], dtype=torch.int64)
    x = x.to(torch.int32).view(torch.float32)
    data = quantize(x, fmt)
    assert torch.equal(data, _gguf_quantize(x, fmt))
    assert dequantize(data, fmt, x.shape)[0, :3].isnan().all()


@pytest.mark.parametrize("fmt", QUANTIZABLE)
def test_quantize_bytes_equal_gguf(fmt: str) -> None:
    x = _values(6, 512, seed=3)
    ours = quantize(x, fmt)
    assert ours.dtype == torch.uint8 and ours.shape == (6, row_bytes(fmt, 512))
    assert torch.equal(ours, _gguf_quantize(x, fmt))


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_quantize_scale_edge_cases(fmt: str) -> None:
    block = FORMATS[fmt].block_size
    top = 15 if fmt.startswith("Q4") else 31  # the largest level of Q4_1 / Q5_1
    x = torch.zeros(7, block)  # row 0: all zeros
    x[1, 7] = 65000.0  # a single large value (near the float16 limit of the stored scale)
    x[2, 3] = -1e-3  # a single negative value: Q4_0 / Q5_0 divide by the signed max
    x[3] = torch.linspace(-1, 1, block)
    x[3, 9] = -x[3].abs().max()  # a tie on |max|: the first one sets the sign
    x[4] = (torch.arange(block) - block // 2) * 0.5  # exact halves for the signed formats (d = +-1)
    x[5] = torch.arange(block) % top + 0.5  # exact halves for Q4_1 / Q5_1 (min 0, max top: d = 1)
    x[5, :2] = torch.tensor([0.0, top])
    x[6] = -2.5  # constant: max == min, so Q4_1 / Q5_1 have d = 0 with a nonzero min
    assert torch.equal(quantize(x, fmt), _gguf_quantize(x, fmt))


def test_quantize_keeps_leading_dims() -> None:
    x = torch.randn(2, 3, 64, generator=_gen(4))
    out = quantize(x, "Q5_1")
    assert out.shape == (2, 3, row_bytes("Q5_1", 64))
    assert torch.equal(out.reshape(6, -1), quantize(x.reshape(6, 64), "Q5_1"))
    torch.testing.assert_close(
        dequantize(out, "Q5_1", x.shape), dequantize(out.reshape(-1), "Q5_1", (2, 3, 64))
    )


def test_dequantize_dtype_and_shape() -> None:
    shape = (2, 3, 256)
    data = _random_blocks("Q4_K", 6, 256, seed=5)
    wide = dequantize(data, "Q4_K", shape)
    assert wide.shape == shape and wide.dtype == torch.float32
    narrow = dequantize(data, "Q4_K", torch.Size(shape), dtype=torch.bfloat16)
    assert narrow.shape == shape and narrow.dtype == torch.bfloat16
    reference = _gguf_dequantize(data, "Q4_K").view(shape)
    assert torch.equal(narrow, reference.to(torch.bfloat16))  # float32 arithmetic, one rounding at the end
    x = torch.randn(shape, generator=_gen(5))
    half = dequantize(_gguf_quantize(x, "F16"), "F16", shape, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, x.half().to(torch.bfloat16))


def test_results_never_alias_their_inputs() -> None:
    x = torch.randn(2, 64, generator=_gen(10))
    before = x.clone()
    data = quantize(x, "F32")
    data.zero_()
    assert torch.equal(x, before)
    data = quantize(x, "F32")
    dequantize(data, "F32", (2, 64)).zero_()
    assert torch.equal(data, _gguf_quantize(x, "F32"))


@pytest.mark.parametrize("fmt", ["F32", "F16", "Q8_0", "Q6_K"])
def test_dequantize_reads_any_byte_layout(fmt: str) -> None:
    """A tensor's bytes sliced out of a file buffer at an odd offset, or strided, decode the same."""
    data = _random_blocks(fmt, 4, 256, seed=6) if fmt in F16_FIELDS else quantize(_values(4, 256, 6), fmt)
    buffer = torch.zeros(data.numel() + 3, dtype=torch.uint8)
    buffer[1 : 1 + data.numel()] = data.reshape(-1)
    odd = buffer[1 : 1 + data.numel()]  # misaligned for float32 / float16 views
    expected = dequantize(data, fmt, (4, 256))
    torch.testing.assert_close(dequantize(odd, fmt, (4, 256)), expected, rtol=0, atol=0)
    strided = torch.stack((data.reshape(-1), data.reshape(-1)), dim=1)[:, 0]
    torch.testing.assert_close(dequantize(strided, fmt, (4, 256)), expected, rtol=0, atol=0)


def test_q8_0_round_trip_error_is_half_a_step() -> None:
    # Scales chosen so that d = amax / 127 is exact in float16: then every value is within d / 2.
    x = torch.rand(8, 256, generator=_gen(7)) * 2 - 1
    blocks = x.view(8, -1, 32)
    amax = 127 * 2.0 ** torch.randint(-12, 4, (8, 8, 1), generator=_gen(8)).float()
    blocks = blocks / blocks.abs().amax(-1, keepdim=True) * amax
    back = dequantize(quantize(blocks.reshape(8, 256), "Q8_0"), "Q8_0", (8, 256)).view(8, -1, 32)
    d = amax / 127
    assert ((back - blocks).abs() <= d / 2).all()
    assert ((back - blocks).abs() > d / 4).any()  # the bound is not vacuous
    # Any data: the stored float16 d adds at most |q| * |d - d16| <= 127 * |d - d16| on top.
    y = torch.randn(8, 256, generator=_gen(9)).view(8, -1, 32)
    packed = quantize(y.reshape(8, 256), "Q8_0")
    d = y.abs().amax(-1, keepdim=True) / 127
    d16 = packed.view(8, -1, 34)[..., :2].contiguous().view(torch.float16).float()
    err = (dequantize(packed, "Q8_0", (8, 256)).view(8, -1, 32) - y).abs()
    assert (err <= d / 2 + 127 * (d - d16).abs() + 1e-7).all()


def test_row_bytes() -> None:
    assert row_bytes("Q4_K", 3072) == 12 * 144
    assert row_bytes("Q8_0", 64) == 2 * 34
    assert row_bytes("BF16", 5) == 10
    with pytest.raises(GGMLError, match="multiple of 256"):
        row_bytes("Q4_K", 100)
    with pytest.raises(GGMLError, match="multiple of 32"):
        quantize(torch.zeros(2, 48), "Q8_0")


def test_byte_count_mismatch() -> None:
    data = quantize(torch.zeros(4, 64), "Q8_0")
    with pytest.raises(
        GGMLError, match=r"Q8_0 tensor of shape \[4, 96\] takes 408 bytes, but data holds 272"
    ):
        dequantize(data, "Q8_0", (4, 96))
    with pytest.raises(GGMLError, match="multiple of 32"):
        dequantize(data, "Q8_0", (8, 34))
    with pytest.raises(GGMLError, match="uint8"):
        dequantize(data.float(), "Q8_0", (4, 64))


@pytest.mark.parametrize(("type_id", "name"), [(23, "IQ4_XS"), (9, "Q8_1")])
def test_unsupported_type_id(type_id: int, name: str) -> None:
    with pytest.raises(GGMLError) as info:
        format_by_id(type_id)
    message = str(info.value)
    assert f"{type_id} ({name})" in message
    assert all(fmt in message for fmt in FORMATS)
    with pytest.raises(GGMLError, match="unknown GGML format 'IQ4_XS'"):
        dequantize(torch.zeros(136, dtype=torch.uint8), "IQ4_XS", (1, 256))


def test_quantize_to_k_quants_decodes_as_gguf_does() -> None:
    # the K-quants are written too (their bytes are checked against llama.cpp in test_ggml_kquants.py)
    x = torch.randn(2, 512, generator=_gen(4))
    for fmt in K_QUANTS:
        data = quantize(x, fmt)
        torch.testing.assert_close(
            dequantize(data, fmt, x.shape), _gguf_dequantize(data, fmt), rtol=0, atol=0
        )
