"""LoRA: parity of the three file layouts against independent hand merges, merge/unmerge, adapters, files."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from pictor.checkpoint import CheckpointError, read_safetensors_metadata
from pictor.lora_files import (
    a1111_lora_hash,
    apply_lora,
    load_lora_file,
    lora_file_hash,
    lora_state_dict,
    save_lora,
)
from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids, pack_latents
from pictor.models.lora import (
    LoRAError,
    adapter_tree,
    add_lora,
    list_loras,
    merge_lora,
    remove_lora,
    select_targets,
    set_lora_scale,
    unmerge_lora,
)
from pictor.models.lora_layers import LoRALinear

import tiny_flux
from tiny_flux import LAT_C, load_reference, random_flux

LAT_H, LAT_W = 4, 6
N_TXT, BATCH = 5, 2
TOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from two threads, and on a busy machine two OpenMP threads wait on each
    other (a 10 ms forward becomes 400 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_params() -> FluxParams:
    # Two blocks of each kind (so block indices are exercised), guidance embedder on.
    return tiny_flux.tiny_params(depth=2, guidance_embed=True)


def random_model(seed: int = 0) -> Flux:
    return random_flux(tiny_params(), seed)


def inputs(seed: int = 1) -> dict[str, Tensor]:
    p = tiny_params()
    gen = torch.Generator().manual_seed(seed)
    return {
        "img": pack_latents(torch.randn(BATCH, LAT_C, LAT_H, LAT_W, generator=gen)),
        "img_ids": make_img_ids(BATCH, LAT_H, LAT_W),
        "txt": torch.randn(BATCH, N_TXT, p.context_in_dim, generator=gen),
        "txt_ids": make_txt_ids(BATCH, N_TXT),
        "timesteps": torch.tensor([0.3, 0.8]),
        "y": torch.randn(BATCH, p.vec_in_dim, generator=gen),
        "guidance": torch.tensor([3.5, 1.0]),
    }


@torch.no_grad()
def run(model: nn.Module) -> Tensor:
    return model(**inputs())


def linear_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def random_lora(shapes: dict[str, tuple[int, int]], seed: int) -> dict[str, tuple[Tensor, Tensor, float]]:
    """module -> (A, B, alpha) with ranks 1..4 and alphas that differ from the rank."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, (n_in, n_out)) in enumerate(sorted(shapes.items())):
        rank = 1 + i % 4
        a = 0.3 * torch.randn(rank, n_in, generator=gen)
        b = 0.3 * torch.randn(n_out, rank, generator=gen)
        out[name] = (a, b, float(rank) * (0.5 + (i % 3) * 0.75))
    return out


@torch.no_grad()
def hand_merge(model: nn.Module, lora: dict[str, tuple[Tensor, Tensor, float]], scale: float = 1.0) -> None:
    """W += scale * alpha / rank * B @ A, written out here independently of pictor.models.lora."""
    for name, (a, b, alpha) in lora.items():
        model.get_submodule(name).weight += scale * alpha / a.shape[0] * (b @ a)


def flux_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


# ------------------------------------------------------------------------------------- format parity


def test_native_file_matches_a_hand_merge(tmp_path: Path) -> None:
    base = random_model()
    lora = random_lora(flux_shapes(base), seed=2)
    expected_model = copy.deepcopy(base)
    hand_merge(expected_model, lora)
    expected = run(expected_model)

    tensors = {}
    for name, (a, b, _) in lora.items():
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
    alphas = {name: alpha for name, (_, _, alpha) in lora.items()}
    path = tmp_path / "native.safetensors"
    save_file(tensors, str(path), metadata={"lora_alpha": "1.0", "lora_alphas": json.dumps(alphas)})
    model = copy.deepcopy(base)
    assert apply_lora(model, path) == "native"
    out = run(model)
    assert (out - run(base)).abs().max() > 0.05  # the LoRA changes the output a lot ...
    assert (out - expected).abs().max().item() <= TOL  # ... exactly as the hand merge does


