"""Layouts through the HTTP API: the `layout` field (extra_body for the openai client) reaches the pipeline,
the PNG records it, and bad layouts or a model without an adapter are 400s that name the field."""

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
from pictor.pipeline import GenerationRequest, Pipeline

LAYOUT = [{"box": [0.0, 0.25, 0.5, 0.75], "phrase": "a red circle"}]


def _body(**extra: object) -> dict[str, object]:
    return {
        "prompt": "a red circle",
        "size": "32x32",
        "response_format": "b64_json",
        "seed": 3,
        "steps": 2,
        **extra,
    }


def test_a_layout_reaches_the_pipeline_and_the_record(
    make_client: Callable[..., TestClient], laid_out: Pipeline
) -> None:
    client = make_client(laid_out)
    (card,) = client.get("/v1/models").json()["data"]
    assert card["layout"] is True and card["reference"] is False
    r = client.post("/v1/images/generations", json=_body(layout=LAYOUT))
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))) as im:
        im.load()
        pixels, record = np.asarray(im.convert("RGB")), json.loads(im.text["pictor"])
    assert record["layout"] == LAYOUT and len(record["layout_adapter"]["sha256"]) == 64
    direct = laid_out.generate(
        GenerationRequest("a red circle", width=32, height=32, seed=3, steps=2, layout=LAYOUT)
    )
    assert np.array_equal(pixels, np.asarray(direct[0].image))
    plain = client.post("/v1/images/generations", json=_body()).json()["data"][0]["b64_json"]
    assert plain != r.json()["data"][0]["b64_json"]


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ([{"box": [0, 0, 2, 1], "phrase": "x"}], "0 <= x0 < x1 <= 1"),
        ([{"box": [0, 0, 1], "phrase": "x"}], "layout"),
        ([{"box": [0, 0, 1, 1], "phrase": "x", "where": 1}], "where"),
        ([], "non-empty list"),
    ],
)
def test_bad_layouts_are_400s_that_name_the_field(
    make_client: Callable[..., TestClient], laid_out: Pipeline, layout: object, message: str
) -> None:
    r = make_client(laid_out).post("/v1/images/generations", json=_body(layout=layout))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"] is not None and "layout" in error["param"]


def test_a_model_without_an_adapter_refuses_layouts(client: TestClient) -> None:
    r = client.post("/v1/images/generations", json=_body(layout=LAYOUT))
    assert r.status_code == 400
    assert "no layout adapter" in r.json()["error"]["message"] and r.json()["error"]["param"] == "layout"


def _edit(client: TestClient, layout: str | None, path: str = "/v1/images/edits") -> Any:
    source = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 180, 40)).save(source, "PNG")
    form = {
        "prompt": "a red circle",
        "response_format": "b64_json",
        "seed": "3",
        "steps": "2",
        "strength": "0.9",
    }
    if layout is not None:
        form["layout"] = layout
    return client.post(path, files={"image": ("s.png", source.getvalue(), "image/png")}, data=form)


def test_an_edit_takes_a_layout_as_json_text(
    make_client: Callable[..., TestClient], laid_out: Pipeline, client: TestClient
) -> None:
    ours = make_client(laid_out)
    r = _edit(ours, json.dumps(LAYOUT))
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))) as im:
        im.load()
        pixels, record = np.asarray(im.convert("RGB")), json.loads(im.text["pictor"])
    assert record["layout"] == LAYOUT and record["mode"] == "img2img"
    direct = laid_out.edit(
        EditRequest(
            image=Image.new("RGB", (32, 32), (200, 180, 40)),
            prompt="a red circle",
            strength=0.9,
            seed=3,
            steps=2,
            layout=LAYOUT,
        )
    )
    assert np.array_equal(pixels, np.asarray(direct[0].image))
    assert _edit(ours, None).json()["data"][0]["b64_json"] != r.json()["data"][0]["b64_json"]
    uploads = {c: set(c.app.state.service.store.uploads_dir.iterdir()) for c in (ours, client)}
    for response, message in [
        (_edit(ours, "[{"), "not valid JSON"),
        (_edit(ours, '[{"box": [0, 0, 2, 1], "phrase": "x"}]'), "0 <= x0 < x1 <= 1"),
        (_edit(client, json.dumps(LAYOUT)), "no layout adapter"),
        (_edit(client, json.dumps(LAYOUT), path="/v1/jobs/edits"), "no layout adapter"),
    ]:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert message in error["message"] and error["param"] == "layout", error
    assert {c: set(c.app.state.service.store.uploads_dir.iterdir()) for c in (ours, client)} == uploads
