"""FLUX.1 Redux: a picture's SigLIP features as extra prompt tokens (`pictor.redux_images`).

diffusers' `FluxPriorReduxPipeline` (tiny SigLIP + Redux embedder + the tiny CLIP/T5 folders) makes the prompt
embeddings that its `FluxPipeline` then draws from; pictor on the same weights, noise, prompt and picture
paints the same picture. This pins SigLIP's preprocessing, the embedder, where the tokens go and the pooled
vector at once. Then: strength, records, bit-exact reproduction, refusals, and the command line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pictor.checkpoint import BundleConfig, save_bundle
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import FluxParams, pack_latents
from pictor.models.redux import ReduxEncoder
from pictor.models.text import build_text_encoder
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.provenance import ProvenanceError, parameters_text, read_record
from pictor.redux_images import ReduxError, open_redux, redux_tokens, siglip_inputs
from pictor.reproduce import check_record, reproduce

from tiny_flux import random_flux
from tiny_text_folders import diffusers_components, flux_text_encoders

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PICTOR = shutil.which("pictor")
SIGLIP_DIM, SIGLIP_SIZE = 16, 32
AE = AutoEncoderParams(
    resolution=32,
    in_channels=3,
    ch=32,
    out_ch=3,
    ch_mult=[1, 2],
    num_res_blocks=1,
    z_channels=4,
    scale_factor=0.3611,
    shift_factor=0.1159,
)
MODEL = FluxParams(
    in_channels=16,
    out_channels=16,
    vec_in_dim=32,
    context_in_dim=32,  # the tiny T5's width: Redux tokens are this wide too
    hidden_size=32,
    mlp_ratio=4.0,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=[4, 6, 6],
    guidance_embed=True,
)
DEFAULTS = {
    "width": 32,
    "height": 32,
    "steps": 3,
    "guidance": 2.5,
    "sampler": "euler",
    "schedule": "flux",
    "guidance_mode": "distilled",
}


def _siglip_folder(folder: Path) -> Path:
    config = transformers.SiglipVisionConfig(
        hidden_size=SIGLIP_DIM,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=SIGLIP_SIZE,
        patch_size=4,  # 64 tokens beside T5's 512
    )
    torch.manual_seed(1)
    transformers.SiglipVisionModel(config).save_pretrained(folder)
    size = {"height": SIGLIP_SIZE, "width": SIGLIP_SIZE}
    transformers.SiglipImageProcessorPil(size=size).save_pretrained(folder)
    return folder


def _redux_file(path: Path) -> Path:
    torch.manual_seed(2)
    encoder = ReduxEncoder(SIGLIP_DIM, MODEL.context_in_dim)
    with torch.no_grad():  # larger than default init, so the picture's tokens clearly matter
        for p in encoder.parameters():
            p.mul_(8.0)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("redux")
    _siglip_folder(root / "siglip")
    _redux_file(root / "flux1-redux-dev.safetensors")
    return root


def _pipeline(
    root: Path, guidance_mode: str = "distilled", *, model: FluxParams = MODEL, t5_length: int = 512
) -> Pipeline:
    """The tiny [dev]-like pipeline on `root`'s text folders (also tests/test_ip_adapter_pipeline.py's, with
    its own `model` and the T5 folder's own length)."""
    text = flux_text_encoders(root)
    text["t5"]["max_length"] = t5_length  # diffusers' Redux prior pads T5 to 512 tokens, as FLUX.1 [dev] does
    config = BundleConfig(
        name="tiny-dev", model=model.to_dict(), autoencoder=AE.to_dict(), text_encoder=text,
        defaults={**DEFAULTS, "guidance_mode": guidance_mode},
    )  # fmt: skip
    flux = random_flux(model, seed=0)
    torch.manual_seed(0)
    ae = AutoEncoder(AE).eval()
    return Pipeline(flux, ae, build_text_encoder(text), config, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def pipe(root: Path) -> Pipeline:
    p = _pipeline(root)
    p.set_redux(root / "flux1-redux-dev.safetensors", root / "siglip")
    return p


def _picture(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _request(**kw: object) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a cat", "seed": 5, "steps": 3, **kw})  # type: ignore[arg-type]


def test_siglip_inputs_are_the_image_processors(root: Path) -> None:
    processor = transformers.SiglipImageProcessorPil.from_pretrained(root / "siglip")
    picture = np.asarray(_picture(3, (57, 31)))
    want = processor.preprocess(images=[Image.fromarray(picture)], return_tensors="pt")["pixel_values"]
    redux = open_redux(root / "flux1-redux-dev.safetensors", root / "siglip", MODEL.context_in_dim)
    torch.testing.assert_close(siglip_inputs(picture, redux.preprocess), want, atol=1e-6, rtol=0)


def test_flux_prior_redux_and_pictor_paint_the_same_picture(root: Path, pipe: Pipeline) -> None:
    width, height, seed, prompt = 32, 24, 7, "a red square"
    picture = _picture(1)
    (ours,) = pipe.generate(
        GenerationRequest(prompt, width=width, height=height, steps=3, seed=seed, redux_image=picture)
    )
    components = diffusers_components(root, pipe)
    embedder = diffusers.pipelines.flux.modeling_flux.ReduxImageEncoder(SIGLIP_DIM, MODEL.context_in_dim)
    embedder.load_state_dict(pipe.redux.encoder.state_dict())
    prior = diffusers.FluxPriorReduxPipeline(
        image_encoder=transformers.SiglipVisionModel.from_pretrained(root / "siglip"),
        feature_extractor=transformers.SiglipImageProcessorPil.from_pretrained(root / "siglip"),
        image_embedder=embedder,
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        text_encoder_2=components["text_encoder_2"],
        tokenizer_2=components["tokenizer_2"],
    )
    embeds = prior(image=picture, prompt=prompt)
    # What pictor appends, next to what diffusers' prior makes (the pixels below show where it goes).
    text = pipe.encode_text([prompt])
    tokens = redux_tokens(pipe.redux, np.asarray(picture), 1.0, torch.float32)
    torch.testing.assert_close(
        torch.cat([text.tokens, tokens], 1), embeds.prompt_embeds, atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(text.pooled, embeds.pooled_prompt_embeds, atol=1e-5, rtol=1e-5)
    noise = pipe.initial_noise([seed], height // 2, width // 2)
    theirs = diffusers.FluxPipeline(**components)(
        prompt_embeds=embeds.prompt_embeds,
        pooled_prompt_embeds=embeds.pooled_prompt_embeds,
        height=height,
        width=width,
        num_inference_steps=3,
        guidance_scale=2.5,
        latents=pack_latents(noise),
        output_type="pt",
    ).images[0]
    want = (theirs.permute(1, 2, 0).numpy() * 255).round().astype(int)
    got = _px(ours.image).astype(int)
    assert np.abs(got - want).max() <= 1, f"max |pictor - diffusers| = {np.abs(got - want).max()} levels"
    # Not trivially equal: without the picture, another picture (this tiny random model barely reads its
    # text: another prompt moves its pixels by 0.7 levels on average; the picture by 0.6).
    (plain,) = pipe.generate(GenerationRequest(prompt, width=width, height=height, steps=3, seed=seed))
    assert np.abs(_px(plain.image) - got).mean() > 0.3


def test_strength_scales_the_pictures_say(pipe: Pipeline) -> None:
    (plain,) = pipe.generate(_request())
    (none,) = pipe.generate(_request(redux_image=_picture(), redux_strength=0.0))
    (full,) = pipe.generate(_request(redux_image=_picture()))
    (half,) = pipe.generate(_request(redux_image=_picture(), redux_strength=0.5))
    assert full.record["redux"]["strength"] == 1.0 and half.record["redux"]["strength"] == 0.5
    d_none = np.abs(_px(none.image) - _px(plain.image)).mean()  # zero tokens still take attention, a little
    d_half = np.abs(_px(half.image) - _px(plain.image)).mean()
    d_full = np.abs(_px(full.image) - _px(plain.image)).mean()
    assert d_none < d_half < d_full, (d_none, d_half, d_full)
    assert "Redux strength: 0.5" in parameters_text(half.record)


def test_reproduce_is_bit_exact_and_checks_the_picture(pipe: Pipeline, tmp_path: Path) -> None:
    src, other = tmp_path / "src.png", tmp_path / "other.png"
    _picture(4).save(src)
    _picture(5).save(other)
    images = pipe.generate(_request(redux_image=src, redux_strength=0.75, num_images=2))
    record = images[1].record
    assert record["redux"]["sha256"] == pipe.redux.info["sha256"] and record["redux_image"]["width"] == 48
    again = reproduce(pipe, record, redux=src)
    np.testing.assert_array_equal(_px(again.image), _px(images[1].image))
    with pytest.raises(GenerationError, match="Redux picture is not the one this image was made from"):
        reproduce(pipe, record, redux=other)
    with pytest.raises(GenerationError, match="pass it with --redux IMAGE"):
        reproduce(pipe, record)
    with pytest.raises(ProvenanceError, match="'redux' is"):
        check_record({**record, "redux": {"sha256": "x"}})


def test_edits_take_a_redux_picture(pipe: Pipeline, tmp_path: Path) -> None:
    from pictor.editing import EditRequest

    src = tmp_path / "src.png"
    _picture(6, (32, 32)).save(src)
    edit = EditRequest(image=src, prompt="blue", strength=0.8, seed=1, steps=3, redux_image=_picture(7))
    (made,) = pipe.edit(edit)
    again = reproduce(pipe, made.record, source=src, redux=_picture(7))
    np.testing.assert_array_equal(_px(again.image), _px(made.image))


def test_misuse_is_refused_with_the_reason(root: Path, tmp_path: Path) -> None:
    bare = _pipeline(root)
    with pytest.raises(ReduxError, match=r"pass --redux-model flux1-redux-dev\.safetensors --siglip"):
        bare.generate(_request(redux_image=_picture()))
    cfg = _pipeline(root, guidance_mode="cfg")
    cfg.set_redux(root / "flux1-redux-dev.safetensors", root / "siglip")
    with pytest.raises(ReduxError, match="classifier-free guidance"):
        cfg.generate(_request(redux_image=_picture(), guidance=4.0))
    # a CFG++ sampler would add a negative pass at guidance 1, which has no place for the picture's tokens
    with pytest.raises(GenerationError, match=r"euler_cfg_pp is a CFG\+\+ sampler.*Redux picture"):
        cfg.resolve_request(_request(redux_image=_picture(), guidance=1.0, sampler="euler_cfg_pp"))
    redux_file, siglip = root / "flux1-redux-dev.safetensors", root / "siglip"
    with pytest.raises(ReduxError, match="this model reads 64-wide text tokens"):
        open_redux(redux_file, siglip, 64)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"x.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ReduxError, match=r"not a FLUX\.1 Redux embedder"):
        open_redux(wrong, siglip, 32)
    narrow = tmp_path / "narrow.safetensors"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in ReduxEncoder(8, 32).state_dict().items()}, narrow)
    with pytest.raises(ReduxError, match=r"SigLIP's features are 16 wide, but narrow\.safetensors reads 8"):
        open_redux(narrow, siglip, 32)
    with pytest.raises(ReduxError, match=r"no preprocessor_config\.json"):
        open_redux(redux_file, tmp_path, 32)
    pipe = _pipeline(root)
    pipe.set_redux(redux_file, siglip)
    for bad in (-1.0, float("nan"), 11.0):
        with pytest.raises(ReduxError, match="Redux strength must be a number from 0 to 10"):
            pipe.generate(_request(redux_image=_picture(), redux_strength=bad))
    with pytest.raises(ReduxError, match="without a Redux picture"):
        pipe.generate(_request(redux_strength=0.5))


@pytest.mark.skipif(PICTOR is None, reason="the pictor console script is not installed")
def test_cli_generate_with_redux_and_reproduce(root: Path, pipe: Pipeline, tmp_path: Path) -> None:
    bundle = tmp_path / "tiny-dev"
    save_bundle(bundle, pipe.config, pipe.transformer.state_dict(), pipe.autoencoder.state_dict())
    src = tmp_path / "src.png"
    _picture(8).save(src)
    redux = ["--redux-model", str(root / "flux1-redux-dev.safetensors"), "--siglip", str(root / "siglip")]
    base = [str(PICTOR), "generate", "a cat", "--model", str(bundle), "--device", "cpu", "--steps", "2"]
    run = subprocess.run(
        [*base, "--redux", str(src), *redux, "--seed", "3", "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    made = Path(run.stdout.split()[0])
    assert read_record(made)["redux"]["strength"] == 1.0
    # The Redux file and SigLIP folder come from the record; the picture must be given.
    rep = [str(PICTOR), "reproduce", str(made), "--model", str(bundle), "--device", "cpu"]
    ok = subprocess.run(
        [*rep, "--redux", str(src), "-o", str(tmp_path / "r")], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "identical" in ok.stderr
    half = subprocess.run(
        [*base, "--redux", str(src), "--redux-model", redux[1]], capture_output=True, text=True
    )
    assert half.returncode != 0 and "needs both --redux-model FILE and --siglip FOLDER" in half.stderr


def test_siglip_folders_are_loaded_strictly_and_checked(root: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    redux_file = root / "flux1-redux-dev.safetensors"
    # google/siglip-so400m-patch14-384 is a whole SiglipModel: its vision tower is what is read
    vision = transformers.SiglipVisionConfig(
        hidden_size=SIGLIP_DIM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=SIGLIP_SIZE, patch_size=4,
    )  # fmt: skip
    text = transformers.SiglipTextConfig(
        vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(3)
    full = transformers.SiglipModel(
        transformers.SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    )
    full.save_pretrained(tmp_path / "full")
    transformers.SiglipImageProcessorPil(size={"height": SIGLIP_SIZE, "width": SIGLIP_SIZE}).save_pretrained(
        tmp_path / "full"
    )
    redux = open_redux(redux_file, tmp_path / "full", MODEL.context_in_dim)
    x = torch.randn(1, 3, SIGLIP_SIZE, SIGLIP_SIZE)
    want = full.vision_model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(redux.siglip(pixel_values=x).last_hidden_state, want)
    # a folder missing some of the vision tower's weights is refused, not filled with random ones
    shutil.copytree(root / "siglip", tmp_path / "broken")
    weights = load_file(tmp_path / "broken" / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if "layers.0.mlp" not in k},
        tmp_path / "broken" / "model.safetensors",
    )
    with pytest.raises(ReduxError, match="missing or mismatches 4 weights"):
        open_redux(redux_file, tmp_path / "broken", MODEL.context_in_dim)
    # a processor that resizes to another size than the model reads
    shutil.copytree(root / "siglip", tmp_path / "mixed")
    size = {"height": 2 * SIGLIP_SIZE, "width": 2 * SIGLIP_SIZE}
    transformers.SiglipImageProcessorPil(size=size).save_pretrained(tmp_path / "mixed")
    with pytest.raises(ReduxError, match="resizes pictures to 64x64, but the model reads 32x32"):
        open_redux(redux_file, tmp_path / "mixed", MODEL.context_in_dim)


def test_reproduce_checks_the_siglip_weights_and_reference_is_refused(root: Path, tmp_path: Path) -> None:
    pipe = _pipeline(root)
    pipe.set_redux(root / "flux1-redux-dev.safetensors", root / "siglip")
    (made,) = pipe.generate(_request(redux_image=_picture(9), steps=1))
    other = _pipeline(root)
    other.set_redux(root / "flux1-redux-dev.safetensors", _siglip_folder_seeded(tmp_path / "other", seed=4))
    with pytest.raises(GenerationError, match="made with SigLIP weights"):
        reproduce(other, made.record, redux=_picture(9))
    with pytest.raises(ReduxError, match="Redux picture and a reference picture cannot be combined"):
        pipe.generate(_request(redux_image=_picture(), reference=_picture()))


def _siglip_folder_seeded(folder: Path, seed: int) -> Path:
    _siglip_folder(folder)
    weights = transformers.SiglipVisionModel.from_pretrained(folder)
    torch.manual_seed(seed)
    for p in weights.parameters():
        torch.nn.init.normal_(p, std=0.02)
    weights.save_pretrained(folder)
    return folder


def test_pictor_info_says_what_a_redux_file_is(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pictor.cli import main

    assert main(["info", str(root / "flux1-redux-dev.safetensors")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "FLUX.1 Redux image embedder"
    assert (shown["siglip_dim"], shown["context_dim"]) == (SIGLIP_DIM, MODEL.context_in_dim)
