"""Trainable LyCORIS adapters (LoKr, LoHa, DoRA on LoRA/LoKr/LoHa): LyCORIS' own shapes, keys and start
values; a no-op at the start; a few steps learn; the written file drives pictor's loader and the LyCORIS
library exactly as the trained module drives the model."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights
from lycoris.functional import factorization as lycoris_factorization
from torch import Tensor, nn

from pictor.lora_files import apply_lora, load_lora_file, save_lycoris
from pictor.models.dora_adapter import DoRAAdapter
from pictor.models.factored_adapter import FactoredAdapter
from pictor.models.flux import Flux
from pictor.models.lora import LoRAError, merge_lora, unmerge_lora
from pictor.models.lycoris_train import LycorisAdapter, add_lycoris, factorization

import tiny_flux

TOL = 1e-5
# name -> (algo, dora, rank, alpha, factor). The tiny model's layers are 16..128 wide: rank 2 splits LoKr's
# w2 into rank-2 factors on every layer, rank 8 keeps it whole on the small ones (LyCORIS' rule: split when
# rank < max(w2's sides) / 2), factor 4 fixes w1's sides to 4.
CONFIGS: dict[str, tuple[str, bool, int, float, int]] = {
    "lokr": ("lokr", False, 2, 1.5, -1),
    "lokr-r8": ("lokr", False, 8, 3.0, -1),
    "lokr-f4": ("lokr", False, 2, 1.0, 4),
    "loha": ("loha", False, 3, 1.5, -1),
    "lora+dora": ("lora", True, 3, 1.5, -1),
    "lokr+dora": ("lokr", True, 2, 1.5, -1),
    "loha+dora": ("loha", True, 2, 1.0, -1),
}


@pytest.fixture(autouse=True)
def quiet_lycoris() -> Iterator[None]:
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kohya_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    """LyCORIS under kohya's sd-scripts (``lycoris.kohya``) names the transformer's modules lora_unet_..."""
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")


PARAMS = tiny_flux.tiny_params(depth=1, guidance_embed=True)


def base_model() -> Flux:
    return tiny_flux.random_flux(PARAMS, 0)


def inputs() -> dict[str, Any]:
    x = tiny_flux.make_inputs(PARAMS)
    x["guidance"] = torch.tensor([3.5, 1.0])
    return x


def adapted(config: str, seed: int = 0) -> tuple[Flux, nn.Module]:
    algo, dora, rank, alpha, factor = CONFIGS[config]
    model = base_model()
    torch.manual_seed(seed)
    return model, add_lycoris(model, "default", "all", algo, rank, alpha, dora, factor)


def train_a_little(model: Flux, tree: nn.Module, steps: int = 5) -> list[float]:
    """Adam towards a random target output: the loss must fall."""
    x = inputs()
    target = torch.randn(model(**x).shape, generator=torch.Generator().manual_seed(9))
    opt = torch.optim.Adam(tree.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = (model(**x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def out(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model(**inputs())


@pytest.mark.parametrize("config", list(CONFIGS))
def test_shapes_keys_and_start_are_lycoris_own(config: str, kohya_prefix: None) -> None:
    """Same keys, shapes, alphas and DoRA magnitudes as LyCORIS builds for the same options, and the factor
    LyCORIS zeroes is the zero one (the rest are not), so the update starts at exactly zero."""
    algo, dora, rank, alpha, factor = CONFIGS[config]
    _, tree = adapted(config)
    reference = base_model()
    options: dict[str, Any] = {"linear_dim": rank, "linear_alpha": alpha}
    if algo == "lokr":
        options["factor"] = factor
    if dora:
        options["dora_wd"] = True
    net = create_lycoris(reference, 1.0, algo="locon" if algo == "lora" else algo, **options)
    net.apply_to()
    want = {k: v for k, v in net.state_dict().items()}
    have = tree.state_dict()
    assert set(have) == set(want)
    assert all(have[k].shape == want[k].shape for k in want)
    for key in [k for k in want if k.endswith((".alpha", ".dora_scale"))]:
        assert torch.allclose(have[key].float(), want[key].float(), rtol=1e-6), key
    zero = ("lokr_w2", "lokr_w2_b", "hada_w2_a", "lora_up.weight")
    for key, value in have.items():
        if key.endswith(zero):
            assert not value.any(), key
        elif not key.endswith((".alpha", ".dora_scale")):
            assert value.abs().min() > 0 or value.std() > 0.01, key  # drawn, not zero
    if algo == "lokr":
        whole = {k for k in have if k.endswith(".lokr_w2")}
        split = {k for k in have if k.endswith(".lokr_w2_b")}
        # rank 8 >= max(w2's sides) / 2 on every tiny layer: LyCORIS' "full matrix" mode, alpha saved = rank
        assert (bool(whole), bool(split)) == ((True, False) if config == "lokr-r8" else (False, True))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_fresh_adapter_is_the_base(config: str) -> None:
    """Bit-identical for LoKr and LoHa (one factor is zero); with DoRA within float32's eps, because the
    start is LyCORIS' ``W |W| / (|W| + eps)``."""
    model, _ = adapted(config)
    diff = (out(model) - out(base_model())).abs().max().item()
    if CONFIGS[config][1]:
        assert 0 < diff <= 1e-5
    else:
        assert diff == 0.0


