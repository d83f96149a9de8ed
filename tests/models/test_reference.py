"""The reference adapter: shapes, what reaches its output, and how its residuals join the prompt's."""

from __future__ import annotations

import pytest
import torch

from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids
from pictor.models.reference import (
    ReferenceAdapter,
    ReferenceConditioning,
    ReferenceParams,
    apply_reference,
    conditional_only,
    sincos_2d,
)
from pictor.presets import get_preset


def _adapter(latent_dim: int = 16, context_dim: int = 32, pooled_dim: int = 24) -> ReferenceAdapter:
    """An adapter with live output maps (a new one's residuals are zero)."""
    torch.manual_seed(0)
    params = ReferenceParams(latent_dim, context_dim, pooled_dim, 7, width=32, depth=2, num_heads=4)
    adapter = ReferenceAdapter(params).init_weights()
    with torch.no_grad():
        adapter.out.weight.normal_(0, 0.2)
        adapter.vec_out.weight.normal_()
    return adapter


def test_one_residual_per_prompt_token_from_any_grid() -> None:
    adapter = _adapter()
    for grid in ((3, 4), (2, 2)):
        out = adapter(torch.randn(3, grid[0] * grid[1], 16), *grid)
        assert out.tokens.shape == (3, 7, 32) and out.pooled.shape == (3, 24)
        assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    with pytest.raises(ValueError, match="do not fill a 4x4 grid"):
        adapter(torch.randn(1, 12, 16), 4, 4)


def test_params_round_trip_and_bad_ones_are_named() -> None:
    p = ReferenceParams(16, 384, 384, 32, width=64, depth=1, num_heads=2)
    assert ReferenceParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="num_tokens"):
        ReferenceParams.from_dict({"latent_dim": 16})
    with pytest.raises(ValueError, match="must divide by num_heads"):
        ReferenceAdapter(ReferenceParams(16, 32, 32, 8, width=30, num_heads=4))


def test_where_things_are_and_what_they_are_both_reach_the_output() -> None:
    pos = sincos_2d(3, 5, 32)
    assert pos.shape == (15, 32)
    assert torch.cdist(pos, pos).fill_diagonal_(1.0).min() > 1e-3  # every cell its own code
    adapter = _adapter()
    patch = torch.randn(1, 1, 16)
    here = torch.zeros(1, 12, 16)
    here[:, 0] = patch[:, 0]
    there = torch.zeros(1, 12, 16)
    there[:, 11] = patch[:, 0]
    a, b = adapter(here, 3, 4), adapter(there, 3, 4)
    assert (a.tokens - b.tokens).abs().max() > 1e-3  # the same patch elsewhere
    c = adapter(torch.randn(1, 12, 16), 3, 4)
    assert (a.pooled - c.pooled).abs().max() > 1e-3  # other content
    together = adapter(torch.cat([here, there]), 3, 4)  # the batch's pictures stay apart
    torch.testing.assert_close(together.tokens[0], a.tokens[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.pooled[1], b.pooled[0], atol=1e-5, rtol=1e-5)


def test_a_new_adapter_changes_nothing_and_a_trained_one_reaches_the_image() -> None:
    torch.manual_seed(0)
    flux = Flux(FluxParams.from_dict(get_preset("tiny")["model"]))  # torch's default init: every path live
    b, lat = 2, 4
    img = torch.randn(b, lat * lat, flux.params.in_channels)
    img_ids = make_img_ids(b, 2 * lat, 2 * lat)[:, : lat * lat]
    txt = torch.randn(b, 5, flux.params.context_in_dim)
    txt_ids = make_txt_ids(b, 5)
    t, y = torch.full((b,), 0.5), torch.randn(b, flux.params.vec_in_dim)
    params = ReferenceParams(flux.params.in_channels, flux.params.context_in_dim, flux.params.vec_in_dim, 5)
    adapter = ReferenceAdapter(params).init_weights()
    ref = adapter(torch.randn(1, 6, flux.params.in_channels), 2, 3)
    assert ref.tokens.shape == (1, 5, flux.params.context_in_dim)
    txt2, y2 = apply_reference(txt, y, ref)
    assert torch.equal(txt2, txt) and torch.equal(y2, y)  # both output maps start at zero
    with torch.no_grad():
        adapter.out.weight.normal_(0, 0.2)
        adapter.vec_out.weight.normal_(0, 0.3)
    ref = adapter(torch.randn(1, 6, flux.params.in_channels), 2, 3)
    txt2, y2 = apply_reference(txt, y, ref)
    torch.testing.assert_close(txt2[1], txt[1] + ref.tokens[0])  # batch 1 applies to every row
    torch.testing.assert_close(y2[1], y[1] + ref.pooled[0])
    with torch.no_grad():
        plain = flux(img, img_ids, txt, txt_ids, t, y)
        steered = flux(img, img_ids, txt2, txt_ids, t, y2)
    assert (steered - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match="another max_length"):
        apply_reference(txt[:, :4], y, ref)


def test_under_cfg_only_the_conditional_half_gets_the_picture() -> None:
    ref = ReferenceConditioning(torch.randn(1, 5, 8), torch.randn(1, 3))
    both = conditional_only(ref, 2)
    assert both.tokens.shape == (4, 5, 8) and both.pooled.shape == (4, 3)
    assert torch.equal(both.tokens[1], ref.tokens[0]) and torch.equal(both.pooled[0], ref.pooled[0])
    assert both.tokens[2:].abs().max() == 0 and both.pooled[2:].abs().max() == 0
    rows = ReferenceConditioning(torch.randn(2, 5, 8), torch.randn(2, 3))  # one picture per row
    assert torch.equal(conditional_only(rows, 2).tokens[1], rows.tokens[1])
