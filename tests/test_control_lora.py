"""BFL's FLUX.1 Canny / Depth [dev] LoRAs merged into a FLUX.1 [dev] bundle: a control model.

The reference is BFL's own rule, written out here (flux `util.load_flow_model`: the base's img_in zero-padded
by `optionally_expand_state_dict`, every linear a `LinearLora` running `base(x) + scale * lora_B(lora_A(x))`
with lora_B's bias, the file's qk-norm scales loaded over the model's). diffusers'
`_convert_bfl_flux_control_lora_to_diffusers` hard-codes FLUX.1's 19 / 38 blocks and 3072 width, so a tiny
model cannot go through it; the comparison is with BFL's rule only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from pictor.bundle_storage import cast_bundle
from pictor.checkpoint import (
    AUTOENCODER_FILE,
    TRANSFORMER_FILE,
    BundleConfig,
    CheckpointError,
    load_bundle,
    read_safetensors,
    save_bundle,
)
from pictor.cli import main
from pictor.control_images import ControlImageError
from pictor.loading import load
from pictor.lora_files import apply_lora, lora_file_hash, save_lora
from pictor.lora_merge import control_settings, merge_loras
from pictor.lora_tools import lora_summary, model_linears, read_lora
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.control_lora import control_kind_in_name
from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids
from pictor.models.lora import add_lora, linear_layers
from pictor.models.lora_formats import LoRAError
from pictor.pipeline import GenerationRequest
from pictor.presets import get_preset

from tiny_flux import randomize_

RANK = 3
NORMS = (".norm.query_norm.scale", ".norm.key_norm.scale")


def _config(**changes: object) -> tuple[BundleConfig, FluxParams, AutoEncoderParams]:
    """The tiny preset made FLUX.1 [dev]-like: guidance-distilled (a guidance_in), every bias present."""
    p = get_preset("tiny")
    model = {**p["model"], "guidance_embed": True, **changes.pop("model", {})}  # type: ignore[dict-item]
    defaults = {**p["defaults"], "steps": 4, "guidance": 3.5, "guidance_mode": "distilled"}
    cfg = BundleConfig(
        name="tiny-dev", preset=None, model=model, autoencoder=p["autoencoder"],
        text_encoder=p["text_encoder"], defaults=defaults, training={"stage": "t2i", "step": 3},
        **changes,  # type: ignore[arg-type]
    )  # fmt: skip
    return cfg, FluxParams.from_dict(model), AutoEncoderParams.from_dict(p["autoencoder"])


def _bundle(path: Path, **changes: object) -> Path:
    cfg, params, ae_params = _config(**changes)
    flux = Flux(params).eval()
    randomize_(flux, seed=0)
    torch.manual_seed(0)
    save_bundle(path, cfg, flux.state_dict(), AutoEncoder(ae_params).state_dict())
    return path


def _control_lora(path: Path, params: FluxParams, seed: int = 1, widen: int = 2) -> Path:
    """A random file in BFL's layout for ``params``: lora_A / lora_B / lora_B.bias on every linear (img_in's
    lora_A ``widen`` times the model's input), and every qk-norm scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Flux(params)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in linear_layers(model).items():
        inputs = layer.in_features * (widen if name == "img_in" else 1)
        tensors[f"{name}.lora_A.weight"] = 0.2 * torch.randn(RANK, inputs, generator=gen)
        tensors[f"{name}.lora_B.weight"] = 0.2 * torch.randn(layer.out_features, RANK, generator=gen)
        tensors[f"{name}.lora_B.bias"] = 0.1 * torch.randn(layer.out_features, generator=gen)
    for key, value in model.state_dict().items():
        if key.endswith(NORMS):
            tensors[key] = 1 + 0.3 * torch.randn(value.shape, generator=gen)
    save_file(tensors, path)
    return path


