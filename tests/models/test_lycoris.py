"""LyCORIS files (LoKr, LoHa): made by the LyCORIS library itself on diffusers' FluxTransformer2DModel and on
our Flux, they drive our Flux like LyCORIS drives the model it wrapped; merging, scales, tools, bad files."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lycoris import LycorisNetwork, create_lycoris
from safetensors.torch import save_file
from torch import Tensor, nn

from pictor.checkpoint import save_bundle
from pictor.loading import load
from pictor.lora_files import apply_lora, load_lora_file
from pictor.lora_merge import merge_loras
from pictor.lora_tools import lora_summary, read_lora, resize_lora, write_lora
from pictor.models.factored_adapter import FactoredAdapter
from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids, pack_latents
from pictor.models.lora import list_loras, merge_lora, remove_lora, set_lora_scale, unmerge_lora
from pictor.models.lora_formats import FactoredUpdate, LoRAError, to_flux_updates
from pictor.models.lora_layers import LoRALinear
from pictor.pipeline import GenerationRequest

import tiny_flux
from tiny_bundle import tiny_models

TOL = 1e-5
LAT_H, LAT_W, N_TXT = 4, 6, 5
# (algorithm, LyCORIS options): LoKr with w1 whole and w2 split into rank-r factors where LyCORIS splits it
# (whole on the small layers), LoKr with both factors split, LoKr in "full matrix" mode (scale 1, whatever
# alpha says), and LoHa.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "lokr": ("lokr", {"linear_dim": 4, "linear_alpha": 2.0, "factor": 4}),
    "lokr-both-split": ("lokr", {"linear_dim": 2, "linear_alpha": 1.0, "factor": 8, "decompose_both": True}),
    "lokr-full": ("lokr", {"linear_dim": 4, "linear_alpha": 3.0, "factor": 4, "full_matrix": True}),
    "loha": ("loha", {"linear_dim": 4, "linear_alpha": 2.0}),
}


def tiny_params() -> FluxParams:
    return tiny_flux.tiny_params(depth=2, guidance_embed=True)  # block indices and every embedder exercised


def random_model(seed: int = 0) -> Flux:
    return tiny_flux.random_flux(tiny_params(), seed)


def inputs(seed: int = 1) -> dict[str, Tensor]:
    p = tiny_params()
    gen = torch.Generator().manual_seed(seed)
    return {
        "img": pack_latents(torch.randn(2, tiny_flux.LAT_C, LAT_H, LAT_W, generator=gen)),
        "img_ids": make_img_ids(2, LAT_H, LAT_W),
        "txt": torch.randn(2, N_TXT, p.context_in_dim, generator=gen),
        "txt_ids": make_txt_ids(2, N_TXT),
        "timesteps": torch.tensor([0.3, 0.8]),
        "y": torch.randn(2, p.vec_in_dim, generator=gen),
        "guidance": torch.tensor([3.5, 1.0]),
    }


@pytest.fixture(autouse=True)
def quiet_lycoris() -> Iterator[None]:
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wrap(model: nn.Module, config: str, multiplier: float, seed: int = 3) -> dict[str, Tensor]:
    """Wrap every linear layer of ``model`` with LyCORIS (``config``), give every factor random values
    (LyCORIS starts one at zero) and return the file's tensors, as LyCORIS saves them."""
    algo, options = CONFIGS[config]
    net = create_lycoris(model, multiplier, algo=algo, **options)
    net.apply_to()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def assert_drives_like(
    expected: Callable[[dict[str, Tensor]], Tensor], model: nn.Module, base: nn.Module
) -> None:
    """``model`` (with a file applied) gives what ``expected`` gives (a reference with the same file), and
    the file changes the output: no match by both doing nothing."""
    x = inputs()
    with torch.no_grad():
        want, out, plain = expected(x), model(**x), base(**x)
    assert (want - plain).abs().max() > 0.05
    assert (out - want).abs().max().item() <= TOL


