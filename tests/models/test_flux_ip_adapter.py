"""`Flux.forward(ip_adapter=...)`: XLabs' IP-Adapter attention in the double blocks, as diffusers'
`FluxTransformer2DModel` with `_load_ip_adapter_weights` and `FluxIPAdapterAttnProcessor` computes it."""

from __future__ import annotations

import pytest
import torch

from pictor.models.block_cache import FirstBlockCache
from pictor.models.ip_adapter import IPAdapter, IPAttention, ip_adapter_shapes

from tiny_flux import load_reference, make_inputs, random_flux, randomize_, tiny_params

pytest.importorskip("diffusers")

IMAGE_DIM = 12


def _adapter(params, num_tokens: int = 4, seed: int = 3) -> IPAdapter:
    adapter = IPAdapter(IMAGE_DIM, params.context_in_dim, params.hidden_size, num_tokens, params.depth).eval()
    randomize_(adapter, seed)
    return adapter


def _diffusers_state(adapter: IPAdapter) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter in diffusers' loader layout, made from its XLabs keys as `load_ip_adapter` maps them."""
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in adapter.state_dict().items():
        if key.startswith("ip_adapter_proj_model."):
            out["image_proj"][key.split(".", 1)[1]] = value.clone()
        else:
            name = ".".join(key.split(".")[1:])
            name = name.replace("ip_adapter_double_stream_k_proj", "to_k_ip")
            name = name.replace("ip_adapter_double_stream_v_proj", "to_v_ip").replace("processor.", "")
            out["ip_adapter"][name] = value.clone()
    return out


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_ip_adapter_attention_is_diffusers(scale: float) -> None:
    params = tiny_params(depth=2, guidance_embed=True)
    model = random_flux(params)
    adapter = _adapter(params)
    ref = load_reference().build_reference(params, {k: v.clone() for k, v in model.state_dict().items()})
    ref._load_ip_adapter_weights([_diffusers_state(adapter)], low_cpu_mem_usage=False)
    # diffusers' FluxIPAdapterMixin.set_ip_adapter_scale: one scale for every double block
    for proc in ref.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = [scale]
    inputs = make_inputs(params)
    embeds = torch.randn(2, IMAGE_DIM, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ours = model(**inputs, ip_adapter=adapter.attention(embeds, scale, params.num_heads))
        theirs = ref(
            hidden_states=inputs["img"],
            encoder_hidden_states=inputs["txt"],
            pooled_projections=inputs["y"],
            timestep=inputs["timesteps"],
            img_ids=inputs["img_ids"][0],
            txt_ids=inputs["txt_ids"][0],
            guidance=inputs["guidance"],
            joint_attention_kwargs={"ip_adapter_image_embeds": [embeds[:, None]]},
            return_dict=False,
        )[0]
        plain = model(**inputs)
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours - plain).abs().max() > 1e-2  # the picture changes the output


def test_one_picture_row_serves_the_whole_batch_and_halves_read_their_own() -> None:
    params = tiny_params(depth=2)
    model = random_flux(params)
    adapter = _adapter(params)
    inputs = make_inputs(params)
    embeds = torch.randn(2, IMAGE_DIM, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        one = model(**inputs, ip_adapter=adapter.attention(embeds[:1], 0.8, params.num_heads))
        both = model(**inputs, ip_adapter=adapter.attention(embeds[:1].expand(2, -1), 0.8, params.num_heads))
        per_row = model(**inputs, ip_adapter=adapter.attention(embeds, 0.8, params.num_heads))
        row1 = model(
            **{k: (v[1:] if v is not None else v) for k, v in inputs.items()},
            ip_adapter=adapter.attention(embeds[1:], 0.8, params.num_heads),
        )
    assert (one - both).abs().max() < 1e-6
    assert (per_row[1:] - row1).abs().max() < 1e-5
    assert (per_row[:1] - one[:1]).abs().max() < 1e-5


def test_scale_zero_is_the_plain_model_and_the_cache_passes_it_on() -> None:
    params = tiny_params(depth=3)
    model = random_flux(params)
    adapter = _adapter(params)
    inputs = make_inputs(params)
    embeds = torch.randn(1, IMAGE_DIM)
    with torch.no_grad():
        assert (
            model(**inputs, ip_adapter=adapter.attention(embeds, 0.0, 2)) - model(**inputs)
        ).abs().max() == 0
        ipa = adapter.attention(embeds, 0.7, 2)
        want = model(**inputs, ip_adapter=ipa)
        cache = FirstBlockCache(0.05)
        first = model(**inputs, ip_adapter=ipa, block_cache=cache)
        again = model(**inputs, ip_adapter=ipa, block_cache=cache)
    assert (first - want).abs().max() < 1e-5 and (again - want).abs().max() < 1e-5


def test_the_cache_runs_chosen_rows_with_their_own_picture() -> None:
    params = tiny_params(depth=2)
    model = random_flux(params)
    adapter = _adapter(params)
    inputs = make_inputs(params)
    embeds = torch.randn(2, IMAGE_DIM, generator=torch.Generator().manual_seed(2))
    ipa = adapter.attention(embeds, 1.0, 2)
    sub = ipa.rows(torch.tensor([1]), 2)
    with torch.no_grad():
        full = model(**inputs, ip_adapter=ipa)
        row = model(**{k: (v[1:] if v is not None else v) for k, v in inputs.items()}, ip_adapter=sub)
    assert (full[1:] - row).abs().max() < 1e-5


def test_a_wrong_ip_adapter_is_refused() -> None:
    params = tiny_params(depth=2)
    model = random_flux(params)
    inputs = make_inputs(params)
    short = IPAdapter(IMAGE_DIM, params.context_in_dim, params.hidden_size, 4, 1)
    with pytest.raises(ValueError, match="keys for 1 double blocks"):
        model(**inputs, ip_adapter=short.attention(torch.randn(1, IMAGE_DIM), 1.0, 2))
    three = IPAttention(keys=[torch.zeros(3, 2, 4, 16)] * 2, values=[torch.zeros(3, 2, 4, 16)] * 2, scale=1.0)
    with pytest.raises(ValueError, match="dividing the batch 2"):
        model(**inputs, ip_adapter=three)
    with pytest.raises(ValueError, match="must be an IPAttention"):
        model(**inputs, ip_adapter="picture")  # type: ignore[arg-type]


def test_shapes_are_read_from_a_state_dict_and_a_foreign_one_is_not_an_adapter() -> None:
    params = tiny_params(depth=2)
    adapter = _adapter(params, num_tokens=16)
    sd = adapter.state_dict()
    assert ip_adapter_shapes(sd) == (IMAGE_DIM, params.context_in_dim, params.hidden_size, 16, 2)
    assert ip_adapter_shapes({**sd, "extra.weight": torch.zeros(1)}) is None
    missing = dict(sd)
    missing.pop("double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias")
    assert ip_adapter_shapes(missing) is None
    bad = dict(sd)
    bad["double_blocks.1.processor.ip_adapter_double_stream_k_proj.weight"] = torch.zeros(8, 20)
    assert ip_adapter_shapes(bad) is None
    assert ip_adapter_shapes(random_flux(params).state_dict()) is None
