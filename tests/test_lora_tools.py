"""LoRA tools: extraction from two models, resizing, and the kohya / diffusers layouts written for other
tools, checked against independent SVDs, hand merges and diffusers' own model and converter."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pictor.lora_files import apply_lora
from pictor.lora_tools import extract_lora, read_lora, resize_lora, write_lora
from pictor.models.flux import Flux, make_img_ids, make_txt_ids, pack_latents
from pictor.models.lora import linear_layers, merge_lora
from pictor.models.lora_formats import LoRAError, LoRAUpdate

import tiny_flux
from tiny_flux import LAT_C, load_reference, random_flux

PARAMS = tiny_flux.tiny_params(depth=2, guidance_embed=True)


def shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {p: (m.in_features, m.out_features) for p, m in linear_layers(model).items()}


def inputs() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "img": pack_latents(torch.randn(2, LAT_C, 4, 6, generator=gen)),
        "img_ids": make_img_ids(2, 4, 6),
        "txt": torch.randn(2, 5, PARAMS.context_in_dim, generator=gen),
        "txt_ids": make_txt_ids(2, 5),
        "timesteps": torch.tensor([0.3, 0.8]),
        "y": torch.randn(2, PARAMS.vec_in_dim, generator=gen),
        "guidance": torch.tensor([3.5, 1.0]),
    }


def delta(u: LoRAUpdate) -> Tensor:
    return u.alpha / u.rank * (u.B.float() @ u.A.float())


def random_updates(model: Flux, seed: int, rank: int = 6) -> dict[str, LoRAUpdate]:
    """A LoRA on every linear layer, alpha != rank so that the scale must be carried."""
    gen = torch.Generator().manual_seed(seed)
    return {
        path: LoRAUpdate(
            0.3 * torch.randn(rank, n_in, generator=gen),
            0.3 * torch.randn(n_out, rank, generator=gen),
            2.5,
            path,
        )
        for path, (n_in, n_out) in shapes(model).items()
    }


def native(updates: dict[str, LoRAUpdate]) -> dict[str, Tensor]:
    return {f"{p}.lora_{k}.weight": getattr(u, k) for p, u in updates.items() for k in "AB"}


def alphas(updates: dict[str, LoRAUpdate]) -> dict[str, str]:
    return {"lora_alphas": json.dumps({p: u.alpha for p, u in updates.items()})}


def best_rank(matrix: Tensor, rank: int) -> Tensor:
    """The best rank-r approximation, by a plain SVD written out here (Eckart-Young)."""
    u, s, vh = torch.linalg.svd(matrix.double())
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_extract_recovers_a_low_rank_fine_tune() -> None:
    base = random_flux(PARAMS)
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(3)
    changed = sorted(shapes(base))[::2]
    with torch.no_grad():
        for path in changed:
            w = tuned.get_submodule(path).weight
            w += 0.2 * torch.randn(w.shape[0], 3, generator=gen) @ torch.randn(3, w.shape[1], generator=gen)
        tuned.get_submodule("final_layer.linear").bias += 0.05  # a LoRA cannot carry this
    updates, report = extract_lora(base.state_dict(), tuned.state_dict(), rank=3)
    assert sorted(updates) == changed and set(report.ranks.values()) == {3}
    assert min(report.kept.values()) > 1 - 1e-6
    assert list(report.not_carried) == ["final_layer.linear.bias"]

    model = copy.deepcopy(base)
    apply_lora(model, native(updates), metadata=alphas(updates))
    merge_lora(model)
    for path in changed:
        torch.testing.assert_close(model.get_submodule(path).weight, tuned.get_submodule(path).weight)

    # one rank less: exactly the best rank-2 approximation of each change, and the energy says what it lost
    cut, report = extract_lora(base.state_dict(), tuned.state_dict(), rank=2)
    path = changed[0]
    change = (tuned.get_submodule(path).weight - base.get_submodule(path).weight).detach().double()
    torch.testing.assert_close(delta(cut[path]).double(), best_rank(change, 2), atol=1e-5, rtol=1e-5)
    kept = float((best_rank(change, 2) ** 2).sum() / (change**2).sum())
    assert report.kept[path] == pytest.approx(kept, abs=1e-6) and kept < 0.99


def test_extract_refuses_two_architectures() -> None:
    small, big = random_flux(tiny_flux.tiny_params(depth=1)), random_flux(PARAMS)
    with pytest.raises(LoRAError, match="different layers"):
        extract_lora(small.state_dict(), big.state_dict(), rank=4)
    with pytest.raises(LoRAError, match="rank must be >= 1"):
        extract_lora(small.state_dict(), small.state_dict(), rank=0)


def test_resize_is_the_best_lower_rank_and_energy_picks_the_rank() -> None:
    updates = random_updates(random_flux(PARAMS), seed=5)
    same, _ = resize_lora(updates, 6)
    for path, u in updates.items():
        torch.testing.assert_close(delta(same[path]), delta(u), atol=1e-5, rtol=1e-5)
        assert same[path].alpha == same[path].rank == 6
    cut, report = resize_lora(updates, 2)
    for path, u in updates.items():
        torch.testing.assert_close(delta(cut[path]).double(), best_rank(delta(u), 2), atol=1e-5, rtol=1e-5)
    # with --energy, per layer the fewest singular values that keep that much
    path = "double_blocks.0.img_attn.qkv"
    s = torch.linalg.svdvals(delta(updates[path]).double())
    share = torch.cumsum(s**2, 0) / (s**2).sum()
    want = int((share < 0.9).sum()) + 1
    chosen, _ = resize_lora(updates, 6, energy=0.9)
    assert chosen[path].rank == want < 6
    assert report.kept[path] == pytest.approx(float(share[1]), abs=1e-6)
    with pytest.raises(LoRAError, match="energy must be a fraction"):
        resize_lora(updates, 2, energy=1.5)


@pytest.mark.parametrize("fmt", ["pictor", "kohya", "diffusers"])
def test_written_layouts_read_back_the_same(fmt: str, tmp_path: Path) -> None:
    model = random_flux(PARAMS)
    updates = random_updates(model, seed=7, rank=3)
    path = tmp_path / f"{fmt}.safetensors"
    write_lora(updates, path, fmt)
    back, skipped = read_lora(path, shapes(model))
    assert skipped == []
    assert sorted(back) == sorted(updates)
    for name, u in updates.items():
        torch.testing.assert_close(delta(back[name]), delta(u), atol=1e-6, rtol=1e-6)


def _merged_into_reference(reference: nn.Module, sd: dict[str, Tensor]) -> None:
    """A diffusers-layout LoRA (no alphas: its scale is in B) added into the diffusers model's weights by
    hand, module by module, with diffusers' own names."""
    with torch.no_grad():
        for key, a in sd.items():
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                reference.get_submodule(module).weight += sd[key.replace("lora_A", "lora_B")] @ a


