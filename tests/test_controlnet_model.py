"""FLUX.1 ControlNets (pictor.models.controlnet, pictor.controlnet_files) against diffusers'
FluxControlNetModel.

Tiny random models of each kind (InstantX-like, Union, XLabs-like) are saved the ways they are shipped and
loaded with `load_controlnet`; every block's residual must equal diffusers' within 1e-5 (float32). Every
weight is random, zero-initialised layers included, so a wrong q/k/v order, a misplaced mode token or a
mis-mapped conv cannot pass unnoticed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from pictor.checkpoint import CheckpointError
from pictor.controlnet_files import describe_controlnet, load_controlnet
from pictor.models.controlnet import ControlNetParams, FluxControlNet
from pictor.models.flux import Flux, FluxParams, make_img_ids

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxControlNetModel, FluxTransformer2DModel  # noqa: E402

HEADS, HEAD_DIM, AXES = 2, 16, [4, 6, 6]
TXT_DIM, POOLED = 24, 12
BATCH, GRID_H, GRID_W, N_TXT = 2, 2, 3, 5  # packed latent grid 2x3 -> 6 image tokens
TOL = 1e-5

KINDS: dict[str, dict[str, Any]] = {
    "instantx": {"in_channels": 16, "num_layers": 2, "num_single_layers": 2, "guidance_embeds": True},
    "instantx-no-guidance": {
        "in_channels": 16,
        "num_layers": 1,
        "num_single_layers": 2,
        "guidance_embeds": False,
    },
    "union": {
        "in_channels": 16,
        "num_layers": 1,
        "num_single_layers": 2,
        "guidance_embeds": True,
        "num_mode": 3,
    },
    "xlabs": {
        "in_channels": 64,
        "num_layers": 2,
        "num_single_layers": 0,
        "guidance_embeds": True,
        "patch_size": 2,
        "conditioning_embedding_channels": 16,
    },
}


@torch.no_grad()
def _randomize(model: nn.Module, seed: int) -> None:
    """Every parameter random: RMS-norm gains around 1, weights ~ N(0, 0.8 / fan_in), biases N(0, 0.1).
    Scaled by fan-in so that eight hint convs in a row neither vanish nor blow up."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
            p.copy_(1 + 0.2 * noise)
        elif p.ndim >= 2:
            fan_in = p[0].numel() if "mode_embedder" not in name else 1
            p.copy_(noise * 0.8 / fan_in**0.5)
        else:
            p.copy_(0.1 * noise)


def _reference(
    kind: str, seed: int = 0, heads: int = HEADS, head_dim: int = HEAD_DIM, axes: list[int] = AXES
):
    config = {k: v for k, v in KINDS[kind].items()}
    model = FluxControlNetModel(
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=TXT_DIM,
        pooled_projection_dim=POOLED,
        axes_dims_rope=axes,
        **config,
    )
    _randomize(model, seed)
    return model.eval()


