"""FP8 weight storage: block linears hold float8 weights and cast them per call; the result is exactly the
float32 model's with the same (FP8-representable) weights, and diffusers' layerwise casting agrees."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pictor.models.flux import Flux
from pictor.models.lora import LoRAError, add_lora, merge_lora, remove_lora, unmerge_lora
from pictor.models.weight_storage import (
    FP8_STORAGE,
    StoredLinear,
    place,
    store_fp8,
    stored_dtype,
    stored_linear_paths,
)

from tiny_flux import load_reference, make_inputs, random_flux, tiny_params


def _fp8_representable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight and bias of every linear rounded through FP8 (so storing any of them is lossless)."""
    linears = {p for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {
        k: v.to(FP8_STORAGE).float() if k.rpartition(".")[0] in linears else v.clone()
        for k, v in model.state_dict().items()
    }


def _flux(params, sd: dict[str, torch.Tensor]) -> Flux:  # type: ignore[no-untyped-def]
    with torch.device("meta"):
        model = Flux(params)
    model.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


def test_stored_fp8_equals_float32_and_diffusers_layerwise_casting() -> None:
    params = tiny_params(depth=2, guidance_embed=True)
    sd = _fp8_representable(random_flux(params))
    inputs = make_inputs(params)
    full = _flux(params, sd)
    stored = _flux(params, sd)
    turned = store_fp8(stored, FP8_STORAGE)

    paths = stored_linear_paths(stored)
    assert turned == len(paths) == 2 * 10 + 2 * 3  # 10 linears per double block, 3 per single block
    for path in paths:
        layer = stored.get_submodule(path)
        assert isinstance(layer, StoredLinear) and layer.weight.dtype == FP8_STORAGE
        assert layer.bias is None or layer.bias.dtype == torch.float32
    assert isinstance(stored.img_in, nn.Linear) and stored.img_in.weight.dtype == torch.float32
    assert stored.state_dict().keys() == full.state_dict().keys()  # FLUX.1's keys, unchanged
    assert stored_dtype(stored) == FP8_STORAGE and stored_dtype(full) is None

    ref_mod = load_reference()
    ref = ref_mod.build_reference(params, {k: v.clone() for k, v in sd.items()})
    ref.enable_layerwise_casting(storage_dtype=FP8_STORAGE, compute_dtype=torch.float32)
    assert any(p.dtype == FP8_STORAGE for p in ref.parameters())  # diffusers really stores FP8 too
    with torch.no_grad():
        expected = full(**inputs)
        got = stored(**inputs)
        theirs = ref_mod.reference_forward(ref, **inputs)
    assert expected.abs().max() > 0.1
    assert torch.equal(got, expected)  # the per-call cast is exact: same values, same float32 math
    assert (theirs - got).abs().max().item() <= 1e-4


def test_place_keeps_stored_weights_narrow_and_widens_everything_else() -> None:
    """A model loaded from an all-FP8 file (norm scales, embedders too): only the block linears stay FP8."""
    params = tiny_params(depth=1)
    sd = {k: v.to(FP8_STORAGE) for k, v in random_flux(params).state_dict().items()}
    model = _flux(params, sd)
    store_fp8(model)  # no dtype: adopts the layers whose weights already are FP8
    place(model, "cpu", torch.float32)
    stored = set(stored_linear_paths(model))
    for name, p in model.named_parameters():
        layer = name.rpartition(".")[0]
        want = FP8_STORAGE if layer in stored and name.endswith(".weight") else torch.float32
        assert p.dtype == want, name
    widened = _flux(params, {k: v.float() for k, v in sd.items()})
    inputs = make_inputs(params)
    with torch.no_grad():
        assert torch.equal(model(**inputs), widened(**inputs))


def test_a_weight_beyond_fp8s_range_is_refused_naming_it() -> None:
    model = random_flux(tiny_params(depth=1))
    with torch.no_grad():
        model.single_blocks[0].linear2.weight[0, 0] = 500.0  # FP8 e4m3fn ends at 448; torch would clip
    with pytest.raises(ValueError, match=r"single_blocks\.0\.linear2\.weight holds 500"):
        store_fp8(model, FP8_STORAGE)


def test_loras_on_a_stored_base_compute_as_on_the_float32_base() -> None:
    params = tiny_params(depth=1)
    sd = _fp8_representable(random_flux(params))
    full, stored = _flux(params, sd), _flux(params, sd)
    store_fp8(stored, FP8_STORAGE)
    before = {k: v.clone() for k, v in stored.state_dict().items()}
    for model in (full, stored):
        torch.manual_seed(3)
        add_lora(model, "style", rank=2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    adapter = stored.double_blocks[0].img_attn.qkv.adapters["style"]
    assert adapter.lora_A.weight.dtype == torch.float32  # never FP8 beside an FP8 weight
    inputs = make_inputs(params)
    with torch.no_grad():
        expected, got = full(**inputs), stored(**inputs)
    assert (got - expected).abs().max().item() <= 1e-5
    with pytest.raises(LoRAError, match="cannot be merged into FP8"):  # FP8 would round it away
        merge_lora(stored, "style")
    unmerge_lora(stored, "style")  # nothing merged: a no-op
    with torch.no_grad():
        assert torch.equal(stored(**inputs), got)  # the refused merge left everything as it was
    remove_lora(stored)
    after = stored.state_dict()
    assert all(torch.equal(after[k].float(), before[k].float()) for k in before)
    assert isinstance(stored.double_blocks[0].img_attn.qkv, StoredLinear)
    assert stored.double_blocks[0].img_attn.qkv.weight.dtype == FP8_STORAGE


def test_the_backward_pass_keeps_the_fp8_weight_not_a_wide_copy() -> None:
    """Gradients as through the widened weight, while autograd keeps only the FP8 parameter."""
    gen = torch.Generator().manual_seed(0)
    layer = StoredLinear(24, 16)
    with torch.no_grad():
        layer.weight = nn.Parameter(torch.randn(16, 24, generator=gen).to(FP8_STORAGE), requires_grad=False)
        layer.bias = nn.Parameter(torch.randn(16, generator=gen))
    x = torch.randn(3, 5, 24, generator=gen, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    (out**2).sum().backward()
    assert not any(t.dtype == torch.float32 and t.shape == (16, 24) for t in saved)  # no wide weight kept
    assert any(t.dtype == FP8_STORAGE for t in saved)

    x2 = x.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    want = torch.nn.functional.linear(x2, layer.weight.float(), bias)
    (want**2).sum().backward()
    assert torch.allclose(out, want)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(layer.bias.grad, bias.grad, rtol=1e-5, atol=1e-6)

    layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="are frozen"):
        layer(x)
