"""FLUX.1 Kontext through the multipart edit endpoints: the `context_image` file of POST /v1/images/edits and
/v1/jobs/edits reaches `Pipeline.edit` as the Python API's `EditRequest(context_image=...)` does, is kept
for the queued job, and a model that is not Kontext or a bad file is a 4xx that names the field and keeps
nothing."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.editing import EditRequest
from pictor.pipeline import Pipeline
from pictor.serve.settings import Limits
from tests.serve.conftest import GatedPipeline
from tests.serve.conftest import upload_names as _uploads
from tests.test_kontext import _picture, _pipe

PROMPT = "make the circle blue"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


SOURCE = _png(_picture(4, (32, 32)))
CONTEXT = _png(_picture(5))


def _edit(
    client: TestClient, context: bytes | None = CONTEXT, path: str = "/v1/images/edits", **data: object
) -> Any:
    files = {"image": ("source.png", SOURCE, "image/png")}
    if context is not None:
        files["context_image"] = ("context.png", context, "image/png")
    form = {"prompt": PROMPT, "response_format": "b64_json", "seed": "3", "steps": "2", "strength": "0.8"}
    return client.post(path, files=files, data={**form, **{k: str(v) for k, v in data.items()}})


def _decoded(png: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        return np.asarray(im.convert("RGB")), json.loads(im.text["pictor"])


def _direct(pipe: Pipeline, context: Image.Image | None) -> tuple[np.ndarray, dict[str, Any]]:
    """The same edit through the Python API."""
    (result,) = pipe.edit(
        EditRequest(
            image=Image.open(io.BytesIO(SOURCE)),
            prompt=PROMPT,
            strength=0.8,
            seed=3,
            steps=2,
            context_image=context,
        )
    )
    return np.asarray(result.image), result.record


@pytest.fixture(scope="module")
def kontext() -> Pipeline:
    return _pipe(kontext=True)


def test_an_edit_takes_a_context_file_as_the_python_api_does(
    make_client: Callable[..., TestClient], kontext: Pipeline
) -> None:
    client = make_client(kontext)
    r = _edit(client)
    assert r.status_code == 200, r.text
    pixels, record = _decoded(base64.b64decode(r.json()["data"][0]["b64_json"]))
    assert pixels.shape == (32, 32, 3)  # an edit keeps its source's size, whatever the context's
    want, direct = _direct(kontext, Image.open(io.BytesIO(CONTEXT)))
    assert np.array_equal(pixels, want)
    assert record["mode"] == "img2img" and record["context_image"] == direct["context_image"]
    without, _ = _direct(kontext, None)
    assert not np.array_equal(pixels, without)  # the context changed the picture: it was not dropped


def test_a_16_bit_context_file_is_scaled_as_the_python_api_scales_it(
    make_client: Callable[..., TestClient], kontext: Pipeline
) -> None:
    """65535 -> 255, as the CLI and Python API read it, not clipped to white by Pillow's conversion."""
    picture = Image.fromarray((np.linspace(0, 65535, 40 * 24).reshape(24, 40)).astype(np.uint16))
    assert picture.mode.startswith("I")
    r = _edit(make_client(kontext), context=_png(picture))
    assert r.status_code == 200, r.text
    _, record = _decoded(base64.b64decode(r.json()["data"][0]["b64_json"]))
    assert record["context_image"] == _direct(kontext, picture)[1]["context_image"]


def test_a_queued_edit_keeps_its_context_and_a_refused_one_keeps_nothing(
    make_client: Callable[..., TestClient], kontext: Pipeline, wait_job: Callable[..., Any]
) -> None:
    """The job is held behind another so that it runs from the kept upload (as after a restart), not from
    the request's bytes; a job the full queue refuses leaves no upload behind."""
    gated = GatedPipeline(kontext)
    client = make_client(gated, queue_size=1)
    busy = client.post("/v1/jobs", json={"prompt": "keeps the worker busy", "steps": 1}).json()
    assert gated.gate.reached.wait(10)
    r = _edit(client, path="/v1/jobs/edits", response_format="url")
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["request"]["kind"] == "edit" and job["request"]["context_image"]
    kept = _uploads(client)
    assert f"{job['request']['context_image']}.png" in kept and len(kept) == 2  # the source and context

    full = _edit(client, path="/v1/jobs/edits", response_format="url")
    assert full.status_code == 429, full.text
    assert _uploads(client) == kept

    gated.gate.armed = False
    gated.gate.release.set()
    assert wait_job(client, busy["id"])["status"] == "succeeded"
    done = wait_job(client, job["id"])
    assert done["status"] == "succeeded", done
    pixels, record = _decoded(client.get(done["results"][0]["url"]).content)
    want, direct = _direct(kontext, Image.open(io.BytesIO(CONTEXT)))
    assert np.array_equal(pixels, want)
    assert record["context_image"] == direct["context_image"]


def test_a_model_that_is_not_kontext_refuses_a_context_file(client: TestClient) -> None:
    for path in ("/v1/images/edits", "/v1/jobs/edits"):
        r = _edit(client, path=path)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "not a FLUX.1 Kontext model" in error["message"] and error["param"] == "context_image"
    assert client.get("/v1/jobs").json()["total"] == 0
    assert _uploads(client) == []


def test_bad_context_files_are_4xx_that_name_the_field_and_keep_nothing(
    make_client: Callable[..., TestClient], kontext: Pipeline
) -> None:
    limits = Limits(
        max_pixels=64 * 64, max_steps=20, max_images=4, max_upload_bytes=20_000, max_picture_pixels=50_000
    )
    client = make_client(kontext, limits=limits)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8))
    for context, status, code, message in [
        (b"GIF89a not an image", 400, "invalid_image", "not a readable PNG, JPEG or WebP"),
        (_png(noisy), 413, "upload_too_large", "the upload limit is 20000 bytes"),
        (_png(Image.new("RGB", (300, 200))), 400, "image_too_large", "the limit is 50000"),
        (_png(_picture(1, (4, 4))), 400, "invalid_parameters", "at least 8x8"),
    ]:
        r = _edit(client, context=context)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["param"] == "context_image" and error["code"] == code, error
        assert message in error["message"], error
    assert client.get("/v1/jobs").json()["total"] == 0
    assert _uploads(client) == []
    # Fitted before use, so held to max_picture_pixels, not to the output limit (max_pixels, 4096).
    r = _edit(client, context=_png(_picture(1, (120, 80))))
    assert r.status_code == 200, r.text


def test_unknown_fields_are_still_refused(make_client: Callable[..., TestClient], kontext: Pipeline) -> None:
    r = _edit(make_client(kontext), context_imag="typo")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "context_imag" and "context_image" in error["message"]  # names the right one
