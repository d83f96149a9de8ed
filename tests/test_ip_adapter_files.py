"""XLabs' FLUX.1 IP-Adapter files and CLIP's image encoder (`pictor.ip_adapter_files`).

The reference is diffusers itself: `FluxPipeline.load_ip_adapter` is run on a stand-in pipeline whose
transformer only records the state dicts it is handed, so the same call that reads a user's file gives
the weights (in diffusers' names), the CLIP image encoder and the feature extractor it builds; then
`FluxPipeline.encode_image` makes the embedding pictor must equal. Tiny random weights, made here.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pictor.checkpoint import sha256_file, state_dict_hash
from pictor.generation_request import GenerationError
from pictor.ip_adapter_files import (
    MAX_SCALE,
    IPAdapterError,
    IPAdapterModel,
    blank_pixels,
    clip_image_embeds,
    ip_adapter_fields,
    ip_adapter_file_summary,
    ip_adapter_pixels,
    ip_adapter_problem,
    open_ip_adapter,
)
from pictor.models.ip_adapter import IPAdapter

from tiny_flux import random_flux, randomize_, tiny_params

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PARAMS = tiny_params(depth=2)  # context 20, hidden 32, 2 heads, 2 double blocks
IMAGE_DIM, CLIP_SIZE, TOKENS = 12, 30, 4
XLABS, DIFFUSERS = "ip_adapter.safetensors", "diffusers_layout.safetensors"


def _vision_config(**kw: Any) -> Any:
    settings = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": CLIP_SIZE,
        "patch_size": 6,
        "projection_dim": IMAGE_DIM,
    }
    return transformers.CLIPVisionConfig(**{**settings, **kw})


def _clip_folder(folder: Path, seed: int = 1, **kw: Any) -> Path:
    torch.manual_seed(seed)
    transformers.CLIPVisionModelWithProjection(_vision_config(**kw)).save_pretrained(folder)
    return folder


def _adapter() -> IPAdapter:
    adapter = IPAdapter(IMAGE_DIM, PARAMS.context_in_dim, PARAMS.hidden_size, TOKENS, PARAMS.depth)
    randomize_(adapter, 5)
    return adapter


def _diffusers_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The prefixes diffusers' load_ip_adapter also reads: image_proj.* and ip_adapter.N.to_k_ip.*."""
    out = {}
    for key, value in state.items():
        if key.startswith("ip_adapter_proj_model."):
            out["image_proj." + key.split(".", 1)[1]] = value
        else:
            _, i, _, name, p = key.split(".")
            out[f"ip_adapter.{i}.to_{name.split('_')[-2]}_ip.{p}"] = value
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ip_adapter")
    _clip_folder(root / "clip")
    state = {k: v.contiguous() for k, v in _adapter().state_dict().items()}
    save_file(state, root / XLABS)
    save_file(_diffusers_layout(state), root / DIFFUSERS)
    return root


@pytest.fixture(scope="module")
def model(root: Path) -> IPAdapterModel:
    return open_ip_adapter(root / XLABS, root / "clip", PARAMS)


class _RecordingTransformer:
    def _load_ip_adapter_weights(self, state_dicts: list[dict[str, Any]], low_cpu_mem_usage: bool) -> None:
        self.state_dicts = state_dicts


def _diffusers_load(file: Path, clip: Path) -> SimpleNamespace:
    """diffusers' own FluxPipeline.load_ip_adapter on a stand-in pipeline that has no image encoder yet."""
    pipe = SimpleNamespace(
        image_encoder=None, feature_extractor=None, transformer=_RecordingTransformer(), device="cpu"
    )
    pipe.register_modules = lambda **modules: pipe.__dict__.update(modules)
    diffusers.FluxPipeline.load_ip_adapter(
        pipe,
        str(file.parent),
        weight_name=file.name,
        image_encoder_pretrained_model_name_or_path=str(clip),
        image_encoder_dtype=torch.float32,
        local_files_only=True,
        low_cpu_mem_usage=False,
    )
    return pipe


