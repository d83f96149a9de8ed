"""XLabs' FLUX.1 IP-Adapter end to end: the same pictures as diffusers' `FluxPipeline` with the weights its
`load_ip_adapter` reads (tiny CLIP vision tower, tiny FLUX.1 [dev]-like model), also under true CFG where the
negative half reads a black picture; scales, records, reproduction, edits, the grid axis and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.checkpoint import save_bundle
from pictor.ip_adapter_files import IPAdapterError
from pictor.models.flux import FluxParams, pack_latents
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.provenance import ProvenanceError, parameters_text, read_record
from pictor.reproduce import check_record, reproduce
from tests.test_redux import MODEL as REDUX_MODEL
from tests.test_redux import _picture, _px, _request
from tests.test_redux import _pipeline as redux_pipeline

from tiny_ip_adapter import clip_vision_folder, ip_adapter_file
from tiny_text_folders import T5_LEN, diffusers_components

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PICTOR = shutil.which("pictor")
# Redux's tiny [dev]-like model (tests/test_redux.py) with two double blocks, so the adapter's blocks matter;
# its text width is the tiny T5's: the picture's tokens are this wide too
MODEL = replace(REDUX_MODEL, depth=2)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ip_adapter")
    clip_vision_folder(root / "clip-vision")
    ip_adapter_file(root / "ip_adapter.safetensors", MODEL.context_in_dim, MODEL.hidden_size, MODEL.depth)
    return root


def _pipeline(root: Path, model: FluxParams = MODEL, guidance_mode: str = "distilled") -> Pipeline:
    return redux_pipeline(root, guidance_mode, model=model, t5_length=T5_LEN)


@pytest.fixture(scope="module")
def pipe(root: Path) -> Pipeline:
    p = _pipeline(root)
    p.set_ip_adapter(root / "ip_adapter.safetensors", root / "clip-vision")
    return p


def _diffusers_pipeline(root: Path, pipe: Pipeline, scale: float) -> object:
    """diffusers' FluxPipeline on the same weights, the IP-Adapter loaded as `load_ip_adapter` loads XLabs'
    file (its own key mapping, read from the same safetensors file)."""
    from diffusers.loaders.ip_adapter import FluxIPAdapterMixin

    components = diffusers_components(root, pipe)
    flux = diffusers.FluxPipeline(
        **components,
        image_encoder=transformers.CLIPVisionModelWithProjection.from_pretrained(root / "clip-vision"),
        feature_extractor=transformers.CLIPImageProcessor.from_pretrained(root / "clip-vision"),
    )
    FluxIPAdapterMixin.load_ip_adapter(
        flux,
        str(root),
        weight_name="ip_adapter.safetensors",
        image_encoder_pretrained_model_name_or_path=None,
        low_cpu_mem_usage=False,
    )
    flux.set_ip_adapter_scale(scale)
    return flux


def _close(ours: Image.Image, theirs: torch.Tensor) -> None:
    want = (theirs.permute(1, 2, 0).numpy() * 255).round().astype(int)
    got = _px(ours).astype(int)
    assert np.abs(got - want).max() <= 1, f"max |pictor - diffusers| = {np.abs(got - want).max()} levels"


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_diffusers_flux_pipeline_and_pictor_paint_the_same_picture(
    root: Path, pipe: Pipeline, scale: float
) -> None:
    width, height, seed, prompt = 32, 24, 7, "a red square"
    picture = _picture(1)
    (ours,) = pipe.generate(
        GenerationRequest(
            prompt, width=width, height=height, steps=3, seed=seed, ip_adapter_image=picture,
            ip_adapter_scale=scale,
        )
    )  # fmt: skip
    noise = pipe.initial_noise([seed], height // 2, width // 2)
    theirs = _diffusers_pipeline(root, pipe, scale)(
        prompt=prompt,
        ip_adapter_image=picture,
        height=height,
        width=width,
        num_inference_steps=3,
        guidance_scale=2.5,
        latents=pack_latents(noise),
        max_sequence_length=T5_LEN,
        output_type="pt",
    ).images[0]
    _close(ours.image, theirs)
    (plain,) = pipe.generate(GenerationRequest(prompt, width=width, height=height, steps=3, seed=seed))
    assert np.abs(_px(plain.image) - _px(ours.image)).mean() > 1  # the picture shows


def test_under_true_cfg_the_negative_half_reads_a_black_picture(root: Path) -> None:
    """A model with real classifier-free guidance: diffusers' true CFG (true_cfg_scale, a negative prompt)
    gives the negative pass a black picture's embedding; so does pictor."""
    model = replace(MODEL, guidance_embed=False)
    pipe = _pipeline(root, model, guidance_mode="cfg")
    pipe.set_ip_adapter(root / "ip_adapter.safetensors", root / "clip-vision")
    picture = _picture(2)
    (ours,) = pipe.generate(
        GenerationRequest(
            "a red square", negative_prompt="a blue blur", width=32, height=32, steps=3, seed=6,
            guidance=3.0, ip_adapter_image=picture, ip_adapter_scale=0.8,
        )
    )  # fmt: skip
    noise = pipe.initial_noise([6], 16, 16)
    theirs = _diffusers_pipeline(root, pipe, 0.8)(
        prompt="a red square",
        negative_prompt="a blue blur",
        true_cfg_scale=3.0,
        ip_adapter_image=picture,
        height=32,
        width=32,
        num_inference_steps=3,
        latents=pack_latents(noise),
        max_sequence_length=T5_LEN,
        output_type="pt",
    ).images[0]
    _close(ours.image, theirs)


