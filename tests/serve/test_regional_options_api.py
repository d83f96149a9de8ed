"""Regional attention's Regional-Prompting-FLUX controls (`pictor.regional_attention.RegionalOptions`:
`regional_steps`, `regional_double_interval`, `regional_single_interval`, `regional_base_ratio`) through the
server: the JSON generations, the job queue and the edit forms take them, by the pipeline's rules (a 400
naming the field, before anything is kept or queued, also while the model loads; without regional attention
and regions too); records and jobs keep them and the pictures are the pipeline's; jobs that differ in them
never share a sampler run; `POST /v1/images/settings` gives them back. The page:
tests/serve/test_browser_regional_options.py."""

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
from pictor.serve.pipeline_errors import field_of, job_error
from tests.serve.conftest import assert_refused, decode_images, wait_for
from tests.serve.test_edits import edit, png_bytes, source_image
from tests.serve.test_prompt_editing_api import _px, _stored
from tests.serve.test_regions_api import BODY, GENERATIONS, KEPT, SENT
from tests.serve.test_settings_from_api import settings_of

EDIT_FORMS = ("/v1/images/edits", "/v1/jobs/edits")
# The tiny model has one block of each kind, so only the window and the base ratio change its pixels; the
# intervals are seen in the records (what the pipeline ran with).
RPF = {"regional_steps": 1, "regional_single_interval": 2, "regional_base_ratio": 0.3}
REGIONAL = {**BODY, "regions": SENT, "regional_attention": True}


def _direct(pipe: Pipeline, **fields: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """The pipeline's own first image (and record) for BODY's settings with the regions as one pass."""
    request = {"width": 32, "height": 32, "steps": 2, "seed": 3, **fields}
    first, *_ = pipe.generate(
        GenerationRequest("two shapes", regions=KEPT, regional_attention=True, **request)
    )
    return _px(first.image), first.record


def test_a_generation_with_the_options_is_the_pipelines_and_its_job_keeps_them(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    ((pixels, record),) = decode_images(client.post(GENERATIONS, json={**REGIONAL, **RPF}))
    want, direct = _direct(tiny, **RPF)
    assert np.array_equal(pixels, want)
    assert {k: record.get(k) for k in RPF} == RPF == {k: direct.get(k) for k in RPF}, record
    plain, _ = _direct(tiny)
    assert not np.array_equal(pixels, plain)  # the options made the difference
    job = client.get("/v1/jobs").json()["data"][0]
    assert {k: job["request"][k] for k in RPF} == RPF, job["request"]
    assert job["request"]["regional_double_interval"] is None

    # A whole number of steps is a count (as --regional-steps 2 is), a share stays a share.
    r = client.post("/v1/jobs", json={**REGIONAL, "regional_steps": 1.0, "regional_double_interval": 3})
    assert r.status_code == 202, r.text
    assert r.json()["request"]["regional_steps"] == 1 and isinstance(
        r.json()["request"]["regional_steps"], int
    )
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    stored, record = _stored(client, job["results"][0]["image_id"])
    assert (record["regional_steps"], record["regional_double_interval"]) == (1, 3), record
    assert np.array_equal(stored, _direct(tiny, regional_steps=1, regional_double_interval=3)[0])
    ((half, record),) = decode_images(client.post(GENERATIONS, json={**REGIONAL, "regional_base_ratio": 0.5}))
    assert record["regional_base_ratio"] == 0.5 and "regional_steps" not in record, record
    assert np.array_equal(half, _direct(tiny, regional_base_ratio=0.5)[0])


@pytest.mark.parametrize("path", EDIT_FORMS)
def test_an_edit_form_takes_the_options(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any], path: str
) -> None:
    source = source_image()
    form = {"seed": "4", "steps": "2", "strength": "0.9", "regions": json.dumps(SENT)}
    fields = {k: str(v) for k, v in RPF.items()}
    r = edit(client, png_bytes(source), "two shapes", path=path, regional_attention="true", **form, **fields)
    if path == "/v1/jobs/edits":
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["id"])
        pixels, record = _stored(client, job["results"][0]["image_id"])
    else:
        ((pixels, record),) = decode_images(r)
        job = client.get("/v1/jobs").json()["data"][0]
    assert job["request"]["kind"] == "edit" and {k: job["request"][k] for k in RPF} == RPF, job["request"]
    assert {k: record.get(k) for k in RPF} == RPF and record["mode"] == "img2img", record
    request = EditRequest(
        source, "two shapes", seed=4, steps=2, strength=0.9, regions=KEPT, regional_attention=True
    )
    (direct,) = tiny.edit(dataclasses.replace(request, **RPF))
    assert np.array_equal(pixels, _px(direct.image))
    (plain,) = tiny.edit(request)
    assert not np.array_equal(pixels, _px(plain.image))  # the fields made the difference