class _LinearLora(nn.Linear):
    """BFL's `LinearLora` (flux `modules/lora.py`): base(x) + scale * lora_B(lora_A(x)), lora_B biased."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, scale: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.lora_A = nn.Linear(a.shape[1], a.shape[0], bias=False)
        self.lora_B = nn.Linear(b.shape[1], b.shape[0], bias=True)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
            self.lora_B.bias.copy_(bias)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_B(self.lora_A(x)) * self.scale


def _reference(base: Path, lora: Path, scale: float) -> Flux:
    """BFL's load_flow_model for flux-dev-canny-lora, on the tiny model: the base's state dict expanded with
    zeros where the model is wider (img_in), every linear wrapped, the file's norm scales loaded over it."""
    bundle = load_bundle(base)
    params = FluxParams.from_dict(
        {**bundle.config.model, "in_channels": 2 * bundle.config.model["in_channels"]}
    )
    model = Flux(params).eval()
    sd = dict(bundle.transformer)
    for name, param in model.state_dict().items():  # optionally_expand_state_dict
        if sd[name].shape != param.shape:
            expanded = torch.zeros_like(param)
            expanded[tuple(slice(0, d) for d in sd[name].shape)] = sd[name]
            sd[name] = expanded
    model.load_state_dict(sd)
    file = read_safetensors(lora)
    for name in list(linear_layers(model)):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        wrapped = _LinearLora(
            getattr(owner, child),
            file[f"{name}.lora_A.weight"],
            file[f"{name}.lora_B.weight"],
            file[f"{name}.lora_B.bias"],
            scale,
        )
        setattr(owner, child, wrapped)
    norms = {k: v for k, v in file.items() if k.endswith(NORMS)}
    assert norms
    _missing, unexpected = model.load_state_dict(norms, strict=False)
    assert not unexpected
    return model


def _inputs(params: FluxParams, seed: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lat_h, lat_w, n_txt = 4, 6, 5
    return {
        "img": torch.randn(2, lat_h * lat_w // 4, params.in_channels, generator=gen),
        "img_ids": make_img_ids(2, lat_h, lat_w),
        "txt": torch.randn(2, n_txt, params.context_in_dim, generator=gen),
        "txt_ids": make_txt_ids(2, n_txt),
        "timesteps": torch.tensor([0.3, 0.8]),
        "y": torch.randn(2, params.vec_in_dim, generator=gen),
        "guidance": torch.tensor([3.5, 30.0]),
    }


def _merged_model(out: Path) -> Flux:
    bundle = load_bundle(out)
    model = Flux(FluxParams.from_dict(bundle.config.model)).eval()
    model.load_state_dict(bundle.transformer)
    return model


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("control-lora")
    base = _bundle(root / "base")
    params = FluxParams.from_dict(json.loads((base / "config.json").read_text())["model"])
    lora = _control_lora(root / "flux1-canny-dev-lora.safetensors", params)
    out, left_out = merge_loras(base, [(lora, 1.0)], root / "canny")
    assert left_out == []
    return {"root": root, "base": base, "lora": lora, "canny": out}


@torch.no_grad()
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_the_merged_model_is_bfl_lora_model(made: dict[str, Path], scale: float, tmp_path: Path) -> None:
    out = (
        made["canny"]
        if scale == 1.0
        else merge_loras(made["base"], [(made["lora"], scale)], tmp_path / "m")[0]
    )
    merged, reference = _merged_model(out), _reference(made["base"], made["lora"], scale)
    x = _inputs(merged.params)
    want, got = reference(**x), merged(**x)
    assert (got - want).abs().max() < 1e-5
    # ...and the rule matters: without the control picture's columns, or the norm scales, outputs differ.
    x_no_control = {**x, "img": torch.cat([x["img"][..., :16], torch.zeros_like(x["img"][..., 16:])], -1)}
    assert (merged(**x_no_control) - got).abs().max() > 1e-2
    sd = read_safetensors(out / TRANSFORMER_FILE)
    base = read_safetensors(made["base"] / TRANSFORMER_FILE)
    key = "double_blocks.0.img_attn.norm.query_norm.scale"
    assert torch.equal(sd[key], read_safetensors(made["lora"])[key])  # replaced whatever the scale
    assert not torch.equal(sd[key], base[key])
    file = read_safetensors(made["lora"])
    w = base["img_in.weight"].double()
    expected = torch.cat([w, torch.zeros_like(w)], 1) + scale * (
        file["img_in.lora_B.weight"].double() @ file["img_in.lora_A.weight"].double()
    )
    assert torch.equal(sd["img_in.weight"], expected.float())
    assert torch.equal(
        sd["img_in.bias"],
        (base["img_in.bias"].double() + scale * file["img_in.lora_B.bias"].double()).float(),
    )


def test_the_bundle_is_a_control_model_with_canny_settings(made: dict[str, Path]) -> None:
    config = json.loads((made["canny"] / "config.json").read_text())
    base = json.loads((made["base"] / "config.json").read_text())
    assert config["control"] == "canny"
    assert config["model"] == {**base["model"], "in_channels": 32}
    assert config["preset"] is None  # not FLUX.1's architecture: no preset names it
    assert config["defaults"] == {**base["defaults"], "steps": 50, "guidance": 30.0}
    assert config["name"] == "tiny-dev+flux1-canny-dev-lora"
    assert config["training"]["stage"] == "lora-merge"
    assert config["training"]["base_training"] == {"stage": "t2i", "step": 3}
    (entry,) = config["training"]["loras"]
    assert (entry["control"], entry["scale"], entry["sha256"]) == ("canny", 1.0, lora_file_hash(made["lora"]))
    assert (made["canny"] / AUTOENCODER_FILE).read_bytes() == (made["base"] / AUTOENCODER_FILE).read_bytes()


def test_the_pipeline_paints_with_a_control_picture(made: dict[str, Path]) -> None:
    pipe = load(made["canny"], device="cpu")
    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32)) for _ in "ab"
    ]
    images = []
    for picture in pictures:
        request = GenerationRequest(
            "a red circle", steps=2, seed=3, width=32, height=32, control_image=picture
        )
        (result,) = pipe.generate(request)
        images.append(np.asarray(result.image, dtype=np.int16))
    assert np.abs(images[0] - images[1]).max() > 10  # the control picture steers the image
    with pytest.raises(ControlImageError, match="control"):  # a control model needs its picture
        pipe.generate(GenerationRequest("a red circle", steps=2, seed=3, width=32, height=32))


