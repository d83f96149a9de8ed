"""FLUX.1 Kontext: context images read in context by the transformer (`pictor.context_images`).

Parity with diffusers' `FluxKontextPipeline` convention (its own `prepare_latents`: encoding, packing, ids
with the first coordinate 1; the transformer on the concatenated sequence, cut back to the generated tokens),
then the pipeline's behaviour: the context conditions, a Kontext model without one is plain FLUX, records
reproduce bit-exactly, batches are invariant, and misuse is refused with the reason.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pictor.checkpoint import BundleConfig, CheckpointError, load_bundle, save_bundle
from pictor.context_images import (
    KONTEXT_RESOLUTIONS,
    ContextImageError,
    context_pixels,
    context_size,
    context_tokens,
)
from pictor.convert import convert_flux
from pictor.editing import EditRequest
from pictor.guided_velocity import guided_velocity
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import FluxParams, make_img_ids
from pictor.models.text import build_text_encoder
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.presets import get_preset
from pictor.provenance import ProvenanceError, read_record
from pictor.reproduce import check_record, reproduce

from tiny_flux import load_benchmark_module, load_reference, random_flux

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxKontextPipeline  # noqa: E402
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

PICTOR = shutil.which("pictor")
# A latent shift and scale that are not 0 and 1, so a wrong order of the two shows.
AE_SCALE, AE_SHIFT = 0.3611, 0.1159


def _config(kontext: bool) -> BundleConfig:
    p = get_preset("tiny")
    return BundleConfig(
        name="tiny-kontext" if kontext else "tiny-dev",
        preset="tiny",
        # diffusers' transformer fixes mlp_ratio 4; guidance-distilled like FLUX.1 Kontext [dev]
        model={**p["model"], "mlp_ratio": 4.0, "guidance_embed": True},
        autoencoder={**p["autoencoder"], "scale_factor": AE_SCALE, "shift_factor": AE_SHIFT},
        text_encoder=p["text_encoder"],
        defaults={**p["defaults"], "guidance": 2.5, "guidance_mode": "distilled", "steps": 3},
        kontext=kontext,
    )


def _pipe(kontext: bool = True) -> Pipeline:
    config = _config(kontext)
    flux = random_flux(FluxParams.from_dict(config.model), seed=0)  # every weight random: all paths live
    torch.manual_seed(0)
    ae = AutoEncoder(AutoEncoderParams.from_dict(config.autoencoder)).eval()
    text = build_text_encoder(config.text_encoder)
    # The same weights under both flags: "without a context, a Kontext model is plain FLUX" is comparable.
    return Pipeline(flux, ae, text, config, device="cpu", dtype=torch.float32, model_id_hash="ab" * 32)


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return _pipe(kontext=True)


def _picture(seed: int = 0, size: tuple[int, int] = (40, 24)) -> Image.Image:
    """Smooth random colours (noise would be all high frequency, which the tiny autoencoder blurs away)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# --------------------------------------------------------------------------------------------- sizing


def test_context_size_is_diffusers_auto_resize_at_flux_size() -> None:
    for width, height in [(1000, 1000), (1920, 1080), (600, 1400), (512, 768), (3000, 1000)]:
        aspect = width / height
        # diffusers' FluxKontextPipeline._auto_resize, then its multiple-of-16 rounding
        _, w, h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
        assert context_size(width, height, 1024 * 1024, 16) == (w // 16 * 16, h // 16 * 16)
    # A smaller model's default area scales the list: 1024x1024 -> 32x32 for a 32x32 model.
    assert context_size(50, 50, 32 * 32, 4) == (32, 32)
    assert context_size(40, 24, 32 * 32, 4) == (40, 24)  # 1328x800 / 32 = 41.5x25 -> multiples of 4


def test_context_pixels_are_fitted_once_and_bad_images_named(tmp_path: Path) -> None:
    fitted = context_pixels(_picture(size=(80, 48)), 32 * 32, 4)
    assert fitted.shape == (24, 40, 3) and fitted.dtype == np.uint8
    np.testing.assert_array_equal(context_pixels(fitted, 32 * 32, 4), fitted)  # idempotent
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ContextImageError, match=r"context image .*bad.png: not a readable image"):
        context_pixels(bad, 1024, 4)
    with pytest.raises(ContextImageError, match="no such file"):
        context_pixels(tmp_path / "missing.png", 1024, 4)
    with pytest.raises(ContextImageError, match="uint8"):
        context_pixels(np.zeros((8, 8, 4), np.uint8), 1024, 4)
    with pytest.raises(ContextImageError, match="at least 8x8"):
        context_pixels(Image.new("RGB", (4, 30)), 1024, 4)