def _as_diffusers_names(adapter: IPAdapter) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in adapter.state_dict().items():
        if key.startswith("ip_adapter_proj_model."):
            out["image_proj"][key.split(".", 1)[1]] = value
        else:
            _, i, _, name, p = key.split(".")
            out["ip_adapter"][f"{i}.to_{name.split('_')[-2]}_ip.{p}"] = value
    return out


def _encode_image(pipe: SimpleNamespace, image: Any) -> torch.Tensor:
    with torch.no_grad():
        return diffusers.FluxPipeline.encode_image(pipe, image, "cpu", 1)


def _needs_pil_processor(pipe: SimpleNamespace) -> None:
    pil = getattr(transformers, "CLIPImageProcessorPil", None)
    if pil is not None and not isinstance(pipe.feature_extractor, pil):
        pytest.skip("diffusers' CLIPImageProcessor is torchvision's here; pictor uses the PIL one")


def _picture(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (5, 4, len(mode)), dtype=np.uint8)
    return Image.fromarray(small, mode).resize(size, Image.Resampling.BILINEAR)


def test_both_layouts_load_as_diffusers_reads_them(root: Path, model: IPAdapterModel) -> None:
    want = _adapter().state_dict()
    for name in (XLABS, DIFFUSERS):
        ours = open_ip_adapter(root / name, root / "clip", PARAMS)
        got = ours.adapter.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name
        assert not any(p.requires_grad for p in ours.adapter.parameters())
        theirs = _diffusers_load(root / name, root / "clip").transformer.state_dicts[0]
        mine = _as_diffusers_names(ours.adapter)
        for part in ("image_proj", "ip_adapter"):
            assert set(theirs[part]) == set(mine[part])
            assert all(torch.equal(theirs[part][k], mine[part][k]) for k in mine[part]), (name, part)
    info = model.info
    assert info["name"] == "ip_adapter" and info["path"] == str((root / XLABS).resolve())
    assert info["sha256"] == sha256_file(root / XLABS) and info["tokens"] == TOKENS
    assert info["clip"] == str((root / "clip").resolve())
    reference = transformers.CLIPVisionModelWithProjection.from_pretrained(root / "clip")
    assert info["clip_sha256"] == state_dict_hash(reference.state_dict())


def test_embeddings_are_diffusers_encode_image(root: Path, model: IPAdapterModel) -> None:
    pipe = _diffusers_load(root / XLABS, root / "clip")
    _needs_pil_processor(pipe)
    wide = _picture(0, (57, 31))
    ours = clip_image_embeds(model, np.asarray(wide))
    assert ours.shape == (1, IMAGE_DIM) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, _encode_image(pipe, wide), atol=1e-6, rtol=0)
    if int(transformers.__version__.split(".")[0]) >= 5:
        # transparency composited onto white, as CLIP's processor does since transformers 5
        rgba = _picture(1, (23, 41), "RGBA")
        torch.testing.assert_close(
            clip_image_embeds(model, ip_adapter_pixels(rgba)), _encode_image(pipe, rgba), atol=1e-6, rtol=0
        )
    # the negative half under true CFG: diffusers' black array, width rows by height columns
    height, width = 24, 40
    blank = blank_pixels(height, width)
    assert blank.shape == (width, height, 3) and blank.dtype == np.uint8 and not blank.any()
    black = clip_image_embeds(model, blank)
    torch.testing.assert_close(
        black, _encode_image(pipe, np.zeros((width, height, 3), dtype=np.uint8)), atol=1e-6, rtol=0
    )
    assert (black - ours).abs().max() > 1e-3


