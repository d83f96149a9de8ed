"""Flux: parity with diffusers' FluxTransformer2DModel at identical random weights, plus its contracts."""

from __future__ import annotations

import json

import pytest
import torch

from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids, pack_latents, unpack_latents

import tiny_flux
from tiny_flux import BATCH, LAT_C, LAT_H, LAT_W, N_TXT, load_reference, make_inputs, random_flux


def tiny_params(guidance_embed: bool = False) -> FluxParams:
    return tiny_flux.tiny_params(depth=1, guidance_embed=guidance_embed)


# ------------------------------------------------------------------------------------- diffusers parity


@pytest.mark.parametrize("guidance_embed", [False, True])
def test_matches_diffusers(guidance_embed: bool) -> None:
    ref_mod = load_reference()
    params = tiny_params(guidance_embed)
    model = random_flux(params)
    ref = ref_mod.build_reference(params, {k: v.clone() for k, v in model.state_dict().items()})
    inputs = make_inputs(params)

    with torch.no_grad():
        expected = ref_mod.reference_forward(ref, **inputs)
        inference = model(**inputs)  # no autograd: in-place fast paths
    training = model(**inputs)  # autograd on: the out-of-place paths

    assert expected.shape == (BATCH, (LAT_H // 2) * (LAT_W // 2), params.out_channels)
    assert expected.abs().max() > 0.1  # a meaningful, non-degenerate output
    assert (inference - expected).abs().max().item() <= 1e-4
    assert (training.detach() - expected).abs().max().item() <= 1e-4


def test_compile_code_paths_match_diffusers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The branches taken under torch.compile (real-valued RoPE, fused-form GELU, cat) run eagerly here."""
    ref_mod = load_reference()
    params = tiny_params(guidance_embed=True)
    model = random_flux(params)
    ref = ref_mod.build_reference(params, {k: v.clone() for k, v in model.state_dict().items()})
    inputs = make_inputs(params)
    with torch.no_grad():
        expected = ref_mod.reference_forward(ref, **inputs)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        out = model(**inputs)
    assert (out - expected).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    """The real thing: Flux.compile() (inductor) against the eager model. ~20 s of compile on 2 cores."""
    params = tiny_params(guidance_embed=True)
    model = random_flux(params)
    inputs = make_inputs(params)
    with torch.no_grad():
        eager = model(**inputs)
        compiled = model.compile()(**inputs)
    torch._dynamo.reset()
    assert (compiled - eager).abs().max().item() <= 1e-4


def test_converter_uses_every_key_and_loads_strict() -> None:
    ref_mod = load_reference()
    params = tiny_params(guidance_embed=True)
    sd = Flux(params).state_dict()
    converted = ref_mod.to_diffusers_state_dict(sd, params)
    assert sum(v.numel() for v in converted.values()) == sum(v.numel() for v in sd.values())
    with pytest.raises(KeyError, match="not converted"):
        ref_mod.to_diffusers_state_dict({**sd, "extra.weight": torch.zeros(1)}, params)
    ref_mod.build_reference(params, sd)  # load_state_dict(strict=True) inside


# ------------------------------------------------------------------------------------------ contracts


def test_official_flux_key_names() -> None:
    keys = set(Flux(tiny_params(guidance_embed=True)).state_dict())
    expected = {
        "img_in.weight",
        "txt_in.bias",
        "time_in.in_layer.weight",
        "time_in.out_layer.bias",
        "vector_in.in_layer.weight",
        "guidance_in.out_layer.weight",
        "double_blocks.0.img_mod.lin.weight",
        "double_blocks.0.img_attn.qkv.weight",
        "double_blocks.0.img_attn.qkv.bias",
        "double_blocks.0.img_attn.norm.query_norm.scale",
        "double_blocks.0.img_attn.norm.key_norm.scale",
        "double_blocks.0.img_attn.proj.weight",
        "double_blocks.0.img_mlp.0.weight",
        "double_blocks.0.img_mlp.2.bias",
        "double_blocks.0.txt_mod.lin.bias",
        "double_blocks.0.txt_attn.qkv.weight",
        "double_blocks.0.txt_mlp.2.weight",
        "single_blocks.0.linear1.weight",
        "single_blocks.0.linear2.weight",
        "single_blocks.0.norm.query_norm.scale",
        "single_blocks.0.modulation.lin.weight",
        "final_layer.linear.weight",
        "final_layer.adaLN_modulation.1.weight",
    }
    assert expected <= keys
    assert not any(k.startswith("pe_embedder") for k in keys)  # RoPE has no state
    assert "guidance_in.in_layer.weight" not in Flux(tiny_params(guidance_embed=False)).state_dict()


def test_init_weights_gives_zero_output_and_adaln_zero() -> None:
    params = tiny_params(guidance_embed=True)
    model = random_flux(params).init_weights()
    out = model(**make_inputs(params))
    assert torch.equal(out, torch.zeros_like(out))
    block = model.double_blocks[0]
    assert torch.count_nonzero(block.img_mod.lin.weight) == 0
    assert torch.count_nonzero(model.single_blocks[0].modulation.lin.weight) == 0
    assert torch.count_nonzero(model.final_layer.adaLN_modulation[1].weight) == 0
    assert torch.count_nonzero(block.img_attn.qkv.bias) == 0
    assert block.img_attn.qkv.weight.std() > 0  # the trunk is not zero, only the gates
    assert torch.equal(
        block.img_attn.norm.query_norm.scale, torch.ones_like(block.img_attn.norm.query_norm.scale)
    )


def test_ids_2d_and_3d_agree_and_inputs_untouched() -> None:
    params = tiny_params(guidance_embed=True)
    model = random_flux(params)
    inputs = make_inputs(params)
    before = {k: v.clone() for k, v in inputs.items() if v is not None}
    with torch.no_grad():
        out3 = model(**inputs)
        out2 = model(**{**inputs, "img_ids": inputs["img_ids"][0], "txt_ids": inputs["txt_ids"][0]})
    assert torch.allclose(out2, out3, atol=1e-6)
    for k, v in before.items():
        assert torch.equal(inputs[k], v), k


def test_missing_guidance_and_bad_shapes_raise() -> None:
    params = tiny_params(guidance_embed=True)
    model = random_flux(params)
    inputs = make_inputs(params)
    with pytest.raises(ValueError, match="guidance"):
        model(**{**inputs, "guidance": None})
    bad = {
        "img": torch.zeros(BATCH, 15, params.in_channels + 1),
        "img_ids": torch.zeros(BATCH, 14, 3),
        "txt": torch.zeros(BATCH, N_TXT, 3),
        "txt_ids": torch.zeros(N_TXT, 2),
        "timesteps": torch.zeros(BATCH + 1),
        "y": torch.zeros(BATCH, params.vec_in_dim + 1),
        "guidance": torch.zeros(BATCH, 1),
    }
    for name, value in bad.items():
        with pytest.raises(ValueError, match=name):
            model(**{**inputs, name: value})


def test_odd_latent_sizes_raise() -> None:
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 4, 5, 6))
    with pytest.raises(ValueError, match="even"):
        make_img_ids(1, 6, 7)
    with pytest.raises(ValueError, match="even"):
        unpack_latents(torch.zeros(1, 6, 16), 5, 6)


def test_pack_unpack_round_trip_and_layout() -> None:
    z = torch.randn(2, LAT_C, LAT_H, LAT_W)
    tokens = pack_latents(z)
    assert tokens.shape == (2, (LAT_H // 2) * (LAT_W // 2), 4 * LAT_C)
    assert torch.equal(unpack_latents(tokens, LAT_H, LAT_W), z)
    # token (i, j) row-major, channel c * 4 + ph * 2 + pw  <-  z[c, 2i + ph, 2j + pw]
    i, j, c, ph, pw = 2, 3, 1, 1, 0
    assert tokens[1, i * (LAT_W // 2) + j, c * 4 + ph * 2 + pw] == z[1, c, 2 * i + ph, 2 * j + pw]


def test_make_ids() -> None:
    ids = make_img_ids(2, LAT_H, LAT_W)
    assert ids.shape == (2, 15, 3)
    assert torch.equal(ids[0, :, 0], torch.zeros(15))
    assert ids[1, 7].tolist() == [0.0, 1.0, 2.0]  # token 7 = row 1, column 2 of a 3x5 grid
    assert torch.equal(make_txt_ids(2, 4), torch.zeros(2, 4, 3))


def test_params_json_round_trip_and_validation() -> None:
    params = tiny_params(guidance_embed=True)
    assert FluxParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params
    with pytest.raises(ValueError, match="unknown"):
        FluxParams.from_dict({**params.to_dict(), "hiden_size": 3})
    with pytest.raises(ValueError, match="axes_dim"):
        FluxParams.from_dict({**params.to_dict(), "axes_dim": [4, 4, 4]})


def test_bfloat16_runs_close_to_float32() -> None:
    params = tiny_params(guidance_embed=True)
    model = random_flux(params)
    inputs = make_inputs(params)
    with torch.no_grad():
        ref = model(**inputs)
        model.to(torch.bfloat16)
        low = model(
            **{
                k: v.to(torch.bfloat16) if v is not None and k != "timesteps" else v
                for k, v in inputs.items()
            }
        )
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() / ref.abs().max() < 0.05


def test_backward_reaches_every_parameter() -> None:
    params = tiny_params(guidance_embed=True)
    model = random_flux(params).train()
    model(**make_inputs(params)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