BAD = [
    ({"regional_steps": 0}, "regional_steps", "regional_steps must be a share of the steps above 0"),
    ({"regional_steps": 1.5}, "regional_steps", "or a whole number of steps"),
    ({"regional_steps": -0.5}, "regional_steps", "regional_steps must be"),
    ({"regional_double_interval": 0}, "regional_double_interval", "regional_double_interval must be a whole"),
    (
        {"regional_single_interval": -2},
        "regional_single_interval",
        "regional_single_interval must be a whole",
    ),
    ({"regional_base_ratio": 1.5}, "regional_base_ratio", "regional_base_ratio must be a number from 0 to 1"),
    (
        {"regional_base_ratio": -0.1},
        "regional_base_ratio",
        "regional_base_ratio must be a number from 0 to 1",
    ),
]


@pytest.mark.parametrize(("sent", "param", "words"), BAD, ids=[f"{b[1]}{i}" for i, b in enumerate(BAD)])
def test_a_bad_value_is_a_400_naming_its_field(client: TestClient, sent: Any, param: str, words: str) -> None:
    for path in (GENERATIONS, "/v1/jobs"):
        assert_refused(client.post(path, json={**REGIONAL, **sent}), param, words)
    form = {"steps": "2", "regions": json.dumps(SENT), "regional_attention": "true"}
    for path in EDIT_FORMS:
        r = edit(client, png_bytes(source_image()), path=path, **form, **{k: str(v) for k, v in sent.items()})
        assert_refused(r, param, words)
    assert client.get("/v1/jobs").json()["total"] == 0  # nothing queued, no upload kept
    assert not any(client.app.state.service.store.uploads_dir.iterdir())


def test_without_regional_attention_and_regions_they_are_refused_by_name(client: TestClient) -> None:
    """As the CLI refuses --regional-steps without --regional-attention: the field named, in the pipeline's
    words (the first field when several are given)."""
    with pytest.raises(GenerationError) as info:
        client.app.state.service.manager.pipeline.resolve_request(
            GenerationRequest("two shapes", steps=2, regions=KEPT, regional_base_ratio=0.2)
        )
    words = str(info.value)
    assert words.startswith("regional_base_ratio shapes regional attention"), words
    with_regions = {**BODY, "regions": SENT}
    for path in (GENERATIONS, "/v1/jobs"):
        r = client.post(path, json={**with_regions, "regional_base_ratio": 0.2})
        assert_refused(r, "regional_base_ratio", words)
        r = client.post(path, json={**BODY, "regional_steps": 0.5, "regional_base_ratio": 0.2})
        assert_refused(r, "regional_steps", "regional_steps, regional_base_ratio shape regional attention")
        # regional attention without regions is refused first, by its own name
        r = client.post(path, json={**BODY, "regional_attention": True, "regional_steps": 0.5})
        assert_refused(r, "regional_attention", "regional attention is a way to run regions")
    for path in EDIT_FORMS:
        r = edit(client, png_bytes(source_image()), path=path, regions=json.dumps(SENT), regional_steps="2")
        assert_refused(r, "regional_steps", "regional_steps shapes regional attention")
    assert client.get("/v1/jobs").json()["total"] == 0
    assert not any(client.app.state.service.store.uploads_dir.iterdir())
    # A variation's form takes no regions, so none of these either: an unknown field, by its name.
    r = edit(client, png_bytes(source_image()), "", path="/v1/images/variations", regional_base_ratio="0.2")
    assert_refused(r, "regional_base_ratio", "unknown field 'regional_base_ratio'")


def test_wrong_types_are_400s_naming_the_field(client: TestClient) -> None:
    for sent, param in (
        ({"regional_double_interval": 1.5}, "regional_double_interval"),
        ({"regional_base_ratio": "0.2"}, "regional_base_ratio"),
        ({"regional_steps": True}, "regional_steps"),
    ):
        r = client.post(GENERATIONS, json={**REGIONAL, **sent})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = edit(client, png_bytes(source_image()), regions=json.dumps(SENT), regional_attention="true",
             regional_single_interval="two")  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "regional_single_interval", r.text


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
        r = client.post("/v1/jobs", json={**REGIONAL, "regional_base_ratio": 2})
        assert_refused(r, "regional_base_ratio", "from 0 to 1")
        r = client.post("/v1/jobs", json={**BODY, "regional_steps": 0.5})
        assert_refused(r, "regional_steps", "shapes regional attention")
        form = {"path": "/v1/jobs/edits", "regions": json.dumps(SENT), "regional_attention": "true"}
        r = edit(client, png_bytes(source_image()), regional_double_interval="0", **form)
        assert_refused(r, "regional_double_interval", "from 1 to 1000")
        r = client.post("/v1/jobs", json={**REGIONAL, **RPF})
        assert r.status_code == 202 and r.json()["request"]["regional_base_ratio"] == 0.3, r.text
        manager = client.app.state.service.manager
        wait_for(lambda: manager.queue_depth() == 1, what="the job to queue")
    finally:
        loaded.set()
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    pixels, record = _stored(client, job["results"][0]["image_id"])
    assert record["regional_base_ratio"] == 0.3 and np.array_equal(pixels, _direct(tiny, **RPF)[0])


