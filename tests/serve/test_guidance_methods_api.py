"""Guidance methods (`pictor.guidance_methods`) through the server: `guidance_method`, an object of
`GuidanceMethod`'s fields on the JSON generations and jobs, its JSON text on the edit forms. The dataclass
checks it (a 400 naming `guidance_method.<field>`, before anything is kept or queued, also while the model
loads); the pipeline's refusals (a distilled model, guidance 1, an interval or zero-init steps that leave
nothing) are 400s naming the field too; jobs and records keep it and the pictures are the pipeline's;
`POST /v1/images/settings` gives it back from an image's record or its A1111 text alone; the model card lists
the methods. The page: tests/serve/test_browser_guidance_methods.py."""

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
from pictor.guidance_methods import METHODS, GuidanceMethod
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.provenance import parameters_text
from pictor.serve.job_requests import batch_key, edit_request, generation_request
from pictor.serve.pipeline_errors import field_of, job_error
from tests.serve.conftest import assert_refused, decode_images, wait_for
from tests.serve.test_edits import edit, png_bytes, source_image
from tests.serve.test_prompt_editing_api import _px, _stored
from tests.serve.test_settings_from_api import png_with, settings_of

GENERATIONS = "/v1/images/generations"
EDIT_FORMS = ("/v1/images/edits", "/v1/jobs/edits")
BODY = {"prompt": "a red circle", "size": "32x32", "steps": 4, "seed": 3, "response_format": "b64_json"}
# APG with an interval and momentum, as sent (the parameters of other methods left out)
APG = {"method": "apg", "eta": 0.25, "momentum": -0.5, "norm_threshold": 3, "start": 0, "stop": 0.7}
APG_METHOD = GuidanceMethod(**APG)
KEPT = APG_METHOD.record()  # what jobs and records keep: every parameter the method reads


def _direct(pipe: Pipeline, method: GuidanceMethod | None, **fields: Any) -> np.ndarray:
    settings = {"width": 32, "height": 32, "steps": 4, "seed": 3, **fields}
    first, *_ = pipe.generate(GenerationRequest("a red circle", guidance_method=method, **settings))
    return _px(first.image)


