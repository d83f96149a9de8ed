"""The server's edits with upscaling (`upscale`, `upscaler`), inpainting only the masked area (`inpaint_area`,
`mask_padding`, `inpaint_size`), and prompt weights (`prompt_weights`, generations too): the same pictures as
the pipeline's, kept by queued jobs, refused by name in the API's words."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.editing import EditError, EditRequest
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.serve.pipeline_errors import api_message, field_of
from pictor.serve.settings import Limits
from tests.serve import test_upscale_api
from tests.serve.conftest import assert_refused, decode_images
from tests.serve.test_upscale_api import NAME

# The upscale tests' fixtures: the tiny model with a tiny upscale model loaded, and its file.
upscaler_file = test_upscale_api.upscaler_file
upscaling = test_upscale_api.upscaling

BODY = {"prompt": "a red circle", "size": "64x64", "steps": 3, "seed": 2, "response_format": "b64_json"}


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _source(size: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 90)], -1).astype(np.uint8)


def _edit(client: TestClient, source: np.ndarray, path: str = "/v1/images/edits", **fields: Any) -> Any:
    data = {"prompt": "a blue square", "seed": "4", "steps": "2", "response_format": "b64_json"}
    data |= {k: str(v) for k, v in fields.items() if k != "mask"}
    files = {"image": ("source.png", png(source), "image/png")}
    if "mask" in fields:
        files["mask"] = ("mask.png", png(fields["mask"]), "image/png")
    return client.post(path, data=data, files=files)


def test_an_upscaling_edit_is_the_pipelines_and_its_job_keeps_it(
    make_client: Callable[..., TestClient], upscaling: Pipeline, wait_job: Callable[..., Any]
) -> None:
    client = make_client(upscaling)
    source = _source()
    ((pixels, record),) = decode_images(_edit(client, source, upscale=2, upscaler=NAME))
    (direct,) = upscaling.edit(
        EditRequest(Image.fromarray(source), "a blue square", seed=4, steps=2, upscale=2, upscaler=NAME)
    )
    assert pixels.shape == (64, 64, 3) and np.array_equal(pixels, np.asarray(direct.image))
    assert record["source_upscale"]["upscaler"] == NAME and record["strength"] == 0.3
    ((lanczos, record),) = decode_images(_edit(client, source, upscale=2, upscaler="lanczos"))
    assert record["source_upscale"]["upscaler"] == "lanczos" and not np.array_equal(lanczos, pixels)

    r = _edit(client, source, "/v1/jobs/edits", upscale=2, upscaler=NAME)
    assert r.status_code == 202, r.text
    request = r.json()["request"]
    assert (request["width"], request["height"]) == (64, 64) and request["upscaler"] == NAME
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    path = client.app.state.service.store.image_path(job["results"][0]["image_id"])
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), pixels)


def test_upscaling_edits_are_refused_by_name(
    make_client: Callable[..., TestClient], upscaling: Pipeline, tiny: Pipeline
) -> None:
    client, source = make_client(upscaling), _source()
    assert_refused(_edit(client, source, upscale=1), "upscale", "upscale must be a number above 1")
    r = _edit(client, source, upscale=2, upscaler="4x-UltraSharp")
    assert_refused(r, "upscaler", f"upscaler '4x-UltraSharp' is not loaded ('{NAME}' is)")
    assert "GET /v1/models" in r.json()["error"]["message"] and "(--upscaler FILE," not in r.text  # the CLI's
    assert_refused(_edit(client, source, upscaler=NAME), "upscale", "give the upscale factor too")
    assert_refused(_edit(client, source, upscale=2, size="32x32"), "size", "follows from upscale; omit size")
    # the server's pixel limit applies to the enlarged picture (TEST_LIMITS: 128x128 at most)
    assert_refused(_edit(client, _source(64), upscale=4), "upscale", "upscale makes 256x256")
    plain = make_client(tiny)  # a server without an upscale model
    r = _edit(plain, source, upscale=2, upscaler=NAME)
    assert_refused(r, "upscaler", f"upscaler '{NAME}' is not loaded (none is)")


def test_the_masked_area_is_drawn_apart_and_blended_back(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    source = _source(64)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:20, 40:56] = 255
    fields = {"mask": mask, "inpaint_area": "masked", "mask_padding": 4, "inpaint_size": "32x32"}
    ((pixels, record),) = decode_images(_edit(client, source, **fields))
    assert pixels.shape == (64, 64, 3) and np.array_equal(pixels[mask == 0], source[mask == 0])
    assert record["inpaint_area"] == "masked" and record["mask_padding"] == 4
    assert (record["width"], record["height"]) == (32, 32)
    request = EditRequest(Image.fromarray(source), "a blue square", mask=Image.fromarray(mask), seed=4,
                          steps=2, inpaint_area="masked", mask_padding=4, inpaint_size=(32, 32))  # fmt: skip
    (direct,) = tiny.edit(request)
    assert np.array_equal(pixels, np.asarray(direct.image))

    r = _edit(client, source, "/v1/jobs/edits", **fields)
    assert r.status_code == 202, r.text
    assert r.json()["request"]["inpaint_size"] == [32, 32]
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    path = client.app.state.service.store.image_path(job["results"][0]["image_id"])
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), pixels)

    assert_refused(_edit(client, source, inpaint_area="masked"), "inpaint_area", "give a mask")
    assert_refused(_edit(client, source, mask=mask, mask_padding=8), "mask_padding", "inpaint_area masked")
    r = _edit(client, source, mask=mask, inpaint_area="masked", inpaint_size="30x32")
    assert_refused(r, "inpaint_size", "must have both sides multiples of")
    r = _edit(client, source, mask=mask, inpaint_area="masked", inpaint_size="256x256")
    assert_refused(r, "inpaint_size", "inpaint_size makes 256x256")
    assert _edit(client, source, mask=mask, inpaint_area="box").status_code in (400, 422)


def test_prompt_weights_in_generations_edits_and_jobs(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    body = {**BODY, "prompt": "a (red:1.6) circle", "prompt_weights": True}
    ((pixels, record),) = decode_images(client.post("/v1/images/generations", json=body))
    (direct,) = tiny.generate(
        GenerationRequest("a (red:1.6) circle", width=64, height=64, steps=3, seed=2, prompt_weights=True)
    )
    assert record["prompt_weights"] is True and np.array_equal(pixels, np.asarray(direct.image))
    ((text, record),) = decode_images(
        client.post("/v1/images/generations", json={**body, "prompt_weights": False})
    )
    assert "prompt_weights" not in record and not np.array_equal(text, pixels)

    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202 and r.json()["request"]["prompt_weights"] is True, r.text
    job = wait_job(client, r.json()["id"])
    path = client.app.state.service.store.image_path(job["results"][0]["image_id"])
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), pixels)

    ((_, record),) = decode_images(
        _edit(client, _source(), prompt="a (blue:1.5) square", prompt_weights="true")
    )
    assert record["prompt_weights"] is True
    r = client.post("/v1/images/generations", json={**body, "negative_prompt": "(x:1.2.3)"})
    assert_refused(r, "negative_prompt", "prompt weight '1.2.3' at character 4 is not a number")
    r = client.post("/v1/images/generations", json={**body, "prompt": "(x:99)"})
    assert_refused(r, "prompt", "outside [-10, 10]")


def test_the_new_edit_messages_name_their_field_in_api_words(tiny: Pipeline) -> None:
    source = Image.fromarray(_source())
    mask = Image.fromarray(np.full((32, 32), 255, np.uint8))
    cases = [
        ({"upscale": 9}, "upscale"),
        ({"upscaler": "x"}, "upscale"),
        ({"upscale": 2, "upscaler": "x"}, "upscaler"),
        ({"upscale": 2, "mask": mask, "inpaint_area": "masked"}, "inpaint_area"),
        ({"inpaint_area": "masked"}, "inpaint_area"),
        ({"mask": mask, "mask_padding": 3}, "mask_padding"),
        ({"mask": mask, "inpaint_area": "masked", "inpaint_size": (30, 30)}, "inpaint_size"),
        ({"mask": mask, "inpaint_area": "masked", "mask_padding": -2}, "mask_padding"),
    ]
    for change, field in cases:
        with pytest.raises(EditError) as info:
            tiny.edit(EditRequest(source, "x", steps=1, **change))
        text = str(info.value)
        assert field_of(text) == field, (text, field)
        assert not re.findall(r"--(?!upscaler FILE\))[a-z][a-z-]*", api_message(text)), api_message(text)
    with pytest.raises(GenerationError) as info:
        tiny.generate(GenerationRequest("(a:1.2.3)", steps=1, prompt_weights=True))
    assert field_of(str(info.value)) == "prompt"


def test_a_masked_area_is_drawn_within_the_servers_pixel_limit(
    make_client: Callable[..., TestClient], tiny: Pipeline
) -> None:
    """A masked area is drawn at the model's default pixel count when no inpaint_size is given: a server whose
    limit is lower refuses it, naming inpaint_area, as it would refuse that size sent."""
    client = make_client(tiny, limits=Limits(max_pixels=16 * 16, max_steps=2000, max_images=8))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    r = _edit(client, _source(16), mask=mask, inpaint_area="masked")
    assert_refused(r, "inpaint_area", "inpaint_area makes 32x32")
    r = _edit(client, _source(16), mask=mask, inpaint_area="masked", inpaint_size="16x16")
    assert r.status_code == 200, r.text


def test_variations_take_prompt_weights(client: TestClient) -> None:
    data = {"prompt": "a (red:1.5) circle", "prompt_weights": "true", "seed": "1", "steps": "2"}
    files = {"image": ("source.png", png(_source()), "image/png")}
    r = client.post("/v1/images/variations", data={**data, "response_format": "b64_json"}, files=files)
    ((_, record),) = decode_images(r)
    assert record["prompt_weights"] is True
