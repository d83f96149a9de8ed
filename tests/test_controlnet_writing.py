"""A fresh ControlNet grown from a transformer (`controlnet_from_transformer`) and ControlNets written as
diffusers folders (`pictor.controlnet_writing`), against diffusers' FluxControlNetModel.

diffusers' `from_transformer` is run on the diffusers twin of a tiny random pictor Flux; the folders pictor
writes are read by diffusers' `from_pretrained` and by pictor's `load_controlnet`. Every weight of the
written nets is random, zero-initialised layers included, so a wrong q/k/v cut or a misnamed conv shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import Tensor, nn

import pictor.checkpoint
from pictor.checkpoint import CheckpointError, read_safetensors, read_safetensors_metadata
from pictor.controlnet_files import load_controlnet
from pictor.controlnet_keys import diffusers_controlnet_keys, params_from_diffusers_config
from pictor.controlnet_writing import (
    controlnet_config_diffusers,
    controlnet_state_dict_diffusers,
    save_controlnet_folder,
)
from pictor.models.controlnet import ControlNetParams, FluxControlNet, controlnet_from_transformer
from pictor.models.flux import Flux, make_img_ids

from tiny_flux import load_reference, make_inputs, random_flux, tiny_params

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxControlNetModel  # noqa: E402

HEADS, HEAD_DIM, AXES = 2, 16, [4, 6, 6]
TXT_DIM, POOLED = 24, 12
BATCH, GRID_H, GRID_W, N_TXT = 2, 2, 3, 5  # packed latent grid 2x3 -> 6 image tokens
TOL = 1e-5


# ------------------------------------------------------------------------------- from_transformer


def _diffusers_from_transformer(flux: Flux, depth: int, depth_single: int) -> FluxControlNetModel:
    ref = load_reference().build_reference(flux.params, flux.state_dict())
    return FluxControlNetModel.from_transformer(
        ref,
        num_layers=depth,
        num_single_layers=depth_single,
        attention_head_dim=flux.params.head_dim,
        num_attention_heads=flux.params.num_heads,
        load_weights_from_transformer=True,
    )


def _assert_same(ours: dict[str, Tensor], theirs: dict[str, Tensor], tol: float = 1e-6) -> None:
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key].shape == theirs[key].shape, key
        assert float((ours[key].float() - theirs[key].float()).abs().max()) <= tol, key


@pytest.mark.parametrize(
    ("guidance", "depth", "depth_single"), [(True, 2, 1), (False, 1, 2), (True, 1, 0), (False, 2, 2)]
)
def test_from_transformer_matches_diffusers(guidance: bool, depth: int, depth_single: int) -> None:
    flux = random_flux(tiny_params(depth=2, guidance_embed=guidance), seed=3)
    net = controlnet_from_transformer(flux, depth, depth_single)
    theirs = _diffusers_from_transformer(flux, depth, depth_single)
    assert net.params == params_from_diffusers_config(dict(theirs.config), "diffusers")
    assert net.params.kind == "instantx" and net.params.axes_dim == flux.params.axes_dim
    # Compared in pictor's names and in diffusers' (the writer's direction), zero-init parts included.
    _assert_same(net.state_dict(), diffusers_controlnet_keys(theirs.state_dict(), "diffusers"))
    _assert_same(controlnet_state_dict_diffusers(net), theirs.state_dict())
    zero = [*net.controlnet_blocks.parameters(), *net.controlnet_single_blocks.parameters()]
    assert all(not p.any() for p in [*zero, *net.pos_embed_input.parameters()])
    assert float(net.double_blocks[0].img_attn.qkv.weight.detach().abs().max()) > 0.1  # copied, not zeroed
    assert all(p.requires_grad and p.dtype == torch.float32 for p in net.parameters())


def test_union_from_transformer() -> None:
    """diffusers' from_transformer makes no Union model: all but the mode embedding as there, that N(0, 1)."""
    flux = random_flux(tiny_params(depth=2, guidance_embed=True), seed=4)
    net = controlnet_from_transformer(flux, 1, 2, num_modes=5)
    theirs = _diffusers_from_transformer(flux, 1, 2)
    ours = net.state_dict()
    modes = ours.pop("controlnet_mode_embedder.weight")
    assert net.params.kind == "union" and modes.shape == (5, flux.params.hidden_size)
    assert 0.7 < float(modes.std()) < 1.3
    _assert_same(ours, diffusers_controlnet_keys(theirs.state_dict(), "diffusers"))