def test_a_generation_with_a_method_is_the_pipelines_and_its_job_keeps_it(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    ((pixels, record),) = decode_images(client.post(GENERATIONS, json={**BODY, "guidance_method": APG}))
    assert record["guidance_method"] == KEPT, record
    assert np.array_equal(pixels, _direct(tiny, APG_METHOD))
    assert not np.array_equal(pixels, _direct(tiny, None))  # the method made the difference
    job = client.get("/v1/jobs").json()["data"][0]
    assert job["request"]["guidance_method"] == KEPT, job["request"]

    r = client.post("/v1/jobs", json={**BODY, "guidance_method": APG})
    assert r.status_code == 202 and r.json()["request"]["guidance_method"] == KEPT, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    stored, record = _stored(client, job["results"][0]["image_id"])
    assert record["guidance_method"] == KEPT and np.array_equal(stored, pixels)
    # and the A1111 text of the stored image says it in pictor's own words
    assert (
        "Guidance method: apg"
        in client.get(f"/v1/images/{job['results'][0]['image_id']}/metadata").json()["parameters"]
    )


@pytest.mark.parametrize("method", ["cfg-zero-star", "tcfg"])
def test_every_method_runs_through_the_server(client: TestClient, tiny: Pipeline, method: str) -> None:
    sent = {"method": method, "rescale": 0.5} | ({"zero_init_steps": 2} if method == "cfg-zero-star" else {})
    ((pixels, record),) = decode_images(client.post(GENERATIONS, json={**BODY, "guidance_method": sent}))
    assert record["guidance_method"] == GuidanceMethod(**sent).record(), record
    assert np.array_equal(pixels, _direct(tiny, GuidanceMethod(**sent)))


def test_plain_cfg_is_no_method(client: TestClient, tiny: Pipeline) -> None:
    """Plain CFG over every step (an empty object, or other methods' parameters only) is what runs without a
    method: the job and record do not say it, and it batches with requests that never sent one."""
    for sent in ({}, {"method": "cfg"}, {"method": "cfg", "eta": 0.5, "start": 0, "stop": 1}):
        r = client.post("/v1/jobs", json={**BODY, "guidance_method": sent})
        assert r.status_code == 202 and r.json()["request"]["guidance_method"] is None, r.text
    ((pixels, record),) = decode_images(client.post(GENERATIONS, json={**BODY, "guidance_method": {}}))
    assert "guidance_method" not in record and np.array_equal(pixels, _direct(tiny, None))


BAD = [
    ({"method": "pag"}, "guidance_method.method", "guidance method must be one of cfg, apg"),
    ({"method": "apg", "eta": 2}, "guidance_method.eta", "APG eta (eta) must be a number between 0 and 1"),
    ({"rescale": "0.7"}, "guidance_method.rescale", "must be a number between 0 and 1, got '0.7'"),
    ({"rescale": True}, "guidance_method.rescale", "got True"),
    ({"start": 0.5, "stop": 0.5}, "guidance_method.start", "must be below its stop"),
    ({"stop": 0}, "guidance_method.stop", "above 0 and at most 1"),
    ({"method": "apg", "momentum": -1}, "guidance_method.momentum", "above -1 and below 1"),
    ({"method": "apg", "norm_threshold": -1}, "guidance_method.norm_threshold", "between 0 (off)"),
    ({"method": "cfg-zero-star", "zero_init_steps": 1.5}, "guidance_method.zero_init_steps", "whole number"),
    ({"method": "apg", "rescale": None}, "guidance_method.rescale", "got None"),
]


@pytest.mark.parametrize(("sent", "param", "words"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_a_bad_value_is_a_400_naming_its_field(client: TestClient, sent: Any, param: str, words: str) -> None:
    for path in (GENERATIONS, "/v1/jobs"):
        assert_refused(client.post(path, json={**BODY, "guidance_method": sent}), param, words)
    for path in EDIT_FORMS:
        form = {"steps": "2", "guidance_method": json.dumps(sent)}
        assert_refused(edit(client, png_bytes(source_image()), path=path, **form), param, words)
    assert client.get("/v1/jobs").json()["total"] == 0  # nothing queued, no upload kept
    assert not any(client.app.state.service.store.uploads_dir.iterdir())


def test_unknown_fields_and_other_shapes_are_named(client: TestClient) -> None:
    r = client.post(GENERATIONS, json={**BODY, "guidance_method": {"method": "apg", "etta": 0.5}})
    assert_refused(r, "guidance_method.etta", "unknown field 'guidance_method.etta'")
    assert_refused(client.post("/v1/jobs", json={**BODY, "guidance_method": "apg"}), "guidance_method", "")
    image = png_bytes(source_image())
    r = edit(client, image, guidance_method=json.dumps({"method": "apg", "etta": 0.5}))
    assert_refused(r, "guidance_method.etta", "unknown field 'guidance_method.etta'; guidance_method takes")
    assert_refused(edit(client, image, guidance_method="apg"), "guidance_method", "must be a JSON object")
    assert_refused(edit(client, image, guidance_method='"apg"'), "guidance_method", "must be an object of")
    # a blank field is no method, as an absent one
    ((_, record),) = decode_images(edit(client, image, steps="2", seed="1", guidance_method=" "))
    assert "guidance_method" not in record


def test_the_pipelines_refusals_are_400s_naming_the_field(client: TestClient) -> None:
    cases = [
        ({**BODY, "guidance": 1, "guidance_method": APG}, "guidance_method", "off at guidance 1"),
        (
            {**BODY, "steps": 2, "guidance_method": {"stop": 0.3}},
            "guidance_method.stop",
            "holds none of the 2",
        ),
        (
            {**BODY, "steps": 2, "guidance_method": {"method": "cfg-zero-star", "zero_init_steps": 2}},
            "guidance_method.zero_init_steps",
            "would zero every one of the 2 steps",
        ),
        (  # the hires fix's second pass counts its own steps
            {**BODY, "hires_scale": 2, "hires_steps": 2, "guidance_method": {"stop": 0.3}},
            "guidance_method.stop",
            "the hires fix's second pass",
        ),
    ]
    for body, param, words in cases:
        for path in (GENERATIONS, "/v1/jobs"):
            assert_refused(client.post(path, json=body), param, words)
    form = {"steps": "2", "guidance": "1", "guidance_method": json.dumps(APG)}
    for path in EDIT_FORMS:
        assert_refused(
            edit(client, png_bytes(source_image()), path=path, **form), "guidance_method", "guidance 1"
        )
    form = {"steps": "2", "guidance_method": json.dumps({"stop": 0.3})}
    r = edit(client, png_bytes(source_image()), **form)
    assert_refused(r, "guidance_method.stop", "holds none of the 2 steps")
    assert client.get("/v1/jobs").json()["total"] == 0


def test_a_distilled_model_refuses_a_method_by_name(
    make_client: Callable[..., TestClient], tiny: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny, "guidance_mode", "distilled")
    client = make_client(tiny)
    r = client.post(GENERATIONS, json={**BODY, "guidance_method": {"method": "tcfg"}})
    assert_refused(r, "guidance_method", "guidance method tcfg (and guidance rescale or interval) acts on")
    assert "guidance-distilled" in r.json()["error"]["message"]
    r = edit(client, png_bytes(source_image()), guidance_method=json.dumps({"rescale": 0.7}))
    assert_refused(r, "guidance_method", "this model is guidance-distilled")


def test_the_pipelines_messages_name_the_field(tiny: Pipeline) -> None:
    """The messages the pipeline really gives, through the server's table, as a job refused only when it runs
    (accepted while the model loaded) says them: the field first."""
    for request, field in (
        (GenerationRequest("a", guidance=1.0, guidance_method=APG_METHOD), "guidance_method"),
        (GenerationRequest("a", steps=2, guidance_method=GuidanceMethod(stop=0.3)), "guidance_method.stop"),
        (
            GenerationRequest(
                "a", steps=2, guidance_method=GuidanceMethod("cfg-zero-star", zero_init_steps=5)
            ),
            "guidance_method.zero_init_steps",
        ),
    ):
        with pytest.raises(GenerationError) as info:
            tiny.resolve_request(request)
        assert field_of(str(info.value)) == field, str(info.value)
        error = job_error(info.value)
        assert error["param"] == field and error["message"].startswith(f"{field}: "), error
    # the guidance's own rule still names guidance
    assert field_of("guidance must be a number from 0 to 100, got -1") == "guidance"


def test_bad_values_are_refused_while_the_model_loads_and_good_ones_run_once_it_is_there(
    make_client: Callable[..., TestClient],
    tiny: Pipeline,
    monkeypatch: pytest.MonkeyPatch,
    wait_job: Callable[..., Any],
) -> None:
    loaded = threading.Event()

    def slow_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        assert loaded.wait(30)
        return tiny

    monkeypatch.setattr("pictor.loading.load", slow_load)
    client = make_client(None, model="tiny")
    try:
        assert client.app.state.service.manager.pipeline is None
        r = client.post("/v1/jobs", json={**BODY, "guidance_method": {"method": "apg", "eta": 5}})
        assert_refused(r, "guidance_method.eta", "between 0 and 1")
        r = edit(client, png_bytes(source_image()), path="/v1/jobs/edits", guidance_method='{"rescale": 2}')
        assert_refused(r, "guidance_method.rescale", "between 0 and 1")
        r = client.post("/v1/jobs", json={**BODY, "guidance_method": APG})
        assert r.status_code == 202 and r.json()["request"]["guidance_method"] == KEPT, r.text
        # refused by the model only when it runs: guidance 1 (the job fails naming the field)
        bad = client.post("/v1/jobs", json={**BODY, "guidance": 1, "guidance_method": APG})
        assert bad.status_code == 202, bad.text
        manager = client.app.state.service.manager
        wait_for(lambda: manager.queue_depth() == 2, what="the jobs to queue")
    finally:
        loaded.set()
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    pixels, record = _stored(client, job["results"][0]["image_id"])
    assert record["guidance_method"] == KEPT and np.array_equal(pixels, _direct(tiny, APG_METHOD))
    failed = wait_job(client, bad.json()["id"])
    assert failed["status"] == "failed" and failed["error"]["param"] == "guidance_method", failed
    assert failed["error"]["message"].startswith("guidance_method: guidance method apg"), failed


@pytest.mark.parametrize("path", EDIT_FORMS)
def test_an_edit_form_takes_the_method_as_json_text(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any], path: str
) -> None:
    source = source_image()
    form = {"seed": "4", "steps": "4", "strength": "0.9"}
    sent = {"method": "tcfg", "rescale": 0.7, "stop": 0.75}
    r = edit(client, png_bytes(source), path=path, guidance_method=json.dumps(sent), **form)
    if path == "/v1/jobs/edits":
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["id"])
        pixels, record = _stored(client, job["results"][0]["image_id"])
    else:
        ((pixels, record),) = decode_images(r)
        job = client.get("/v1/jobs").json()["data"][0]
    method = GuidanceMethod(**sent)
    assert job["request"]["kind"] == "edit" and job["request"]["guidance_method"] == method.record(), job
    assert record["guidance_method"] == method.record() and record["mode"] == "img2img", record
    request = EditRequest(source, "a red circle", seed=4, steps=4, strength=0.9)
    (direct,) = tiny.edit(dataclasses.replace(request, guidance_method=method))
    assert np.array_equal(pixels, _px(direct.image))
    (plain,) = tiny.edit(request)
    assert not np.array_equal(pixels, _px(plain.image))


def test_jobs_keep_it_and_those_queued_before_it_existed_read_as_plain_cfg(tmp_path: Path) -> None:
    params = {"prompt": "a red circle", "steps": 4}
    assert generation_request(params).guidance_method is None
    assert generation_request({**params, "guidance_method": KEPT}).guidance_method == APG_METHOD
    assert batch_key({**params, "guidance_method": KEPT}) != batch_key(params)
    assert batch_key({**params, "guidance_method": None}) == batch_key(params)

    class Uploads:  # the store's one method edit_request asks of it here
        def upload_path(self, upload: str) -> Path:
            return tmp_path / upload

    edit_params = {**params, "kind": "edit", "image": "a" * 32}
    assert edit_request(edit_params, Uploads()).guidance_method is None  # type: ignore[arg-type]
    on = edit_request({**edit_params, "guidance_method": KEPT}, Uploads())  # type: ignore[arg-type]
    assert on.guidance_method == APG_METHOD


def test_an_images_settings_give_the_method_back(client: TestClient, tiny: Pipeline) -> None:
    """From the image's record (and the body makes the same picture again), and from its A1111 text alone."""
    ((pixels, record),) = decode_images(client.post(GENERATIONS, json={**BODY, "guidance_method": APG}))
    image_id = client.get("/v1/jobs").json()["data"][0]["results"][0]["image_id"]
    answer = settings_of(client, client.get(f"/v1/images/{image_id}").content).json()
    assert answer["source"] == "pictor" and answer["settings"]["guidance_method"] == KEPT, answer
    ((again, _),) = decode_images(
        client.post(GENERATIONS, json={**answer["settings"], "response_format": "b64_json"})
    )
    assert np.array_equal(again, pixels)

    answer = settings_of(client, png_with(parameters_text(record))).json()  # the A1111 text alone
    assert answer["source"] == "a1111" and answer["settings"]["guidance_method"] == KEPT, answer
    assert not any("Guidance" in n or "APG" in n for n in answer["notices"]), answer["notices"]
    assert client.post(GENERATIONS, json=BODY).status_code == 200
    plain_id = client.get("/v1/jobs").json()["data"][0]["results"][0]["image_id"]
    answer = settings_of(client, client.get(f"/v1/images/{plain_id}").content).json()
    assert "guidance_method" not in answer["settings"], answer


def test_the_model_card_and_schema_list_the_methods(client: TestClient) -> None:
    card = client.get("/v1/models").json()["data"][0]
    assert card["guidance_methods"] == list(METHODS) == ["cfg", "apg", "cfg-zero-star", "tcfg"], card
    schema = client.get("/openapi.json").json()
    field = schema["components"]["schemas"]["GuidanceMethodBody"]["properties"]
    assert set(field) == {f.name for f in dataclasses.fields(GuidanceMethod)}, field
    assert field["method"]["enum"] == list(METHODS)
    form = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]
    fields = schema["components"]["schemas"][form["schema"]["$ref"].rsplit("/", 1)[1]]["properties"]
    assert "as JSON" in fields["guidance_method"]["description"], fields["guidance_method"]
