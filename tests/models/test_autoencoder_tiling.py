"""Tiled autoencoder passes: tile placement, blending, and closeness to the whole pass on a trained model."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.autoencoder_tiling import tile_starts, tiled_decode, tiled_encode


@pytest.mark.parametrize(
    "size,tile,overlap",
    [
        (8, 8, 2),
        (5, 8, 2),
        (9, 8, 2),
        (16, 8, 2),
        (57, 32, 8),
        (40, 32, 8),
        (30, 6, 0),
        (64, 32, 8),
        (100, 9, 4),
    ],
)
def test_tiles_cover_everything_with_at_least_the_overlap(size: int, tile: int, overlap: int) -> None:
    starts, length = tile_starts(size, tile, overlap)
    assert length <= tile and starts[0] == 0 and starts[-1] + length == size
    for a, b in itertools.pairwise(starts):
        assert a < b and a + length - b >= overlap
    if len(starts) > 1:
        # the fewest tiles (one less could not keep every overlap), each no longer than that needs
        assert (len(starts) - 2) * (tile - overlap) + tile < size
        assert len(starts) * (length - 1) < size + (len(starts) - 1) * overlap


def test_tile_overlap_must_be_smaller_than_the_tile() -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(16, 4, 4)


def _upsample(z: torch.Tensor) -> torch.Tensor:
    """A decoder whose output pixel depends only on the latent pixel under it: tiling cannot change it."""
    return F.interpolate(z[:, :3] * 2 + 1, scale_factor=4, mode="nearest")


@pytest.mark.parametrize("tile,overlap", [(4, 1), (6, 2), (5, 0), (16, 4)])
def test_local_decoder_tiled_equals_whole(tile: int, overlap: int) -> None:
    z = torch.randn(2, 4, 12, 10)
    tiled = tiled_decode(_upsample, z, tile, overlap, factor=4)
    torch.testing.assert_close(tiled, _upsample(z), rtol=1e-6, atol=1e-6)


def test_progress_after_each_tile() -> None:
    calls: list[int] = []
    tiled_decode(_upsample, torch.randn(1, 4, 12, 10), 6, 2, factor=4, on_tile=lambda: calls.append(1))
    assert len(calls) == len(tile_starts(12, 6, 2)[0]) * len(tile_starts(10, 6, 2)[0])


def test_local_encoder_tiled_equals_whole() -> None:
    x = torch.randn(1, 3, 48, 40)

    def encode(p: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(p, 4).repeat(1, 2, 1, 1)[:, :4]

    torch.testing.assert_close(tiled_encode(encode, x, 5, 2, factor=4), encode(x), rtol=1e-6, atol=1e-6)


def test_overlaps_are_blended_not_overwritten() -> None:
    """Each tile decodes to its own constant: across an overlap the result crossfades linearly from one to
    the other, so a seam is a gradient, not a step."""
    z = torch.zeros(1, 4, 4, 12)
    counter = iter(range(100))

    def constant(p: torch.Tensor) -> torch.Tensor:
        return torch.full((1, 3, p.shape[-2] * 2, p.shape[-1] * 2), float(next(counter)))

    out = tiled_decode(constant, z, 8, 4, factor=2)[0, 0, 0]  # tiles [0, 8) and [4, 12): overlap [8, 16) px
    assert torch.all(out[:8] == 0) and torch.all(out[16:] == 1)
    # a linear crossfade: pixel k of the 8-pixel overlap is (k + 0.5) / 8 of the way from one to the other
    torch.testing.assert_close(out[8:16], (torch.arange(8) + 0.5) / 8)


def test_a_tile_as_large_as_the_input_is_the_whole_pass() -> None:
    torch.manual_seed(0)
    ae = AutoEncoder(
        AutoEncoderParams(
            resolution=16,
            in_channels=3,
            ch=32,
            out_ch=3,
            ch_mult=[1, 2],
            num_res_blocks=1,
            z_channels=4,
            scale_factor=1.0,
            shift_factor=0.0,
        )
    ).eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(tiled_decode(ae.decode, z, 8, 2, factor=2), ae.decode(z))
