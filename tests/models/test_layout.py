"""LayoutAdapter and Flux's img_residuals: exact box coverage, a new adapter changes nothing, residuals reach
every block, tokens outside every box get nothing, and bad inputs are refused with the reason."""

from __future__ import annotations

import pytest
import torch

from pictor.models.flux import Flux, make_img_ids, make_txt_ids
from pictor.models.layout import LayoutAdapter, LayoutParams, box_coverage

from tiny_flux import tiny_params


def test_coverage_is_the_covered_fraction_of_each_cell() -> None:
    # A 4x4 grid of cells 0.25 wide: the box covers column 0 fully, column 1 to 0.1 / 0.25 = 0.4, and rows
    # 1 (from y 0.3: 0.8 of it) and 2 (to y 0.6: 0.4 of it).
    cover = box_coverage(torch.tensor([[[0.0, 0.3, 0.35, 0.6]]]), 4, 4).reshape(4, 4)
    want = torch.zeros(4, 4)
    want[1, 0], want[1, 1] = 0.8, 0.8 * 0.4
    want[2, 0], want[2, 1] = 0.4, 0.4 * 0.4
    torch.testing.assert_close(cover, want, atol=1e-6, rtol=0)
    # Summed over the cells: the box's area in cells (0.35 * 0.3 of a 16-cell image).
    assert cover.sum().item() == pytest.approx(0.35 * 0.3 * 16, abs=1e-5)


def test_zero_area_boxes_cover_nothing_and_rectangular_grids_work() -> None:
    boxes = torch.tensor([[[0.2, 0.2, 0.2, 0.9], [0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 1.0, 0.5]]])
    cover = box_coverage(boxes, 2, 6)  # 2 rows, 6 columns
    assert cover.shape == (1, 3, 12)
    assert cover[0, :2].abs().sum() == 0
    # The right half of the top row: columns 3..5 of row 0.
    want = torch.tensor([[0.0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(cover[0, 2].reshape(2, 6), want, atol=1e-6, rtol=0)


def test_coverage_refuses_a_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\[B, N, 4\]"):
        box_coverage(torch.zeros(2, 4), 2, 2)


def _adapter(random_out: bool) -> LayoutAdapter:
    torch.manual_seed(1)
    adapter = LayoutAdapter(LayoutParams(phrase_dim=20, hidden_size=32, num_blocks=2)).init_weights()
    if random_out:
        for lin in adapter.block_out:
            torch.nn.init.normal_(lin.weight, std=0.5)
    return adapter


def _flux_inputs(batch: int = 2) -> tuple[Flux, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    flux = Flux(tiny_params()).eval()  # default init: every weight random
    lat = 8  # latent 8x8 -> 4x4 = 16 tokens
    inputs = {
        "img": torch.randn(batch, 16, 16),
        "img_ids": make_img_ids(batch, lat, lat),
        "txt": torch.randn(batch, 5, 20),
        "txt_ids": make_txt_ids(batch, 5),
        "timesteps": torch.rand(batch),
        "y": torch.randn(batch, 24),
    }
    return flux, inputs


def test_a_new_adapter_leaves_the_velocity_exactly_as_it_was() -> None:
    flux, inputs = _flux_inputs()
    res = _adapter(random_out=False)(torch.randn(2, 3, 20), torch.rand(2, 3, 4).sort(-1).values, 4, 4)
    assert all(r.abs().sum() == 0 for r in res)
    with torch.no_grad():
        assert torch.equal(flux(**inputs), flux(**inputs, img_residuals=res))


def test_residuals_change_the_velocity_through_double_and_single_blocks() -> None:
    flux, inputs = _flux_inputs()
    with torch.no_grad():
        base = flux(**inputs)
        for block in range(2):  # tiny_params: one double block (0), one single block (1)
            res = [torch.zeros(2, 16, 32) for _ in range(2)]
            res[block] = torch.randn(2, 16, 32)
            moved = (flux(**inputs, img_residuals=res) - base).abs().max()
            assert moved > 1e-3, f"a residual before block {block} did not reach the output"


def test_tokens_outside_every_box_get_the_empty_feature() -> None:
    adapter = _adapter(random_out=True)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5]]])  # the top-left 2x2 cells of a 4x4 grid
    res = adapter(torch.randn(1, 1, 20), boxes, 4, 4)
    for r, lin in zip(res, adapter.block_out, strict=True):
        grid = r[0].reshape(4, 4, 32)
        empty = lin(adapter.empty)
        outside = torch.ones(4, 4, dtype=torch.bool)
        outside[:2, :2] = False
        torch.testing.assert_close(grid[outside], empty.expand(12, 32))
        assert (grid[:2, :2] - empty).abs().min() > 0  # inside: the phrase, not empty space


def test_a_half_covered_cell_is_half_phrase_half_empty() -> None:
    adapter = _adapter(random_out=True)
    phrase = torch.randn(1, 1, 20)
    half = adapter(phrase, torch.tensor([[[0.0, 0.0, 0.25, 1.0]]]), 1, 2)  # covers half of cell 0
    full = adapter(phrase, torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]), 1, 2)
    for h, f, lin in zip(half, full, adapter.block_out, strict=True):
        torch.testing.assert_close(h[0, 0], (f[0, 0] + lin(adapter.empty)) / 2)


def test_overlapping_boxes_average_their_phrases() -> None:
    adapter = _adapter(random_out=True)
    phrases = torch.randn(1, 2, 20)
    full = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]])
    both = adapter(phrases, full, 2, 2)
    one = adapter(phrases[:, :1], full[:, :1], 2, 2)
    two = adapter(phrases[:, 1:], full[:, 1:], 2, 2)
    for b, o, t in zip(both, one, two, strict=True):
        torch.testing.assert_close(b, (o + t) / 2)


def test_flux_refuses_wrong_residuals() -> None:
    flux, inputs = _flux_inputs()
    with pytest.raises(ValueError, match="one tensor per block"):
        flux(**inputs, img_residuals=[torch.zeros(2, 16, 32)])
    with pytest.raises(ValueError, match=r"\[2, 16, 32\]"):
        flux(**inputs, img_residuals=[torch.zeros(2, 16, 32), torch.zeros(2, 15, 32)])


def test_adapter_refuses_mismatched_phrases_and_boxes() -> None:
    adapter = _adapter(random_out=False)
    with pytest.raises(ValueError, match=r"\[B, N, 20\]"):
        adapter(torch.randn(1, 2, 19), torch.rand(1, 2, 4), 2, 2)
    with pytest.raises(ValueError, match="same"):
        adapter(torch.randn(1, 2, 20), torch.rand(1, 3, 4), 2, 2)


def test_params_round_trip_and_refuse_junk() -> None:
    p = LayoutParams(384, 256, 6)
    assert LayoutParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="phrase_dim"):
        LayoutParams.from_dict({"hidden_size": 3})