@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_file_drives_pictor_and_lycoris_as_the_trained_module(
    config: str, tmp_path: Path, kohya_prefix: None
) -> None:
    """A few steps change every trained tensor and lower the loss; the saved file, applied by pictor's loader
    at scale 1 and by LyCORIS' create_lycoris_from_weights, gives the trained model's output."""
    algo, dora, *_ = CONFIGS[config]
    model, tree = adapted(config)
    before = {k: v.clone() for k, v in tree.state_dict().items()}
    losses = train_a_little(model, tree)
    assert losses[-1] < 0.97 * losses[0], losses
    for key, value in tree.state_dict().items():
        assert key.endswith(".alpha") or not torch.equal(value, before[key]), key
        if key.endswith(".alpha"):
            assert torch.equal(value, before[key])
    path = tmp_path / "trained.safetensors"
    save_lycoris(tree, path, {"extra": "kept"})
    tensors, meta = load_lora_file(path)
    assert set(tensors) == set(tree.state_dict())
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["extra"] == "kept"
    assert meta["lora_algo"] == algo + ("+dora" if dora else "")
    # the alpha asked for (kohya's --network_alpha), though whole-matrix LoKr layers store alpha = rank
    assert float(meta["ss_network_alpha"]) == CONFIGS[config][3]

    trained, plain = out(model), out(base_model())
    assert (trained - plain).abs().max() > 0.02  # the training moved the output: no match by doing nothing
    ours = base_model()
    apply_lora(ours, path)
    adapter = ours.get_submodule("double_blocks.0.img_attn.qkv").adapters["trained"]
    assert isinstance(adapter, DoRAAdapter if dora else FactoredAdapter)
    assert (out(ours) - trained).abs().max().item() <= TOL

    theirs = base_model()
    net, _ = create_lycoris_from_weights(1.0, str(path), theirs)
    assert len(net.loras) == len([m for m in tree.children()])  # every module of the file was read
    net.apply_to()
    assert (out(theirs) - trained).abs().max().item() <= TOL


@pytest.mark.parametrize("config", list(CONFIGS))
def test_gradients_are_lycoris_own(config: str, tmp_path: Path, kohya_prefix: None) -> None:
    """Trained as LyCORIS trains it: at the same (trained) values, the same loss gives the same gradient for
    every tensor, DoRA's through the norm of ``W + dW`` included (LyCORIS does not detach it)."""
    model, tree = adapted(config)
    train_a_little(model, tree, steps=2)
    path = tmp_path / "a.safetensors"
    save_lycoris(tree, path)
    theirs = base_model().requires_grad_(False)
    net, _ = create_lycoris_from_weights(1.0, str(path), theirs)
    net.apply_to()
    x = inputs()
    target = torch.randn(out(model).shape, generator=torch.Generator().manual_seed(4))
    grads = {}
    for name, m, params in (
        ("ours", model, dict(tree.named_parameters())),
        ("theirs", theirs, {f"{lo.lora_name}.{n}": p for lo in net.loras for n, p in lo.named_parameters()}),
    ):
        for p in params.values():
            p.grad = None
        (m(**x) - target).pow(2).mean().backward()
        grads[name] = {k: p.grad for k, p in params.items() if p.requires_grad}
    assert set(grads["ours"]) <= set(grads["theirs"])
    for key, g in grads["ours"].items():
        want = grads["theirs"][key]
        assert g is not None and want is not None, key
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-6 * want.abs().max().item()), key


def test_merge_and_unmerge_a_trained_lokr_exactly() -> None:
    model, tree = adapted("lokr+dora")
    train_a_little(model, tree, steps=2)
    unmerged = out(model)
    merge_lora(model, "default")
    assert (out(model) - unmerged).abs().max().item() <= TOL
    unmerge_lora(model, "default")
    assert torch.equal(out(model), unmerged)


def test_factorization_is_lycoris_own() -> None:
    for dim in [*range(1, 200), 256, 360, 1000, 1024, 3072, 9216, 12288, 15360]:
        for factor in (-1, 1, 2, 3, 4, 8, 16, 32):
            assert factorization(dim, factor) == lycoris_factorization(dim, factor), (dim, factor)


def test_bad_options_are_refused() -> None:
    model = base_model()
    with pytest.raises(LoRAError, match="unknown LyCORIS algorithm 'lycon'"):
        add_lycoris(model, "a", "all", "lycon", 2, None)
    with pytest.raises(LoRAError, match="add_lora"):
        add_lycoris(model, "b", "all", "lora", 2, None, dora=False)
    with pytest.raises(LoRAError, match="rank must be >= 1"):
        LycorisAdapter(nn.Linear(4, 4), "loha", 0, None)
