"""A FLUX.1 Fill model behind the HTTP API: edits with a mask paint as `Pipeline.edit` does, generations,
variations and unmasked edits are a 400 that says what the model needs, and the model card says `fill`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from pictor.checkpoint import BundleConfig
from pictor.editing import EditRequest
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import FluxParams
from pictor.models.text import build_text_encoder
from pictor.pipeline import Pipeline
from pictor.presets import get_preset
from tests.serve.conftest import decode_images
from tests.serve.test_edits import edit, png_bytes, source_image

from tiny_flux import random_flux


@pytest.fixture(scope="module")
def fill() -> Pipeline:
    return fill_pipeline()


def fill_pipeline() -> Pipeline:
    """The tiny preset widened to FLUX.1 Fill's input: noise, masked-picture latents and the folded mask."""
    p = get_preset("tiny")
    ae = AutoEncoderParams.from_dict(p["autoencoder"])
    f, out = ae.downsample_factor, p["model"]["out_channels"]
    model = {**p["model"], "mlp_ratio": 4.0, "guidance_embed": True, "in_channels": 2 * out + 4 * f * f}
    config = BundleConfig(
        name="tiny-fill",
        preset="tiny",
        model=model,
        autoencoder=p["autoencoder"],
        text_encoder=p["text_encoder"],
        defaults={**p["defaults"], "guidance": 2.5, "guidance_mode": "distilled", "steps": 2},
    )
    flux = random_flux(FluxParams.from_dict(model), seed=0)
    torch.manual_seed(0)
    text = build_text_encoder(config.text_encoder)
    return Pipeline(flux, AutoEncoder(ae).eval(), text, config, device="cpu", dtype=torch.float32)


def test_a_fill_model_paints_masked_edits_and_refuses_the_rest(
    make_client: Callable[..., TestClient], fill: Pipeline
) -> None:
    client = make_client(fill)
    (card,) = client.get("/v1/models").json()["data"]
    assert card["fill"] is True and card["kontext"] is False
    source = source_image()
    repaint = np.zeros((32, 32), np.uint8)
    repaint[8:24, 4:20] = 255
    mask = Image.fromarray(repaint)
    ((pixels, record),) = decode_images(edit(client, png_bytes(source), mask=png_bytes(mask), seed=5))
    (direct,) = fill.edit(EditRequest(source, "a red circle", mask=mask, seed=5))
    assert np.array_equal(pixels, np.asarray(direct.image)) and record["mode"] == "inpaint"
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "response_format": "b64_json"})
    assert r.status_code == 400 and "FLUX.1 Fill model" in r.json()["error"]["message"], r.text
    r = edit(client, png_bytes(source), strength=0.5)
    assert r.status_code == 400 and "give a picture and a mask" in r.json()["error"]["message"], r.text


def test_other_models_cards_say_fill_false(client: TestClient) -> None:
    assert client.get("/v1/models").json()["data"][0]["fill"] is False