def _inputs(ref: FluxControlNetModel, seed: int = 1, txt_ids_zero: bool = False) -> dict[str, Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    c = ref.config
    n_img = GRID_H * GRID_W
    if c.conditioning_embedding_channels is None:
        cond = torch.randn(BATCH, n_img, c.in_channels, generator=gen)
    else:
        cond = torch.rand(BATCH, 3, 16 * GRID_H, 16 * GRID_W, generator=gen) * 2 - 1
    # Distinct text positions (FLUX.1's are zeros): the mode token's position then shows in the outputs.
    txt_ids = (
        torch.zeros(N_TXT, 3) if txt_ids_zero else torch.randint(0, 7, (N_TXT, 3), generator=gen).float()
    )
    return {
        "img": torch.randn(BATCH, n_img, c.in_channels, generator=gen),
        "img_ids": make_img_ids(1, 2 * GRID_H, 2 * GRID_W)[0],
        "cond": cond,
        "txt": torch.randn(BATCH, N_TXT, TXT_DIM, generator=gen),
        "txt_ids": txt_ids,
        "timesteps": torch.tensor([0.3, 0.85]),
        "y": torch.randn(BATCH, POOLED, generator=gen),
        "guidance": torch.tensor([3.5, 1.5]) if c.guidance_embeds else None,
        "mode": torch.tensor([2, 0]) if c.num_mode is not None else None,
    }


@torch.no_grad()
def _theirs(ref: FluxControlNetModel, x: dict[str, Tensor | None], scale: float = 1.0) -> list[Tensor]:
    mode = x["mode"]
    double, single = ref(
        hidden_states=x["img"],
        controlnet_cond=x["cond"],
        controlnet_mode=None if mode is None else mode[:, None],
        conditioning_scale=scale,
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
def _ours(net: FluxControlNet, x: dict[str, Tensor | None], scale: float = 1.0) -> list[Tensor]:
    res = net(**x).scaled(scale)  # type: ignore[arg-type]
    return [*res.double, *res.single]


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    assert len(a) == len(b), f"{len(a)} residuals vs {len(b)}"
    for s, t in zip(a, b, strict=True):
        assert s.shape == t.shape, f"{tuple(s.shape)} vs {tuple(t.shape)}"
    return max(float((s - t).abs().max()) for s, t in zip(a, b, strict=True))


def _magnitude(samples: list[Tensor]) -> float:
    return min(float(s.abs().mean()) for s in samples)


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("kind", list(KINDS))
def test_diffusers_folder_matches_diffusers(kind: str, tmp_path: Path) -> None:
    ref = _reference(kind)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    net = load_controlnet(tmp_path)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in net.parameters())
    x = _inputs(ref)
    theirs = _theirs(ref, x)
    ours = _ours(net, x)
    assert _magnitude(theirs) > 0.05  # residuals far from zero: the comparison means something
    assert _max_diff(ours, theirs) <= TOL
    assert _max_diff(_ours(net, x, 0.7), _theirs(ref, x, 0.7)) <= TOL

    info = describe_controlnet(net)
    expected_kind = "xlabs" if kind == "xlabs" else kind.split("-")[0]
    assert info["kind"] == expected_kind == net.params.kind
    assert (info["double_blocks"], info["single_blocks"]) == (
        ref.config.num_layers,
        ref.config.num_single_layers,
    )
    assert info["modes"] == ref.config.num_mode
    assert net(**x).repeat is (kind == "xlabs") is net.takes_pixels  # type: ignore[arg-type]
    json.dumps(info)

    # Batched ids ([B, N, 3]) give the same residuals as shared ones ([N, 3]).
    batched = {
        **x,
        "img_ids": x["img_ids"].expand(BATCH, -1, -1),
        "txt_ids": x["txt_ids"].expand(BATCH, -1, -1),
    }
    assert _max_diff(_ours(net, batched), ours) <= 1e-6

    # The test can fail: q and k swapped in the first double block's image projection change everything.
    with torch.no_grad():
        qkv = net.double_blocks[0].img_attn.qkv.weight
        q, k, v = qkv.clone().chunk(3)
        qkv.copy_(torch.cat([k, q, v]))
    assert _max_diff(_ours(net, x), theirs) > 1e-3


def test_union_mode_token_matters(tmp_path: Path) -> None:
    """Another mode gives other residuals, diffusers agrees mode by mode, with FLUX.1's zero text ids too."""
    ref = _reference("union", seed=3)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    net = load_controlnet(tmp_path)
    for zero_ids in (False, True):
        x = _inputs(ref, seed=4, txt_ids_zero=zero_ids)
        for mode in ([0, 0], [1, 2], [2, 1]):
            y = {**x, "mode": torch.tensor(mode)}
            assert _max_diff(_ours(net, y), _theirs(ref, y)) <= TOL
        other = {**x, "mode": torch.tensor([1, 1])}
        assert _max_diff(_ours(net, other), _theirs(ref, x)) > 1e-3
    # One mode for the whole batch (a 0-d tensor) is broadcast.
    x = _inputs(ref, seed=4)
    same = {**x, "mode": torch.tensor(1)}
    assert _max_diff(_ours(net, same), _ours(net, {**x, "mode": torch.tensor([1, 1])})) == 0.0


@pytest.mark.parametrize("kind", list(KINDS))
def test_single_diffusers_file_matches_folder(kind: str, tmp_path: Path) -> None:
    ref = _reference(kind, seed=5)
    ref.save_pretrained(tmp_path / "folder", safe_serialization=True)
    save_file(ref.state_dict(), str(tmp_path / "controlnet.safetensors"))
    from_folder = load_controlnet(tmp_path / "folder")
    from_file = load_controlnet(tmp_path / "controlnet.safetensors", axes_dim=AXES)
    assert from_file.params.to_dict() == from_folder.params.to_dict()
    x = _inputs(ref, seed=6)
    assert _max_diff(_ours(from_file, x), _theirs(ref, x)) <= TOL


def test_single_file_axes_from_head_dim(tmp_path: Path) -> None:
    """Without axes_dim, a single file gets FLUX.1's 1:7:7 RoPE split of its head dim (32 -> 4, 14, 14)."""
    ref = _reference("instantx", seed=7, heads=2, head_dim=32, axes=[4, 14, 14])
    save_file(ref.state_dict(), str(tmp_path / "cn.safetensors"))
    net = load_controlnet(tmp_path / "cn.safetensors")
    assert net.params.axes_dim == [4, 14, 14] and net.params.num_heads == 2
    x = _inputs(ref, seed=8)
    assert _max_diff(_ours(net, x), _theirs(ref, x)) <= TOL
    # The tiny head dim 16 has no even 1:7:7 split: the loader asks for axes_dim instead of guessing.
    small = _reference("instantx")
    save_file(small.state_dict(), str(tmp_path / "small.safetensors"))
    with pytest.raises(CheckpointError, match="axes_dim"):
        load_controlnet(tmp_path / "small.safetensors")


# ----------------------------------------------------------------------------------- XLabs' own layout

_HINT_CONVS = ["conv_in", *(f"blocks.{k}" for k in range(6)), "conv_out"]  # diffusers' names, in order


def _xlabs_state_dict(ref: FluxControlNetModel) -> dict[str, Tensor]:
    """The diffusers model's weights under XLabs' key names (x-flux ``src/flux/controlnet.py``), written out
    here by hand rather than taken from the loader's table."""
    d = ref.state_dict()
    used: set[str] = set()
    out: dict[str, Tensor] = {}

    def get(key: str) -> Tensor:
        used.add(key)
        return d[key].clone()

    def linear(xlabs: str, theirs: str) -> None:
        out[f"{xlabs}.weight"] = get(f"{theirs}.weight")
        out[f"{xlabs}.bias"] = get(f"{theirs}.bias")

    linear("img_in", "x_embedder")
    linear("txt_in", "context_embedder")
    linear("pos_embed_input", "controlnet_x_embedder")
    for xlabs, theirs in (("time_in", "timestep"), ("vector_in", "text"), ("guidance_in", "guidance")):
        linear(f"{xlabs}.in_layer", f"time_text_embed.{theirs}_embedder.linear_1")
        linear(f"{xlabs}.out_layer", f"time_text_embed.{theirs}_embedder.linear_2")
    for i in range(ref.config.num_layers):
        x, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        linear(f"{x}.img_mod.lin", f"{t}.norm1.linear")
        linear(f"{x}.txt_mod.lin", f"{t}.norm1_context.linear")
        for param in ("weight", "bias"):
            out[f"{x}.img_attn.qkv.{param}"] = torch.cat([get(f"{t}.attn.to_{c}.{param}") for c in "qkv"])
            out[f"{x}.txt_attn.qkv.{param}"] = torch.cat(
                [get(f"{t}.attn.add_{c}_proj.{param}") for c in "qkv"]
            )
        out[f"{x}.img_attn.norm.query_norm.scale"] = get(f"{t}.attn.norm_q.weight")
        out[f"{x}.img_attn.norm.key_norm.scale"] = get(f"{t}.attn.norm_k.weight")
        out[f"{x}.txt_attn.norm.query_norm.scale"] = get(f"{t}.attn.norm_added_q.weight")
        out[f"{x}.txt_attn.norm.key_norm.scale"] = get(f"{t}.attn.norm_added_k.weight")
        linear(f"{x}.img_attn.proj", f"{t}.attn.to_out.0")
        linear(f"{x}.txt_attn.proj", f"{t}.attn.to_add_out")
        linear(f"{x}.img_mlp.0", f"{t}.ff.net.0.proj")
        linear(f"{x}.img_mlp.2", f"{t}.ff.net.2")
        linear(f"{x}.txt_mlp.0", f"{t}.ff_context.net.0.proj")
        linear(f"{x}.txt_mlp.2", f"{t}.ff_context.net.2")
        linear(f"controlnet_blocks.{i}", f"controlnet_blocks.{i}")
    # XLabs' input_hint_block is a Sequential: convs at 0, 2, ..., 14, SiLUs at the odd indices.
    for index, name in zip(range(0, 15, 2), _HINT_CONVS, strict=True):
        linear(f"input_hint_block.{index}", f"input_hint_block.{name}")
    assert used == set(d), f"diffusers keys left out: {sorted(set(d) - used)}"
    return out


def _xlabs_hint_block() -> nn.Sequential:
    """x-flux's ``input_hint_block``, as written there."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2),
        nn.SiLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2),
        nn.SiLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2),
        nn.SiLU(),
        nn.Conv2d(16, 16, 3, padding=1),
    )


@torch.no_grad()
def test_xlabs_hint_block_is_diffusers_conditioning_embedding() -> None:
    ref = _reference("xlabs", seed=9)
    hint = {k.removeprefix("input_hint_block."): v for k, v in _xlabs_state_dict(ref).items() if "hint" in k}
    xlabs = _xlabs_hint_block()
    xlabs.load_state_dict(hint, strict=True)
    pixels = torch.rand(2, 3, 32, 48) * 2 - 1
    theirs = ref.input_hint_block(pixels)
    assert theirs.shape == (2, 16, 4, 6)
    assert float((xlabs(pixels) - theirs).abs().max()) <= 1e-6
    assert float(theirs.abs().mean()) > 0.05


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_xlabs_original_file_matches_diffusers(stored: torch.dtype, tmp_path: Path) -> None:
    ref = _reference("xlabs", seed=10)
    sd = {k: v.to(stored) for k, v in _xlabs_state_dict(ref).items()}
    save_file(sd, str(tmp_path / "flux-canny-controlnet-v3.safetensors"))
    net = load_controlnet(tmp_path / "flux-canny-controlnet-v3.safetensors", axes_dim=AXES)
    assert net.takes_pixels and net.params.kind == "xlabs" and net.params.guidance_embed
    assert net.params.depth == 2 and net.params.depth_single_blocks == 0
    assert all(p.dtype == torch.float32 for p in net.parameters())  # widened on load
    if stored == torch.bfloat16:  # compare against diffusers holding the same rounded weights
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    x = _inputs(ref, seed=11)
    theirs = _theirs(ref, x)
    assert _magnitude(theirs) > 0.05
    assert _max_diff(_ours(net, x), theirs) <= TOL


def test_sharded_folder(tmp_path: Path) -> None:
    ref = _reference("union", seed=12)
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    net = load_controlnet(tmp_path)
    x = _inputs(ref, seed=13)
    assert _max_diff(_ours(net, x), _theirs(ref, x)) <= TOL


def test_load_dtype(tmp_path: Path) -> None:
    ref = _reference("instantx", seed=14)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    net = load_controlnet(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    x = _inputs(ref, seed=15)
    low = {
        k: v.to(torch.bfloat16) if v is not None and k in ("img", "cond", "txt", "y") else v
        for k, v in x.items()
    }
    ours = _ours(net, low)
    theirs = _theirs(ref, x)
    assert all(o.dtype == torch.bfloat16 for o in ours)
    rel = max(float((o.float() - t).abs().max() / t.abs().max()) for o, t in zip(ours, theirs, strict=True))
    assert rel < 0.1


# -------------------------------------------------------------------------------------------- refusals


def test_refuses_transformers(tmp_path: Path) -> None:
    dit = FluxTransformer2DModel(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TXT_DIM,
        pooled_projection_dim=POOLED,
        axes_dims_rope=AXES,
    )
    save_file(dit.state_dict(), str(tmp_path / "diffusers-transformer.safetensors"))
    with pytest.raises(CheckpointError, match=r"FLUX\.1 transformer"):
        load_controlnet(tmp_path / "diffusers-transformer.safetensors")
    dit.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    with pytest.raises(CheckpointError, match="FluxTransformer2DModel"):
        load_controlnet(tmp_path / "transformer")

    bfl = Flux(
        FluxParams(
            in_channels=16,
            out_channels=16,
            vec_in_dim=POOLED,
            context_in_dim=TXT_DIM,
            hidden_size=HEADS * HEAD_DIM,
            mlp_ratio=4.0,
            num_heads=HEADS,
            depth=1,
            depth_single_blocks=1,
            axes_dim=AXES,
        )
    )
    save_file(bfl.state_dict(), str(tmp_path / "flux1-dev.safetensors"))
    with pytest.raises(CheckpointError, match="final_layer"):
        load_controlnet(tmp_path / "flux1-dev.safetensors")


def test_refuses_pickles_and_incomplete_folders(tmp_path: Path) -> None:
    (tmp_path / "controlnet.bin").write_bytes(b"\x80\x04not even opened")
    with pytest.raises(CheckpointError, match="pickle"):
        load_controlnet(tmp_path / "controlnet.bin")
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_controlnet(folder)
    ref = _reference("instantx")
    (folder / "config.json").write_text(json.dumps(dict(ref.config)))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors"):
        load_controlnet(folder)
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle"):
        load_controlnet(folder)
    with pytest.raises(CheckpointError, match="no such"):
        load_controlnet(tmp_path / "absent.safetensors")


def test_refuses_missing_and_unexpected_keys(tmp_path: Path) -> None:
    ref = _reference("instantx")
    sd = {k: v.clone() for k, v in ref.state_dict().items()}

    lacking = dict(sd)
    del lacking["transformer_blocks.0.attn.to_k.weight"]
    save_file(lacking, str(tmp_path / "lacking.safetensors"))
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.attn\.to_k\.weight"):
        load_controlnet(tmp_path / "lacking.safetensors", axes_dim=AXES)

    no_out = dict(sd)
    del no_out["controlnet_single_blocks.1.bias"]
    save_file(no_out, str(tmp_path / "no_out.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing key.*controlnet_single_blocks\.1\.bias"):
        load_controlnet(tmp_path / "no_out.safetensors", axes_dim=AXES)

    extra = {**sd, "transformer_blocks.0.attn.to_q_extra.weight": torch.zeros(1)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"to_q_extra\.weight"):
        load_controlnet(tmp_path / "extra.safetensors", axes_dim=AXES)

    xlabs = _xlabs_state_dict(_reference("xlabs"))
    del xlabs["controlnet_blocks.1.weight"]
    save_file(xlabs, str(tmp_path / "xlabs.safetensors"))
    with pytest.raises(CheckpointError, match=r"controlnet_blocks\.1\.weight"):
        load_controlnet(tmp_path / "xlabs.safetensors", axes_dim=AXES)

    # A folder whose config.json does not fit its weights: the mismatch is named in pictor's key names.
    ref.save_pretrained(tmp_path / "folder", safe_serialization=True)
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    config["num_layers"] = 3
    (tmp_path / "folder" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"double_blocks\.2\..*pictor's"):
        load_controlnet(tmp_path / "folder")

    lora = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32)}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="LoRA"):
        load_controlnet(tmp_path / "lora.safetensors")


def test_refuses_bad_inputs(tmp_path: Path) -> None:
    union_ref = _reference("union")
    union_ref.save_pretrained(tmp_path / "union", safe_serialization=True)
    union = load_controlnet(tmp_path / "union")
    x = _inputs(union_ref)
    with pytest.raises(ValueError, match="Union ControlNet with 3 control modes; pass mode"):
        union(**{**x, "mode": None})
    with pytest.raises(ValueError, match=r"mode ids must lie in 0\.\.2"):
        union(**{**x, "mode": torch.tensor([0, 3])})
    with pytest.raises(ValueError, match="mode must be an integer tensor"):
        union(**{**x, "mode": torch.tensor([0.0, 1.0])})
    with pytest.raises(ValueError, match=r"mode must be \[2\]"):
        union(**{**x, "mode": torch.tensor([0, 1, 2])})

    plain_ref = _reference("instantx")
    plain_ref.save_pretrained(tmp_path / "plain", safe_serialization=True)
    plain = load_controlnet(tmp_path / "plain")
    x = _inputs(plain_ref)
    with pytest.raises(ValueError, match="no control modes"):
        plain(**{**x, "mode": torch.tensor([0, 0])})
    with pytest.raises(ValueError, match=r"cond must be the packed control latents \[2, 6, 16\]"):
        plain(**{**x, "cond": x["cond"][:, :-1]})  # type: ignore[index]
    with pytest.raises(ValueError, match="cond must be"):
        plain(**{**x, "cond": torch.zeros(BATCH, 3, 32, 48)})
    with pytest.raises(ValueError, match="guidance"):
        plain(**{**x, "guidance": None})
    with pytest.raises(ValueError, match="txt_ids must be"):
        plain(**{**x, "txt_ids": torch.zeros(N_TXT + 1, 3)})
    with pytest.raises(ValueError, match="y must be"):
        plain(**{**x, "y": torch.zeros(BATCH, POOLED + 1)})
    # A control latent shared by the batch ([1, N, C]) is broadcast.
    one = {**x, "cond": x["cond"][:1]}  # type: ignore[index]
    both = {**x, "cond": x["cond"][:1].expand(BATCH, -1, -1)}  # type: ignore[index]
    assert _max_diff(_ours(plain, one), _ours(plain, both)) == 0.0

    xlabs_ref = _reference("xlabs")
    xlabs_ref.save_pretrained(tmp_path / "xlabs", safe_serialization=True)
    xlabs = load_controlnet(tmp_path / "xlabs")
    x = _inputs(xlabs_ref)
    with pytest.raises(ValueError, match=r"cond must be \[2, 3, 16\*h, 16\*w\]"):
        xlabs(**{**x, "cond": torch.zeros(BATCH, 3, 40, 48)})
    with pytest.raises(ValueError, match="reads the control picture itself"):
        xlabs(**{**x, "cond": torch.zeros(BATCH, 6, 64)})
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        xlabs(**{**x, "cond": x["cond"] * 127.5 + 127.5})  # type: ignore[operator]


def test_params_round_trip_and_checks() -> None:
    p = ControlNetParams(
        hidden_size=32,
        num_heads=2,
        in_channels=64,
        vec_in_dim=POOLED,
        context_in_dim=TXT_DIM,
        depth=2,
        axes_dim=AXES,
        guidance_embed=True,
        hint=True,
    )
    assert ControlNetParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError, match="unknown keys"):
        ControlNetParams.from_dict({**p.to_dict(), "num_mode": 3})
    with pytest.raises(ValueError, match="in_channels must be 64"):
        ControlNetParams.from_dict({**p.to_dict(), "in_channels": 16})
    with pytest.raises(ValueError, match="at least one block"):
        ControlNetParams.from_dict({**p.to_dict(), "depth": 0})
    with pytest.raises(ValueError, match="axes_dim"):
        ControlNetParams.from_dict({**p.to_dict(), "axes_dim": [4, 6, 8]})
