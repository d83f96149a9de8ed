"""The whole of diffusers' FluxKontextPipeline against pictor's Pipeline on the same tiny random components
(CLIP + T5 folders, autoencoder, guidance-distilled transformer): the same noise, the same context picture
and prompt give the same decoded image to float tolerance. This pins every convention at once: text
conditioning, context encoding and ids, the schedule and its resolution shift, the distilled guidance, the
slicing of the output, the decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.checkpoint import BundleConfig
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import FluxParams, pack_latents
from pictor.models.text import build_text_encoder
from pictor.pipeline import GenerationRequest, Pipeline

from tiny_flux import random_flux
from tiny_text_folders import T5_LEN, diffusers_components, flux_text_encoders

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def test_flux_kontext_pipeline_and_pictor_make_the_same_image(tmp_path: Path) -> None:
    text = flux_text_encoders(tmp_path)
    model = FluxParams(
        in_channels=16,
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
    ae_params = AutoEncoderParams(
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
    config = BundleConfig(
        name="tiny-kontext",
        model=model.to_dict(),
        autoencoder=ae_params.to_dict(),
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
        kontext=True,
    )
    flux = random_flux(model, seed=0)
    torch.manual_seed(0)
    ae = AutoEncoder(ae_params).eval()
    pipe = Pipeline(flux, ae, build_text_encoder(text), config, device="cpu", dtype=torch.float32)

    rng = np.random.default_rng(0)
    context = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((40, 24))
    prompt, seed, width, height = "blue circle", 7, 32, 24  # within the tiny CLIP's 16 letter-tokens
    request = GenerationRequest(prompt, width=width, height=height, seed=seed, context_image=context)
    r = pipe.resolve_request(request)
    fitted = Image.fromarray(r.context_image)  # pictor's fitting, handed to diffusers as is (see below)
    # pictor's decoded pixels before rounding to 8 bits, in diffusers' "pt" range [0, 1]
    ours = (pipe.sample(r, [seed], lambda i, n: None)[0] / 2 + 0.5).clamp(0, 1)

    theirs_pipe = diffusers.FluxKontextPipeline(**diffusers_components(tmp_path, pipe))
    noise = pipe.initial_noise([seed], height // 2, width // 2)  # pictor's CPU noise, packed for diffusers
    theirs = theirs_pipe(
        image=fitted,
        prompt=prompt,
        height=height,
        width=width,
        num_inference_steps=3,
        guidance_scale=2.5,
        latents=pack_latents(noise),
        max_sequence_length=T5_LEN,
        # the preferred-resolution list is FLUX-sized; pictor scales it to the model's default area, so the
        # fitted picture goes in as it is and diffusers' own resizing is off
        _auto_resize=False,
        max_area=width * height,
        output_type="pt",
    ).images[0]
    assert ours.shape == theirs.shape == (3, height, width)
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-5, f"max |pictor - diffusers| = {diff:.3g}"
    # and not trivially equal: without the context the same seed gives a clearly different picture
    plain = pipe.resolve_request(GenerationRequest(prompt, width=width, height=height, seed=seed))
    without = (pipe.sample(plain, [seed], lambda i, n: None)[0] / 2 + 0.5).clamp(0, 1)
    assert (without - ours).abs().max().item() > 100 * max(diff, 1e-6)
