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