@pytest.mark.parametrize("prefix", ["diffusion_model.", "transformer.", "model.diffusion_model."])
def test_prefixed_native_file_loads_the_same(prefix: str) -> None:
    base = random_model()
    lora = random_lora({k: v for k, v in flux_shapes(base).items() if "double_blocks.1" in k}, seed=3)
    sd = {f"{k}.lora_{ab}.weight": t for k, (a, b, _) in lora.items() for ab, t in (("A", a), ("B", b))}
    plain, prefixed = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(plain, sd)
    apply_lora(prefixed, {prefix + k: v for k, v in sd.items()})
    expected = copy.deepcopy(base)
    hand_merge(expected, {k: (a, b, float(a.shape[0])) for k, (a, b, _) in lora.items()})  # alpha = rank
    assert torch.equal(run(plain), run(prefixed))
    assert (run(plain) - run(expected)).abs().max().item() <= TOL


def test_kohya_file_matches_a_hand_merge(tmp_path: Path) -> None:
    base = random_model()
    lora = random_lora(flux_shapes(base), seed=4)
    sd = {}
    for name, (a, b, alpha) in lora.items():
        flat = "lora_unet_" + name.replace(".", "_")
        sd[f"{flat}.lora_down.weight"], sd[f"{flat}.lora_up.weight"] = a, b
        sd[f"{flat}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "kohya.safetensors"
    save_file(sd, str(path))
    model, expected = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(model, path, scale=0.7)
    hand_merge(expected, lora, scale=0.7)
    assert (run(model) - run(expected)).abs().max().item() <= TOL


def test_diffusers_file_matches_diffusers_model_with_merged_weights(tmp_path: Path) -> None:
    """A random LoRA on EVERY linear of diffusers' FluxTransformer2DModel (split q/k/v, proj_mlp,
    norm_out with its swapped halves, embedders), merged by hand into the diffusers model's weights,
    gives the output our Flux gives with the same file applied by apply_lora."""
    ref_mod = load_reference()
    base = random_model()
    params = tiny_params()
    reference = ref_mod.build_reference(params, {k: v.clone() for k, v in base.state_dict().items()})
    lora = random_lora(flux_shapes(reference), seed=5)
    sd: dict[str, Tensor] = {}
    for i, (name, (a, b, alpha)) in enumerate(sorted(lora.items())):
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = a, b
        if i % 2:  # half the modules carry an alpha tensor; the others get diffusers' default alpha = rank
            sd[f"transformer.{name}.alpha"] = torch.tensor(alpha)
        else:
            lora[name] = (a, b, float(a.shape[0]))
    hand_merge(reference, lora)
    path = tmp_path / "diffusers.safetensors"
    save_file(sd, str(path))

    model = copy.deepcopy(base)
    apply_lora(model, path)
    x = inputs()
    with torch.no_grad():
        expected = ref_mod.reference_forward(reference, **x)
        out = model(**x)
    assert (out - run(base)).abs().max() > 0.05
    assert (out - expected).abs().max().item() <= TOL
    # q/k/v (and the single blocks' MLP input) were fused into one adapter per FLUX layer
    qkv = model.get_submodule("double_blocks.0.img_attn.qkv")
    assert isinstance(qkv, LoRALinear) and len(qkv.adapters) == 1


def test_diffusers_split_sharing_one_down_matrix_keeps_its_rank() -> None:
    """Converters split a fused kohya LoRA into q/k/v with the same A: fused back, the rank stays r."""
    base = random_model()
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(3, 32, generator=gen), torch.randn(96, 3, generator=gen)
    sd = {}
    for part, rows in zip(("to_q", "to_k", "to_v"), b.split(32), strict=True):
        key = f"transformer.transformer_blocks.1.attn.{part}"
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = a, rows
    model, expected = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(model, sd)
    hand_merge(expected, {"double_blocks.1.img_attn.qkv": (a, b, 3.0)})
    adapter = model.get_submodule("double_blocks.1.img_attn.qkv").adapters["lora"]
    assert adapter.rank == 3
    assert (run(model) - run(expected)).abs().max().item() <= TOL


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "key",
    [
        "transformer.transformer_blocks.0.attn.to_nothing.lora_A.weight",
        "lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight",
        "double_blocks.0.img_attn.qkvx.lora_A.weight",
        "diffusion_model.single_blocks.9.linear1.lora_A.weight",
        "text_model.encoder.layers.0.q_proj.lora_A.weight",
    ],
)
def test_a_key_that_matches_nothing_is_an_error_naming_it(key: str) -> None:
    base = random_model()
    good = {
        "double_blocks.0.img_attn.proj.lora_A.weight": torch.zeros(2, 32),
        "double_blocks.0.img_attn.proj.lora_B.weight": torch.zeros(32, 2),
    }
    if key.startswith("lora_unet_"):
        good = {
            "lora_unet_double_blocks_0_img_attn_proj." + k.split(".")[-2] + ".weight": v
            for k, v in good.items()
        }
        good = {k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v for k, v in good.items()}
    elif key.startswith("transformer."):
        good = {
            "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": torch.zeros(2, 32),
            "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": torch.zeros(32, 2),
        }
    sd = {
        **good,
        key: torch.zeros(2, 32),
        key.replace("lora_A", "lora_B").replace("lora_down", "lora_up"): torch.zeros(96, 2),
    }
    with pytest.raises(LoRAError) as err:
        apply_lora(base, sd)
    assert key in str(err.value)
    assert not list_loras(base)  # nothing half-applied