def _control_inputs(flux: Flux, seed: int = 1) -> tuple[dict[str, Tensor | None], Tensor]:
    x = make_inputs(flux.params, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    img = x["img"]
    assert img is not None
    return x, torch.randn(img.shape, generator=gen)


def test_fresh_controlnet_changes_nothing() -> None:
    flux = random_flux(tiny_params(depth=2, guidance_embed=True), seed=5)
    net = controlnet_from_transformer(flux, 2, 1, num_modes=3)
    x, cond = _control_inputs(flux)
    mode = torch.tensor([0, 2])
    res = net(cond=cond, mode=mode, **x)  # type: ignore[arg-type]
    assert len(res.double) == 2 and len(res.single) == 1
    assert all(not r.any() for r in [*res.double, *res.single])
    with torch.no_grad():
        plain = flux(**x)
        controlled = flux(controlnet=res, **x)
    assert float((controlled - plain).abs().max()) <= 1e-6
    # The test can fail: one residual projection off zero and the transformer's output moves. (Not by a
    # constant bias: the final LayerNorm would take that out again.)
    with torch.no_grad():
        net.controlnet_blocks[1].weight.normal_(0.0, 0.2)
        moved = flux(controlnet=net(cond=cond, mode=mode, **x), **x)  # type: ignore[arg-type]
    assert float((moved - plain).abs().max()) > 1e-3

    # A first training step reaches the residual projections (the only layers with a gradient yet), and
    # the transformer it was copied from is not touched.
    net = controlnet_from_transformer(flux, 2, 1, num_modes=3)
    before = flux.img_in.weight.detach().clone()
    flux.requires_grad_(False)
    out = flux(controlnet=net(cond=cond, mode=mode, **x), **x)  # type: ignore[arg-type]
    out.square().mean().backward()
    assert all(b.weight.grad is not None and b.weight.grad.abs().max() > 0 for b in net.controlnet_blocks)
    with torch.no_grad():
        net.img_in.weight.add_(1.0)
    assert torch.equal(flux.img_in.weight, before)
    assert net.img_in.weight.data_ptr() != flux.img_in.weight.data_ptr()


def test_from_transformer_shapes_and_refusals() -> None:
    flux = random_flux(tiny_params(depth=2), seed=6).to(torch.bfloat16)
    net = controlnet_from_transformer(flux, 2, 2)
    assert all(p.dtype == torch.float32 for p in net.parameters())  # trainable master weights
    assert torch.equal(net.txt_in.weight, flux.txt_in.weight.float())
    with pytest.raises(ValueError, match="has only 2 / 2"):
        controlnet_from_transformer(flux, 3, 0)
    with pytest.raises(ValueError, match="has only 2 / 2"):
        controlnet_from_transformer(flux, 1, 3)
    with pytest.raises(ValueError, match="at least one block"):
        controlnet_from_transformer(flux, 0, 0)
    with pytest.raises(ValueError, match="num_modes"):
        controlnet_from_transformer(flux, 1, 1, num_modes=0)


# -------------------------------------------------------------------------------------------- writing

CASES: dict[str, dict[str, object]] = {
    "instantx": {"in_channels": 16, "depth": 2, "depth_single_blocks": 2, "guidance_embed": True},
    "instantx-no-guidance": {"in_channels": 16, "depth": 1, "depth_single_blocks": 0},
    "instantx-singles-only": {
        "in_channels": 16,
        "depth": 0,
        "depth_single_blocks": 3,
        "guidance_embed": True,
    },
    "union": {
        "in_channels": 16,
        "depth": 1,
        "depth_single_blocks": 2,
        "guidance_embed": True,
        "num_modes": 3,
    },
    "union-deep": {"in_channels": 8, "depth": 3, "depth_single_blocks": 1, "num_modes": 2},
    "xlabs": {"in_channels": 64, "depth": 2, "depth_single_blocks": 0, "guidance_embed": True, "hint": True},
}


@torch.no_grad()
def _random_net(case: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> FluxControlNet:
    """Every parameter random (fan-in scaled, so eight hint convs in a row neither vanish nor blow up)."""
    params = ControlNetParams(
        hidden_size=HEADS * HEAD_DIM,
        num_heads=HEADS,
        vec_in_dim=POOLED,
        context_in_dim=TXT_DIM,
        axes_dim=AXES,
        **CASES[case],  # type: ignore[arg-type]
    )
    net = FluxControlNet(params).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, p in net.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith(".scale"):
            p.copy_(1 + 0.2 * noise)
        elif p.ndim >= 2:
            fan_in = p[0].numel() if "mode_embedder" not in name else 1
            p.copy_(noise * 0.8 / fan_in**0.5)
        else:
            p.copy_(0.1 * noise)
    return net.to(dtype)


def _inputs(p: ControlNetParams, seed: int = 1) -> dict[str, Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    n_img = GRID_H * GRID_W
    if p.hint:
        cond = torch.rand(BATCH, 3, 16 * GRID_H, 16 * GRID_W, generator=gen) * 2 - 1
    else:
        cond = torch.randn(BATCH, n_img, p.in_channels, generator=gen)
    return {
        "img": torch.randn(BATCH, n_img, p.in_channels, generator=gen),
        "img_ids": make_img_ids(1, 2 * GRID_H, 2 * GRID_W)[0],
        "cond": cond,
        "txt": torch.randn(BATCH, N_TXT, TXT_DIM, generator=gen),
        # Distinct text positions (FLUX.1's are zeros): a misplaced mode token then shows in the outputs.
        "txt_ids": torch.randint(0, 7, (N_TXT, 3), generator=gen).float(),
        "timesteps": torch.tensor([0.3, 0.85]),
        "y": torch.randn(BATCH, POOLED, generator=gen),
        "guidance": torch.tensor([3.5, 1.5]) if p.guidance_embed else None,
        "mode": torch.tensor([2, 0])[:BATCH] % p.num_modes if p.num_modes is not None else None,
    }


@torch.no_grad()
def _theirs(ref: FluxControlNetModel, x: dict[str, Tensor | None]) -> list[Tensor]:
    mode = x["mode"]
    double, single = ref(
        hidden_states=x["img"],
        controlnet_cond=x["cond"],
        controlnet_mode=None if mode is None else mode[:, None],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["timesteps"],
        img_ids=x["img_ids"],
        txt_ids=x["txt_ids"],
        guidance=x["guidance"],
        return_dict=False,
    )
    return [*(double or []), *(single or [])]


@torch.no_grad()
def _ours(net: FluxControlNet, x: dict[str, Tensor | None]) -> list[Tensor]:
    res = net(**x)  # type: ignore[arg-type]
    return [*res.double, *res.single]


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    assert len(a) == len(b), f"{len(a)} residuals vs {len(b)}"
    for s, t in zip(a, b, strict=True):
        assert s.shape == t.shape, f"{tuple(s.shape)} vs {tuple(t.shape)}"
    return max(float((s - t).abs().max()) for s, t in zip(a, b, strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_written_folder_is_diffusers(case: str, tmp_path: Path) -> None:
    net = _random_net(case, seed=len(case))
    folder = save_controlnet_folder(net, tmp_path / "cn", metadata={"trained_by": "pictor"})
    assert folder == tmp_path / "cn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cn"]  # no staging folder left beside it
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]

    ref = FluxControlNetModel.from_pretrained(folder).eval()
    x = _inputs(net.params, seed=2)
    theirs = _theirs(ref, x)
    assert min(float(t.abs().mean()) for t in theirs) > 0.05  # far from zero: the comparison means something
    assert _max_diff(_ours(net, x), theirs) <= TOL
    # The file holds diffusers' keys, exactly as diffusers' own model has them.
    _assert_same(read_safetensors(folder / "diffusion_pytorch_model.safetensors"), ref.state_dict(), 0.0)
    assert read_safetensors_metadata(folder / "diffusion_pytorch_model.safetensors") == {
        "trained_by": "pictor",
        "format": "pt",
    }
    # config.json as diffusers writes it (same fields, values and formatting; its own version and, for a
    # model it read from a folder, the folder's path aside).
    ref.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    written = (folder / "config.json").read_text()
    ours_cfg, theirs_cfg = json.loads(written), json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert ours_cfg["_diffusers_version"] and theirs_cfg.pop("_name_or_path", None) is not None
    assert {**ours_cfg, "_diffusers_version": ""} == {**theirs_cfg, "_diffusers_version": ""}
    assert written == json.dumps(ours_cfg, indent=2, sort_keys=True) + "\n"

    # Read back by pictor: the same params and, key for key, the same tensors.
    back = load_controlnet(folder)
    assert back.params == net.params
    sd, back_sd = net.state_dict(), back.state_dict()
    assert sorted(sd) == sorted(back_sd)
    assert all(torch.equal(sd[k], back_sd[k]) for k in sd)


def test_state_dict_is_a_snapshot() -> None:
    net = _random_net("union", seed=7)
    sd = controlnet_state_dict_diffusers(net)
    assert all(t.is_contiguous() and not t.requires_grad for t in sd.values())
    assert len({t.untyped_storage().data_ptr() for t in sd.values()}) == len(sd)  # q, k, v not views
    own = {p.untyped_storage().data_ptr() for p in net.parameters()}
    assert not own & {t.untyped_storage().data_ptr() for t in sd.values()}
    q = sd["transformer_blocks.0.attn.to_q.weight"].clone()
    with torch.no_grad():
        net.double_blocks[0].img_attn.qkv.weight.add_(1.0)
    assert torch.equal(sd["transformer_blocks.0.attn.to_q.weight"], q)
    assert torch.allclose(
        q, net.double_blocks[0].img_attn.qkv.weight.detach()[: HEADS * HEAD_DIM] - 1.0, atol=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_kept(dtype: torch.dtype, tmp_path: Path) -> None:
    net = _random_net("instantx", seed=8, dtype=dtype)
    save_controlnet_folder(net, tmp_path / "cn")
    with safe_open(str(tmp_path / "cn" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {  # noqa: SIM118
            {torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
        }
    back = load_controlnet(tmp_path / "cn", dtype=dtype)
    sd, back_sd = net.state_dict(), back.state_dict()
    assert all(back_sd[k].dtype == dtype and torch.equal(sd[k], back_sd[k]) for k in sd)


def test_fresh_controlnet_saved_is_diffusers_from_transformer(tmp_path: Path) -> None:
    """The training stage's path: grow, save, and diffusers reads what its own from_transformer makes."""
    flux = random_flux(tiny_params(depth=2, guidance_embed=True), seed=9)
    save_controlnet_folder(controlnet_from_transformer(flux, 2, 1), tmp_path / "cn")
    theirs = _diffusers_from_transformer(flux, 2, 1)
    loaded = FluxControlNetModel.from_pretrained(tmp_path / "cn")
    _assert_same(loaded.state_dict(), theirs.state_dict(), 0.0)
    public = [k for k in loaded.config if not k.startswith("_")]
    as_json = {k: json.loads(json.dumps(theirs.config[k])) for k in public}  # diffusers keeps a tuple here
    assert {k: loaded.config[k] for k in public} == as_json


# ------------------------------------------------------------------------------------ crashes, refusals


def _crash(*args: object, **kwargs: object) -> None:
    raise OSError("disk full (injected)")


def test_crash_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pictor.checkpoint, "save_file", _crash)
    with pytest.raises(OSError, match="injected"):
        save_controlnet_folder(_random_net("instantx"), tmp_path / "cn")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging folder or temp file


def test_crash_keeps_previous_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _random_net("union", seed=10)
    save_controlnet_folder(first, tmp_path / "cn")
    before = {p.name: p.read_bytes() for p in (tmp_path / "cn").iterdir()}
    monkeypatch.setattr(pictor.checkpoint, "save_file", _crash)
    with pytest.raises(OSError, match="injected"):
        save_controlnet_folder(_random_net("instantx", seed=11), tmp_path / "cn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cn"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "cn").iterdir()} == before
    back = load_controlnet(tmp_path / "cn")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in first.state_dict().items())

    # Without the crash, the second save replaces the first whole.
    monkeypatch.undo()
    second = _random_net("instantx", seed=11)
    save_controlnet_folder(second, tmp_path / "cn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cn"]
    assert load_controlnet(tmp_path / "cn").params == second.params


def test_refusals(tmp_path: Path) -> None:
    net = _random_net("instantx")
    # Never replace what is not a ControlNet folder.
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.png").write_bytes(b"not mine to delete")
    with pytest.raises(CheckpointError, match="not a diffusers ControlNet folder"):
        save_controlnet_folder(net, other)
    assert (other / "holiday.png").read_bytes() == b"not mine to delete"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        save_controlnet_folder(net, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    save_controlnet_folder(net, tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "config.json").is_file()

    with pytest.raises(CheckpointError, match="strings"):
        save_controlnet_folder(net, tmp_path / "a", metadata={"steps": 1000})  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match="'format' must be 'pt'"):
        save_controlnet_folder(net, tmp_path / "a", metadata={"format": "np"})
    for change, match in (({"mlp_ratio": 2.0}, "mlp_ratio"), ({"qkv_bias": False}, "qkv_bias")):
        odd = FluxControlNet(ControlNetParams(**{**net.params.to_dict(), **change}))
        with pytest.raises(CheckpointError, match=match):
            save_controlnet_folder(odd, tmp_path / "a")
    with pytest.raises(CheckpointError, match="theta"):
        controlnet_config_diffusers(ControlNetParams(**{**net.params.to_dict(), "theta": 1000}))
    assert not (tmp_path / "a").exists()


def test_unknown_module_is_refused() -> None:
    net = _random_net("instantx")
    net.extra = nn.Linear(2, 2)  # a part the writer has no diffusers name for must not be dropped silently
    with pytest.raises(CheckpointError, match=r"extra\.weight"):
        controlnet_state_dict_diffusers(net)
