"""Guidance methods (`pictor.guidance_methods`) on the variation forms (`POST /v1/images/variations` and
`POST /v1/jobs/variations`): `guidance_method` as its JSON text, as on the edit forms. The dataclass checks it
(a 400 naming `guidance_method.<field>`, before the picture is read and before anything is kept or queued);
the pipeline's refusals (guidance 1, a guidance-distilled model such as a Redux server's) name the field too;
jobs and records keep it and the pictures are the pipeline's. The generations' and edits':
tests/serve/test_guidance_methods_api.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pictor.editing import EditRequest
from pictor.guidance_methods import GuidanceMethod
from pictor.pipeline import Pipeline
from tests.serve.conftest import assert_refused, decode_images
from tests.serve.test_prompt_editing_api import _px, _stored
from tests.serve.test_variations import DOCUMENTED_STRENGTH, picture, png, vary

VARIATIONS = ("/v1/images/variations", "/v1/jobs/variations")
SENT = {"method": "apg", "eta": 0.25, "momentum": -0.5, "start": 0, "stop": 0.7}
METHOD = GuidanceMethod(**SENT)


def _direct(pipe: Pipeline, method: GuidanceMethod | None) -> np.ndarray:
    request = EditRequest(
        picture(), "a red circle", strength=DOCUMENTED_STRENGTH, seed=3, steps=4, guidance_method=method
    )
    (first,) = pipe.edit(request)
    return _px(first.image)


@pytest.mark.parametrize("path", VARIATIONS)
def test_a_variation_takes_the_method_as_json_text(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any], path: str
) -> None:
    fields = {"prompt": "a red circle", "seed": 3, "steps": 4, "guidance_method": json.dumps(SENT)}
    r = vary(client, png(picture()), path=path, **fields)
    if path == "/v1/jobs/variations":
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["id"])
        pixels, record = _stored(client, job["results"][0]["image_id"])
    else:
        ((pixels, record),) = decode_images(r)
        job = client.get("/v1/jobs").json()["data"][0]
    assert job["request"]["kind"] == "edit" and job["request"]["variation"] is True, job["request"]
    assert job["request"]["guidance_method"] == METHOD.record(), job["request"]
    assert record["guidance_method"] == METHOD.record() and record["mode"] == "img2img", record
    assert np.array_equal(pixels, _direct(tiny, METHOD))
    assert not np.array_equal(pixels, _direct(tiny, None))  # the method made the difference
    # a blank field (and plain CFG over every step) is no method, as an absent one
    for blank in (" ", json.dumps({"method": "cfg"})):
        ((plain, record),) = decode_images(
            vary(client, png(picture()), **{**fields, "guidance_method": blank})
        )
        assert "guidance_method" not in record and np.array_equal(plain, _direct(tiny, None))


BAD = [
    (json.dumps({"method": "pag"}), "guidance_method.method", "guidance method must be one of cfg, apg"),
    (json.dumps({"method": "apg", "eta": 2}), "guidance_method.eta", "must be a number between 0 and 1"),
    (
        json.dumps({"method": "apg", "etta": 0.5}),
        "guidance_method.etta",
        "unknown field 'guidance_method.etta'",
    ),
    ("apg", "guidance_method", "must be a JSON object"),
    ('"apg"', "guidance_method", "must be an object of"),
]


@pytest.mark.parametrize(("sent", "param", "words"), BAD, ids=[f"{b[1]}{i}" for i, b in enumerate(BAD)])
def test_a_bad_value_is_a_400_naming_its_field(client: TestClient, sent: str, param: str, words: str) -> None:
    for path in VARIATIONS:
        assert_refused(vary(client, png(picture()), path=path, guidance_method=sent), param, words)
    # checked before the picture is read: a picture that is no picture does not change the answer
    assert_refused(vary(client, b"not a picture", guidance_method=sent), param, words)
    assert client.get("/v1/jobs").json()["total"] == 0  # nothing queued, no upload kept
    assert not any(client.app.state.service.store.uploads_dir.iterdir())


def test_the_pipelines_refusals_are_400s_naming_the_field(client: TestClient) -> None:
    for path in VARIATIONS:
        r = vary(client, png(picture()), path=path, guidance="1", guidance_method=json.dumps(SENT))
        assert_refused(r, "guidance_method", "guidance 1")
        r = vary(client, png(picture()), path=path, steps="2", guidance_method=json.dumps({"stop": 0.3}))
        assert_refused(r, "guidance_method.stop", "holds none of the")
    assert client.get("/v1/jobs").json()["total"] == 0


def test_a_redux_variation_passes_the_method_to_its_generation(
    make_client: Callable[..., TestClient], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With FLUX.1 Redux loaded a variation is a generation: the method goes to it, and the (guidance-
    distilled) Redux model refuses it by name, as a generation's is refused; plain CFG runs."""
    from tests.serve.test_redux_api import dev_pipeline, redux_files

    dev = dev_pipeline()
    dev.set_redux(*redux_files(tmp_path_factory.mktemp("redux-variation")))
    client = make_client(dev)
    for path in VARIATIONS:
        r = vary(client, png(picture()), path=path, guidance_method=json.dumps({"method": "tcfg"}))
        assert_refused(r, "guidance_method", "guidance-distilled")
        r = vary(client, png(picture()), path=path, guidance_method=json.dumps({"method": "pag"}))
        assert_refused(r, "guidance_method.method", "guidance method must be one of")
    assert client.get("/v1/jobs").json()["total"] == 0
    r = vary(client, png(picture()), size="32x32", guidance_method=json.dumps({"method": "cfg"}))
    ((_, record),) = decode_images(r)
    assert "guidance_method" not in record and record["redux"], record


def test_the_schema_documents_the_field(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    form = schema["paths"]["/v1/images/variations"]["post"]["requestBody"]["content"]["multipart/form-data"]
    fields = schema["components"]["schemas"][form["schema"]["$ref"].rsplit("/", 1)[1]]["properties"]
    assert '{"method": "apg"' in fields["guidance_method"]["description"], fields["guidance_method"]