def save(sd: dict[str, Tensor], path: Path) -> Path:
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("config", list(CONFIGS))
def test_file_made_on_diffusers_flux_drives_ours_like_lycoris_drives_diffusers(
    config: str, tmp_path: Path
) -> None:
    """SimpleTuner's layout: LyCORIS on diffusers' model names every linear by its diffusers name
    (``lycoris_transformer_blocks_0_attn_to_q``), q/k/v and the single blocks' MLP input apart, norm_out's
    rows in diffusers' (scale, shift) order; pictor fuses them onto FLUX's layers."""
    ref_mod = tiny_flux.load_reference()
    base = random_model()
    reference = ref_mod.build_reference(tiny_params(), {k: v.clone() for k, v in base.state_dict().items()})
    sd = wrap(reference, config, multiplier=0.7)
    assert any(k.startswith("lycoris_transformer_blocks_0_attn_to_q.") for k in sd)
    assert any(k.startswith("lycoris_norm_out_linear.") for k in sd)
    model = copy.deepcopy(base)
    apply_lora(model, save(sd, tmp_path / f"{config}.safetensors"), scale=0.7)
    assert_drives_like(lambda x: ref_mod.reference_forward(reference, **x), model, base)
    # run from the factors: q, k, v and the MLP input as four pieces of single_blocks.0.linear1
    adapter = model.get_submodule("single_blocks.0.linear1").adapters[config]
    assert isinstance(adapter, FactoredAdapter) and adapter.kind == CONFIGS[config][0]
    assert len(adapter.holders) == 4


