"""The first-block cache through the API: `cache_threshold` on generations, jobs and edits, recorded and
reproducible, part of the batching key (0 batches with none), out-of-range values refused by name."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from pictor.pipeline import Pipeline
from pictor.provenance import read_record
from pictor.reproduce import reproduce


def job_record(client: TestClient, job: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
    path = client.app.state.service.store.image_path(job["results"][0]["image_id"])
    with Image.open(path) as image:
        return read_record(path), np.asarray(image.convert("RGB"))


def test_generation_and_edit_record_and_reproduce(
    make_client: Callable[..., TestClient], tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    client = make_client(tiny)
    r = client.post(
        "/v1/jobs", json={"prompt": "a red circle", "steps": 5, "seed": 2, "cache_threshold": 0.9}
    )
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded" and job["request"]["cache_threshold"] == 0.9, job
    record, pixels = job_record(client, job)
    assert record["cache_threshold"] == 0.9
    assert np.array_equal(pixels, np.asarray(reproduce(tiny, record).image))

    source = io.BytesIO()
    Image.fromarray(pixels).save(source, format="PNG")
    files = {"image": ("source.png", source.getvalue(), "image/png")}
    data = {"prompt": "a blue square", "steps": "4", "seed": "1", "cache_threshold": "0.9"}
    r = client.post("/v1/jobs/edits", files=files, data=data)
    assert r.status_code == 202, r.text
    edited, _ = job_record(client, wait_job(client, r.json()["id"]))
    assert edited["cache_threshold"] == 0.9 and edited["mode"] == "img2img"

    for bad in (1.5, -0.1):
        r = client.post("/v1/jobs", json={"prompt": "x", "cache_threshold": bad})
        assert r.status_code == 400 and "cache_threshold" in r.text, r.text
    r = client.post("/v1/jobs/edits", files=files, data={**data, "cache_threshold": "2"})
    assert r.status_code == 400 and "cache_threshold" in r.text, r.text


def test_threshold_is_part_of_the_batching_key(
    make_client: Callable[..., TestClient], gated: Any, wait_job: Callable[..., Any]
) -> None:
    client = make_client(gated, max_batch=4)

    def submit(**body: Any) -> str:
        r = client.post("/v1/jobs", json={"prompt": "a red circle", "steps": 2, **body})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    submit(prompt="hold the worker")
    assert gated.gate.reached.wait(10)
    ids = [submit(cache_threshold=0.2), submit(), submit(cache_threshold=0), submit(cache_threshold=0.2)]
    gated.gate.release.set()
    assert all(wait_job(client, i)["status"] == "succeeded" for i in ids)
    runs = sorted((r.cache_threshold or 0, r.num_images) for r in gated.calls[1:])
    assert runs == [(0, 2), (0.2, 2)], runs  # 0 is off: it ran with the request that gave none