def test_scale_orders_how_much_the_picture_says(pipe: Pipeline) -> None:
    (plain,) = pipe.generate(_request())
    (none,) = pipe.generate(_request(ip_adapter_image=_picture(), ip_adapter_scale=0.0))
    (half,) = pipe.generate(_request(ip_adapter_image=_picture(), ip_adapter_scale=0.5))
    (full,) = pipe.generate(_request(ip_adapter_image=_picture()))
    assert full.record["ip_adapter"]["scale"] == 1.0 and half.record["ip_adapter"]["scale"] == 0.5
    assert np.array_equal(_px(none.image), _px(plain.image))  # scale 0 adds nothing at all
    d_half = np.abs(_px(half.image) - _px(plain.image)).mean()
    d_full = np.abs(_px(full.image) - _px(plain.image)).mean()
    assert 0 < d_half < d_full, (d_half, d_full)
    text = parameters_text(half.record)
    assert "IP-Adapter scale: 0.5" in text and "IP-Adapter model: ip_adapter [" in text


def test_reproduce_is_bit_exact_and_checks_picture_and_files(
    root: Path, pipe: Pipeline, tmp_path: Path
) -> None:
    src, other = tmp_path / "src.png", tmp_path / "other.png"
    _picture(4).save(src)
    _picture(5).save(other)
    images = pipe.generate(
        _request(ip_adapter_image=src, ip_adapter_scale=0.75, num_images=2, cache_threshold=0.2)
    )
    record = images[1].record
    assert record["ip_adapter"]["sha256"] == pipe.ip_adapter.info["sha256"]
    assert record["ip_adapter_image"]["width"] == 48
    again = reproduce(pipe, record, ip_adapter=src)
    np.testing.assert_array_equal(_px(again.image), _px(images[1].image))
    with pytest.raises(GenerationError, match="IP-Adapter picture is not the one this image was made from"):
        reproduce(pipe, record, ip_adapter=other)
    with pytest.raises(GenerationError, match="pass it with --ip-adapter IMAGE"):
        reproduce(pipe, record)
    with pytest.raises(ProvenanceError, match="'ip_adapter' is"):
        check_record({**record, "ip_adapter": {"sha256": "x"}})
    bare = _pipeline(root)
    with pytest.raises(GenerationError, match="--ip-adapter-model FILE --clip-vision FOLDER"):
        reproduce(bare, record, ip_adapter=src)
    other_clip = clip_vision_folder(tmp_path / "clip-other", seed=9)
    bare.set_ip_adapter(root / "ip_adapter.safetensors", other_clip)
    with pytest.raises(GenerationError, match="CLIP vision weights"):
        reproduce(bare, record, ip_adapter=src)
    # The same weights behind another image processor (mean and std) see another picture
    shifted = tmp_path / "clip-shifted"
    shutil.copytree(root / "clip-vision", shifted)
    config = json.loads((shifted / "preprocessor_config.json").read_text())
    config["image_mean"] = [0.5, 0.5, 0.5]
    (shifted / "preprocessor_config.json").write_text(json.dumps(config))
    bare = _pipeline(root)
    bare.set_ip_adapter(root / "ip_adapter.safetensors", shifted)
    assert bare.ip_adapter.info["clip_sha256"] == record["ip_adapter"]["clip_sha256"]
    with pytest.raises(GenerationError, match="CLIP image processor settings"):
        reproduce(bare, record, ip_adapter=src)
    (plain,) = pipe.generate(_request())
    with pytest.raises(GenerationError, match="drop --ip-adapter"):
        reproduce(pipe, plain.record, ip_adapter=src)