def test_presets_and_defaults_of_a_flux1_dev_base() -> None:
    p = get_preset("flux-dev")
    dev = BundleConfig(
        name="flux1-dev", preset="flux-dev", model=p["model"], autoencoder=p["autoencoder"],
        text_encoder=p["text_encoder"], defaults=p["defaults"],
    )  # fmt: skip
    canny = control_settings(dev, "canny")
    assert canny["preset"] == "flux-canny-dev" and canny["model"] == get_preset("flux-canny-dev")["model"]
    assert canny["defaults"] == {**p["defaults"], "steps": 50, "guidance": 30.0}
    depth = control_settings(dev, "depth")
    assert depth["preset"] == "flux-depth-dev" and depth["control"] == "depth"
    assert depth["defaults"] == get_preset("flux-depth-dev")["defaults"]
    assert control_settings(dev, "depth", keep_defaults=True)["defaults"] == p["defaults"]
    assert control_kind_in_name("flux1-depth-dev-lora.safetensors") == "depth"
    assert control_kind_in_name("my_canny_v2.safetensors") == "canny"
    assert control_kind_in_name("structure.safetensors") is None
    assert control_kind_in_name("canny-and-depth.safetensors") is None


def test_the_kind_comes_from_the_flag_when_the_name_says_neither(
    made: dict[str, Path], tmp_path: Path
) -> None:
    unnamed = tmp_path / "structure.safetensors"
    unnamed.write_bytes(made["lora"].read_bytes())
    with pytest.raises(LoRAError, match=r"does not say whether .* add --control canny or --control depth"):
        merge_loras(made["base"], [(unnamed, 1.0)], tmp_path / "x")
    out, _ = merge_loras(
        made["base"], [(unnamed, 1.0)], tmp_path / "depth", control="depth", keep_defaults=True
    )
    config = json.loads((out / "config.json").read_text())
    assert config["control"] == "depth"
    assert config["defaults"] == json.loads((made["base"] / "config.json").read_text())["defaults"]
    assert not (tmp_path / "x").exists()


def test_it_is_refused_at_run_time_and_by_the_lora_tools(made: dict[str, Path]) -> None:
    pipe = load(made["base"], device="cpu")
    merge = (
        r"merge it into a FLUX.1 \[dev\] bundle with `pictor lora merge --model BUNDLE --lora FILE --out NEW`"
    )
    with pytest.raises(
        LoRAError, match=r"flux1-canny-dev-lora.safetensors: BFL's FLUX.1 Canny/Depth.*" + merge
    ):
        pipe.add_lora(made["lora"])
    assert pipe.loras == []
    with pytest.raises(LoRAError, match=merge):
        apply_lora(pipe.transformer, read_safetensors(made["lora"]))
    with pytest.raises(LoRAError, match=merge):  # lora convert / resize
        read_lora(made["lora"], model_linears(made["base"]))
    summary = lora_summary(made["lora"])
    assert summary["layout"] == "bfl-control" and summary["control"] == "canny" and summary["ranks"] == [RANK]
    assert summary["replaced_norm_scales"] == 6 and summary["layers"] == summary["biased_layers"]


