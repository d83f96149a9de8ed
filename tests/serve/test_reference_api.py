"""Reference pictures through the HTTP API: the `reference_image` field (base64, extra_body for the openai
client) reaches the pipeline and the PNG's record, the picture is kept for the job, and bad pictures or a
model without an adapter are 400s that name the field."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.editing import EditRequest
from pictor.pipeline import GenerationRequest, Pipeline
from tests.serve.conftest import wait_for


def _png(seed: int = 0, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _body(**extra: object) -> dict[str, object]:
    return {
        "prompt": "a red circle",
        "size": "32x32",
        "response_format": "b64_json",
        "seed": 3,
        "steps": 2,
        **extra,
    }


def _decoded(response_b64: str) -> tuple[np.ndarray, dict]:
    with Image.open(io.BytesIO(base64.b64decode(response_b64))) as im:
        im.load()
        return np.asarray(im.convert("RGB")), json.loads(im.text["pictor"])


def test_a_reference_reaches_the_pipeline_and_the_record(
    make_client: Callable[..., TestClient], referenced: Pipeline, tmp_path: Path
) -> None:
    client = make_client(referenced)
    r = client.post("/v1/images/generations", json=_body(reference_image=_b64(_png())))
    assert r.status_code == 200, r.text
    pixels, record = _decoded(r.json()["data"][0]["b64_json"])
    assert len(record["reference_adapter"]["sha256"]) == 64 and record["reference_image"]["width"] == 32
    direct = referenced.generate(
        GenerationRequest(
            "a red circle", width=32, height=32, seed=3, steps=2, reference=Image.open(io.BytesIO(_png()))
        )
    )
    assert np.array_equal(pixels, np.asarray(direct[0].image))
    assert record["reference_image"] == direct[0].record["reference_image"]
    # the prompt may be empty: the picture alone says what to draw
    alone = client.post("/v1/images/generations", json=_body(prompt="", reference_image=_b64(_png())))
    assert alone.status_code == 200, alone.text
    assert _decoded(alone.json()["data"][0]["b64_json"])[1]["prompt"] == ""
    # a data: URL is the same picture; the job names its kept upload
    again = client.post(
        "/v1/jobs", json=_body(reference_image="data:image/png;base64," + _b64(_png()), response_format=None)
    )
    assert again.status_code == 202, again.text
    job = again.json()
    upload = job["request"]["reference"]
    assert (tmp_path / "data" / "uploads" / f"{upload}.png").is_file()
    done = wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["status"] == "succeeded" and j,
        what="the job",
    )
    image = client.get(done["results"][0]["url"])
    assert image.status_code == 200
    with Image.open(io.BytesIO(image.content)) as im:
        assert json.loads(im.text["pictor"])["reference_image"] == record["reference_image"]


@pytest.mark.parametrize(
    ("picture", "status", "message"),
    [
        ("not base64!", 400, "is not base64"),
        (_b64(b"GIF89a not an image"), 400, "not a readable PNG, JPEG or WebP image"),
        (_b64(_png(size=4)), 400, "at least 8x8"),
    ],
)
def test_bad_pictures_are_4xx_that_name_the_field(
    make_client: Callable[..., TestClient], referenced: Pipeline, picture: str, status: int, message: str
) -> None:
    r = make_client(referenced).post("/v1/images/generations", json=_body(reference_image=picture))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == "reference_image"


def test_a_model_without_an_adapter_refuses_references(client: TestClient) -> None:
    r = client.post("/v1/images/generations", json=_body(reference_image=_b64(_png())))
    assert r.status_code == 400
    error = r.json()["error"]
    assert "no reference adapter" in error["message"] and error["param"] == "reference_image"


def _edit(client: TestClient, path: str = "/v1/images/edits", **data: object) -> Any:
    files = {"image": ("source.png", _png(seed=1), "image/png")}
    reference = data.pop("reference", None)
    if reference is not None:
        files["reference_image"] = ("reference.png", reference, "image/png")
    form = {
        "prompt": "a red circle",
        "response_format": "b64_json",
        "seed": "3",
        "steps": "2",
        "strength": "0.8",
    }
    return client.post(path, files=files, data={**form, **{k: str(v) for k, v in data.items()}})


def test_an_edit_takes_a_reference_file(
    make_client: Callable[..., TestClient], referenced: Pipeline, tmp_path: Path
) -> None:
    client = make_client(referenced)
    r = _edit(client, reference=_png())
    assert r.status_code == 200, r.text
    pixels, record = _decoded(r.json()["data"][0]["b64_json"])
    assert record["mode"] == "img2img" and record["reference_image"]["width"] == 32
    direct = referenced.edit(
        EditRequest(
            image=Image.open(io.BytesIO(_png(seed=1))),
            prompt="a red circle",
            strength=0.8,
            seed=3,
            steps=2,
            reference=Image.open(io.BytesIO(_png())),
        )
    )
    assert np.array_equal(pixels, np.asarray(direct[0].image))
    assert record["reference_image"] == direct[0].record["reference_image"]
    alone = _edit(client, prompt="", reference=_png())  # the picture alone says what to draw
    assert alone.status_code == 200, alone.text
    # the queued form keeps the picture as an upload its job names
    job = _edit(client, path="/v1/jobs/edits", reference=_png()).json()
    assert (tmp_path / "data" / "uploads" / f"{job['request']['reference']}.png").is_file()


def test_bad_edit_references_are_400s_and_keep_nothing(
    make_client: Callable[..., TestClient], referenced: Pipeline, client: TestClient
) -> None:
    ours = make_client(referenced)
    for response, message, param in [
        (_edit(ours, reference=b"GIF89a not an image"), "not a readable", "reference_image"),
        (_edit(ours, reference=_png(size=4)), "at least 8x8", "reference_image"),
        (_edit(ours, prompt=""), "prompt is empty", "prompt"),
        (_edit(client, reference=_png()), "no reference adapter", "reference_image"),
    ]:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert message in error["message"] and error["param"] == param, error
    for c in (ours, client):
        assert c.get("/v1/jobs").json()["total"] == 0
        assert not any(c.app.state.service.store.uploads_dir.iterdir())