def test_wrong_shape_and_unknown_suffix_name_the_key() -> None:
    base = random_model()
    bad = {
        "double_blocks.0.img_mlp.0.lora_A.weight": torch.zeros(2, 31),
        "double_blocks.0.img_mlp.0.lora_B.weight": torch.zeros(128, 2),
    }
    with pytest.raises(LoRAError, match=r"double_blocks\.0\.img_mlp\.0\.lora_A\.weight"):
        apply_lora(base, bad)
    dora = {**bad, "double_blocks.0.img_mlp.0.dora_scale": torch.zeros(1, 32)}
    with pytest.raises(LoRAError, match=r"double_blocks\.0\.img_mlp\.0\.dora_scale"):
        apply_lora(base, dora)


def test_text_encoder_keys_are_skipped_out_loud_and_a_text_encoder_only_file_refused() -> None:
    """Like `read_lora` (the server's folder, `pictor lora merge`): a kohya file's CLIP keys are left out with
    a warning that names them, so a file the server offers also applies; one with nothing else is an error."""
    base = random_model()
    sd = {
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, 32),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(32, 2),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 8),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, 2),
    }
    with pytest.warns(UserWarning, match="text-encoder keys not applied .2.: lora_te1_text_model_encoder"):
        apply_lora(base, sd)
    assert list_loras(base)["lora"]["layers"] == 1
    with pytest.raises(LoRAError, match="holds only text-encoder weights"):
        apply_lora(base, {k: v for k, v in sd.items() if k.startswith("lora_te1_")})


def test_pickles_are_refused_unopened(tmp_path: Path) -> None:
    for suffix in (".pt", ".ckpt", ".bin", ".pth"):
        path = tmp_path / f"lora{suffix}"
        path.write_bytes(b"\x80\x04 not even a real pickle")
        with pytest.raises(CheckpointError, match="pickle"):
            load_lora_file(path)
        with pytest.raises(CheckpointError, match="pickle"):
            apply_lora(random_model(), path)


# ------------------------------------------------------------------------------- adapters, merging


