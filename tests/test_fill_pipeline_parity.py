"""FLUX.1 Fill [dev]: diffusers' FluxFillPipeline against `pictor edit` on the same tiny random components
(CLIP + T5 folders, autoencoder, a guidance-distilled transformer whose input is the noise, the masked
picture's latents and the folded mask): the same noise, picture, mask and prompt give the same picture
inside the mask, and pictor keeps the source's pixels outside it. This pins the masked picture's encoding,
the mask's folding, the channel order and the distilled guidance at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.checkpoint import BundleConfig
from pictor.editing import EditRequest
from pictor.fill_images import FillError, fold_mask, is_fill_model
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import FluxParams, pack_latents
from pictor.models.text import build_text_encoder
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline

from tiny_flux import random_flux
from tiny_text_folders import T5_LEN, diffusers_components, flux_text_encoders

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.pipelines.flux import pipeline_flux_fill  # noqa: E402

AE = AutoEncoderParams(
    resolution=32,
    in_channels=3,
    ch=32,
    out_ch=3,
    ch_mult=[1, 2],  # factor 2: the folded mask is 4 channels a latent pixel, 16 a token
    num_res_blocks=1,
    z_channels=4,
    scale_factor=0.3611,
    shift_factor=0.1159,
)
MODEL = FluxParams(
    in_channels=2 * 16 + 16,  # noise (4 x 4), masked-picture latents (4 x 4), folded mask (4 x 2^2)
    out_channels=16,
    vec_in_dim=32,
    context_in_dim=32,
    hidden_size=32,
    mlp_ratio=4.0,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=[4, 6, 6],
    guidance_embed=True,
)


def _pipeline(root: Path) -> Pipeline:
    text = flux_text_encoders(root)
    config = BundleConfig(
        name="tiny-fill",
        model=MODEL.to_dict(),
        autoencoder=AE.to_dict(),
        text_encoder=text,
        defaults={
            "width": 32,
            "height": 32,
            "steps": 3,
            "guidance": 2.5,
            "sampler": "euler",
            "schedule": "flux",
            "guidance_mode": "distilled",
        },
    )
    flux = random_flux(MODEL, seed=0)
    torch.manual_seed(0)
    ae = AutoEncoder(AE).eval()
    return Pipeline(flux, ae, build_text_encoder(text), config, device="cpu", dtype=torch.float32)


def test_the_mask_folds_as_diffusers_folds_it() -> None:
    mask = np.random.default_rng(0).random((8, 12)) > 0.5
    ours = fold_mask(mask, 2)
    theirs = torch.from_numpy(mask.astype(np.float32))[None].view(1, 4, 2, 6, 2).permute(0, 2, 4, 1, 3)
    assert torch.equal(ours, theirs.reshape(1, 4, 4, 6))
    assert is_fill_model(MODEL, 2) and not is_fill_model(
        FluxParams(**{**MODEL.to_dict(), "in_channels": 16}), 2
    )


def test_flux_fill_pipeline_and_pictor_edit_paint_the_same_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = _pipeline(tmp_path)
    assert pipe.fill
    rng = np.random.default_rng(0)
    width, height, seed, prompt = 32, 24, 7, "blue circle"
    source = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    repaint = np.zeros((height, width), bool)
    repaint[3:16, 7:28] = True  # odd edges: some latent pixels are partly masked (the fold matters)
    mask = Image.fromarray(repaint.astype(np.uint8) * 255)
    request = EditRequest(
        source, prompt, mask=mask, strength=1.0, feather=0, seed=seed, steps=3, guidance=2.5
    )
    (ours,) = pipe.edit(request)
    got = np.asarray(ours.image).astype(int)

    theirs_pipe = diffusers.FluxFillPipeline(**diffusers_components(tmp_path, pipe))
    # diffusers draws the masked picture's latents from the encoder's distribution, pictor takes its mean.
    original = pipeline_flux_fill.retrieve_latents
    monkeypatch.setattr(
        pipeline_flux_fill,
        "retrieve_latents",
        lambda out, generator=None, sample_mode="sample": original(out, generator, "argmax"),
    )
    noise = pipe.initial_noise([seed], height // 2, width // 2)
    theirs = theirs_pipe(
        image=source,
        mask_image=mask,
        prompt=prompt,
        height=height,
        width=width,
        num_inference_steps=3,
        guidance_scale=2.5,
        strength=1.0,
        latents=pack_latents(noise),
        max_sequence_length=T5_LEN,
        output_type="pt",
    ).images[0]
    want = (theirs.permute(1, 2, 0).numpy() * 255).round().astype(int)
    inside = np.abs(got - want)[repaint]
    assert inside.max() <= 1, f"max |pictor - diffusers| inside the mask = {inside.max()} levels"
    assert np.array_equal(got[~repaint], np.asarray(source).astype(int)[~repaint])  # kept pixels, exactly
    # Not trivially equal: the painted region is not the source's pixels.
    assert np.abs(got - np.asarray(source).astype(int))[repaint].mean() > 20


def test_a_fill_model_refuses_what_it_cannot_draw(tmp_path: Path) -> None:
    pipe = _pipeline(tmp_path)
    source = Image.new("RGB", (32, 32), "white")
    with pytest.raises(FillError, match="repaints the masked part"):
        pipe.generate(GenerationRequest("a red circle", width=32, height=32, steps=2, seed=1))
    with pytest.raises(FillError, match="give a picture and a mask"):
        pipe.edit(EditRequest(source, "a red circle", strength=0.5, steps=2, seed=1))
    mask = Image.new("L", (32, 32), 255)
    with pytest.raises(GenerationError, match=r"not a FLUX\.1 Kontext model"):
        pipe.edit(EditRequest(source, "x", mask=mask, steps=2, seed=1, context_image=source))
    (painted,) = pipe.edit(EditRequest(source, "x", mask=mask, steps=2, seed=1))  # the whole picture
    assert painted.image.size == (32, 32) and painted.record["mask"]["sha256"]


def test_outpainting_with_a_fill_model_paints_the_new_area(tmp_path: Path) -> None:
    pipe = _pipeline(tmp_path)
    rng = np.random.default_rng(1)
    source = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    (out,) = pipe.edit(EditRequest(source, "red", expand=(0, 0, 8, 0), feather=0, steps=2, seed=3))
    got = np.asarray(out.image).astype(int)
    assert got.shape == (24, 32, 3) and out.record["mode"] == "outpaint"
    assert np.array_equal(got[:, :24], np.asarray(source).astype(int))  # the picture, kept exactly
    edge = np.repeat(np.asarray(source)[:, -1:].astype(int), 8, axis=1)  # what the area starts from
    assert np.abs(got[:, 24:] - edge).mean() > 5  # painted by the model, not the replicated edge
