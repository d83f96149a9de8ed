"""A1111's prompt editing (`pictor.prompt_editing`) through the server: the JSON generations, the edit and
variation forms and the job queue take `prompt_editing`; the records keep it and the pictures are the
pipeline's; without `prompt_weights` it is a 400 naming that field in the API's words; jobs that differ in it
never share a sampler run; a job's notices are about the texts the model reads. The page:
tests/serve/test_browser_prompt_editing.py."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.editing import EditRequest
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.provenance import read_record
from pictor.reproduce import reproduce
from pictor.serve.job_requests import batch_key, generation_request
from pictor.serve.pipeline_errors import api_message, field_of
from tests.serve import test_redux_api
from tests.serve.conftest import assert_refused, decode_images
from tests.serve.test_edits import edit, png_bytes, source_image

PROMPT = "a [red|blue] circle"
EDITING = {"prompt_weights": True, "prompt_editing": True}
BODY = {"prompt": PROMPT, "size": "64x64", "steps": 3, "seed": 2, "response_format": "b64_json"}
# A model with FLUX.1 Redux loaded (test_redux_api's), whose variations are generations.
files = test_redux_api.files
dev = test_redux_api.dev
# A text longer than the tiny text encoder's 16 tokens, read only for the first two of three steps.
LONG = "a [" + " ".join(["word"] * 40) + ":b:2] c"


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _stored(client: TestClient, image_id: str) -> tuple[np.ndarray, dict[str, Any]]:
    path = client.app.state.service.store.image_path(image_id)
    with Image.open(path) as im:
        return _px(im), read_record(path)


def test_a_generation_with_prompt_editing_is_the_pipelines_and_its_job_keeps_it(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    ((pixels, record),) = decode_images(client.post("/v1/images/generations", json={**BODY, **EDITING}))
    assert record["prompt_editing"] is True and record["prompt_weights"] is True, record
    (direct,) = tiny.generate(GenerationRequest(PROMPT, width=64, height=64, steps=3, seed=2, **EDITING))
    assert np.array_equal(pixels, _px(direct.image))
    assert np.array_equal(_px(reproduce(tiny, record).image), pixels)
    # The brackets are read as editing, not as weights alone.
    ((weighted, record),) = decode_images(
        client.post("/v1/images/generations", json={**BODY, "prompt_weights": True})
    )
    assert "prompt_editing" not in record and not np.array_equal(weighted, pixels)

    r = client.post("/v1/jobs", json={**BODY, **EDITING})
    assert r.status_code == 202 and r.json()["request"]["prompt_editing"] is True, r.text
    job = wait_job(client, r.json()["id"])
    stored, record = _stored(client, job["results"][0]["image_id"])
    assert record["prompt_editing"] is True and np.array_equal(stored, pixels)


def test_an_edit_and_a_variation_take_prompt_editing(client: TestClient, tiny: Pipeline) -> None:
    source = source_image()
    form = {"prompt_weights": "true", "prompt_editing": "true", "seed": "4", "steps": "2", "strength": "0.9"}
    ((pixels, record),) = decode_images(edit(client, png_bytes(source), PROMPT, **form))
    assert record["prompt_editing"] is True, record
    (direct,) = tiny.edit(EditRequest(source, PROMPT, seed=4, steps=2, strength=0.9, **EDITING))
    assert np.array_equal(pixels, _px(direct.image))
    ((plain, _),) = decode_images(
        edit(client, png_bytes(source), PROMPT, **{**form, "prompt_editing": "false"})
    )
    assert not np.array_equal(plain, pixels)

    r = edit(client, png_bytes(source), PROMPT, path="/v1/images/variations", **form)
    ((_, record),) = decode_images(r)
    assert record["prompt_editing"] is True, record


def test_a_redux_variation_takes_prompt_editing(
    make_client: Callable[..., TestClient], dev: Pipeline
) -> None:
    client = make_client(dev)
    picture = test_redux_api.redux_picture(3, (32, 32))
    form = {"prompt": PROMPT, "prompt_weights": "true", "prompt_editing": "true", "seed": "3", "steps": "2"}
    r = client.post(
        "/v1/images/variations",
        files={"image": ("picture.png", png_bytes(picture), "image/png")},
        data={**form, "response_format": "b64_json"},
    )
    ((pixels, record),) = decode_images(r)
    assert record["prompt_editing"] is True, record
    (direct,) = dev.generate(
        GenerationRequest(PROMPT, seed=3, steps=2, width=32, height=32, redux_image=picture, **EDITING)
    )
    assert np.array_equal(pixels, _px(direct.image))


def test_prompt_editing_without_prompt_weights_is_a_400_naming_prompt_weights(client: TestClient) -> None:
    words = "send prompt_weights true with prompt_editing"
    for path in ("/v1/images/generations", "/v1/jobs"):
        r = client.post(path, json={**BODY, "prompt_editing": True})
        assert_refused(r, "prompt_weights", words)
        assert "--" not in r.json()["error"]["message"], r.text
    form = {"prompt_editing": "true", "steps": "2"}
    for path in ("/v1/images/edits", "/v1/jobs/edits", "/v1/images/variations", "/v1/jobs/variations"):
        r = edit(client, png_bytes(source_image()), PROMPT, path=path, **form)
        assert_refused(r, "prompt_weights", words)


def test_the_pipelines_message_names_prompt_weights_in_api_words(tiny: Pipeline) -> None:
    with pytest.raises(GenerationError) as info:
        tiny.resolve_request(GenerationRequest(PROMPT, steps=2, prompt_editing=True))
    text = str(info.value)
    assert field_of(text) == "prompt_weights"
    assert not re.findall(r"--[a-z]", api_message(text)), api_message(text)
    assert api_message(text).endswith("send prompt_weights true with prompt_editing"), api_message(text)


def test_jobs_that_differ_in_prompt_editing_never_share_a_run(
    make_client: Callable[..., TestClient], gated: Any, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    client = make_client(gated, max_batch=8)

    def submit(**body: Any) -> str:
        r = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 2, "prompt_weights": True, **body})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    submit(prompt="hold the worker")
    assert gated.gate.reached.wait(10)
    ids = [submit(prompt_editing=True), submit(), submit(prompt_editing=True)]
    gated.gate.release.set()
    jobs = [wait_job(client, job_id) for job_id in ids]
    assert all(job["status"] == "succeeded" for job in jobs), jobs
    runs = gated.calls[1:]
    # the two equal editing jobs share one run; the one without editing runs on its own
    assert [(run.prompt_editing, run.num_images) for run in runs] == [(True, 2), (False, 1)], runs
    stored = [_stored(client, job["results"][0]["image_id"]) for job in jobs]
    assert [record.get("prompt_editing", False) for _, record in stored] == [True, False, True]
    first = jobs[0]["results"][0]["seed"]
    assert jobs[2]["results"][0]["seed"] == first + 1  # the next seed in the shared run
    shared = tiny.generate(GenerationRequest(PROMPT, steps=2, seed=first, num_images=2, **EDITING))
    assert np.array_equal(stored[0][0], _px(shared[0].image))
    assert np.array_equal(stored[2][0], _px(shared[1].image))
    seed = jobs[1]["results"][0]["seed"]
    (alone,) = tiny.generate(GenerationRequest(PROMPT, steps=2, seed=seed, prompt_weights=True))
    assert np.array_equal(stored[1][0], _px(alone.image))


def test_jobs_queued_before_prompt_editing_existed_read_as_without_it() -> None:
    params = {"prompt": PROMPT, "steps": 2, "prompt_weights": True}
    assert generation_request(params).prompt_editing is False
    assert generation_request({**params, "prompt_editing": True}).prompt_editing is True
    assert batch_key({**params, "prompt_editing": True}) != batch_key({**params, "prompt_editing": False})


@pytest.mark.filterwarnings("ignore::pictor.notices.PictorWarning")  # the server log's copy
def test_a_jobs_notices_are_about_the_texts_the_model_reads(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    """With prompt editing the raw prompt's brackets are no part of any text the model reads: the job says
    what the pipeline warns about the scheduled texts (here the first steps' text, cut off before ' c')."""
    body = {"prompt": LONG, "steps": 3, "seed": 1, **EDITING}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny.resolve_request(GenerationRequest(LONG, steps=3, seed=1, **EDITING))
    expected = [str(w.message) for w in caught if "longer than the text encoder" in str(w.message)]
    assert len(expected) == 1 and expected[0].endswith("word c'"), expected
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded" and job["warnings"] == expected, job
    # A text the schedule reaches only past the steps is not read: no notice, unless the hires pass's steps
    # reach it (as the pipeline checks both passes' schedules).
    late = "a [b:" + " ".join(["word"] * 40) + ":5] c"
    r = client.post("/v1/jobs", json={**body, "prompt": late})
    assert wait_job(client, r.json()["id"])["warnings"] == []
    hires = {"prompt": late, "size": "32x32", "hires_scale": 2, "hires_steps": 10}
    r = client.post("/v1/jobs", json={**body, **hires})
    assert r.status_code == 202, r.text
    (notice,) = wait_job(client, r.json()["id"])["warnings"]
    assert notice.endswith("word c'"), notice
    # Without editing, the raw prompt is the text read, and the notice says so.
    r = client.post("/v1/jobs", json={**body, "prompt_editing": False})
    job = wait_job(client, r.json()["id"])
    assert job["warnings"] != expected and ": b : 2 c'" in job["warnings"][0], job
