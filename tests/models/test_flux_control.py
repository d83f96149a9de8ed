"""`Flux.forward(control=...)`: a ControlNet's residuals added after the blocks, spread (or cycled, for XLabs'
ControlNets) as diffusers' `FluxTransformer2DModel` spreads `controlnet_block_samples`."""

from __future__ import annotations

import pytest
import torch

from pictor.models.block_cache import FirstBlockCache
from pictor.models.control_residuals import ControlResiduals

from tiny_flux import load_reference, make_inputs, random_flux, tiny_params

pytest.importorskip("diffusers")


def _residuals(inputs: dict, double: int, single: int, seed: int = 5) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    shape = (*inputs["img"].shape[:2], 32)
    return (
        [torch.randn(shape, generator=gen) for _ in range(double)],
        [torch.randn(shape, generator=gen) for _ in range(single)],
    )


@pytest.mark.parametrize(
    ("double", "single", "repeat"), [(3, 3, False), (2, 2, False), (1, 0, False), (2, 0, True)]
)
def test_control_residuals_land_where_diffusers_puts_them(double: int, single: int, repeat: bool) -> None:
    params = tiny_params(depth=3, guidance_embed=True)
    model = random_flux(params)
    ref_module = load_reference()
    ref = ref_module.build_reference(params, {k: v.clone() for k, v in model.state_dict().items()})
    inputs = make_inputs(params)
    d, s = _residuals(inputs, double, single)
    with torch.no_grad():
        ours = model(**inputs, controlnet=ControlResiduals(d, s, repeat))
        theirs = ref(
            hidden_states=inputs["img"],
            encoder_hidden_states=inputs["txt"],
            pooled_projections=inputs["y"],
            timestep=inputs["timesteps"],
            img_ids=inputs["img_ids"][0],
            txt_ids=inputs["txt_ids"][0],
            guidance=inputs["guidance"],
            controlnet_block_samples=d,
            controlnet_single_block_samples=s or None,
            controlnet_blocks_repeat=repeat,
            return_dict=False,
        )[0]
        plain = model(**inputs)
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours - plain).abs().max() > 1e-2  # the residuals change the output


def test_the_first_block_cache_passes_the_control_on() -> None:
    params = tiny_params(depth=3)
    model = random_flux(params)
    inputs = make_inputs(params)
    control = ControlResiduals(*_residuals(inputs, 2, 2))
    with torch.no_grad():
        want = model(**inputs, controlnet=control)
        cache = FirstBlockCache(0.05)
        first = model(**inputs, controlnet=control, block_cache=cache)  # a first call always runs in full
        again = model(**inputs, controlnet=control, block_cache=cache)  # nothing moved: the tail is reused
    assert (first - want).abs().max() < 1e-5 and (again - want).abs().max() < 1e-5


def test_a_wrong_control_is_refused() -> None:
    params = tiny_params(depth=1)
    model = random_flux(params)
    inputs = make_inputs(params)
    d, s = _residuals(inputs, 2, 0)
    with pytest.raises(ValueError, match="more than this model's"):
        model(**inputs, controlnet=ControlResiduals(d, s))
    with pytest.raises(ValueError, match="embedded image tokens"):
        model(**inputs, controlnet=ControlResiduals([d[0][:, :3]], []))
