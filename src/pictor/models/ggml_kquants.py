"""Writing GGML's K-quants (Q2_K ... Q6_K) in torch, byte for byte as llama.cpp's reference quantizers.

llama.cpp's `quantize_row_q{2..6}_K_ref` (what `llama-quantize` runs without an importance matrix, and so
what city96's FLUX.1 GGUF files hold) search for each 16- or 32-value sub-block's scale (and minimum) by
trying a few candidate scales and keeping the one of least weighted error (`make_qkx2_quants`,
`make_qx_quants`, `make_q3_quants`), then store the sub-block scales as 4-, 6- or 8-bit multiples of one
float16 super-block scale and quantize the values again against the stored scales.

Getting the same bytes means doing the same float32 operations in the same order, so:
- every sum the C code accumulates in a loop is accumulated here in the same order, one element after the
  other (torch's `sum` adds pairwise, which rounds differently and flips some choices between candidates);
  the elementwise work is vectorized over all sub-blocks of a chunk, and only those additions loop;
- `nearest_int` is the C bit trick (add 1.5 * 2**23, read the mantissa bits): round half to even for
  normal inputs, and the same garbage as C for the huge ones its assert rules out;
- products are written in C's left-to-right association, e.g. `w*x*l` as (w * x) * l, never fused into
  one multiply-add (torch's elementwise ops round each step, like C compiled without FMA contraction);
- a division with a constant on one side is a real division (`_rdiv`, `_div`: torch turns `c / t` and
  `t / c` into multiplies by a reciprocal), and sqrtf is a float64 square root rounded to float32.

The sub-block code works on (n, B) tensors, value index first, so that the C loops' "element i of every
sub-block" is one contiguous row. Rows are quantized in chunks of super-blocks, to bound the memory a
FLUX.1-size matrix needs (measured: 100-150 MB beyond the 144 MB input, where whole-matrix
temporaries would take several GB).

This module is a leaf beside `ggml_quants`, which registers its encoders: it imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["KQUANT_ENCODERS", "quantize_k"]

_QK_K = 256
_EPS = 1e-15  # llama.cpp's GROUP_MAX_EPS: a sub-block below it in magnitude counts as all zero
# Super-blocks per chunk: 8192 * 256 values = 8 MB of float32 input; the temporaries are a small multiple.
_CHUNK = 8192


def _f32(v: float) -> float:
    """v rounded to float32, as a Python float: a C `float` constant or constant expression."""
    return torch.tensor(v, dtype=torch.float32).item()


def _rdiv(num: float, t: torch.Tensor) -> torch.Tensor:
    """num / t as one float32 division. `num / t` in torch is t.reciprocal() * num, rounded twice."""
    return torch.full_like(t, num) / t


def _div(t: torch.Tensor, num: float) -> torch.Tensor:
    """t / num as one float32 division. torch divides by a Python number as a multiply by its reciprocal."""
    return t / torch.full_like(t, num)


def _nearest_int(f: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int: (bits of f + 12582912.f) & 0x7fffff - 0x400000, as int32."""
    bits = (f.to(torch.float32) + 12582912.0).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """sum over dim 0 added one element after the other from 0.0, as C's `float s = 0; s += t[i]`."""
    acc = torch.zeros_like(t[0])
    for row in t:
        acc += row
    return acc


