"""Variation seeds and seed resizing (`pictor.noise_variation`) against A1111's rules written out plainly
here, one image at a time on [C, H, W] noise (modules/rng.py, ImageRNG.first with the CPU generator)."""

from __future__ import annotations

import math

import pytest
import torch

from pictor.noise_variation import slerp, varied_noise

C = 4


def draw(seeds: list[int], h: int, w: int) -> torch.Tensor:
    """pictor's initial noise: per image, a CPU generator seeded with its seed."""
    return torch.cat([torch.randn(1, C, h, w, generator=torch.Generator().manual_seed(s)) for s in seeds])


def a1111_slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Slerp of two [C, H, W] noises along dim 1, each (channel, column) on its own great circle."""
    out = torch.empty_like(low)
    for c in range(low.shape[0]):
        for x in range(low.shape[2]):
            a, b = low[c, :, x].double(), high[c, :, x].double()
            cos = float((a / a.norm()) @ (b / b.norm()))
            omega = math.acos(cos)
            out[c, :, x] = (math.sin((1 - val) * omega) * a + math.sin(val * omega) * b) / math.sin(omega)
    return out


def a1111_noise(seed: int, subseed: int, strength: float, shape: tuple[int, int, int], src: tuple[int, int]):  # type: ignore[no-untyped-def]
    """One image's first noise: drawn at `src` (h, w), blended with the subseed's, centred on `shape`."""
    c, h, w = shape

    def randn(s: int, hh: int, ww: int) -> torch.Tensor:
        return torch.randn(1, c, hh, ww, generator=torch.Generator().manual_seed(s))[0]

    noise = randn(seed, *src)
    if strength:
        noise = a1111_slerp(strength, noise, randn(subseed, *src))
    if src == (h, w):
        return noise
    out = randn(seed, h, w)
    for y in range(h):  # every target pixel that the centred source covers takes the source's
        for x in range(w):
            sy, sx = y - (h - src[0]) // 2, x - (w - src[1]) // 2
            if 0 <= sy < src[0] and 0 <= sx < src[1]:
                # A1111 copies a (h + 2 dy)-row block where the source is larger: its last row stays
                # the target's own when the difference is odd
                if src[0] > h and y >= src[0] + 2 * ((h - src[0]) // 2):
                    continue
                if src[1] > w and x >= src[1] + 2 * ((w - src[1]) // 2):
                    continue
                out[:, y, x] = noise[:, sy, sx]
    return out


def test_no_variation_is_the_plain_noise() -> None:
    assert torch.equal(varied_noise(draw, [3, 4], 6, 8), draw([3, 4], 6, 8))
    assert torch.equal(
        varied_noise(draw, [3], 6, 8, variation_seed=9, variation_strength=0.0), draw([3], 6, 8)
    )


@pytest.mark.parametrize("strength", [0.05, 0.3, 0.7, 1.0])
def test_variation_seeds_follow_a1111(strength: float) -> None:
    got = varied_noise(draw, [7, 7, 7], 6, 8, variation_seed=100, variation_strength=strength)
    for j in range(3):  # image j: the seed's noise with variation seed 100 + j
        want = a1111_noise(7, 100 + j, strength, (C, 6, 8), (6, 8))
        torch.testing.assert_close(got[j], want.float(), atol=1e-5, rtol=0)
    assert not torch.equal(got[0], got[1])
    if strength == 1.0:  # all the way: the variation seed's own noise
        torch.testing.assert_close(got[1], draw([101], 6, 8)[0], atol=1e-5, rtol=0)


def test_slerp_keeps_the_noise_unit_variance_where_a_straight_blend_does_not() -> None:
    a, b = draw([1], 64, 64), draw([2], 64, 64)
    assert abs(float(slerp(0.5, a, b).std()) - 1.0) < 0.02
    assert abs(float((0.5 * a + 0.5 * b).std()) - 1.0) > 0.25
    torch.testing.assert_close(slerp(0.4, a, a), a)  # one noise with itself: itself (the straight branch)


@pytest.mark.parametrize(
    ("src", "size"),
    [((4, 6), (6, 8)), ((8, 10), (6, 8)), ((5, 9), (6, 8)), ((7, 4), (6, 8)), ((6, 8), (6, 8))],
)
def test_seed_resize_centres_noise_of_another_size(src: tuple[int, int], size: tuple[int, int]) -> None:
    got = varied_noise(
        draw, [11], *size, variation_seed=5, variation_strength=0.25, resize_from=(src[1], src[0])
    )
    want = a1111_noise(11, 5, 0.25, (C, *size), src)
    torch.testing.assert_close(got[0], want.float(), atol=1e-5, rtol=0)
    plain = varied_noise(draw, [11], *size, resize_from=(src[1], src[0]))
    torch.testing.assert_close(plain[0], a1111_noise(11, 0, 0.0, (C, *size), src).float(), atol=0, rtol=0)


def test_columns_whose_slerp_is_undefined_are_blended_straight() -> None:
    """(Found in review: noise one row high made every column's vectors parallel or opposite, and the slerp
    divided 0 by 0.) A one-row noise, and a few-row one, stay finite; A1111's maths is unchanged elsewhere."""
    one_row = varied_noise(draw, [3], 4, 4, variation_seed=9, variation_strength=0.3, resize_from=(1, 1))
    assert torch.isfinite(one_row).all()
    low, high = draw([3], 1, 6), draw([9], 1, 6)
    torch.testing.assert_close(slerp(0.3, low, high), 0.7 * low + 0.3 * high)
    few = slerp(0.3, draw([1], 2, 64), draw([2], 2, 64))
    assert torch.isfinite(few).all()
