"""FLUX.1 Kontext through the HTTP API: the `context_image` field (base64, extra_body for the openai client)
reaches the pipeline and the PNG's record, the picture is kept for the job, and a model that is not Kontext
or a bad picture is a 400 that names the field."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.pipeline import GenerationRequest, Pipeline
from pictor.serve.settings import Limits
from tests.serve.conftest import wait_for
from tests.test_kontext import _picture, _pipe


def _png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    _picture(seed).save(buf, "PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _body(**extra: object) -> dict[str, object]:
    return {"prompt": "make the circle blue", "response_format": "b64_json", "seed": 3, "steps": 2, **extra}


@pytest.fixture(scope="module")
def kontext() -> Pipeline:
    return _pipe(kontext=True)


def test_a_context_reaches_the_pipeline_the_record_and_the_job(
    make_client: Callable[..., TestClient], kontext: Pipeline, tmp_path: Path
) -> None:
    client = make_client(kontext)
    r = client.post("/v1/images/generations", json=_body(context_image=_b64(_png())))
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))) as im:
        im.load()
        pixels, record = np.asarray(im.convert("RGB")), json.loads(im.text["pictor"])
    assert pixels.shape == (24, 40, 3)  # no size: the fitted context's
    direct = kontext.generate(
        GenerationRequest(
            "make the circle blue", seed=3, steps=2, context_image=Image.open(io.BytesIO(_png()))
        )
    )[0]
    assert np.array_equal(pixels, np.asarray(direct.image))
    assert record["context_image"] == direct.record["context_image"]
    job = client.post("/v1/jobs", json=_body(context_image=_b64(_png()), response_format=None))
    assert job.status_code == 202, job.text
    upload = job.json()["request"]["context_image"]
    assert (tmp_path / "data" / "uploads" / f"{upload}.png").is_file()
    done = wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job.json()['id']}").json())["status"] == "succeeded" and j,
        what="the job",
    )
    with Image.open(io.BytesIO(client.get(done["results"][0]["url"]).content)) as im:
        assert json.loads(im.text["pictor"])["context_image"] == record["context_image"]


def test_a_model_that_is_not_kontext_refuses_a_context(client: TestClient) -> None:
    r = client.post("/v1/images/generations", json=_body(context_image=_b64(_png())))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "not a FLUX.1 Kontext model" in error["message"] and error["param"] == "context_image"


def test_a_bad_picture_names_the_field(make_client: Callable[..., TestClient], kontext: Pipeline) -> None:
    r = make_client(kontext).post("/v1/images/generations", json=_body(context_image="not base64!"))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "context_image"


def _data(picture: Image.Image) -> str:
    buf = io.BytesIO()
    picture.save(buf, "PNG")
    return _b64(buf.getvalue())


def test_a_16_bit_context_is_scaled_as_the_python_api_scales_it(
    make_client: Callable[..., TestClient], kontext: Pipeline
) -> None:
    """A 16-bit picture is made 8-bit by scaling (65535 -> 255), as the CLI and Python API do, not clipped
    to white by Pillow's conversion; so the server draws what `pictor reproduce --context FILE` checks."""
    ramp = (np.linspace(0, 65535, 40 * 24).reshape(24, 40)).astype(np.uint16)
    picture = Image.fromarray(ramp)
    assert picture.mode.startswith("I")
    r = make_client(kontext).post("/v1/images/generations", json=_body(context_image=_data(picture)))
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))) as im:
        record = json.loads(im.text["pictor"])
    (direct,) = kontext.generate(
        GenerationRequest("make the circle blue", seed=3, steps=2, context_image=picture)
    )
    assert record["context_image"] == direct.record["context_image"]


def test_a_context_larger_than_an_output_is_taken_and_a_fitted_size_over_the_limit_named(
    make_client: Callable[..., TestClient], kontext: Pipeline
) -> None:
    """A context picture is fitted down before use, so it is held to max_picture_pixels, not to the output
    limit; when the fitted size (which the output takes without a size) is over the output limit, the error
    names context_image and suggests a size, not a size the client never sent."""
    big = _picture(1, size=(400, 240))  # 96,000 pixels, over max_pixels below; fitted to 40x24 = 960
    client = make_client(kontext, limits=Limits(max_pixels=1000, max_steps=20, max_images=4))
    r = client.post("/v1/images/generations", json=_body(context_image=_data(big)))
    assert r.status_code == 200, r.text
    tight = make_client(kontext, limits=Limits(max_pixels=900, max_steps=20, max_images=4))
    r = tight.post("/v1/images/generations", json=_body(context_image=_data(big)))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "context_image" and "fitted to 40x24 = 960 pixels" in error["message"]
    assert "give a size (e.g. 36x20)" in error["message"]
    with_size = tight.post("/v1/images/generations", json=_body(context_image=_data(big), size="36x20"))
    assert with_size.status_code == 200, with_size.text
    small_cap = make_client(kontext, limits=Limits(max_pixels=1000, max_picture_pixels=50_000))
    r = small_cap.post("/v1/images/generations", json=_body(context_image=_data(big)))
    assert r.status_code == 400 and "the limit is 50000" in r.json()["error"]["message"], r.text


def test_the_model_card_says_whether_the_model_is_kontext(
    make_client: Callable[..., TestClient], kontext: Pipeline, client: TestClient
) -> None:
    """The web page offers its context picture only where the card says so (others refuse one)."""
    ours = make_client(kontext)
    (card,) = ours.get("/v1/models").json()["data"]
    assert card["kontext"] is True
    assert ours.get(f"/v1/models/{card['id']}").json()["kontext"] is True
    assert client.get("/v1/models").json()["data"][0]["kontext"] is False
