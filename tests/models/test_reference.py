"""The reference adapter: shapes, positions that tell cells apart, and how its tokens join the prompt's."""

from __future__ import annotations

import pytest
import torch

from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids
from pictor.models.reference import ReferenceAdapter, ReferenceParams, append_reference, sincos_2d
from pictor.presets import get_preset


def _adapter(latent_dim: int = 16, context_dim: int = 32) -> ReferenceAdapter:
    torch.manual_seed(0)
    return ReferenceAdapter(
        ReferenceParams(latent_dim, context_dim, width=32, depth=2, num_heads=4)
    ).init_weights()


def test_tokens_come_out_one_per_reference_cell_at_the_text_width() -> None:
    adapter = _adapter()
    out = adapter(torch.randn(3, 12, 16), 3, 4)
    assert out.shape == (3, 12, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="do not fill a 4x4 grid"):
        adapter(torch.randn(1, 12, 16), 4, 4)


def test_params_round_trip_and_bad_ones_are_named() -> None:
    p = ReferenceParams(16, 384, width=64, depth=1, num_heads=2)
    assert ReferenceParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="latent_dim"):
        ReferenceParams.from_dict({"latent_dim": 16})
    with pytest.raises(ValueError, match="must divide by num_heads"):
        ReferenceAdapter(ReferenceParams(16, 32, width=30, num_heads=4))


def test_positions_make_the_same_patch_differ_by_place_and_the_batch_stays_apart() -> None:
    pos = sincos_2d(3, 5, 32)
    assert pos.shape == (15, 32)
    assert torch.cdist(pos, pos).fill_diagonal_(1.0).min() > 1e-3  # every cell its own code
    adapter = _adapter()
    same = torch.randn(1, 1, 16).expand(1, 12, 16)  # one patch repeated over the grid
    out = adapter(same, 3, 4)
    assert (out[0, 0] - out[0, 5]).abs().max() > 1e-3
    a, b = torch.randn(1, 12, 16), torch.randn(1, 12, 16)
    together = adapter(torch.cat([a, b]), 3, 4)
    torch.testing.assert_close(together[0], adapter(a, 3, 4)[0], atol=1e-5, rtol=1e-5)


def test_reference_tokens_join_the_text_at_position_zero_and_reach_the_image() -> None:
    torch.manual_seed(0)
    params = get_preset("tiny")["model"]
    flux = Flux(FluxParams.from_dict(params))  # torch's default init: no zero gates, every path live
    b, lat = 2, 4
    img = torch.randn(b, lat * lat, flux.params.in_channels)
    img_ids = make_img_ids(b, 2 * lat, 2 * lat)[:, : lat * lat]
    txt = torch.randn(b, 5, flux.params.context_in_dim)
    txt_ids = make_txt_ids(b, 5)
    t, y = torch.full((b,), 0.5), torch.randn(b, flux.params.vec_in_dim)
    ctx = torch.randn(1, 7, flux.params.context_in_dim)
    txt2, ids2 = append_reference(txt, txt_ids, ctx)
    assert txt2.shape == (b, 12, flux.params.context_in_dim) and ids2.shape == (b, 12, 3)
    assert ids2.abs().sum() == 0 and torch.equal(txt2[:, :5], txt) and torch.equal(txt2[1, 5:], ctx[0])
    with torch.no_grad():
        plain = flux(img, img_ids, txt, txt_ids, t, y)
        with_ref = flux(img, img_ids, txt2, ids2, t, y)
    assert with_ref.shape == plain.shape and (with_ref - plain).abs().max() > 1e-4
