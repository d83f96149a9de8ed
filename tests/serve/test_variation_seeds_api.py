"""Variation seeds (A1111's, `pictor.noise_variation`) through the server: the JSON generations take
variation_seed, variation_strength and seed_resize_from, the edit forms the first two; the records carry them
and reproduce; a job with a variation strength never shares a sampler run (its images keep the seed and count
the variation seed instead); the errors name their field. The page:
tests/serve/test_browser_variation_seeds.py.
"""

from __future__ import annotations

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
from pictor.serve.pipeline_errors import job_error
from tests.serve.conftest import assert_refused, decode_images
from tests.serve.test_edits import edit, png_bytes, source_image

PROMPT = "a red circle"
VARIED = {"variation_seed": 9, "variation_strength": 0.3}


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _stored(client: TestClient, image_id: str) -> tuple[np.ndarray, dict[str, Any]]:
    """An image as the server wrote it: its pixels and the record in its PNG."""
    path = client.app.state.service.store.image_path(image_id)
    with Image.open(path) as im:
        return _px(im), read_record(path)


def test_a_generation_takes_variation_seeds_and_its_records_keep_them(
    client: TestClient, tiny: Pipeline
) -> None:
    body = {"prompt": PROMPT, "steps": 2, "seed": 5, "n": 2, "response_format": "b64_json", **VARIED}
    images = decode_images(client.post("/v1/images/generations", json={**body, "seed_resize_from": "16x48"}))
    records = [record for _, record in images]
    assert [r["seed"] for r in records] == [5, 5]  # every image keeps the seed...
    assert [r["variation_seed"] for r in records] == [9, 10]  # ...and counts the variation seed
    assert all(r["variation_strength"] == 0.3 and r["seed_resize_from"] == [16, 48] for r in records)
    direct = tiny.generate(
        GenerationRequest(PROMPT, steps=2, seed=5, num_images=2, seed_resize_from=(16, 48), **VARIED)
    )
    for (pixels, _), made in zip(images, direct, strict=True):
        assert np.array_equal(pixels, _px(made.image))
    # the job's request keeps them as the worker reads them
    job = client.get("/v1/jobs").json()["data"][0]["request"]
    assert (job["variation_seed"], job["variation_strength"], job["seed_resize_from"]) == (9, 0.3, [16, 48])

    # a strength without a variation seed: the server draws one, and the records keep it
    (_, drawn), (_, second) = decode_images(
        client.post(
            "/v1/images/generations",
            json={"prompt": PROMPT, "steps": 2, "seed": 5, "n": 2, "response_format": "b64_json",
                  "variation_strength": 0.5},
        )
    )  # fmt: skip
    assert (
        isinstance(drawn["variation_seed"], int) and second["variation_seed"] == drawn["variation_seed"] + 1
    )
    # without them, a record has none of the fields
    ((_, plain),) = decode_images(
        client.post(
            "/v1/images/generations", json={"prompt": PROMPT, "steps": 2, "response_format": "b64_json"}
        )
    )
    assert not {"variation_seed", "variation_strength", "seed_resize_from"} & set(plain)