def test_merge_then_unmerge_restores_the_weights_bit_exactly() -> None:
    model = random_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = random_lora(flux_shapes(model), seed=7)
    sd = {f"{k}.lora_{ab}.weight": t for k, (a, b, _) in lora.items() for ab, t in (("A", a), ("B", b))}
    apply_lora(model, sd, name="one")
    apply_lora(model, sd, name="two", scale=-0.3)
    live = run(model)
    merge_lora(model, "one")
    merge_lora(model)  # the rest
    assert all(info["merged"] for info in list_loras(model).values())
    assert not torch.equal(model.state_dict()["img_in.weight"], before["img_in.weight"])
    assert (run(model) - live).abs().max().item() <= 1e-5
    set_lora_scale(model, "two", 0.5)  # re-merged at the new scale
    unmerge_lora(model, "two")
    unmerge_lora(model, "one")
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    remove_lora(model)
    assert torch.equal(run(model), run(random_model()))


def test_adapters_add_up_with_their_scales_and_can_be_removed() -> None:
    base = random_model()
    shapes = flux_shapes(base)
    l1, l2 = random_lora(shapes, seed=8), random_lora(shapes, seed=9)

    def sd(lora: dict[str, tuple[Tensor, Tensor, float]]) -> dict[str, Tensor]:
        return {f"{k}.lora_{ab}.weight": t for k, (a, b, _) in lora.items() for ab, t in (("A", a), ("B", b))}

    model = copy.deepcopy(base)
    apply_lora(model, sd(l1), scale=0.5, name="first")
    apply_lora(model, sd(l2), scale=-1.5, name="second")
    expected = copy.deepcopy(base)
    hand_merge(expected, {k: (a, b, float(a.shape[0])) for k, (a, b, _) in l1.items()}, scale=0.5)
    hand_merge(expected, {k: (a, b, float(a.shape[0])) for k, (a, b, _) in l2.items()}, scale=-1.5)
    assert (run(model) - run(expected)).abs().max().item() <= TOL

    set_lora_scale(model, "second", 0.0)
    only_first = copy.deepcopy(base)
    hand_merge(only_first, {k: (a, b, float(a.shape[0])) for k, (a, b, _) in l1.items()}, scale=0.5)
    assert (run(model) - run(only_first)).abs().max().item() <= TOL

    remove_lora(model, "first")
    remove_lora(model, "second")
    assert not list_loras(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.equal(run(model), run(base))
    with pytest.raises(LoRAError, match="no LoRA adapter named 'first'"):
        merge_lora(model, "first")


def test_state_dict_keys_stay_the_base_keys() -> None:
    base = random_model()
    model = copy.deepcopy(base)
    add_lora(model, "x", targets="all", rank=2)
    assert list(model.state_dict()) == list(base.state_dict())
    model.load_state_dict(base.state_dict(), strict=True)  # a base checkpoint still loads
    names = {n for n, _ in model.named_parameters()}
    assert "double_blocks.0.img_attn.qkv.adapters.x.lora_A.weight" in names  # ... and training sees them


def test_a_fresh_adapter_is_the_identity_and_only_it_gets_gradients() -> None:
    model = random_model()
    before = run(model)
    model.requires_grad_(False)
    with pytest.raises(LoRAError, match="'train'"):
        add_lora(model, "train")  # would shadow Module.train in the adapters' ModuleDict
    tree = add_lora(model, "trainable", targets="attn,*.img_mod.lin", rank=4, alpha=8)
    assert torch.equal(run(model), before)  # B = 0
    model(**inputs()).square().mean().backward()
    assert all(p.grad is not None for p in tree.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)
    keys = list(tree.state_dict())
    assert (
        "double_blocks.0.img_attn.qkv.lora_A.weight" in keys
        and "single_blocks.1.linear2.lora_B.weight" in keys
    )
    assert not any("img_mlp" in k for k in keys)


def test_target_selection() -> None:
    model = random_model()
    assert select_targets(model, "mod") == [
        "double_blocks.0.img_mod.lin",
        "double_blocks.0.txt_mod.lin",
        "double_blocks.1.img_mod.lin",
        "double_blocks.1.txt_mod.lin",
        "single_blocks.0.modulation.lin",
        "single_blocks.1.modulation.lin",
    ]
    assert select_targets(model, r"re:single_blocks\.1\.linear[12]") == [
        "single_blocks.1.linear1",
        "single_blocks.1.linear2",
    ]
    assert len(select_targets(model, "all")) == len(linear_paths(model))
    with pytest.raises(LoRAError, match=r"'\*\.img_atn\.qkv' matches no linear layer"):
        select_targets(model, "attn,*.img_atn.qkv")


# ------------------------------------------------------------------------------------- saving


def test_saved_file_has_rank_and_alpha_and_round_trips(tmp_path: Path) -> None:
    model = random_model()
    tree = add_lora(model, "mine", targets="attn", rank=4, alpha=2.0)
    with torch.no_grad():
        for p in tree.parameters():
            p.normal_(0, 0.2)
        tree.get_submodule("single_blocks.0.linear1").alpha = 6.0  # one module with its own alpha
    path = tmp_path / "mine.safetensors"
    digest = save_lora(model, path, adapter="mine", metadata={"base_model": "tiny"})
    meta = read_safetensors_metadata(path)
    assert meta["lora_rank"] == "4" and float(meta["lora_alpha"]) == 2.0
    assert json.loads(meta["lora_alphas"])["single_blocks.0.linear1"] == 6.0
    assert meta["base_model"] == "tiny"
    tensors, _ = load_lora_file(path)
    assert set(tensors) == set(lora_state_dict(model, "mine"))
    assert "double_blocks.0.img_attn.qkv.lora_A.weight" in tensors

    data = path.read_bytes()
    assert digest == lora_file_hash(path) == hashlib.sha256(data).hexdigest()
    header = 8 + int.from_bytes(data[:8], "little")
    assert a1111_lora_hash(path) == hashlib.sha256(data[header:]).hexdigest()[:12]

    fresh = random_model()
    apply_lora(fresh, path)
    assert (run(fresh) - run(model)).abs().max().item() <= TOL
    assert run(model).sub(run(random_model())).abs().max() > 1e-3
    assert adapter_tree(fresh, "mine").get_submodule("single_blocks.0.linear1").alpha == 6.0


def test_diffusers_header_alphas_are_read() -> None:
    """diffusers keeps PEFT's lora_alpha / alpha_pattern in the `lora_adapter_metadata` header."""
    base = random_model()
    gen = torch.Generator().manual_seed(10)
    lora = {
        "transformer_blocks.0.attn.to_out.0": (
            torch.randn(4, 32, generator=gen),
            torch.randn(32, 4, generator=gen),
        ),
        "single_transformer_blocks.1.proj_out": (
            torch.randn(4, 160, generator=gen),
            torch.randn(32, 4, generator=gen),
        ),
    }
    sd = {
        f"transformer.{k}.lora_{ab}.weight": t for k, (a, b) in lora.items() for ab, t in (("A", a), ("B", b))
    }
    header = {"transformer.r": 4, "transformer.lora_alpha": 2, "transformer.alpha_pattern": {"proj_out": 12}}
    model, expected = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(model, sd, metadata={"lora_adapter_metadata": json.dumps(header)})
    a, b = lora["transformer_blocks.0.attn.to_out.0"]
    hand_merge(expected, {"double_blocks.0.img_attn.proj": (a, b, 2.0)})
    a, b = lora["single_transformer_blocks.1.proj_out"]
    hand_merge(expected, {"single_blocks.1.linear2": (a, b, 12.0)})
    assert (run(model) - run(expected)).abs().max().item() <= TOL


def test_float32_adapters_on_a_bfloat16_base() -> None:
    """Training keeps adapters in float32 on a low-precision base: the forward casts, nothing breaks."""
    model = random_model().to(torch.bfloat16)
    tree = add_lora(model, "fp32", targets="blocks", rank=4, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in tree.parameters())
    x = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs().items()}
    out = model(**x)
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in tree.parameters())