def test_the_pipelines_messages_name_the_field(tiny: Pipeline) -> None:
    """The messages the pipeline really gives, through the server's table, as a job refused only when it runs
    would say them: the field first."""
    for fields, field in (
        ({"regional_steps": 0}, "regional_steps"),
        ({"regional_double_interval": 0}, "regional_double_interval"),
        ({"regional_single_interval": 0}, "regional_single_interval"),
        ({"regional_base_ratio": 2.0}, "regional_base_ratio"),
        ({"regional_attention": False, "regional_single_interval": 2}, "regional_single_interval"),
    ):
        request = GenerationRequest(
            "two shapes", steps=2, regions=KEPT, **{"regional_attention": True, **fields}
        )
        with pytest.raises(GenerationError) as info:
            tiny.resolve_request(request)
        assert field_of(str(info.value)) == field, str(info.value)
        error = job_error(info.value)
        assert error["param"] == field and error["message"].startswith(field), error


def test_jobs_keep_them_and_those_queued_before_them_read_as_the_defaults(tmp_path: Path) -> None:
    params = {"prompt": "two shapes", "steps": 2, "regions": KEPT, "regional_attention": True}
    request = generation_request(params)
    assert (request.regional_steps, request.regional_double_interval) == (None, None)
    assert (request.regional_single_interval, request.regional_base_ratio) == (None, None)
    on = generation_request({**params, **RPF})
    assert (on.regional_steps, on.regional_single_interval, on.regional_base_ratio) == (1, 2, 0.3)
    for name, value in RPF.items():  # jobs that differ in any one never share a sampler run
        assert batch_key({**params, name: value}) != batch_key(params), name
    assert batch_key({**params, "regional_steps": None}) == batch_key(params)

    class Uploads:  # the store's one method edit_request asks of it here
        def upload_path(self, upload: str) -> Path:
            return tmp_path / upload

    edit_params = {**params, "kind": "edit", "image": "a" * 32}
    assert edit_request(edit_params, Uploads()).regional_base_ratio is None  # type: ignore[arg-type]
    on_edit = edit_request({**edit_params, **RPF}, Uploads())  # type: ignore[arg-type]
    assert (on_edit.regional_steps, on_edit.regional_single_interval, on_edit.regional_base_ratio) == (
        1,
        2,
        0.3,
    )


def test_jobs_that_differ_in_the_options_never_share_a_run(
    make_client: Callable[..., TestClient], gated: Any, wait_job: Callable[..., Any]
) -> None:
    client = make_client(gated, max_batch=8)
    seedless = {k: v for k, v in REGIONAL.items() if k != "seed"}
    assert client.post("/v1/jobs", json={"prompt": "hold the worker", "steps": 2}).status_code == 202
    assert gated.gate.reached.wait(10)
    ratios = [0.3, None, 0.3]
    answers = [
        client.post("/v1/jobs", json={**seedless, **({"regional_base_ratio": r} if r else {})})
        for r in ratios
    ]
    gated.gate.release.set()
    jobs = [wait_job(client, a.json()["id"]) for a in answers]
    assert [job["status"] for job in jobs] == ["succeeded"] * 3, jobs
    runs = gated.calls[1:]
    assert [(run.regional_base_ratio, run.num_images) for run in runs] == [(0.3, 2), (None, 1)], runs


def test_an_images_settings_give_the_options_back(client: TestClient) -> None:
    """POST /v1/images/settings answers them with the regions (and the body makes the same picture again)."""
    ((pixels, _),) = decode_images(client.post(GENERATIONS, json={**REGIONAL, **RPF}))
    image_id = client.get("/v1/jobs").json()["data"][0]["results"][0]["image_id"]
    answer = settings_of(client, client.get(f"/v1/images/{image_id}").content).json()
    settings = answer["settings"]
    assert {k: settings.get(k) for k in RPF} == RPF and settings["regional_attention"] is True, answer
    assert "regional_double_interval" not in settings  # a default is not recorded, so not answered
    assert not any("regional_" in n for n in answer["notices"]), answer["notices"]
    ((again, record),) = decode_images(
        client.post(GENERATIONS, json={**settings, "response_format": "b64_json"})
    )
    assert {k: record.get(k) for k in RPF} == RPF and np.array_equal(again, pixels)


def test_the_schema_documents_them(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    form = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]
    fields = schema["components"]["schemas"][form["schema"]["$ref"].rsplit("/", 1)[1]]["properties"]
    for name, words in (
        ("regional_steps", "mask_inject_steps"),
        ("regional_double_interval", "double_inject_blocks_interval"),
        ("regional_single_interval", "single_inject_blocks_interval"),
        ("regional_base_ratio", "base_ratio"),
    ):
        for where in (body, fields):
            assert "With regional_attention" in where[name]["description"], where[name]
            assert words in where[name]["description"], where[name]
    assert "`regional_steps`" in schema["info"]["description"]
