"""Regional attention (`pictor.regional_attention`: the regions as one transformer pass with a masked joint
attention) through the server: the JSON generations, the job queue and the edit forms take
`regional_attention`; the records and jobs keep it and the pictures are the pipeline's; without regions it is
a 400 naming `regional_attention` in the pipeline's words, before anything is kept or queued (also while the
model loads); jobs that differ in it never share a sampler run, and a queued job keeps it across a restart;
`POST /v1/images/settings` gives it back with the regions. The page:
tests/serve/test_browser_regional_attention.py."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pictor.editing import EditRequest
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.serve.job_requests import batch_key, edit_request, generation_request
from pictor.serve.pipeline_errors import api_message, field_of, job_error
from tests.serve.conftest import assert_refused, decode_images, wait_for
from tests.serve.test_edits import edit, png_bytes, source_image
from tests.serve.test_prompt_editing_api import _px, _stored
from tests.serve.test_regions_api import BODY, GENERATIONS, KEPT, SENT
from tests.serve.test_settings_from_api import settings_of

EDIT_FORMS = ("/v1/images/edits", "/v1/jobs/edits")
WITHOUT_REGIONS = "regional attention is a way to run regions: give regions (boxes with prompts) with it"


def _direct(pipe: Pipeline, on: bool, **fields: Any) -> np.ndarray:
    """The pipeline's own first image for BODY's settings with the regions, run as one pass or not."""
    request = {"width": 32, "height": 32, "steps": 2, "seed": 3, **fields}
    first, *_ = pipe.generate(GenerationRequest("two shapes", regions=KEPT, regional_attention=on, **request))
    return _px(first.image)


def test_a_generation_with_regional_attention_is_the_pipelines_and_its_job_keeps_it(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    body = {**BODY, "regions": SENT}
    ((pixels, record),) = decode_images(client.post(GENERATIONS, json={**body, "regional_attention": True}))
    assert record["regional_attention"] is True and record["regions"] == KEPT, record
    assert np.array_equal(pixels, _direct(tiny, True))
    # Off (the default): a pass per region, another picture, and the record does not say it.
    ((blend, record),) = decode_images(client.post(GENERATIONS, json=body))
    assert "regional_attention" not in record and not np.array_equal(blend, pixels)
    assert np.array_equal(blend, _direct(tiny, False))

    r = client.post("/v1/jobs", json={**body, "regional_attention": True})
    assert r.status_code == 202 and r.json()["request"]["regional_attention"] is True, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    stored, record = _stored(client, job["results"][0]["image_id"])
    assert record["regional_attention"] is True and np.array_equal(stored, pixels)


@pytest.mark.parametrize("path", EDIT_FORMS)
def test_an_edit_form_takes_regional_attention(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any], path: str
) -> None:
    source = source_image()
    form = {"seed": "4", "steps": "2", "strength": "0.9", "regions": json.dumps(SENT)}
    r = edit(client, png_bytes(source), "two shapes", path=path, regional_attention="true", **form)
    if path == "/v1/jobs/edits":
        assert r.status_code == 202 and r.json()["request"]["regional_attention"] is True, r.text
        job = wait_job(client, r.json()["id"])
        pixels, record = _stored(client, job["results"][0]["image_id"])
    else:
        ((pixels, record),) = decode_images(r)
        job = client.get("/v1/jobs").json()["data"][0]
    assert job["request"]["kind"] == "edit" and job["request"]["regional_attention"] is True, job["request"]
    assert record["regional_attention"] is True and record["mode"] == "img2img", record
    request = EditRequest(source, "two shapes", seed=4, steps=2, strength=0.9, regions=KEPT)
    (direct,) = tiny.edit(dataclasses.replace(request, regional_attention=True))
    assert np.array_equal(pixels, _px(direct.image))
    (blend,) = tiny.edit(request)
    assert not np.array_equal(pixels, _px(blend.image))  # the field made the difference
    off = edit(client, png_bytes(source), "two shapes", regional_attention="false", **form)
    ((plain, record),) = decode_images(off)
    assert "regional_attention" not in record and np.array_equal(plain, _px(blend.image))


def test_without_regions_it_is_a_400_in_the_pipelines_words(client: TestClient, tiny: Pipeline) -> None:
    with pytest.raises(GenerationError) as info:
        tiny.resolve_request(GenerationRequest("two shapes", steps=2, regional_attention=True))
    words = api_message(str(info.value))
    assert words.startswith(WITHOUT_REGIONS), words
    for path in (GENERATIONS, "/v1/jobs"):
        r = client.post(path, json={**BODY, "regional_attention": True})
        assert_refused(r, "regional_attention", words)
        assert r.json()["error"]["code"] == "invalid_parameters" and r.json()["error"]["message"] == words
    for path in EDIT_FORMS:
        for regions in ({}, {"regions": " "}):  # a blank field is no regions, as an absent one
            r = edit(client, png_bytes(source_image()), "two shapes", path=path, regional_attention="true",
                     steps="2", **regions)  # fmt: skip
            assert_refused(r, "regional_attention", words)
    assert client.get("/v1/jobs").json()["total"] == 0  # nothing queued, no upload kept
    assert not any(client.app.state.service.store.uploads_dir.iterdir())
    # False without regions is the default, and runs.
    assert client.post("/v1/jobs", json={**BODY, "regional_attention": False}).status_code == 202
    # A variation's form takes no regions, so no regional attention either: an unknown field, by its name.
    r = edit(client, png_bytes(source_image()), "", path="/v1/images/variations", regional_attention="true")
    assert_refused(r, "regional_attention", "unknown field 'regional_attention'")


def test_without_regions_it_is_refused_while_the_model_loads_too(
    make_client: Callable[..., TestClient],
    tiny: Pipeline,
    monkeypatch: pytest.MonkeyPatch,
    wait_job: Callable[..., Any],
) -> None:
    """Known without the model: a 400 at once, not a job that fails when the model is there."""
    loaded = threading.Event()

    def slow_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        assert loaded.wait(30)
        return tiny

    monkeypatch.setattr("pictor.loading.load", slow_load)
    client = make_client(None, model="tiny")
    try:
        assert client.app.state.service.manager.pipeline is None
        r = client.post("/v1/jobs", json={**BODY, "regional_attention": True})
        assert_refused(r, "regional_attention", WITHOUT_REGIONS)
        form = {"path": "/v1/jobs/edits", "regional_attention": "true"}
        assert_refused(edit(client, png_bytes(source_image()), "two shapes", **form), "regional_attention",
                       WITHOUT_REGIONS)  # fmt: skip
        # with regions it is taken while the model loads, and runs once it is there
        r = client.post("/v1/jobs", json={**BODY, "regions": SENT, "regional_attention": True})
        assert r.status_code == 202 and r.json()["request"]["regional_attention"] is True, r.text
        manager = client.app.state.service.manager
        wait_for(lambda: manager.queue_depth() == 1, what="the job to queue")
        assert client.get("/v1/jobs").json()["total"] == 1
    finally:
        loaded.set()
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    pixels, record = _stored(client, job["results"][0]["image_id"])
    assert record["regional_attention"] is True and np.array_equal(pixels, _direct(tiny, True))


def test_the_pipelines_message_names_regional_attention(tiny: Pipeline) -> None:
    """The message the pipeline really gives (it is shared with the CLI), through the server's table, as a job
    refused only when it runs would say it: the field first."""
    with pytest.raises(GenerationError) as info:
        tiny.resolve_request(GenerationRequest("two shapes", steps=2, regional_attention=True))
    text = str(info.value)
    assert field_of(text) == "regional_attention", text
    error = job_error(GenerationError(text))
    assert error["param"] == "regional_attention", error
    assert error["message"].startswith("regional_attention: regional attention is a way"), error
    assert api_message("run them as one pass with --regional-attention") == (
        "run them as one pass with regional_attention"
    )


def test_jobs_that_differ_in_regional_attention_never_share_a_run(
    make_client: Callable[..., TestClient], gated: Any, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    """Three seedless jobs with the same regions queued behind a running one, the same but for regional
    attention: the two with it share one sampler run (its seeds in a row), the one without runs alone."""
    client = make_client(gated, max_batch=8)
    seedless = {k: v for k, v in BODY.items() if k != "seed"} | {"regions": SENT}
    assert client.post("/v1/jobs", json={"prompt": "hold the worker", "steps": 2}).status_code == 202
    assert gated.gate.reached.wait(10)
    flags = [True, False, True]
    answers = [client.post("/v1/jobs", json={**seedless, "regional_attention": flag}) for flag in flags]
    gated.gate.release.set()
    jobs = [wait_job(client, a.json()["id"]) for a in answers]
    assert [job["request"]["regional_attention"] for job in jobs] == flags, jobs
    runs = gated.calls[1:]
    assert [(run.regional_attention, run.num_images) for run in runs] == [(True, 2), (False, 1)], runs
    stored = [_stored(client, job["results"][0]["image_id"]) for job in jobs]
    assert [record.get("regional_attention", False) for _, record in stored] == flags
    seeds = [job["results"][0]["seed"] for job in jobs]
    assert seeds[2] == seeds[0] + 1  # the next seed in the shared run
    shared = tiny.generate(
        GenerationRequest(
            "two shapes", width=32, height=32, steps=2, seed=seeds[0], num_images=2, regions=KEPT,
            regional_attention=True,
        )
    )  # fmt: skip
    assert np.array_equal(stored[2][0], _px(shared[1].image))
    assert np.array_equal(stored[1][0], _direct(tiny, False, seed=seeds[1]))


def test_a_queued_job_keeps_regional_attention_across_a_restart(
    make_client: Callable[..., TestClient], gated: Any, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    client = make_client(gated)
    assert client.post("/v1/jobs", json={**BODY, "prompt": "hold the worker"}).status_code == 202
    assert gated.gate.reached.wait(10)
    queued = client.post("/v1/jobs", json={**BODY, "regions": SENT, "regional_attention": True})
    assert queued.status_code == 202, queued.text
    client.app.state.service.manager.begin_drain()  # the queued job stays for the next server
    make_client.close(client)

    again = make_client(tiny)
    job = wait_job(again, queued.json()["id"])
    assert job["status"] == "succeeded" and job["request"]["regional_attention"] is True, job
    pixels, record = _stored(again, job["results"][0]["image_id"])
    assert record["regional_attention"] is True and np.array_equal(pixels, _direct(tiny, True))


def test_jobs_queued_before_regional_attention_existed_read_as_without_it(tmp_path: Path) -> None:
    params = {"prompt": "two shapes", "steps": 2, "regions": KEPT}
    assert generation_request(params).regional_attention is False
    assert generation_request({**params, "regional_attention": True}).regional_attention is True
    assert batch_key({**params, "regional_attention": True}) != batch_key(params)

    class Uploads:  # the store's one method edit_request asks of it here
        def upload_path(self, upload: str) -> Path:
            return tmp_path / upload

    edit_params = {**params, "kind": "edit", "image": "a" * 32}
    assert edit_request(edit_params, Uploads()).regional_attention is False  # type: ignore[arg-type]
    on = edit_request({**edit_params, "regional_attention": True}, Uploads())  # type: ignore[arg-type]
    assert on.regional_attention is True


def test_an_images_settings_give_regional_attention_back(client: TestClient) -> None:
    """POST /v1/images/settings answers it with the regions for an image that ran them as one pass (and the
    body makes the same picture again); an image with a pass per region says nothing of it."""
    body = {**BODY, "regions": SENT}
    ((pixels, _),) = decode_images(client.post(GENERATIONS, json={**body, "regional_attention": True}))
    ((blend, _),) = decode_images(client.post(GENERATIONS, json=body))
    on, off = (client.get("/v1/jobs").json()["data"][i]["results"][0]["image_id"] for i in (1, 0))
    settings = settings_of(client, client.get(f"/v1/images/{on}").content).json()["settings"]
    assert settings["regional_attention"] is True and settings["regions"] == KEPT, settings
    ((again, record),) = decode_images(
        client.post(GENERATIONS, json={**settings, "response_format": "b64_json"})
    )
    assert record["regional_attention"] is True and np.array_equal(again, pixels)
    settings = settings_of(client, client.get(f"/v1/images/{off}").content).json()["settings"]
    assert "regional_attention" not in settings and settings["regions"] == KEPT, settings
    assert not np.array_equal(blend, pixels)


def test_the_schema_documents_regional_attention(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    field = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]["regional_attention"]
    assert field["type"] == "boolean" and "Needs regions" in field["description"], field
    form = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]
    fields = schema["components"]["schemas"][form["schema"]["$ref"].rsplit("/", 1)[1]]["properties"]
    assert "Needs regions" in fields["regional_attention"]["description"], fields["regional_attention"]
    # the overview lists it among the generations' fields and the edit forms'
    assert schema["info"]["description"].count("`regional_attention`") == 2, schema["info"]["description"]