def test_bad_bases_and_files_are_refused_by_name(made: dict[str, Path], tmp_path: Path) -> None:
    base, lora, out = made["base"], made["lora"], tmp_path / "out"
    params = FluxParams.from_dict(json.loads((base / "config.json").read_text())["model"])
    plain = tmp_path / "style.safetensors"
    flux = Flux(params)
    add_lora(flux, "style", targets="attn", rank=2)
    save_lora(flux, plain, "style")
    with pytest.raises(LoRAError, match="merged alone"):
        merge_loras(base, [(lora, 1.0), (plain, 1.0)], out)
    with pytest.raises(LoRAError, match=r"--control depth: only for BFL's"):
        merge_loras(base, [(plain, 1.0)], out, control="depth")
    with pytest.raises(LoRAError, match=r"already a FLUX\.1 control model"):
        merge_loras(made["canny"], [(lora, 1.0)], out)
    schnell = _bundle(tmp_path / "schnell", model={"guidance_embed": False})
    with pytest.raises(LoRAError, match=r"no guidance embedding.*FLUX.1 \[dev\]"):
        merge_loras(schnell, [(lora, 1.0)], out)
    fill = _bundle(tmp_path / "fill", model={"in_channels": 48})
    with pytest.raises(LoRAError, match=r"reads 48 channels a token for 16 \(FLUX.1 Fill"):
        merge_loras(fill, [(lora, 1.0)], out)
    kontext = _bundle(tmp_path / "kontext", kontext=True)
    with pytest.raises(LoRAError, match="Kontext"):
        merge_loras(kontext, [(lora, 1.0)], out)
    with pytest.raises(CheckpointError, match=r"stored in FP8.*bf16/fp16 bundle it came from"):
        merge_loras(cast_bundle(base, tmp_path / "fp8", "fp8"), [(lora, 1.0)], out)
    wide = _bundle(tmp_path / "wide", model={"hidden_size": 64, "num_heads": 4})
    with pytest.raises(
        LoRAError,
        match=r"LoRA key '[\w.]+\.lora_A\.weight' takes 32 inputs, but it must take 64: the layer's",
    ):
        merge_loras(wide, [(lora, 1.0)], out)
    narrow = _control_lora(tmp_path / "flux1-canny-dev-narrow.safetensors", params, widen=1)
    with pytest.raises(
        LoRAError, match=r"'img_in.lora_A.weight' takes 16 inputs, but it must take 32: twice"
    ):
        merge_loras(base, [(narrow, 1.0)], out)
    tensors = read_safetensors(lora)
    tensors["single_blocks.0.norm.key_norm.scale"] = torch.ones(3)
    save_file(tensors, tmp_path / "canny-bad-norm.safetensors")
    with pytest.raises(LoRAError, match=r"'single_blocks.0.norm.key_norm.scale' is \[3\].*\[16\]"):
        merge_loras(base, [(tmp_path / "canny-bad-norm.safetensors", 1.0)], out)
    tensors = read_safetensors(lora)
    tensors["txt_in.lora_B.bias"] = torch.ones(31)
    save_file(tensors, tmp_path / "canny-bad-bias.safetensors")
    with pytest.raises(LoRAError, match=r"'txt_in.lora_B.bias' is \[31\]"):
        merge_loras(base, [(tmp_path / "canny-bad-bias.safetensors", 1.0)], out)
    tensors = read_safetensors(lora)
    tensors["final_layer.linear.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, tmp_path / "canny-nan.safetensors")
    with pytest.raises(LoRAError, match=r"'final_layer.linear.lora_B.weight' holds NaN"):
        merge_loras(base, [(tmp_path / "canny-nan.safetensors", 1.0)], out)
    with pytest.raises(LoRAError, match="finite"):
        merge_loras(base, [(lora, float("inf"))], out)
    assert not out.exists()


def test_the_command_line_merges_it(
    made: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    merge = ["lora", "merge", "--model", str(made["base"])]
    out = tmp_path / "canny"
    assert main([*merge, "--lora", f"{made['lora']}:0.5", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["control"] == "canny" and config["training"]["loras"][0]["scale"] == 0.5
    unnamed = tmp_path / "structure.safetensors"
    unnamed.write_bytes(made["lora"].read_bytes())
    assert main([*merge, "--lora", str(unnamed), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "--control canny or --control depth" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    generate = ["generate", "a cat", "--model", str(made["base"]), "-o", str(tmp_path / "g")]
    assert main([*generate, "--lora", str(made["lora"])]) == 2
    assert "pictor lora merge" in capsys.readouterr().err
    # `merge`'s own options
    options = ["--name", "d", "--control", "depth", "--keep-defaults"]
    assert main([*merge, "--lora", str(unnamed), "--out", str(tmp_path / "d"), *options]) == 0
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert (config["control"], config["name"], config["defaults"]["steps"]) == ("depth", "d", 4)