def test_a_folder_with_its_own_preprocessor_config(root: Path, model: IPAdapterModel, tmp_path: Path) -> None:
    folder = shutil.copytree(root / "clip", tmp_path / "clip")
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor_cls(
        size={"shortest_edge": 34},
        crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE},
        resample=Image.Resampling.BILINEAR,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(folder)
    ours = open_ip_adapter(root / XLABS, folder, PARAMS)
    pipe = _diffusers_load(root / XLABS, folder)
    # a pipeline whose feature extractor comes from the folder (as from_pretrained gives a pipeline one)
    pipe.feature_extractor = transformers.CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    _needs_pil_processor(pipe)
    picture = _picture(2, (45, 70))
    got = clip_image_embeds(ours, np.asarray(picture))
    torch.testing.assert_close(got, _encode_image(pipe, picture), atol=1e-6, rtol=0)
    assert (got - clip_image_embeds(model, np.asarray(picture))).abs().max() > 1e-3  # the config is read


def test_a_whole_clip_model_folder_gives_its_vision_tower(root: Path, tmp_path: Path) -> None:
    # openai/clip-vit-large-patch14 is published as a whole CLIPModel, text tower and all
    text = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2
    )
    config = transformers.CLIPConfig(
        text_config=text.to_dict(), vision_config=_vision_config().to_dict(), projection_dim=IMAGE_DIM
    )
    torch.manual_seed(7)
    full = transformers.CLIPModel(config).eval()
    full.save_pretrained(tmp_path / "full")
    ours = open_ip_adapter(root / XLABS, tmp_path / "full", PARAMS)
    pipe = _diffusers_load(root / XLABS, tmp_path / "full")
    _needs_pil_processor(pipe)
    picture = _picture(3, (33, 48))
    got = clip_image_embeds(ours, np.asarray(picture))
    torch.testing.assert_close(got, _encode_image(pipe, picture), atol=1e-6, rtol=0)
    x = pipe.feature_extractor(picture, return_tensors="pt").pixel_values
    with torch.no_grad():
        want = full.visual_projection(full.vision_model(pixel_values=x).pooler_output)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert ours.info["clip_sha256"] == state_dict_hash(
        {k: v for k, v in full.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    )


class _Trap:
    """A pickle that, if anything unpickled it, would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.marker,))


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def test_adapter_files_are_refused_with_the_reason(root: Path, tmp_path: Path) -> None:
    clip, state = root / "clip", load_file(root / XLABS)

    def refused(path: Path, match: str, params: Any = PARAMS) -> None:
        with pytest.raises(IPAdapterError, match=match):
            open_ip_adapter(path, clip, params)

    refused(tmp_path / "absent.safetensors", "absent.safetensors: no such file")
    marker = tmp_path / "unpickled"
    for name in ("ip_adapter.bin", "pickle.safetensors"):
        (tmp_path / name).write_bytes(pickle.dumps(_Trap(marker)))
    refused(tmp_path / "ip_adapter.bin", r"reads \.safetensors only \(never pickles")
    refused(tmp_path / "pickle.safetensors", "not a readable safetensors file")
    assert ip_adapter_file_summary(tmp_path / "pickle.safetensors") is None
    assert not marker.exists()
    refused(
        _save(tmp_path / "x.safetensors", {"x.weight": torch.zeros(2)}),
        r"not a FLUX\.1 IP-Adapter.*x\.weight",
    )
    refused(_save(tmp_path / "empty.safetensors", {}), "holds no tensors")
    # a FLUX transformer, an XLabs LoRA: keys under double_blocks. that are no adapter's
    flux = _save(tmp_path / "flux.safetensors", random_flux(PARAMS).state_dict())
    refused(flux, r"not a FLUX\.1 IP-Adapter .*keys are no IP-Adapter's.*'double_blocks\.0\.")
    lora = {"double_blocks.0.processor.proj_lora1.down.weight": torch.zeros(4, 32)}
    refused(_save(tmp_path / "lora.safetensors", lora), r"not a FLUX\.1 IP-Adapter")
    net = {
        "controlnet_blocks.0.weight": torch.zeros(32, 32),
        "double_blocks.0.img_mod.lin.weight": torch.zeros(2),
    }
    refused(_save(tmp_path / "controlnet.safetensors", net), r"not a FLUX\.1 IP-Adapter")
    cut = dict(state)
    cut.pop("double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias")
    refused(
        _save(tmp_path / "cut.safetensors", cut), r"missing \['double_blocks\.1\.processor\.ip_adapter_double"
    )
    bent = {**state, "ip_adapter_proj_model.norm.bias": torch.zeros(7)}
    refused(_save(tmp_path / "bent.safetensors", bent), "shapes do not fit together")
    twice = {**state, "image_proj.norm.bias": state["ip_adapter_proj_model.norm.bias"].clone()}
    refused(_save(tmp_path / "twice.safetensors", twice), "image_proj.norm.bias and .* are the same weight")
    ints = {**state, "ip_adapter_proj_model.norm.bias": torch.zeros(PARAMS.context_in_dim, dtype=torch.int64)}
    refused(_save(tmp_path / "ints.safetensors", ints), "holds torch.int64, not weights")
    adapter = root / XLABS
    refused(adapter, "made for a transformer with 2 double blocks, this one has 3", replace(PARAMS, depth=3))
    refused(
        adapter,
        "picture tokens are 20 wide, but this transformer reads 24-wide",
        replace(PARAMS, context_in_dim=24),
    )
    wide = replace(PARAMS, hidden_size=64, axes_dim=[8, 12, 12])
    refused(adapter, "are 32 wide, but this transformer's hidden size is 64", wide)
    # FluxParams itself refuses such heads; params changed after the check still are
    odd_heads = replace(PARAMS)
    odd_heads.num_heads = 3
    refused(adapter, "do not split into this transformer's 3 heads", odd_heads)


def test_clip_folders_are_refused_with_the_reason(root: Path, tmp_path: Path) -> None:
    def refused(folder: Path, match: str) -> None:
        with pytest.raises(IPAdapterError, match=match):
            open_ip_adapter(root / XLABS, folder, PARAMS)

    refused(tmp_path / "absent", "absent: no such folder")
    (tmp_path / "bare").mkdir()
    refused(tmp_path / "bare", r"not a CLIP model folder \(no config\.json\)")
    (tmp_path / "siglip").mkdir()
    (tmp_path / "siglip" / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))
    refused(tmp_path / "siglip", "model_type 'siglip_vision_model', not a CLIP model")
    refused(
        _clip_folder(tmp_path / "base", projection_dim=16),
        "CLIP's image embeddings are 16 wide, but the IP-Adapter reads 12",
    )
    (tmp_path / "config_only").mkdir()
    shutil.copy(root / "clip" / "config.json", tmp_path / "config_only")
    refused(tmp_path / "config_only", r"no \.safetensors weights \(pictor never unpickles")
    # a whole CLIPModel whose vision_config does not carry the model's projection_dim
    text = {"vocab_size": 49408, "hidden_size": 16, "intermediate_size": 20, "num_hidden_layers": 1}
    vision = {k: v for k, v in _vision_config().to_dict().items() if k != "projection_dim"}
    (tmp_path / "odd").mkdir()
    config = {"model_type": "clip", "projection_dim": IMAGE_DIM, "text_config": text, "vision_config": vision}
    (tmp_path / "odd" / "config.json").write_text(json.dumps(config))
    refused(tmp_path / "odd", "projects to 12 but its vision_config says projection_dim 512")
    broken = shutil.copytree(root / "clip", tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.1.mlp" not in k}, broken / "model.safetensors")
    refused(broken, "missing or mismatches 4 weights")
    mixed = shutil.copytree(root / "clip", tmp_path / "mixed")
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor_cls(size=2 * CLIP_SIZE, crop_size=2 * CLIP_SIZE).save_pretrained(mixed)
    refused(mixed, "makes 60x60 pictures, but CLIP's vision tower reads 30x30; the folder mixes two models")


def test_request_problems_fields_and_pixels(model: IPAdapterModel, tmp_path: Path) -> None:
    picture = np.asarray(_picture(4, (57, 31)))

    def problem(model: IPAdapterModel | None = model, **kw: Any) -> str | None:
        return ip_adapter_problem(SimpleNamespace(**kw), model)

    assert problem() is None and problem(ip_adapter_image=None, ip_adapter_scale=None) is None
    assert "scale without an IP-Adapter picture; add --ip-adapter IMAGE" in (
        problem(ip_adapter_scale=0.5) or ""
    )
    assert "needs --ip-adapter-model FILE and --clip-vision FOLDER" in (
        problem(None, ip_adapter_image=picture) or ""
    )
    for scale in (None, 0, 0.6, 1, MAX_SCALE):
        assert problem(ip_adapter_image=picture, ip_adapter_scale=scale) is None, scale
    for scale in (-0.1, float("nan"), float("inf"), 10.5, True, "1"):
        said = problem(ip_adapter_image=picture, ip_adapter_scale=scale) or ""
        assert "IP-Adapter scale must be a number from 0 to 10" in said, scale
    fields = ip_adapter_fields(picture, 1, model.info)
    assert fields["ip_adapter_image"]["width"] == 57 and fields["ip_adapter_image"]["height"] == 31
    assert fields["ip_adapter"] == {**model.info, "scale": 1.0}
    assert isinstance(fields["ip_adapter"]["scale"], float)
    assert issubclass(IPAdapterError, GenerationError)
    assert ip_adapter_pixels(picture) is picture
    with pytest.raises(IPAdapterError, match="IP-Adapter picture array must be uint8"):
        ip_adapter_pixels(picture.astype(np.float32))
    with pytest.raises(IPAdapterError, match="no such file"):
        ip_adapter_pixels(Path("no-such-picture.png"))
    with pytest.raises(IPAdapterError, match="must be a path, a PIL image or a uint8"):
        ip_adapter_pixels(3)  # type: ignore[arg-type]
    # from a file as from the picture; transparent parts white, opaque ones as they are
    rgba = _picture(6, (20, 14), "RGBA")
    rgba.save(tmp_path / "rgba.png")
    alpha = np.asarray(rgba)[..., 3:].astype(np.float64) / 255
    on_white = np.asarray(rgba)[..., :3] * alpha + 255 * (1 - alpha)
    np.testing.assert_array_equal(ip_adapter_pixels(tmp_path / "rgba.png"), ip_adapter_pixels(rgba))
    assert np.abs(ip_adapter_pixels(rgba).astype(np.float64) - on_white).max() <= 1
    palette = Image.fromarray(picture).quantize(8)
    palette.info["transparency"] = 0
    see_through = np.asarray(palette) == 0
    assert see_through.any() and (ip_adapter_pixels(palette)[see_through] == 255).all()
    np.testing.assert_array_equal(ip_adapter_pixels(Image.fromarray(picture)), picture)


def test_to_moves_and_freezes(root: Path) -> None:
    moved = open_ip_adapter(root / XLABS, root / "clip", PARAMS).to("cpu", torch.bfloat16)
    for module in (moved.adapter, moved.clip):
        assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in module.parameters())
        assert not module.training
    assert clip_image_embeds(moved, np.asarray(_picture(5, (40, 40)))).dtype == torch.bfloat16


def test_pictor_info_says_what_an_ip_adapter_file_is(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pictor.cli import main

    shown = {}
    for name in (XLABS, DIFFUSERS):
        assert main(["info", str(root / name)]) == 0
        shown[name] = json.loads(capsys.readouterr().out)
    xlabs = shown[XLABS]
    assert xlabs["kind"] == "FLUX.1 IP-Adapter (XLabs)" and xlabs["sha256"] == sha256_file(root / XLABS)
    dims = ("image_dim", "context_dim", "hidden_size", "tokens", "double_blocks")
    assert tuple(xlabs[k] for k in dims) == (IMAGE_DIM, PARAMS.context_in_dim, PARAMS.hidden_size, TOKENS, 2)
    assert "--ip-adapter-model THIS_FILE --clip-vision CLIP_FOLDER" in xlabs["use"]
    assert {**shown[DIFFUSERS], "sha256": ""} == {**xlabs, "sha256": ""}
    assert ip_adapter_file_summary(root / "clip" / "model.safetensors") is None