def _fp16_round(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGML_FP32_TO_FP16 (round to nearest even) as (float16 bytes (B, 2), the float16 value as float32)."""
    h = x.to(torch.float16)
    return h.view(torch.uint8).reshape(-1, 2), h.to(torch.float32)


def _positive_max(t: torch.Tensor) -> torch.Tensor:
    """max(0, row maxima) as C's `float m = 0; if (v > m) m = v;`: +0.0, never -0.0, when none is > 0."""
    m = t.amax(dim=1, keepdim=True)
    return torch.where(m > 0, m, 0.0)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude along dim 0, sign kept; the first of equal ones, as the C `>` loop."""
    return x.gather(0, x.abs().argmax(dim=0, keepdim=True))[0]


# ---------------------------------------------------------------------------------------------------------
# Sub-block searches. x: (n, B) float32 values, n = 16 or 32; B independent sub-blocks.


def _make_qkx2(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants: (scale (B,), the_min (B,), L (n, B) int32 in [0, nmax]) for an affine sub-block."""
    mn = x[0].clone()
    mx = x[0].clone()
    for row in x[1:]:  # C's `if (x[i] < min) min = x[i]` keeps the first of equal values (and its zero sign)
        mn = torch.where(row < mn, row, mn)
        mx = torch.where(row > mx, row, mx)
    sum_w = w[0].clone()  # C starts these two from element 0, not from 0.0
    for row in w[1:]:
        sum_w += row
    wx = w * x
    sum_x = wx[0].clone()
    for row in wx[1:]:
        sum_x += row
    mn = torch.where(mn > 0, 0.0, mn)
    flat = mx == mn
    iscale = _rdiv(nmax, mx - mn)
    scale = _rdiv(1.0, iscale)
    L = _nearest_int(iscale * (x - mn)).clamp_(0, nmax)
    diff = (scale * L + mn) - x
    diff = diff.abs() if use_mad else diff * diff
    best_error = _seq_sum(w * diff)
    for step in range(nstep + 1):
        # C: iscale = (rmin + rdelta*is + nmax)/(max - min), the numerator in float32
        # (and min is the best candidate's so far: C updates it inside the loop)
        num = _f32(_f32(rmin + _f32(_f32(rdelta) * step)) + nmax)
        laux = _nearest_int(_rdiv(num, mx - mn) * (x - mn)).clamp_(0, nmax)
        lf = laux.to(torch.float32)
        wl = w * lf
        sum_l = _seq_sum(wl)
        sum_l2 = _seq_sum(wl * lf)
        sum_xl = _seq_sum(wl * x)
        big_d = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / big_d
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / big_d
        pos = this_min > 0
        this_min = torch.where(pos, 0.0, this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        diff = (this_scale * lf + this_min) - x
        diff = diff.abs() if use_mad else diff * diff
        cur_error = _seq_sum(w * diff)
        take = (big_d > 0) & (cur_error < best_error) & ~flat  # C returned early for a flat sub-block
        L = torch.where(take, laux, L)
        best_error = torch.where(take, cur_error, best_error)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    L = torch.where(flat, 0, L)
    scale = torch.where(flat, 0.0, scale)
    return scale, -mn, L


def _make_qx(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants with rmse_type 1 and no importance: (scale (B,), L (n, B) int32 in [0, 2 * nmax))."""
    mx = _signed_absmax(x)
    zero = x.abs().amax(dim=0) < _EPS
    w = x * x
    wx = w * x

    def attempt(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lv = _nearest_int(iscale * x).clamp_(-nmax, nmax - 1)
        lf = lv.to(torch.float32)
        return lv, _seq_sum(wx * lf), _seq_sum((w * lf) * lf)

    L, sumlx, suml2 = attempt(_rdiv(-nmax, mx))
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, sumlx, suml2 = attempt(_rdiv(-_f32(nmax + _f32(_f32(0.1) * step)), mx))
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(take, lv, L)
        scale = torch.where(take, sumlx / suml2, scale)
        best = torch.where(take, scale * sumlx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, L + nmax)


def _make_q3(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants with do_rmse: (scale (B,), L (n, B) int32 in [0, 2 * nmax)).

    The refinement visits the values in order and each accepted change updates the sums the next value
    sees, so it loops over values (vectorized over sub-blocks). C stops a sub-block after a pass without
    changes; another pass over an unchanged state changes nothing again, so all run the 5 passes."""
    mx = _signed_absmax(x)
    zero = x.abs().amax(dim=0) < _EPS
    w = x * x
    wx = w * x
    L = _nearest_int(_rdiv(-nmax, mx) * x).clamp_(-nmax, nmax - 1)
    lf = L.to(torch.float32)
    sumlx = _seq_sum(wx * lf)
    suml2 = _seq_sum((w * lf) * lf)
    for _ in range(5):
        changed = False
        for i in range(x.shape[0]):
            li = L[i].to(torch.float32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (w[i] * li) * li
            new_l = _nearest_int((x[i] * sl2) / slx).clamp_(-nmax, nmax - 1)
            nf = new_l.to(torch.float32)
            slx = slx + wx[i] * nf
            sl2 = sl2 + (w[i] * nf) * nf
            # slx tested before the update, as in C (its update only runs inside `if (slx > 0)`)
            ok = (sumlx - wx[i] * li > 0) & (new_l != L[i])
            ok &= (sl2 > 0) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            if bool(ok.any()):
                changed = True
                L[i] = torch.where(ok, new_l, L[i])
                sumlx = torch.where(ok, slx, sumlx)
                suml2 = torch.where(ok, sl2, suml2)
        if not changed:
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, L + nmax)


# ---------------------------------------------------------------------------------------------------------
# Packing helpers. L: (B, 256) levels of each super-block, in value order.


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K qs: per 128 values, byte l = L[l] | L[l+32] << 2 | L[l+64] << 4 | L[l+96] << 6: (B, 64)."""
    q = L.reshape(-1, 2, 4, 32)
    packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return packed.reshape(-1, 64)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins (B, 8) into Q4_K/Q5_K's 12 bytes (see ggml_quants._k4_scales)."""
    lo_s, hi_s = ls[:, :4], ls[:, 4:]
    lo_m, hi_m = lm[:, :4], lm[:, 4:]
    first = lo_s | ((hi_s >> 4) << 6)
    second = lo_m | ((hi_m >> 4) << 6)
    third = (hi_s & 0xF) | ((hi_m & 0xF) << 4)
    return torch.cat((first, second, third), dim=1)


def _k4_levels(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> torch.Tensor:
    """Q4_K (nmax 15) / Q5_K (nmax 31) of (B, 256) values: (the 16 bytes d | dmin | scales, L (B, 256) in
    [0, nmax] in value order)."""
    nb = x.shape[0]
    xs = x.reshape(nb * 8, 32).T.contiguous()  # (32, B * 8): one column per 32-value sub-block
    # sqrtf is correctly rounded; torch's float32 sqrt on the CPU is not always (seen 1 ulp off), while a
    # float64 square root rounded to float32 is (53 >= 2 * 24 + 2 bits, so the double rounding is harmless)
    av_x = torch.sqrt(_div(_seq_sum(xs * xs), 32.0).double()).float()
    w = av_x + xs.abs()
    scales, mins, L = _make_qkx2(xs, w, nmax, rmin, 0.1, nstep, use_mad=False)
    scales, mins = scales.view(nb, 8), mins.view(nb, 8)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    inv_scale = torch.where(max_scale > 0, _rdiv(63.0, max_scale), 0.0)
    inv_min = torch.where(max_min > 0, _rdiv(63.0, max_min), 0.0)
    ls = (_nearest_int(inv_scale * scales) & 0xFF).clamp_max_(63)  # C: uint8_t, then MIN(63, .)
    lm = (_nearest_int(inv_min * mins) & 0xFF).clamp_max_(63)
    d_bytes, d = _fp16_round(_div(max_scale, 63.0))
    m_bytes, dmin = _fp16_round(_div(max_min, 63.0))
    dd = (d * ls).reshape(1, nb * 8)  # the stored scales, per sub-block column (column b * 8 + j)
    dm = (dmin * lm).reshape(1, nb * 8)
    again = _nearest_int((xs + dm) / dd).clamp_(0, nmax)
    L = torch.where(dd != 0, again, L)
    L = L.view(32, nb, 8).permute(1, 2, 0).reshape(nb, 256)  # back to value order per super-block
    head = torch.cat((d_bytes, m_bytes, _pack_k4_scales(ls, lm).to(torch.uint8)), dim=1)
    return head, L


def _qz_q4_k(x: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales(12) | qs(128): per 64 values, byte l = L[l] | L[l + 32] << 4
    head, L = _k4_levels(x, 15, -1.0, 20)
    q = L.reshape(-1, 4, 2, 32)
    return torch.cat((head, (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)), dim=1)


def _qz_q5_k(x: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales(12) | qh(32) | qs(128): low nibbles as Q4_K; bit j of qh byte i = bit 4 of value 32j+i
    head, L = _k4_levels(x, 31, -0.5, 15)
    q = L.reshape(-1, 4, 2, 32) & 0xF
    high = (L.reshape(-1, 8, 32) >> 4) << torch.arange(8, dtype=torch.int32, device=L.device).view(1, 8, 1)
    qh = high.sum(dim=1)  # disjoint bits: the sum is their bitwise or
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat((head, qh.to(torch.uint8), qs.to(torch.uint8)), dim=1)


def _qz_q2_k(x: torch.Tensor) -> torch.Tensor:
    # scales(16: low nibble scale, high nibble min) | qs(64) | d | dmin
    nb = x.shape[0]
    xs = x.reshape(nb * 16, 16).T.contiguous()  # (16, B * 16)
    scales, mins, L = _make_qkx2(xs, xs.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.view(nb, 16), mins.view(nb, 16)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    ls = torch.where(max_scale > 0, _nearest_int(_rdiv(15.0, max_scale) * scales), 0)
    lm = torch.where(max_min > 0, _nearest_int(_rdiv(15.0, max_min) * mins), 0)
    sc = (ls | (lm << 4)) & 0xFF  # C: uint8_t l, then |= (l << 4)
    d_bytes, d = _fp16_round(torch.where(max_scale > 0, _div(max_scale, 15.0), 0.0))
    m_bytes, dmin = _fp16_round(torch.where(max_min > 0, _div(max_min, 15.0), 0.0))
    dd = (d * (sc & 0xF)).reshape(1, nb * 16)
    dm = (dmin * (sc >> 4)).reshape(1, nb * 16)
    again = _nearest_int((xs + dm) / dd).clamp_(0, 3)
    L = torch.where(dd != 0, again, L).view(16, nb, 16).permute(1, 2, 0).reshape(nb, 256)
    return torch.cat((sc.to(torch.uint8), _pack_2bit(L).to(torch.uint8), d_bytes, m_bytes), dim=1)


def _qz_q3_k(x: torch.Tensor) -> torch.Tensor:
    # hmask(32) | qs(64) | scales(12: 6-bit, offset 32) | d
    nb = x.shape[0]
    xs = x.reshape(nb * 16, 16).T.contiguous()
    scales, L = _make_q3(xs, 4)
    scales = scales.view(nb, 16)
    max_scale = _signed_absmax(scales.T)
    has = (max_scale != 0).unsqueeze(1)
    iscale = _rdiv(-32.0, max_scale).unsqueeze(1)
    lv = _nearest_int(iscale * scales)
    lv = ((lv + 128) & 0xFF) - 128  # C: int8_t l = nearest_int(.)
    lv = torch.where(has, lv.clamp(-32, 31) + 32, 0)  # no scale: the 12 bytes stay zero
    s = torch.cat(
        (
            (lv[:, :8] & 0xF) | ((lv[:, 8:] & 0xF) << 4),
            (lv >> 4)
            .view(nb, 4, 4)
            .transpose(1, 2)
            .mul(torch.tensor([1, 4, 16, 64], device=lv.device))
            .sum(dim=2),
        ),
        dim=1,
    )
    d_bytes, d = _fp16_round(torch.where(has, _rdiv(1.0, iscale), 0.0))
    dd = (d * (lv - 32)).reshape(1, nb * 16)  # the stored 6-bit scale, read back
    again = _nearest_int(xs / dd).clamp_(-4, 3) + 4
    L = torch.where(dd != 0, again, L).view(16, nb, 16).permute(1, 2, 0).reshape(nb, 256)
    high = (L >> 2).view(nb, 8, 32) << torch.arange(8, dtype=torch.int32, device=L.device).view(1, 8, 1)
    hmask = high.sum(dim=1)  # bit j of byte m: value 32j + m has level > 3
    qs = _pack_2bit(L & 3)
    return torch.cat((hmask.to(torch.uint8), qs.to(torch.uint8), s.to(torch.uint8), d_bytes), dim=1)


def _qz_q6_k(x: torch.Tensor) -> torch.Tensor:
    # ql(128) | qh(64) | scales(16 x int8) | d
    nb = x.shape[0]
    xs = x.reshape(nb * 16, 16).T.contiguous()
    scales, L = _make_qx(xs, 32)
    scales = scales.view(nb, 16)
    max_scale = _signed_absmax(scales.T).unsqueeze(1)
    live = max_scale.abs() >= _EPS  # else the whole block is zero bytes, d included
    iscale = _rdiv(-128.0, max_scale)
    sc = _nearest_int(iscale * scales).clamp_max(127)
    sc = torch.where(live, ((sc + 128) & 0xFF) - 128, 0)  # C: int8_t
    d_bytes, d = _fp16_round(torch.where(live, _rdiv(1.0, iscale), 0.0))
    dd = (d * sc).reshape(1, nb * 16)
    again = _nearest_int(xs / dd).clamp_(-32, 31) + 32
    L = torch.where(dd != 0, again, L).view(16, nb, 16).permute(1, 2, 0).reshape(nb, 256)
    L = torch.where(live, L, 0)
    q = L.view(nb, 2, 4, 32)
    ql = torch.cat(
        ((q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4), (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)),
        dim=2,
    ).reshape(nb, 128)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    return torch.cat(
        (ql.to(torch.uint8), qh.reshape(nb, 64).to(torch.uint8), (sc & 0xFF).to(torch.uint8), d_bytes),
        dim=1,
    )


KQUANT_ENCODERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q2_K": _qz_q2_k,
    "Q3_K": _qz_q3_k,
    "Q4_K": _qz_q4_k,
    "Q5_K": _qz_q5_k,
    "Q6_K": _qz_q6_k,
}


def quantize_k(blocks: torch.Tensor, fmt: str, chunk: int = _CHUNK) -> torch.Tensor:
    """(n_blocks, 256) float32 super-blocks -> (n_blocks, type_size) uint8 bytes of K-quant `fmt`."""
    encode = KQUANT_ENCODERS[fmt]
    parts = [encode(blocks[i : i + chunk].to(torch.float32)) for i in range(0, blocks.shape[0], chunk)]
    return torch.cat(parts) if parts else torch.empty(0, 0, dtype=torch.uint8)