@pytest.mark.parametrize(
    ("config", "prefix"), [("lokr", "lora_unet"), ("loha", "lora_unet"), ("lokr-full", "lycoris")]
)
def test_file_made_on_our_flux_names_flux_layers(
    config: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kohya's sd-scripts with LyCORIS names FLUX.1's own layers (``lora_unet_double_blocks_0_img_attn_qkv``);
    LyCORIS alone writes ``lycoris_`` + the same flattened name."""
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", prefix)
    base = random_model()
    wrapped = copy.deepcopy(base)
    sd = wrap(wrapped, config, multiplier=-0.6, seed=5)
    assert any(k.startswith(f"{prefix}_double_blocks_1_img_attn_qkv.") for k in sd)
    model = copy.deepcopy(base)
    apply_lora(model, save(sd, tmp_path / "f.safetensors"), scale=-0.6)
    assert_drives_like(lambda x: wrapped(**x), model, base)


def test_lokr_merges_unmerges_and_scales_exactly(tmp_path: Path) -> None:
    ref_mod = tiny_flux.load_reference()
    base = random_model()
    reference = ref_mod.build_reference(tiny_params(), {k: v.clone() for k, v in base.state_dict().items()})
    path = save(wrap(reference, "lokr", 1.0), tmp_path / "style.safetensors")
    model = copy.deepcopy(base)
    apply_lora(model, path, scale=0.5)
    x = inputs()
    with torch.no_grad():
        plain, unmerged = base(**x), model(**x)
        merge_lora(model, "style")
        merged = model(**x)
        set_lora_scale(model, "style", 0.0)  # re-merged at scale 0: the base weights again
        zero = model(**x)
        set_lora_scale(model, "style", 0.5)
        unmerge_lora(model, "style")
        again = model(**x)
    assert (merged - unmerged).abs().max().item() <= TOL
    assert (zero - plain).abs().max().item() <= TOL
    assert torch.equal(again, unmerged)
    remove_lora(model)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), base.state_dict().values(), strict=True)
    )
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_loha_is_an_exact_lora_of_rank_r_squared_and_lokr_resizes(tmp_path: Path) -> None:
    """LoHa converts to kohya's LoRA layout exactly (rank 4 x 4 = 16); LoKr cannot be written as a LoRA, so
    convert refuses it by name and resize gives its best low-rank LoRA, whose energy it reports."""
    base = random_model()
    linears = {
        p: (m.in_features, m.out_features) for p, m in base.named_modules() if isinstance(m, nn.Linear)
    }
    loha = save(wrap(copy.deepcopy(base), "loha", 1.0), tmp_path / "loha.safetensors")
    updates, _ = read_lora(loha, linears)
    assert all(isinstance(u, FactoredUpdate) and u.kind == "loha" for u in updates.values())
    assert {u.rank for u in updates.values()} == {16}
    write_lora(updates, tmp_path / "loha-kohya.safetensors", "kohya")
    one, two = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(one, loha)
    apply_lora(two, tmp_path / "loha-kohya.safetensors")
    x = inputs()
    with torch.no_grad():
        assert (one(**x) - two(**x)).abs().max().item() <= TOL

    lokr = save(wrap(copy.deepcopy(base), "lokr-full", 1.0), tmp_path / "lokr.safetensors")
    updates, _ = read_lora(lokr, linears)
    assert all(isinstance(u, FactoredUpdate) for u in updates.values())
    with pytest.raises(LoRAError, match=r"LoKr update .* `pictor lora resize --rank R`"):
        write_lora(updates, tmp_path / "no.safetensors", "kohya")
    full, report = resize_lora(updates, rank=32)  # every layer is at most 32 wide: the cut keeps it all
    assert min(report.kept.values()) > 1 - 1e-6
    for path, update in updates.items():
        assert torch.allclose(full[path].delta(), update.delta(), atol=1e-4)
    _, cut = resize_lora(updates, rank=2)
    assert max(cut.kept.values()) < 0.99  # a full-rank LoKr loses energy at rank 2, and says how much


def test_lokr_merged_into_a_bundle_draws_what_the_adapter_draws(tmp_path: Path) -> None:
    cfg, flux, ae = tiny_models(description="random weights for a test", training={"stage": "t2i", "step": 1})
    tiny_flux.randomize_(flux, seed=2)
    base = tmp_path / "base"
    save_bundle(base, cfg, flux.state_dict(), ae.state_dict())
    lokr = save(wrap(copy.deepcopy(flux), "lokr", 1.0, seed=8), tmp_path / "lokr.safetensors")
    out, left_out = merge_loras(base, [(lokr, 0.8)], tmp_path / "merged")
    assert left_out == []
    request = GenerationRequest("a red circle", steps=3, seed=5, width=32, height=32)
    pipe = load(base, device="cpu")
    plain = np.asarray(pipe.generate(request)[0].image).astype(int)
    pipe.add_lora(lokr, 0.8)
    want = np.asarray(pipe.generate(request)[0].image).astype(int)
    got = np.asarray(load(out, device="cpu").generate(request)[0].image).astype(int)
    assert np.abs(want - plain).max() > 10
    assert np.abs(got - want).max() <= 1


def test_summary_names_the_algorithm_and_ranks(tmp_path: Path) -> None:
    base = random_model()
    summary = lora_summary(save(wrap(copy.deepcopy(base), "lokr", 1.0), tmp_path / "a.safetensors"))
    assert summary["layout"] == "lycoris" and summary["algorithms"] == ["lokr"]
    assert summary["layers"] == sum(isinstance(m, nn.Linear) for m in base.modules())
    assert summary["ranks"] == [4]  # the split factors' inner size; whole-factor layers list none
    summary = lora_summary(save(wrap(copy.deepcopy(base), "loha", 1.0), tmp_path / "b.safetensors"))
    assert summary["algorithms"] == ["loha"] and summary["ranks"] == [4]


def _lokr_file(**extra: Tensor) -> dict[str, Tensor]:
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    sd = {
        f"{name}.lokr_w1": torch.randn(4, 4),
        f"{name}.lokr_w2": torch.randn(24, 8),
        f"{name}.alpha": torch.tensor(1.0),
    }
    return {**sd, **extra}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"drop": ".lokr_w2"}, "has no lokr_w2 .nor lokr_w2_a and lokr_w2_b."),
        (
            {"set": (".lokr_w2", torch.randn(24, 4))},
            r"update for 'double_blocks.0.img_attn.qkv' is \[96 x 16\] but the layer is \[96 x 32\]",
        ),
        ({"set": (".lokr_w2", torch.randn(24, 8, 3, 3))}, "is 4-D .* must be a matrix"),
        ({"set": (".lokr_t2", torch.randn(4, 4, 3, 3))}, "LoKr with Tucker factors"),
        (
            {"set": (".dora_scale", torch.randn(3, 3))},
            r"\(3, 3\), but a DoRA scale .* is \[96, 1\] .* or \[1, 32\]",
        ),
        (
            {"set": (".lora_magnitude_vector", torch.randn(95))},
            r"is \(95,\); a DoRA magnitude here is \[96\]",
        ),
        ({"set": (".lora_up.weight", torch.randn(96, 4))}, "mixes lokr and lora tensors"),
        ({"set": (".hada_w1_a", torch.randn(96, 4))}, "mixes loha and lokr tensors"),
    ],
)
def test_broken_lycoris_files_name_the_key(change: dict[str, Any], message: str) -> None:
    sd = _lokr_file()
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    if "drop" in change:
        del sd[name + change["drop"]]
    else:
        suffix, value = change["set"]
        sd[name + suffix] = value
    with pytest.raises(LoRAError, match=message) as err:
        apply_lora(random_model(), sd)
    assert name in str(err.value)


def test_loha_parts_that_do_not_multiply_and_two_names_for_one_layer_are_refused() -> None:
    name = "lycoris_transformer_blocks_0_attn_to_q"
    loha = {
        f"{name}.hada_w1_a": torch.randn(32, 2),
        f"{name}.hada_w1_b": torch.randn(3, 32),
        f"{name}.hada_w2_a": torch.randn(32, 2),
        f"{name}.hada_w2_b": torch.randn(2, 32),
    }
    with pytest.raises(LoRAError, match=r"hada_w1_a.*hada_w1_b.*do not multiply"):
        apply_lora(random_model(), loha)
    twice = {
        "lycoris_double_blocks_0_img_attn_qkv.lokr_w1": torch.randn(4, 4),
        "lycoris_double_blocks_0_img_attn_qkv.lokr_w2": torch.randn(24, 8),
        "lycoris_transformer_blocks_0_attn_to_q.lokr_w1": torch.randn(4, 4),
        "lycoris_transformer_blocks_0_attn_to_q.lokr_w2": torch.randn(8, 8),
    }
    with pytest.raises(LoRAError, match=r"both update 'double_blocks\.0\.img_attn\.qkv'"):
        apply_lora(random_model(), twice)


def test_unknown_flattened_name_is_refused_or_skipped_when_asked() -> None:
    text = "lycoris_text_model_encoder_layers_0_mlp_fc1"
    sd = {**_lokr_file(), f"{text}.lokr_w1": torch.randn(2, 2), f"{text}.lokr_w2": torch.randn(2, 2)}
    sd = {k.replace("lora_unet_", "lycoris_"): v for k, v in sd.items()}
    with pytest.raises(LoRAError, match=f"'{text}.lokr_w1' matches no layer .*no FLUX or diffusers layer"):
        apply_lora(random_model(), sd)
    model = random_model()
    with pytest.warns(UserWarning, match=f"LoRA keys not applied .2.: {text}"):
        apply_lora(model, sd, strict=False)
    assert isinstance(model.get_submodule("double_blocks.0.img_attn.qkv"), LoRALinear)


def test_lokr_and_loha_scales_by_hand() -> None:
    """The scales LyCORIS trains with and ComfyUI applies: alpha / r with r the split factor's inner size
    (w2's when both are split), 1 for two whole factors whatever the alpha tensor says; LoHa alpha / r."""
    linears = {"double_blocks.0.img_attn.qkv": (32, 96)}
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    w1, w2 = torch.randn(4, 4, dtype=torch.float64), torch.randn(24, 8, dtype=torch.float64)
    w1_a, w1_b = torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    w2_a, w2_b = torch.randn(24, 3, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    cases = [
        ({"lokr_w1": w1, "lokr_w2": w2, "alpha": 8.0}, torch.kron(w1, w2)),
        (
            {"lokr_w1": w1, "lokr_w2_a": w2_a, "lokr_w2_b": w2_b, "alpha": 6.0},
            2.0 * torch.kron(w1, w2_a @ w2_b),
        ),
        (
            {"lokr_w1_a": w1_a, "lokr_w1_b": w1_b, "lokr_w2": w2, "alpha": 1.0},
            0.5 * torch.kron(w1_a @ w1_b, w2),
        ),
        ({"lokr_w1": w1, "lokr_w2_a": w2_a, "lokr_w2_b": w2_b}, torch.kron(w1, w2_a @ w2_b)),  # no alpha: r
    ]
    a1, b1, a2, b2 = (torch.randn(96, 2), torch.randn(2, 32), torch.randn(96, 2), torch.randn(2, 32))
    loha = {"hada_w1_a": a1, "hada_w1_b": b1, "hada_w2_a": a2, "hada_w2_b": b2, "alpha": 1.0}
    cases.append((loha, 0.5 * (a1 @ b1).double() * (a2 @ b2).double()))
    for tensors, expected in cases:
        sd = {
            f"{name}.{role}": torch.tensor(v) if isinstance(v, float) else v.float()
            for role, v in tensors.items()
        }
        update = to_flux_updates(sd, {}, linears)[0]["double_blocks.0.img_attn.qkv"]
        assert torch.allclose(update.delta(), expected, rtol=1e-5, atol=1e-5), sorted(tensors)


# ------------------------------------------------------------------------------------------------ DoRA

DORA = {
    "lora-dora-rows": ("lora", {"linear_dim": 4, "linear_alpha": 2.0, "dora_wd": True}),
    "lora-dora-columns": (
        "lora",
        {"linear_dim": 4, "linear_alpha": 2.0, "dora_wd": True, "wd_on_output": False},
    ),
    "lokr-dora-rows": ("lokr", {"linear_dim": 4, "linear_alpha": 2.0, "factor": 4, "dora_wd": True}),
    "loha-dora-columns": (
        "loha",
        {"linear_dim": 4, "linear_alpha": 2.0, "dora_wd": True, "wd_on_output": False},
    ),
}


def dora_net(model: nn.Module, config: str, seed: int = 3) -> Any:
    """LyCORIS with weight decomposition on every linear of ``model``: random factors, and magnitudes
    (LyCORIS starts them at the weights' norms, which would change nothing) moved 30% at random."""
    algo, options = DORA[config]
    net = create_lycoris(model, 1.0, algo=algo, **options)
    net.apply_to()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("dora_scale"):
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return net


def state(net: Any) -> dict[str, Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("config", list(DORA))
def test_dora_file_drives_our_flux_like_lycoris(
    config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kohya's names on FLUX.1's layers, ``dora_scale`` per output row ([out, 1], LyCORIS' default) or per
    input column ([1, in]); at strength 1 both LyCORIS and ComfyUI give ``m / |W + dW| * (W + dW)``."""
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")
    base = random_model()
    wrapped = copy.deepcopy(base)
    sd = state(dora_net(wrapped, config))
    assert any(k.endswith(".dora_scale") for k in sd)
    model = copy.deepcopy(base)
    apply_lora(model, save(sd, tmp_path / "dora.safetensors"))
    assert_drives_like(lambda x: wrapped(**x), model, base)


def test_dora_on_diffusers_split_parts_keeps_each_rows_scale(tmp_path: Path) -> None:
    """LyCORIS on diffusers' model: DoRA per output row on to_q / to_k / to_v fuses onto FLUX's qkv row by
    row; per input column it spans one part's rows only, which a fused layer cannot hold: refused by key."""
    ref_mod = tiny_flux.load_reference()
    base = random_model()
    reference = ref_mod.build_reference(tiny_params(), {k: v.clone() for k, v in base.state_dict().items()})
    sd = state(dora_net(reference, "lora-dora-rows"))
    model = copy.deepcopy(base)
    apply_lora(model, save(sd, tmp_path / "rows.safetensors"))
    assert_drives_like(lambda x: ref_mod.reference_forward(reference, **x), model, base)

    again = ref_mod.build_reference(tiny_params(), {k: v.clone() for k, v in base.state_dict().items()})
    columns = save(state(dora_net(again, "lora-dora-columns")), tmp_path / "columns.safetensors")
    with pytest.raises(LoRAError, match=r"lycoris_.*attn_(to|add)_.*per input column on a part of"):
        apply_lora(copy.deepcopy(base), columns)


PEFT_TARGETS = [  # every linear of diffusers' FluxTransformer2DModel, by PEFT's suffix match
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp",
    "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
    "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder", "context_embedder", "linear_1",
    "linear_2",
]  # fmt: skip


def test_peft_dora_file_in_diffusers_layout_drives_ours_like_peft(tmp_path: Path) -> None:
    """diffusers' DoRA training (PEFT ``use_dora``) saves ``transformer.<module>.lora_magnitude_vector`` [out]
    beside lora_A / lora_B: per-row DoRA, split q/k/v fused row by row, norm_out's rows swapped."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    ref_mod = tiny_flux.load_reference()
    base = random_model()
    reference = ref_mod.build_reference(tiny_params(), {k: v.clone() for k, v in base.state_dict().items()})
    reference.add_adapter(LoraConfig(r=4, lora_alpha=2, use_dora=True, target_modules=PEFT_TARGETS))
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    # saved as diffusers' training scripts save it: alpha 2 at rank 4 only in the header's PEFT config
    FluxPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(reference),
        transformer_lora_adapter_metadata=reference.peft_config["default"].to_dict(),
        weight_name="peft-dora.safetensors",
    )
    sd, _meta = load_lora_file(tmp_path / "peft-dora.safetensors")
    assert "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector" in sd
    model = copy.deepcopy(base)
    apply_lora(model, tmp_path / "peft-dora.safetensors")
    assert_drives_like(lambda x: ref_mod.reference_forward(reference, **x), model, base)
    assert lora_summary(tmp_path / "peft-dora.safetensors")["algorithms"] == ["lora+dora"]


def test_dora_strength_scales_from_the_base_to_the_decomposed_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At strength s a layer is ``W + s * (W_dora - W)`` (ComfyUI's rule; 0 is the base model), W_dora taken
    from LyCORIS' own merged weight; merged and unmerged agree, and unmerging restores the base exactly."""
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")
    base = random_model()
    wrapped = copy.deepcopy(base)
    net = dora_net(wrapped, "lora-dora-rows")
    s = 0.6
    by_hand = copy.deepcopy(base)
    layers = {"lora_unet_" + p.replace(".", "_"): p for p, _m in base.named_modules()}
    with torch.no_grad():
        for lora in net.loras:
            w_dora = lora.get_merged_weight(multiplier=1)[0]
            layer = by_hand.get_submodule(layers[lora.lora_name])
            layer.weight.copy_(layer.weight + s * (w_dora - layer.weight))
    model = copy.deepcopy(base)
    apply_lora(model, save(state(net), tmp_path / "dora.safetensors"), scale=s)
    x = inputs()
    with torch.no_grad():
        want, unmerged = by_hand(**x), model(**x)
        merge_lora(model)
        merged = model(**x)
        set_lora_scale(model, "dora", 0.0)
        zero = model(**x)
        unmerge_lora(model)
        plain = base(**x)
    assert (want - plain).abs().max() > 0.05
    assert (unmerged - want).abs().max().item() <= TOL
    assert (merged - want).abs().max().item() <= TOL
    assert (zero - plain).abs().max().item() <= TOL
    remove_lora(model)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), base.state_dict().values(), strict=True)
    )


def test_dora_merges_into_a_bundle_and_refuses_resize_and_convert(tmp_path: Path) -> None:
    cfg, flux, ae = tiny_models(description="random weights for a test", training={"stage": "t2i", "step": 1})
    tiny_flux.randomize_(flux, seed=2)
    base = tmp_path / "base"
    save_bundle(base, cfg, flux.state_dict(), ae.state_dict())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")
        dora = save(
            state(dora_net(copy.deepcopy(flux), "lora-dora-columns", seed=4)), tmp_path / "d.safetensors"
        )
    out, _ = merge_loras(base, [(dora, 0.7)], tmp_path / "merged")
    request = GenerationRequest("a red circle", steps=3, seed=5, width=32, height=32)
    pipe = load(base, device="cpu")
    plain = np.asarray(pipe.generate(request)[0].image).astype(int)
    pipe.add_lora(dora, 0.7)
    want = np.asarray(pipe.generate(request)[0].image).astype(int)
    got = np.asarray(load(out, device="cpu").generate(request)[0].image).astype(int)
    assert np.abs(want - plain).max() > 10
    assert np.abs(got - want).max() <= 1
    linears = {
        p: (m.in_features, m.out_features) for p, m in flux.named_modules() if isinstance(m, nn.Linear)
    }
    updates, _ = read_lora(dora, linears)
    with pytest.raises(LoRAError, match="is a DoRA update, whose change depends on the weights"):
        resize_lora(updates, rank=2)
    with pytest.raises(LoRAError, match="is a DoRA update"):
        write_lora(updates, tmp_path / "no.safetensors", "kohya")
    assert lora_summary(dora)["algorithms"] == ["lora+dora"]


# ------------------------------------------------------------------------- what a review found, kept fixed


def _magnitude_only_dora(model: nn.Module, layer: str, change: Tensor) -> dict[str, Tensor]:
    """A kohya DoRA on one layer whose LoRA is zero: it only scales each output row's norm by 1 + change."""
    weight = model.get_submodule(layer).weight.detach()
    name = "lora_unet_" + layer.replace(".", "_")
    return {
        f"{name}.lora_down.weight": torch.randn(2, weight.shape[1]),
        f"{name}.lora_up.weight": torch.zeros(weight.shape[0], 2),
        f"{name}.dora_scale": (weight.norm(dim=1, keepdim=True) * (1 + change[:, None])).float(),
    }


def test_dora_in_bf16_keeps_norm_changes_smaller_than_bf16_steps() -> None:
    """A DoRA's typical change of a row's norm (a few thousandths) is below bf16's step near 1 (0.004): the
    adapter keeps r - 1 in float32 through the model's cast to bf16, so the change survives."""
    from pictor.models.weight_storage import place

    model = random_model()
    layer = "double_blocks.0.img_attn.qkv"
    change = torch.linspace(-0.003, 0.003, 96)
    apply_lora(model, _magnitude_only_dora(model, layer, change), scale=0.8, name="dora")
    weight = model.get_submodule(layer).weight.detach().double().clone()
    place(model, "cpu", torch.bfloat16)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    adapter = model.get_submodule(layer).adapters["dora"]
    assert adapter.d.dtype == torch.float32
    with torch.no_grad():
        got = adapter(x.bfloat16()).double()
    want = 0.8 * change[None, :].double() * (x.double() @ weight.T)  # s (r - 1) (x W^T), up to the eps
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_dora_beside_other_adapters_merges_with_them_or_not_at_all(tmp_path: Path) -> None:
    """Each DoRA is decomposed against the base weight: on a layer with a DoRA, merging one adapter alone is
    refused (the DoRA's forward would read a weight that is no longer the base); all together it is exact;
    a DoRA is not applied over merged adapters, and a refused file leaves nothing behind."""
    model = random_model()
    layer = "double_blocks.0.img_attn.qkv"
    apply_lora(model, _lokr_file(), scale=0.5, name="kron")
    apply_lora(model, _magnitude_only_dora(model, layer, torch.linspace(-0.3, 0.3, 96)), scale=0.7, name="d")
    x = inputs()
    with torch.no_grad():
        unmerged = model(**x)
        with pytest.raises(LoRAError, match=r"carries the DoRA adapter 'd'.*merge all"):
            merge_lora(model, "kron")
        merge_lora(model)
        assert (model(**x) - unmerged).abs().max().item() <= TOL
        with pytest.raises(LoRAError, match="carries the DoRA adapter 'd'"):
            unmerge_lora(model, "d")
        unmerge_lora(model)
        assert torch.equal(model(**x), unmerged)

    other = random_model()
    apply_lora(other, _lokr_file(), name="kron")
    merge_lora(other)
    with pytest.raises(LoRAError, match=r"merged into 'double_blocks\.0\.img_attn\.qkv'; unmerge them first"):
        apply_lora(other, _magnitude_only_dora(other, layer, torch.zeros(96)), name="d")
    assert list(list_loras(other)) == ["kron"]


def test_lora_then_dora_merged_into_a_bundle_draws_what_both_adapters_draw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, flux, ae = tiny_models(description="random weights for a test", training={"stage": "t2i", "step": 1})
    tiny_flux.randomize_(flux, seed=2)
    base = tmp_path / "base"
    save_bundle(base, cfg, flux.state_dict(), ae.state_dict())
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")
    kron = save(wrap(copy.deepcopy(flux), "lokr", 1.0, seed=8), tmp_path / "kron.safetensors")
    dora = save(state(dora_net(copy.deepcopy(flux), "lora-dora-rows", seed=4)), tmp_path / "d.safetensors")
    out, _ = merge_loras(base, [(kron, 0.5), (dora, 0.7)], tmp_path / "merged")
    request = GenerationRequest("a red circle", steps=3, seed=5, width=32, height=32)
    pipe = load(base, device="cpu")
    pipe.add_lora(kron, 0.5)
    pipe.add_lora(dora, 0.7)
    want = np.asarray(pipe.generate(request)[0].image).astype(int)
    got = np.asarray(load(out, device="cpu").generate(request)[0].image).astype(int)
    assert np.abs(got - want).max() <= 1


def test_parts_of_one_layer_with_other_widths_are_refused_when_read() -> None:
    sd = {
        "lycoris_transformer_blocks_0_attn_to_q.lokr_w1": torch.randn(4, 4),
        "lycoris_transformer_blocks_0_attn_to_q.lokr_w2": torch.randn(8, 8),
        "lycoris_transformer_blocks_0_attn_to_k.lokr_w1": torch.randn(4, 4),
        "lycoris_transformer_blocks_0_attn_to_k.lokr_w2": torch.randn(8, 16),
    }
    linears = {
        p: (m.in_features, m.out_features)
        for p, m in random_model().named_modules()
        if isinstance(m, nn.Linear)
    }
    with pytest.raises(
        LoRAError, match=r"parts of 'double_blocks\.0\.img_attn\.qkv' take inputs of different"
    ):
        to_flux_updates(sd, {}, linears)
    sd["lycoris_transformer_blocks_0_attn_to_q.lokr_w2"] = torch.randn(8, 16)
    with pytest.raises(LoRAError, match=r"is \[96 x 64\] but the layer is \[96 x 32\]"):
        to_flux_updates(sd, {}, linears)


def test_a_model_carrying_lycoris_adapters_loads_other_base_weights_and_its_dora_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Base weights load strictly into a model carrying LoKr and DoRA adapters, and the DoRA's ratio is
    computed again for them: the same output as the file applied to a model made with those weights."""
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")
    first, second = random_model(seed=0), random_model(seed=1)
    dora = state(dora_net(copy.deepcopy(first), "lora-dora-rows"))
    lokr = _lokr_file()
    model = copy.deepcopy(first)
    apply_lora(model, lokr, name="kron")
    apply_lora(model, dora, name="d")
    model.load_state_dict(second.state_dict(), strict=True)
    assert set(model.state_dict()) == set(second.state_dict())
    want = copy.deepcopy(second)
    apply_lora(want, lokr, name="kron")
    apply_lora(want, dora, name="d")
    x = inputs()
    with torch.no_grad():
        assert (model(**x) - want(**x)).abs().max().item() <= TOL
    on_meta = copy.deepcopy(model).to("meta")  # FSDP's sharding goes through the meta device
    on_meta.to_empty(device="cpu")


def test_refusals_leave_the_model_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge refused on one layer changes no layer; a file that fails halfway through (here: out of memory
    on its second DoRA layer) leaves no adapter and no wrapped layer behind."""
    model = random_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lokr = {  # on two layers; the DoRA only on the second
        **_lokr_file(),
        "lora_unet_double_blocks_1_img_attn_qkv.lokr_w1": torch.randn(4, 4),
        "lora_unet_double_blocks_1_img_attn_qkv.lokr_w2": torch.randn(24, 8),
    }
    apply_lora(model, lokr, name="kron")
    apply_lora(model, _magnitude_only_dora(model, "double_blocks.1.img_attn.qkv", torch.zeros(96)), name="d")
    with pytest.raises(LoRAError, match="carries the DoRA adapter 'd'"):
        merge_lora(model, "kron")
    assert list_loras(model)["kron"]["merged"] is False
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    import pictor.models.dora_adapter as dora_module

    calls = {"n": 0}
    real = dora_module.dora_ratio

    def fails_second_time(*args: Any) -> Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated")
        return real(*args)

    monkeypatch.setattr(dora_module, "dora_ratio", fails_second_time)
    fresh = random_model()
    two = {
        **_magnitude_only_dora(fresh, "double_blocks.0.img_attn.qkv", torch.zeros(96)),
        **_magnitude_only_dora(fresh, "double_blocks.1.img_attn.qkv", torch.zeros(96)),
    }
    with pytest.raises(MemoryError):
        apply_lora(fresh, two, name="d")
    assert list_loras(fresh) == {}
    assert not any(isinstance(m, LoRALinear) for m in fresh.modules())


def test_a_nan_dora_scale_is_refused_when_read_and_text_encoder_keys_do_not_decide_the_layout() -> None:
    linears = {
        p: (m.in_features, m.out_features)
        for p, m in random_model().named_modules()
        if isinstance(m, nn.Linear)
    }
    sd = _magnitude_only_dora(random_model(), "double_blocks.0.img_attn.qkv", torch.zeros(96))
    sd["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"][3] = float("nan")
    with pytest.raises(LoRAError, match="dora_scale' holds NaN"):
        to_flux_updates(sd, {}, linears)
    # OneTrainer: flattened diffusers names for the transformer, kohya's lora_te1_ for CLIP
    sd = {
        "lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight": torch.randn(2, 32),
        "lora_transformer_transformer_blocks_0_attn_to_q.lora_up.weight": torch.randn(32, 2),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 8),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, 2),
    }
    with pytest.raises(LoRAError, match=r"lora_te1_.* is for a text encoder"):
        to_flux_updates(sd, {}, linears)
    updates, skipped = to_flux_updates(sd, {}, linears, strict=False)
    assert list(updates) == ["double_blocks.0.img_attn.qkv"] and len(skipped) == 2
    model = random_model()  # as --lora and the server apply it: the CLIP keys left out, out loud
    with pytest.warns(UserWarning, match="text-encoder keys not applied .2."):
        apply_lora(model, sd, name="ot")
    assert list_loras(model)["ot"]["layers"] == 1