# ----------------------------------------------------------------------------------- diffusers parity


def _diffusers_vae(ae: AutoEncoder) -> torch.nn.Module:
    config = load_benchmark_module("_ae_reference").diffusers_config(ae.params)
    ref = diffusers.AutoencoderKL(**config).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(dict(ae.state_dict()), config), strict=True)
    return ref


def test_velocity_matches_diffusers_kontext_convention(pipe: Pipeline) -> None:
    """pictor's guided velocity against diffusers' FluxKontextPipeline.prepare_latents (its VAE encoding,
    packing and ids) and its transformer call on [noisy, context] tokens, sliced as the pipeline slices."""
    width, height = 32, 24  # the output's grid differs from the context's (40x24), as it may
    r = pipe.resolve_request(
        GenerationRequest("make the circle blue", width=width, height=height, context_image=_picture())
    )
    assert r.context_image.shape == (24, 40, 3)
    f = pipe.autoencoder.params.downsample_factor
    lat_h, lat_w = height // f, width // f
    batch = 2
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, (lat_h // 2) * (lat_w // 2), pipe.transformer.params.in_channels, generator=gen)
    t = torch.tensor([0.7, 0.7])
    ours = guided_velocity(pipe, r, batch, lat_h, lat_w)(x, t)

    # diffusers: its own prepare_latents on a stand-in `self` with the pieces it reads
    vae = _diffusers_vae(pipe.autoencoder)
    ns = SimpleNamespace(vae=vae, vae_scale_factor=f, latent_channels=pipe.autoencoder.params.z_channels)
    ns._encode_vae_image = lambda image, generator: FluxKontextPipeline._encode_vae_image(
        ns, image, generator
    )
    ns._pack_latents = FluxKontextPipeline._pack_latents
    ns._prepare_latent_image_ids = FluxKontextPipeline._prepare_latent_image_ids
    image = VaeImageProcessor(vae_scale_factor=f * 2).preprocess(Image.fromarray(r.context_image), 24, 40)
    latents, image_latents, latent_ids, image_ids = FluxKontextPipeline.prepare_latents(
        ns, image, batch, ns.latent_channels, height, width, torch.float32, torch.device("cpu"), None, x
    )
    # the ids pictor builds are diffusers' (context: first coordinate 1, its own 5x10 grid)
    tokens = context_tokens(pipe.autoencoder, r.context_image, torch.float32)
    assert torch.equal(tokens.ids[0], image_ids) and image_ids[:, 0].eq(1).all()
    assert torch.equal(make_img_ids(1, lat_h, lat_w)[0], latent_ids)
    assert (tokens.tokens[0] - image_latents[0]).abs().max() <= 1e-5
    ref = load_reference().build_reference(
        pipe.transformer.params, {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    )
    emb = pipe.encode_text([r.prompt])
    with torch.no_grad():
        theirs = ref(
            hidden_states=torch.cat([latents, image_latents], dim=1),
            encoder_hidden_states=emb.tokens.expand(batch, -1, -1),
            pooled_projections=emb.pooled.expand(batch, -1),
            timestep=t,
            img_ids=torch.cat([latent_ids, image_ids], dim=0),
            txt_ids=torch.zeros(emb.tokens.shape[1], 3),
            guidance=torch.full((batch,), 2.5),
            return_dict=False,
        )[0][:, : latents.shape[1]]
        plain = ref(  # the same call without the context: the context must matter
            hidden_states=latents,
            encoder_hidden_states=emb.tokens.expand(batch, -1, -1),
            pooled_projections=emb.pooled.expand(batch, -1),
            timestep=t,
            img_ids=latent_ids,
            txt_ids=torch.zeros(emb.tokens.shape[1], 3),
            guidance=torch.full((batch,), 2.5),
            return_dict=False,
        )[0]
    assert ours.shape == theirs.shape == x.shape
    assert theirs.abs().max() > 0.1 and (theirs - plain).abs().max() > 1e-2
    assert (ours - theirs).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------- the pipeline


def _request(**kw: object) -> GenerationRequest:
    return GenerationRequest("make the circle blue", seed=5, steps=3, **kw)  # type: ignore[arg-type]


def test_the_context_conditions_and_sets_the_size(pipe: Pipeline) -> None:
    # (The tiny random autoencoder decodes most latent changes to small pixel changes; without the
    # context's tokens both runs would be the same computation, bit for bit.)
    a = pipe.generate(_request(context_image=Image.new("RGB", (40, 24), (0, 0, 0))))[0]
    b = pipe.generate(_request(context_image=Image.new("RGB", (40, 24), (255, 255, 255))))[0]
    none = pipe.generate(_request(width=40, height=24))[0]
    assert a.image.size == (40, 24)  # the fitted context's size, as BFL's Kontext sampling does
    assert np.abs(_px(a.image) - _px(b.image)).mean() > 0.1  # another context, another image
    assert np.abs(_px(a.image) - _px(none.image)).mean() > 0.5  # a context, another image
    assert a.record["context_image"]["width"] == 40 and len(a.record["context_image"]["sha256"]) == 64
    assert a.record["context_image"] != b.record["context_image"]
    sized = pipe.generate(_request(context_image=_picture(0), width=32, height=32))[0]
    assert sized.image.size == (32, 32)


def test_without_a_context_a_kontext_model_is_plain_flux(pipe: Pipeline) -> None:
    plain = _pipe(kontext=False)  # the same weights, not marked Kontext
    ours = pipe.generate(_request())[0]
    theirs = plain.generate(_request())[0]
    np.testing.assert_array_equal(_px(ours.image), _px(theirs.image))
    assert "context_image" not in ours.record


def test_reproduce_is_bit_exact_and_needs_the_same_context(pipe: Pipeline, tmp_path: Path) -> None:
    src = tmp_path / "src.png"
    _picture(2).save(src)
    images = pipe.generate(_request(context_image=src, num_images=2))
    again = reproduce(pipe, images[1].record, context=src)
    np.testing.assert_array_equal(_px(again.image), _px(images[1].image))
    other = tmp_path / "other.png"
    _picture(3).save(other)
    with pytest.raises(GenerationError, match="not the one this image was made from"):
        reproduce(pipe, images[1].record, context=other)
    with pytest.raises(GenerationError, match="pass it with --context"):
        reproduce(pipe, images[1].record)
    plain = pipe.generate(_request())[0]
    with pytest.raises(GenerationError, match="without a context image; drop --context"):
        reproduce(pipe, plain.record, context=src)
    with pytest.raises(ProvenanceError, match="'context_image' is 'x', not an object"):
        check_record({**images[1].record, "context_image": "x"})


def test_a_context_applies_to_every_image_of_a_batch(pipe: Pipeline) -> None:
    batched = pipe.generate(_request(context_image=_picture(), num_images=3))
    for i, g in enumerate(batched):
        single = pipe.generate(
            GenerationRequest("make the circle blue", seed=5 + i, steps=3, context_image=_picture())
        )[0]
        assert np.abs(_px(g.image) - _px(single.image)).max() <= 1  # float rounding across batch shapes


def test_edits_take_a_context_and_reproduce(pipe: Pipeline, tmp_path: Path) -> None:
    src, ctx = tmp_path / "src.png", tmp_path / "ctx.png"
    _picture(4, (32, 32)).save(src)
    _picture(5).save(ctx)
    edit = EditRequest(image=src, prompt="make it blue", strength=0.8, seed=1, steps=3)
    with_context = pipe.edit(EditRequest(**{**edit.__dict__, "context_image": ctx}))[0]
    without = pipe.edit(edit)[0]
    assert with_context.image.size == (32, 32)  # an edit keeps its source's size
    assert np.abs(_px(with_context.image) - _px(without.image)).mean() > 0.5
    again = reproduce(pipe, with_context.record, source=src, context=ctx)
    np.testing.assert_array_equal(_px(again.image), _px(with_context.image))


def test_misuse_is_refused_with_the_reason(pipe: Pipeline, tmp_path: Path) -> None:
    with pytest.raises(GenerationError, match=r"not a FLUX.1 Kontext model.*--kontext"):
        _pipe(kontext=False).generate(_request(context_image=_picture()))
    with pytest.raises(GenerationError, match="2 context images were given"):
        pipe.generate(_request(context_image=[_picture(0), _picture(1)]))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(GenerationError, match="not a readable image"):
        pipe.generate(_request(context_image=bad))
    with pytest.raises(GenerationError, match="hires fix cannot be combined with a context image"):
        pipe.generate(_request(context_image=_picture(), hires_scale=2.0))
    with pytest.raises(GenerationError, match="layout cannot be combined with a context image"):
        pipe.generate(_request(context_image=_picture(), layout=[{"box": [0, 0, 1, 1], "phrase": "x"}]))


# ------------------------------------------------------------------------------ bundles, presets, CLI


def test_the_flag_round_trips_and_is_checked(tmp_path: Path) -> None:
    assert get_preset("flux-kontext-dev")["kontext"] is True
    assert "kontext" not in _config(False).to_dict()  # other bundles' config.json stay as they were
    assert BundleConfig.from_dict(_config(True).to_dict()).kontext is True
    with pytest.raises(CheckpointError, match="'kontext' is 'yes'; it must be true or false"):
        BundleConfig.from_dict({**_config(True).to_dict(), "kontext": "yes"})
    plain = _config(True).to_dict()
    plain["model"] = {**plain["model"], "guidance_embed": False}  # schnell-like: no Kontext model
    with pytest.raises(CheckpointError, match="'kontext' is true, but the model has no guidance embedding"):
        BundleConfig.from_dict(plain)


def test_the_context_is_encoded_in_tiles_when_the_run_is(pipe: Pipeline) -> None:
    """--vae-tile bounds the autoencoder's memory: the context's encode is tiled too (recorded as ever)."""
    shapes: list[tuple[int, ...]] = []
    hook = pipe.autoencoder.encoder.register_forward_pre_hook(lambda _m, a: shapes.append(tuple(a[0].shape)))
    try:
        request = GenerationRequest("make it blue", seed=1, steps=1, context_image=_picture(0, (64, 40)))
        pipe.generate(request)
        whole = list(shapes)
        shapes.clear()
        (tiled,) = pipe.generate(replace(request, vae_tile=16, vae_tile_overlap=8))
    finally:
        hook.remove()
    assert len(whole) == 1 and len(shapes) > 1, (whole, shapes)
    assert max(h * w for *_, h, w in shapes) < whole[0][2] * whole[0][3]
    assert tiled.record["vae_tile"] == 16


def _flux_files(root: Path, guidance_embed: bool) -> list[Path]:
    # Head size 32 split 1:7:7 as FLUX.1 does, so the single file's shapes read back as these params
    params = {**get_preset("tiny")["model"], "hidden_size": 64, "axes_dim": [4, 14, 14]}
    flux = random_flux(FluxParams.from_dict({**params, "guidance_embed": guidance_embed}))
    ae = AutoEncoder(AutoEncoderParams.from_dict(get_preset("tiny")["autoencoder"]))
    sd = {f"model.diffusion_model.{k}": v.contiguous() for k, v in flux.state_dict().items()}
    save_file(sd, root / "flux1-kontext-dev.safetensors")
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, root / "ae.safetensors")
    for name in ("t5", "clip"):
        (root / name).mkdir(exist_ok=True)
        (root / name / "config.json").write_text("{}")
    return [root / "flux1-kontext-dev.safetensors", root / "ae.safetensors", root / "t5", root / "clip"]


def test_convert_flux_marks_a_kontext_file(tmp_path: Path) -> None:
    files = _flux_files(tmp_path, guidance_embed=True)
    bundle = load_bundle(convert_flux(*files, tmp_path / "kontext", kontext=True))
    assert bundle.config.kontext and bundle.config.preset == "flux-kontext-dev"
    assert bundle.config.defaults["guidance"] == 2.5
    plain = load_bundle(convert_flux(*files, tmp_path / "dev")).config
    assert not plain.kontext and plain.preset == "flux-dev"  # the keys alone cannot tell Kontext
    schnell = _flux_files(tmp_path, guidance_embed=False)
    with pytest.raises(CheckpointError, match="--kontext, but the file has no guidance_in"):
        convert_flux(*schnell, tmp_path / "bad", kontext=True)
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(PICTOR is None, reason="the pictor console script is not installed")
def test_cli_generate_with_context_and_reproduce(pipe: Pipeline, tmp_path: Path) -> None:
    bundle = tmp_path / "tiny-kontext"
    save_bundle(bundle, pipe.config, pipe.transformer.state_dict(), pipe.autoencoder.state_dict())
    src, other = tmp_path / "src.png", tmp_path / "other.png"
    _picture(6).save(src)
    _picture(7).save(other)
    base = [str(PICTOR), "generate", "make it blue", "--model", str(bundle), "--device", "cpu"]
    run = subprocess.run(
        [*base, "--context", str(src), "--steps", "2", "--seed", "3", "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    made = Path(run.stdout.split()[0])
    assert read_record(made)["context_image"]["width"] == 40
    rep = [str(PICTOR), "reproduce", str(made), "--model", str(bundle), "--device", "cpu"]
    ok = subprocess.run(
        [*rep, "--context", str(src), "-o", str(tmp_path / "r")], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "identical" in ok.stderr
    wrong = subprocess.run([*rep, "--context", str(other)], capture_output=True, text=True)
    assert wrong.returncode != 0 and "not the one this image was made from" in wrong.stderr
    two = subprocess.run(
        [*base, "--context", str(src), "--context", str(other)], capture_output=True, text=True
    )
    assert two.returncode != 0 and "2 context images were given" in two.stderr