def test_edits_and_hires_take_an_ip_adapter_picture(pipe: Pipeline, tmp_path: Path) -> None:
    from pictor.editing import EditRequest

    src = tmp_path / "src.png"
    _picture(6, (32, 32)).save(src)
    edit = EditRequest(image=src, prompt="blue", strength=0.8, seed=1, steps=3, ip_adapter_image=_picture(7))
    (made,) = pipe.edit(edit)
    assert made.record["ip_adapter"]["scale"] == 1.0
    again = reproduce(pipe, made.record, source=src, ip_adapter=_picture(7))
    np.testing.assert_array_equal(_px(again.image), _px(made.image))
    (hires,) = pipe.generate(_request(ip_adapter_image=_picture(7), hires_scale=1.5, hires_steps=2))
    again = reproduce(pipe, hires.record, ip_adapter=_picture(7))
    np.testing.assert_array_equal(_px(again.image), _px(hires.image))


def test_misuse_is_refused_with_the_reason(root: Path) -> None:
    bare = _pipeline(root)
    with pytest.raises(IPAdapterError, match="--ip-adapter-model FILE and --clip-vision FOLDER"):
        bare.generate(_request(ip_adapter_image=_picture()))
    deeper = _pipeline(root, replace(MODEL, depth=3))
    with pytest.raises(IPAdapterError, match="3"):
        deeper.set_ip_adapter(root / "ip_adapter.safetensors", root / "clip-vision")
    pipe = _pipeline(root)
    pipe.set_ip_adapter(root / "ip_adapter.safetensors", root / "clip-vision")
    for bad in (-1.0, float("nan"), 11.0, True):
        with pytest.raises(IPAdapterError, match="scale"):
            pipe.generate(_request(ip_adapter_image=_picture(), ip_adapter_scale=bad))
    with pytest.raises(IPAdapterError, match="without an IP-Adapter picture"):
        pipe.generate(_request(ip_adapter_scale=0.5))


def test_grid_axis_for_the_scale(pipe: Pipeline) -> None:
    from pictor.grid_axes import plan_grid
    from pictor.grid_runs import run_plan

    base = GenerationRequest("a square", seed=3, steps=2, ip_adapter_image=_picture(2))
    cells = run_plan(pipe, plan_grid(base, "ip-adapter-scale=0,1")).cells
    (zero,) = pipe.generate(replace(base, ip_adapter_scale=0.0))
    (one,) = pipe.generate(replace(base, ip_adapter_scale=1.0))
    assert np.array_equal(_px(cells[0].image.image), _px(zero.image))
    assert np.array_equal(_px(cells[1].image.image), _px(one.image))


