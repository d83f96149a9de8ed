"""pictor's bitsandbytes 4-bit dequantizer against bitsandbytes itself: tests/bnb_golden.safetensors holds
weights that bitsandbytes 0.50.2 quantized (NF4 and FP4, nested and not, blocksizes 32 to 4096) beside its
own dequantize_4bit of them (made once by benchmarks/make_bnb_golden.py; bitsandbytes is not needed here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pictor.models.bnb_quants import (
    BnbError,
    QuantState4bit,
    block_absmax,
    dequantize_4bit,
    dequantize_rows,
    fits_rows,
    quantize_4bit,
    quantize_rows,
    read_quant_state,
    to_rows,
)

GOLDEN = Path(__file__).resolve().parents[1] / "bnb_golden.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _golden() -> dict[str, dict[str, torch.Tensor]]:
    sd = load_file(str(GOLDEN))
    cases: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        case, _, rest = key.partition(".")
        cases.setdefault(case, {})[rest] = t
    return cases


CASES = _golden()


def test_the_golden_file_covers_what_bitsandbytes_writes() -> None:
    states = {name: read_quant_state(t, "weight") for name, t in CASES.items()}
    assert {s.quant_type for s in states.values()} == {"nf4", "fp4"}
    assert {s.nested for s in states.values()} == {True, False}
    assert {s.blocksize for s in states.values()} >= {32, 64, 128, 256, 4096}
    assert {s.dtype for s in states.values()} == {torch.float32, torch.float16, torch.bfloat16}
    big = states["nf4_b64_nested"]
    assert big.nested_absmax is not None and big.nested_absmax.numel() == 2  # two nested blocks
    # bitsandbytes' quant_storage option: the packed bytes stored as bf16 / float32 values
    assert {CASES[name]["weight"].dtype for name in states} == {torch.uint8, torch.bfloat16, torch.float32}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dequantize_equals_bitsandbytes_bit_for_bit(case: str) -> None:
    t = CASES[case]
    state = read_quant_state(t, "weight")
    checked = 0
    for tag, dtype in DTYPES.items():
        # bitsandbytes' reference kernel (the CUDA kernel's blocks over the flattened weight) where its CPU
        # kernel reads blocks per row, which differs when a row is not a whole number of blocks
        want = t.get(f"dq_ref_{tag}", t.get(f"dq_{tag}"))
        if want is None:
            continue
        got = dequantize_4bit(t["weight"], state, dtype)
        if "dq_rows" in t:  # the big case keeps some rows only
            got = got[t["dq_rows"].long()]
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(got, want), (case, tag)
        checked += 1
    assert checked
    if f"dq_ref_{next(iter(DTYPES))}" not in t and "dq_ref_bf16" not in t:
        # the default dtype is the quant state's, as in bitsandbytes
        assert dequantize_4bit(t["weight"], state).dtype == state.dtype


@pytest.mark.parametrize("case", sorted(CASES))
def test_pictors_rows_hold_the_same_values(case: str) -> None:
    t = CASES[case]
    state = read_quant_state(t, "weight")
    if not fits_rows(state):
        assert state.blocksize == 32 or state.shape[1] % 64
        with pytest.raises(BnbError, match="does not fit"):
            to_rows(t["weight"], state)
        return
    rows = to_rows(t["weight"], state)
    out, cols = state.shape
    assert rows.dtype == torch.uint8 and rows.shape == (out, cols // 64 * 36)  # 4.5 bits a weight
    fmt = state.quant_type.upper()
    for dtype in DTYPES.values():
        want = dequantize_4bit(t["weight"], state, dtype)
        assert torch.equal(dequantize_rows(rows, fmt, (out, cols), dtype), want)
    # a row alone dequantizes alone: the layout joins and splits along the rows (diffusers' q, k, v)
    wide = dequantize_4bit(t["weight"], state, torch.float32)
    assert torch.equal(dequantize_rows(rows[1:2], fmt, (1, cols), torch.float32), wide[1:2])


@pytest.mark.parametrize(
    "case", ["nf4_b64", "fp4_b64", "nf4_b256", "nf4_b32", "nf4_b64_straddle", "fp4_b64_partial"]
)
def test_quantize_4bit_writes_bitsandbytes_bytes(case: str) -> None:
    t = CASES[case]
    state = read_quant_state(t, "weight")
    packed, absmax = quantize_4bit(t["source"], state.quant_type, state.blocksize)
    assert torch.equal(packed, t["weight"])
    if not state.nested:
        assert torch.equal(absmax, t["weight.absmax"])
    else:  # the nested absmax is bitsandbytes' second quantization of these
        assert torch.allclose(absmax, block_absmax(state), rtol=0.02)


def test_quantize_rows_is_bitsandbytes_blocks_of_64() -> None:
    t = CASES["nf4_b64"]
    state = read_quant_state(t, "weight")
    assert torch.equal(quantize_rows(t["source"].float(), "NF4"), to_rows(t["weight"], state))


def _state_tensors(case: str, **info_changes: object) -> dict[str, torch.Tensor]:
    t = {k: v for k, v in CASES[case].items() if k.startswith("weight")}
    (key,) = [k for k in t if "quant_state" in k]
    info = json.loads(bytes(t[key].tolist()))
    info.update(info_changes)
    t[key] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)
    return t


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quant_type": "int4"}, "quant_type 'int4'.*nf4 and fp4"),
        ({"blocksize": 48}, "blocksize 48"),
        ({"blocksize": 64.0}, "blocksize 64.0"),
        ({"shape": [8, 256]}, r"for 2048 4-bit weights of shape \(8, 256\)"),
        ({"dtype": "int8"}, "dtype 'int8'"),
        ({"shape": "wide"}, "no list of positive sizes"),
    ],
)
def test_bad_quant_states_are_refused_by_name(change: dict[str, object], message: str) -> None:
    with pytest.raises(BnbError, match=message):
        read_quant_state(_state_tensors("nf4_b64", **change), "weight")


@pytest.mark.parametrize("missing", ["weight.absmax", "weight.quant_map", "weight.nested_absmax"])
def test_missing_parts_are_named(missing: str) -> None:
    t = _state_tensors("nf4_b64_nested")
    del t[missing]
    with pytest.raises(BnbError, match=f"{missing} is missing"):
        read_quant_state(t, "weight")


def test_a_foreign_code_table_and_damaged_json_are_refused() -> None:
    t = _state_tensors("fp4_b64")
    t["weight.quant_map"] = t["weight.quant_map"] * 2
    with pytest.raises(BnbError, match="not bitsandbytes' fp4 table"):
        read_quant_state(t, "weight")
    t = _state_tensors("fp4_b64")
    t["weight.quant_state.bitsandbytes__fp4"] = torch.tensor([0xFF, 0x7B], dtype=torch.uint8)
    with pytest.raises(BnbError, match="not the JSON"):
        read_quant_state(t, "weight")
    del t["weight.quant_state.bitsandbytes__fp4"]
    with pytest.raises(BnbError, match="not a bitsandbytes 4-bit weight"):
        read_quant_state(t, "weight")


def test_block_absmax_is_bitsandbytes_dequantized_absmax() -> None:
    t = CASES["nf4_b64_nested"]
    assert torch.equal(block_absmax(read_quant_state(t, "weight")), t["absmax_dq"])  # both nested blocks


def test_indices_without_a_nested_state_and_two_quant_states_are_refused() -> None:
    t = _state_tensors("nf4_b64_nested")
    (key,) = [k for k in t if "quant_state" in k]
    info = json.loads(bytes(t[key].tolist()))
    for field in ("nested_blocksize", "nested_dtype", "nested_offset"):
        del info[field]
    t[key] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)
    del t["weight.nested_absmax"], t["weight.nested_quant_map"]
    with pytest.raises(BnbError, match=r"weight.absmax is torch.uint8 .*no nested_absmax"):
        read_quant_state(t, "weight")
    t = _state_tensors("nf4_b64")
    t["weight.quant_state.bitsandbytes__fp4"] = t["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(BnbError, match="2 quant states"):
        read_quant_state(t, "weight")


def test_a_weight_whose_bytes_do_not_fit_its_shape_is_refused() -> None:
    t = _state_tensors("nf4_b64")
    t["weight"] = t["weight"][:-3]  # truncated
    with pytest.raises(BnbError, match=r"weight: 253 torch.uint8 values \(253 bytes\).*256 bytes"):
        read_quant_state(t, "weight")
    t["weight"] = torch.zeros(256, 1, dtype=torch.bool)
    with pytest.raises(BnbError, match="bool values cannot hold"):
        read_quant_state(t, "weight")


def test_block_absmax_is_the_nested_formula() -> None:
    state = read_quant_state(CASES["nf4_b64_nested"], "weight")
    assert state.nested_absmax is not None and state.nested_quant_map is not None
    q = state.absmax.long()
    i = torch.arange(q.numel()) // 256
    want = state.nested_quant_map[q] * state.nested_absmax[i] + torch.tensor(state.nested_offset)
    assert torch.equal(block_absmax(state), want)
    plain = QuantState4bit("nf4", 64, torch.float32, (1, 64), torch.tensor([0.5]))
    assert torch.equal(block_absmax(plain), torch.tensor([0.5]))
