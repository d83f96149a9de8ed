"""Denoise tiles through the API: `denoise_tile` / `denoise_tile_overlap` on generations, jobs, edits and
variations, recorded and reproducible, part of the batching key (the overlap's default filled in first),
kept by queued jobs across a restart, bad values refused as 400s that name the field, and on the web page.

The tiny model's tokens are 4 pixels a side: at 64x64 a 32-pixel tile makes 3x3 windows (overlap 8)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.provenance import read_record
from pictor.reproduce import reproduce
from pictor.serve.job_requests import generation_request
from pictor.serve.pipeline_errors import api_message, field_of, job_error
from pictor.serve.store import QUEUED, JobRow, Store
from pictor.serve.upscale_runs import usable_record
from tests.serve import test_browser
from tests.serve.conftest import assert_refused, decode_images

# The browser tests' chromium (skipped where it is missing, as there).
browser = test_browser.browser

BODY = {"prompt": "a red circle", "size": "64x64", "steps": 3, "seed": 2, "response_format": "b64_json"}


def job_record(client: TestClient, job: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
    path = client.app.state.service.store.image_path(job["results"][0]["image_id"])
    with Image.open(path) as image:
        return read_record(path), np.asarray(image.convert("RGB"))


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_generation_records_its_tiles_reproduces_and_differs_from_whole(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    answer = client.post("/v1/images/generations", json={**BODY, "denoise_tile": 32})
    ((tiled, record),) = decode_images(answer)
    assert record["denoise_tile"] == 32 and record["denoise_tile_overlap"] == 8, record  # a quarter
    image_id = client.get(f"/v1/jobs/{answer.json()['job_id']}").json()["results"][0]["image_id"]
    metadata = client.get(f"/v1/images/{image_id}/metadata").json()
    assert metadata["record"] == record and "Denoise tile: 32" in metadata["parameters"], metadata
    ((whole, plain),) = decode_images(client.post("/v1/images/generations", json=BODY))
    assert "denoise_tile" not in plain and not np.array_equal(tiled, whole)
    assert np.array_equal(tiled, np.asarray(reproduce(tiny, record).image.convert("RGB")))
    # an uploaded PNG of it keeps a usable record (what an upscale of it keeps)
    assert usable_record(record) == record

    # the jobs endpoint: the job keeps both, the overlap as given
    r = client.post("/v1/jobs", json={**BODY, "denoise_tile": 32, "denoise_tile_overlap": 16})
    assert r.status_code == 202, r.text
    assert r.json()["request"]["denoise_tile"] == 32 and r.json()["request"]["denoise_tile_overlap"] == 16
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    record, pixels = job_record(client, job)
    assert (record["denoise_tile"], record["denoise_tile_overlap"]) == (32, 16)
    assert not np.array_equal(pixels, tiled)  # another overlap, other windows


def test_edit_and_variation_take_tiles(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    ((source, _),) = decode_images(client.post("/v1/images/generations", json=BODY))
    files = {"image": ("source.png", png(source), "image/png")}
    data = {"prompt": "a blue square", "steps": "3", "seed": "1", "strength": "0.6"}
    r = client.post("/v1/jobs/edits", files=files, data={**data, "denoise_tile": "32"})
    assert r.status_code == 202, r.text
    assert r.json()["request"]["denoise_tile_overlap"] == 8  # the default, filled in
    edited, tiled = job_record(client, wait_job(client, r.json()["id"]))
    assert edited["mode"] == "img2img" and (edited["denoise_tile"], edited["denoise_tile_overlap"]) == (32, 8)
    ((whole, plain),) = decode_images(
        client.post("/v1/images/edits", files=files, data={**data, "response_format": "b64_json"})
    )
    assert "denoise_tile" not in plain and not np.array_equal(tiled, whole)

    r = client.post(
        "/v1/jobs/variations",
        files=files,
        data={"steps": "2", "seed": "3", "denoise_tile": "32", "denoise_tile_overlap": "0"},
    )
    assert r.status_code == 202, r.text
    varied, _ = job_record(client, wait_job(client, r.json()["id"]))
    assert (varied["denoise_tile"], varied["denoise_tile_overlap"]) == (32, 0)


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"denoise_tile": 30}, "denoise_tile", "denoise tile 30 must be a multiple of 4 pixels"),
        ({"denoise_tile": 8}, "denoise_tile", "at least 16"),
        ({"denoise_tile": -32}, "denoise_tile", "denoise tile -32"),
        ({"denoise_tile": 32, "denoise_tile_overlap": 24}, "denoise_tile_overlap", "half the tile (16)"),
        ({"denoise_tile": 32, "denoise_tile_overlap": 6}, "denoise_tile_overlap", "multiple of 4"),
        ({"denoise_tile_overlap": 8}, "denoise_tile", "give denoise_tile too"),
        ({"denoise_tile": 32, "cache_threshold": 0.2}, "denoise_tile", "first-block cache do not go"),
    ],
    ids=["not a multiple", "too small", "negative", "overlap past half", "odd overlap", "no tile", "cache"],
)
def test_bad_tiles_are_refused_by_name(
    client: TestClient, fields: dict[str, Any], param: str, words: str
) -> None:
    assert_refused(client.post("/v1/images/generations", json={**BODY, **fields}), param, words)
    assert_refused(client.post("/v1/jobs", json={**BODY, **fields}), param, words)
    source = {"image": ("source.png", png(np.zeros((64, 64, 3), np.uint8)), "image/png")}
    form = {"prompt": "x", "steps": "2", **{k: str(v) for k, v in fields.items()}}
    assert_refused(client.post("/v1/jobs/edits", files=source, data=form), param, words)
    assert_refused(client.post("/v1/jobs/variations", files=source, data=form), param, words)
    assert client.get("/v1/jobs").json()["data"] == []  # nothing was queued
    # the server goes on: a good request runs
    assert client.post("/v1/images/generations", json={**BODY, "denoise_tile": 32}).status_code == 200


def test_values_that_are_no_integers_are_refused_by_name(client: TestClient) -> None:
    for value in (32.5, "32", True):
        r = client.post("/v1/jobs", json={**BODY, "denoise_tile": value})
        assert r.status_code == 400 and r.json()["error"]["param"] == "denoise_tile", r.text
    r = client.post("/v1/jobs", json={**BODY, "denoise_tile": 32, "denoise_tile_overlap": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "denoise_tile_overlap", r.text
    source = {"image": ("source.png", png(np.zeros((64, 64, 3), np.uint8)), "image/png")}
    r = client.post("/v1/jobs/edits", files=source, data={"prompt": "x", "denoise_tile": "big"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "denoise_tile", r.text


def _generation_error(pipe: Pipeline, **request: Any) -> str:
    with pytest.raises(GenerationError) as info:
        pipe.resolve_request(GenerationRequest(prompt="a", **request))
    return str(info.value)


MESSAGES: list[tuple[str, Callable[[Pipeline], str], str]] = [
    ("tile", lambda p: _generation_error(p, denoise_tile=30), "denoise_tile"),
    (
        "overlap",
        lambda p: _generation_error(p, denoise_tile=32, denoise_tile_overlap=20),
        "denoise_tile_overlap",
    ),
    ("overlap alone", lambda p: _generation_error(p, denoise_tile_overlap=8), "denoise_tile"),
    ("cache", lambda p: _generation_error(p, denoise_tile=32, cache_threshold=0.1), "denoise_tile"),
]


@pytest.mark.parametrize(("what", "message", "field"), MESSAGES, ids=[m[0] for m in MESSAGES])
def test_the_pipelines_messages_name_their_field(
    tiny: Pipeline, what: str, message: Callable[[Pipeline], str], field: str
) -> None:
    """As tests/serve/test_serve_job_errors.py checks the other fields: the messages the pipeline really
    gives, for a 400 and for a job refused when it runs (sent while the model loaded)."""
    text = message(tiny)
    assert field_of(text) == field, text
    api = api_message(text)
    assert "--" not in api, api
    error = job_error(GenerationError(text))
    assert error["param"] == field and error["message"] in (api, f"{field}: {api}"), error


def test_tiles_are_part_of_the_batching_key(
    make_client: Callable[..., TestClient], gated: Any, wait_job: Callable[..., Any]
) -> None:
    client = make_client(gated, max_batch=4)

    def submit(**body: Any) -> str:
        r = client.post("/v1/jobs", json={"prompt": "a red circle", "size": "64x64", "steps": 2, **body})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    submit(prompt="hold the worker")
    assert gated.gate.reached.wait(10)
    ids = [
        submit(denoise_tile=32),
        submit(),
        submit(denoise_tile=32, denoise_tile_overlap=8),  # the default spelled out: batches with the first
        submit(denoise_tile=32, denoise_tile_overlap=0),
        submit(),
    ]
    gated.gate.release.set()
    assert all(wait_job(client, i)["status"] == "succeeded" for i in ids)
    runs = sorted((r.denoise_tile or 0, r.denoise_tile_overlap or 0, r.num_images) for r in gated.calls[1:])
    assert runs == [(0, 0, 2), (32, 0, 1), (32, 8, 2)], runs
    assert [r.denoise_tile_overlap for r in gated.calls[1:] if r.denoise_tile is None] == [None]


def test_queued_jobs_keep_their_tiles_across_a_restart(
    make_client: Callable[..., TestClient], tiny: Pipeline, tmp_path: Path, wait_job: Callable[..., Any]
) -> None:
    params = {**BODY, "width": 64, "height": 64, "negative_prompt": "", "n": 1}
    params |= {"denoise_tile": 32, "denoise_tile_overlap": 8}
    del params["size"], params["response_format"]
    assert generation_request(params).denoise_tile == 32
    store = Store(tmp_path / "data")
    row = JobRow("e" * 32, time.time(), QUEUED, params)
    store.add_job(row)
    store.close()

    client = make_client(tiny)
    job = wait_job(client, row.id)
    assert job["status"] == "succeeded", job
    record, _ = job_record(client, job)
    assert (record["denoise_tile"], record["denoise_tile_overlap"]) == (32, 8)


def test_the_page_sends_tiles_and_puts_them_back(browser: Any, live_server: Any) -> None:
    """Denoise tile fields under Settings go with the request into the record; Reuse settings puts them
    back and Reproduce sends them again (the same PNG)."""
    from playwright.sync_api import expect

    live = live_server()
    page, problems = test_browser.open_page(browser, live.url, height=900)
    test_browser.fill_settings(page, "a tiled star", 5, 3)
    page.get_by_label("Width", exact=True).fill("64")
    page.get_by_label("Height", exact=True).fill("64")
    page.get_by_label("Denoise tile", exact=True).fill("32")
    page.get_by_label("Denoise tile overlap", exact=True).fill("4")
    test_browser.generate_one(page)
    request = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]["request"]
    assert (request["denoise_tile"], request["denoise_tile_overlap"]) == (32, 4)

    thumb = page.get_by_role("img", name="a tiled star (seed 5)")
    thumb.click()
    expect(page.locator("#viewer-parameters")).to_contain_text("Denoise tile: 32")
    page.get_by_role("button", name="Close").click()
    page.get_by_label("Denoise tile", exact=True).fill("")
    page.get_by_label("Denoise tile overlap", exact=True).fill("")
    thumb.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.get_by_label("Denoise tile", exact=True)).to_have_value("32")
    expect(page.get_by_label("Denoise tile overlap", exact=True)).to_have_value("4")
    jobs = test_browser.reproduce_twice(page, live.url, thumb, "a tiled star (seed 5)")
    assert jobs[0]["request"]["denoise_tile"] == 32
    with Image.open(io.BytesIO(httpx.get(jobs[0]["results"][0]["url"]).content)) as im:
        assert json.loads(im.text["pictor"])["denoise_tile_overlap"] == 4
    assert problems == [], problems