@pytest.mark.skipif(PICTOR is None, reason="the pictor console script is not installed")
def test_cli_generate_with_an_ip_adapter_and_reproduce(root: Path, pipe: Pipeline, tmp_path: Path) -> None:
    bundle = tmp_path / "tiny-dev"
    save_bundle(bundle, pipe.config, pipe.transformer.state_dict(), pipe.autoencoder.state_dict())
    src = tmp_path / "src.png"
    _picture(8).save(src)
    files = [
        "--ip-adapter-model",
        str(root / "ip_adapter.safetensors"),
        "--clip-vision",
        str(root / "clip-vision"),
    ]
    base = [str(PICTOR), "generate", "a cat", "--model", str(bundle), "--device", "cpu", "--steps", "2"]
    run = subprocess.run(
        [
            *base,
            "--ip-adapter",
            str(src),
            "--ip-adapter-scale",
            "0.7",
            *files,
            "--seed",
            "3",
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    made = Path(run.stdout.split()[0])
    assert read_record(made)["ip_adapter"]["scale"] == 0.7
    # The IP-Adapter file and CLIP folder come from the record; the picture must be given.
    rep = [str(PICTOR), "reproduce", str(made), "--model", str(bundle), "--device", "cpu"]
    ok = subprocess.run(
        [*rep, "--ip-adapter", str(src), "-o", str(tmp_path / "r")], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "identical" in ok.stderr
    half = subprocess.run(
        [*base, "--ip-adapter", str(src), "--ip-adapter-model", files[1]], capture_output=True, text=True
    )
    assert (
        half.returncode != 0 and "needs both --ip-adapter-model FILE and --clip-vision FOLDER" in half.stderr
    )


@pytest.mark.parametrize("guidance_mode", ["cfg", "distilled"])
def test_regions_and_and_passes_read_the_picture(root: Path, guidance_mode: str) -> None:
    """With regions or AND, every prompt's pass reads the picture and, under CFG, the negative prompt's pass
    the black one: the velocity is the blend of passes of each prompt alone with the picture."""
    from pictor.guided_velocity import guided_velocity
    from pictor.ip_adapter_files import blank_pixels
    from pictor.regional_prompts import parse_regions, region_weights

    model = replace(MODEL, guidance_embed=guidance_mode == "distilled")
    pipe = _pipeline(root, model, guidance_mode=guidance_mode)
    pipe.set_ip_adapter(root / "ip_adapter.safetensors", root / "clip-vision")
    picture, size = _picture(2), {"width": 32, "height": 32, "steps": 3, "ip_adapter_scale": 0.8}
    regions = parse_regions([{"box": [0, 0, 0.5, 1], "prompt": "a blue square"}])
    cfg = {"guidance": 3.0, "negative_prompt": "a blur"} if guidance_mode == "cfg" else {}
    lat = pipe.initial_noise([0], 16, 16).shape[-1]  # the latent grid of a 32x32 image
    torch.manual_seed(0)
    x, t = torch.randn(2, (lat // 2) ** 2, model.in_channels), torch.tensor([0.7, 0.3])

    def velocity(prompt: str, **kw: object) -> torch.Tensor:
        r = pipe.resolve_request(GenerationRequest(prompt, **{**size, **kw}))  # type: ignore[arg-type]
        with torch.inference_mode():
            return guided_velocity(pipe, r, 2, lat, lat)(x, t)

    one = {"guidance": 1.0} if guidance_mode == "cfg" else {}
    alone = [velocity(p, ip_adapter_image=picture, **one) for p in ("a red circle", "a blue square")]
    negative = velocity("a blur", ip_adapter_image=blank_pixels(32, 32), **one) if cfg else None
    w = region_weights(regions, lat // 2, lat // 2)[:, None, :, None]
    blend = (w * torch.stack(alone)).sum(0)
    want = negative + 3.0 * (blend - negative) if negative is not None else blend
    got = velocity("a red circle", regions=regions, ip_adapter_image=picture, **cfg)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    parts = [0.5 * v for v in alone]  # "a red circle:0.5 AND a blue square:0.5"
    want = negative + 3.0 * sum(p - 0.5 * negative for p in parts) if negative is not None else sum(parts)
    got = velocity("a red circle:0.5 AND a blue square:0.5", composable=True, ip_adapter_image=picture, **cfg)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