def test_the_png_the_server_wrote_reproduces(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    body = {"prompt": PROMPT, "steps": 2, "seed": 3, "n": 2, "seed_resize_from": "16x16", **VARIED}
    r = client.post("/v1/jobs", json={**body, "size": "32x16"})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    results = job["results"]
    pixels, record = _stored(client, results[1]["image_id"])  # the second image: variation seed 10
    assert record["variation_seed"] == 10 and record["batch_index"] == 1
    assert np.array_equal(_px(reproduce(tiny, record).image), pixels)


def test_an_edit_takes_variation_seeds(client: TestClient, tiny: Pipeline) -> None:
    source = source_image()
    fields = {"n": "2", "seed": "4", "steps": "2", "strength": "0.8", "response_format": "b64_json"}
    images = decode_images(
        edit(client, png_bytes(source), **fields, variation_seed="7", variation_strength="0.4")
    )
    assert [record["variation_seed"] for _, record in images] == [7, 8]
    assert all(record["variation_strength"] == 0.4 and record["seed"] == 4 for _, record in images)
    direct = tiny.edit(
        EditRequest(source, PROMPT, strength=0.8, seed=4, steps=2, num_images=2, variation_seed=7,
                    variation_strength=0.4)
    )  # fmt: skip
    for (pixels, record), made in zip(images, direct, strict=True):
        assert np.array_equal(pixels, _px(made.image))
        assert np.array_equal(_px(reproduce(tiny, record, source=source).image), pixels)
    plain = decode_images(edit(client, png_bytes(source), **fields))
    assert not np.array_equal(plain[0][0], images[0][0])  # the strength changed the picture


def test_equal_variation_jobs_queued_together_each_run_alone(
    make_client: Callable[..., TestClient], gated: Any, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    """take_batch merges equal jobs as if image i of a run took seed + i; a varied image keeps its seed and
    takes variation seed + i instead, so a job with a variation strength never shares a run: each of these
    gives the image it would give alone."""
    client = make_client(gated, max_batch=8)

    def submit(**body: Any) -> str:
        r = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 2, **body})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    submit(prompt="hold the worker")
    assert gated.gate.reached.wait(10)
    seedless = [submit(**VARIED), submit(**VARIED)]  # equal: plain jobs like these would merge
    chained = [submit(seed=5, **VARIED), submit(seed=6, **VARIED)]  # the next seed: plain ones would merge
    behind_plain = [submit(), submit(**VARIED)]  # a varied job does not join a plain run either
    gated.gate.release.set()
    ids = [*seedless, *chained, *behind_plain]
    jobs = {job_id: wait_job(client, job_id) for job_id in ids}
    assert all(job["status"] == "succeeded" for job in jobs.values()), jobs
    runs = gated.calls[1:]
    assert len(runs) == 6 and all(run.num_images == 1 for run in runs), [
        (run.seed, run.num_images) for run in runs
    ]
    for job_id in ids:
        if job_id == behind_plain[0]:
            continue
        (result,) = jobs[job_id]["results"]
        pixels, record = _stored(client, result["image_id"])
        assert (record["variation_seed"], record["variation_strength"]) == (9, 0.3), record
        (alone,) = tiny.generate(GenerationRequest(PROMPT, steps=2, seed=result["seed"], **VARIED))
        assert np.array_equal(pixels, _px(alone.image))
    assert [jobs[job_id]["results"][0]["seed"] for job_id in chained] == [5, 6]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"variation_seed": 4}, "variation_strength", "without a variation strength"),
        ({"variation_strength": 2}, "variation_strength", "less than or equal to 1"),
        ({"variation_strength": -0.1}, "variation_strength", "greater than or equal to 0"),
        ({"variation_seed": -1, "variation_strength": 0.2}, "variation_seed", "greater than or equal to 0"),
        ({"seed_resize_from": "big"}, "seed_resize_from", "should match pattern"),
        ({"seed_resize_from": [16, 16]}, "seed_resize_from", "valid string"),
        ({"seed_resize_from": "1x16"}, "seed_resize_from", "whose sides are positive multiples of"),
    ],
)
def test_bad_variation_settings_are_400s_naming_the_field(
    client: TestClient, body: dict[str, Any], param: str, words: str
) -> None:
    for path in ("/v1/images/generations", "/v1/jobs"):
        response = client.post(path, json={"prompt": PROMPT, "steps": 2, **body})
        assert_refused(response, param, words)
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_the_edit_form_refuses_seed_resize_and_a_bare_variation_seed(client: TestClient) -> None:
    image = png_bytes(source_image())
    for path in ("/v1/images/edits", "/v1/jobs/edits"):
        refused = edit(client, image, path=path, seed_resize_from="32x32")
        assert_refused(refused, "seed_resize_from", "an edit's composition is its picture's")
        assert_refused(edit(client, image, path=path, variation_seed="3"), "variation_strength", "without")
        assert_refused(
            edit(client, image, path=path, variation_strength="1.5"),
            "variation_strength",
            "less than or equal",
        )
    assert client.get("/v1/jobs").json()["total"] == 0


def test_a_job_refused_when_it_runs_names_the_field(tiny: Pipeline) -> None:
    """A job queued while the model loads is checked when it runs: its error names the field too."""
    with pytest.raises(GenerationError) as info:
        tiny.generate(GenerationRequest(PROMPT, steps=2, seed_resize_from=(1, 16)))
    error = job_error(info.value)
    assert error["param"] == "seed_resize_from" and error["type"] == "invalid_request_error"
    with pytest.raises(GenerationError) as info:
        tiny.generate(GenerationRequest(PROMPT, steps=2, variation_seed=3))
    error = job_error(info.value)
    assert error["param"] == "variation_strength" and "variation_strength" in error["message"]
    assert "--variation-strength" not in error["message"]


def test_variations_take_no_variation_seeds(client: TestClient) -> None:
    """A variation already varies its picture with every seed: the variation endpoint does not take them."""
    files = {"image": ("a.png", png_bytes(source_image()), "image/png")}
    for field in ("variation_seed", "variation_strength", "seed_resize_from"):
        response = client.post("/v1/images/variations", files=files, data={field: "1"})
        assert_refused(response, field, "unknown field")


def test_a_seed_resize_past_the_servers_pixel_limit_is_refused(client: TestClient) -> None:
    """(Found in review: it was checked against the library's 4096x4096, not the server's limit.) The test
    server's limit is 64x64."""
    r = client.post("/v1/jobs", json={"prompt": "x", "seed_resize_from": "128x64"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed_resize_from", r.text
    assert "the limit is 4096" in r.json()["error"]["message"]


def test_a_strength_of_0_is_no_variation(client: TestClient, wait_job: Callable[..., Any]) -> None:
    job = client.post(
        "/v1/jobs", json={"prompt": "x", "steps": 2, "variation_strength": 0, "variation_seed": 9}
    )
    assert job.status_code == 202, job.text
    request = job.json()["request"]
    assert request["variation_seed"] is None and request["variation_strength"] is None
    done = wait_job(client, job.json()["id"], ("succeeded",))
    record = client.get(f"/v1/images/{done['results'][0]['image_id']}/metadata").json()["record"]
    assert record["seed"] is not None and "variation_seed" not in record