def _assert_reference_agrees(
    base: Flux, updates: dict[str, LoRAUpdate], diffusers_sd: dict[str, Tensor]
) -> None:
    """diffusers' model with ``diffusers_sd`` merged by hand gives what our model gives with ``updates``
    themselves (not a file) applied, and the LoRA changes the output."""
    ref_mod = load_reference()
    reference = ref_mod.build_reference(PARAMS, {k: v.clone() for k, v in base.state_dict().items()})
    _merged_into_reference(reference, diffusers_sd)
    ours = copy.deepcopy(base)
    apply_lora(ours, native(updates), metadata=alphas(updates))
    x = inputs()
    with torch.no_grad():
        expected, out = ref_mod.reference_forward(reference, **x), ours(**x)
        assert (out - base(**x)).abs().max() > 0.05
    assert (out - expected).abs().max() <= 1e-4


def test_diffusers_layout_drives_diffusers_model_like_ours(tmp_path: Path) -> None:
    """Written in diffusers' layout, merged by hand into diffusers' FluxTransformer2DModel, the LoRA gives
    what our Flux gives with it: names, the split of fused q/k/v and linear1, final_layer's swapped halves
    and the folded scale are all right."""
    base = random_flux(PARAMS)
    updates = random_updates(base, seed=9, rank=3)
    path = tmp_path / "diffusers.safetensors"
    write_lora(updates, path, "diffusers")
    _assert_reference_agrees(base, updates, load_file(str(path)))


def test_kohya_layout_is_what_diffusers_converter_expects(tmp_path: Path) -> None:
    """diffusers' own kohya -> diffusers converter (the one `load_lora_weights` runs on kohya FLUX files)
    reads our kohya file of the double blocks (its single-block table is fixed to FLUX.1-dev's widths) to
    the same model output."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    base = random_flux(PARAMS)
    updates = {
        p: u for p, u in random_updates(base, seed=11, rank=2).items() if p.startswith("double_blocks")
    }
    path = tmp_path / "kohya.safetensors"
    write_lora(updates, path, "kohya")
    _assert_reference_agrees(base, updates, _convert_kohya_flux_lora_to_diffusers(load_file(str(path))))


def test_bad_outputs_are_refused(tmp_path: Path) -> None:
    updates = random_updates(random_flux(PARAMS), seed=1, rank=1)
    with pytest.raises(LoRAError, match=r"written as \.safetensors"):
        write_lora(updates, tmp_path / "x.pt")
    with pytest.raises(LoRAError, match="unknown LoRA layout 'peft'"):
        write_lora(updates, tmp_path / "x.safetensors", "peft")
    with pytest.raises(LoRAError, match="nothing to write"):
        write_lora({}, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_diffusers_layout_keeps_split_parts_as_they_were(tmp_path: Path) -> None:
    """A diffusers LoRA on to_q (rank 4) and to_v (rank 2) only, fused on reading, is written back as just
    those two with their own ranks: no to_k of zeros, no A shared at rank 6."""
    model = random_flux(PARAMS)
    gen = torch.Generator().manual_seed(2)
    block = "transformer.transformer_blocks.0.attn"
    sd = {
        f"{block}.to_q.lora_A.weight": torch.randn(4, 32, generator=gen),
        f"{block}.to_q.lora_B.weight": torch.randn(32, 4, generator=gen),
        f"{block}.to_v.lora_A.weight": torch.randn(2, 32, generator=gen),
        f"{block}.to_v.lora_B.weight": torch.randn(32, 2, generator=gen),
    }
    save_file(sd, str(tmp_path / "qv.safetensors"))
    updates, _ = read_lora(tmp_path / "qv.safetensors", shapes(model))
    write_lora(updates, tmp_path / "back.safetensors", "diffusers")
    back = load_file(str(tmp_path / "back.safetensors"))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    for key, value in sd.items():
        torch.testing.assert_close(back[key], value)


def test_text_encoder_keys_are_left_out_and_named(tmp_path: Path) -> None:
    model = random_flux(PARAMS)
    updates = random_updates(model, seed=3, rank=2)
    write_lora(updates, tmp_path / "k.safetensors", "kohya")
    sd = load_file(str(tmp_path / "k.safetensors"))
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 8)
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(8, 2)
    save_file(sd, str(tmp_path / "with_te.safetensors"))
    read, skipped = read_lora(tmp_path / "with_te.safetensors", shapes(model))
    assert sorted(read) == sorted(updates)
    assert skipped == [
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
    ]
