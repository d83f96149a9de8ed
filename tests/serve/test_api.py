"""The HTTP API in process: OpenAI images, the job API, events, cancel, images, ops endpoints."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from pictor.pipeline import GenerationRequest, Pipeline
from pictor.provenance import parameters_text

PROMPT = "a red circle above a blue square"


def png_chunks(data: bytes) -> tuple[np.ndarray, dict[str, str]]:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im.convert("RGB")), dict(im.text)


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = [ln for ln in block.split("\n") if not ln.startswith(":")]
        name = next((ln[6:].strip() for ln in lines if ln.startswith("event:")), "message")
        data = "\n".join(ln[5:].strip() for ln in lines if ln.startswith("data:"))
        if data:
            events.append((name, json.loads(data)))
    return events


def test_generations_b64_with_seed_is_reproducible(client: TestClient, tiny: Pipeline) -> None:
    body = {"prompt": PROMPT, "n": 2, "size": "32x32", "response_format": "b64_json", "seed": 7}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out["created"], int) and len(out["data"]) == 2
    assert all(set(d) == {"b64_json"} for d in out["data"])  # no nulls for absent fields, like OpenAI
    pixels, chunks = zip(*(png_chunks(base64.b64decode(d["b64_json"])) for d in out["data"]), strict=True)
    records = [json.loads(c["pictor"]) for c in chunks]
    assert [rec["seed"] for rec in records] == [7, 8]
    assert chunks[0]["parameters"] == parameters_text(records[0])
    # the same pixels as the library gives for that request
    direct = tiny.generate(GenerationRequest(prompt=PROMPT, width=32, height=32, seed=7, num_images=2))
    for got, want in zip(pixels, direct, strict=True):
        assert np.array_equal(got, np.asarray(want.image))
    again = client.post("/v1/images/generations", json=body).json()
    assert again["data"][1]["b64_json"] == out["data"][1]["b64_json"]
    assert again["job_id"] != out["job_id"]


def test_generations_url_serves_the_stored_png(client: TestClient) -> None:
    r = client.post("/v1/images/generations", json={"prompt": PROMPT, "response_format": "url", "seed": 3})
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    image = client.get(url)
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    _, chunks = png_chunks(image.content)
    assert json.loads(chunks["pictor"])["prompt"] == PROMPT
    image_id = url.rsplit("/", 1)[1]
    meta = client.get(f"/v1/images/{image_id}/metadata").json()
    assert meta["parameters"] == chunks["parameters"]
    assert meta["record"] == json.loads(chunks["pictor"]) and meta["seed"] == 3


def test_every_request_is_a_job_in_the_history(client: TestClient) -> None:
    out = client.post("/v1/images/generations", json={"prompt": "history entry", "user": "u1"}).json()
    job = client.get(f"/v1/jobs/{out['job_id']}").json()
    assert job["status"] == "succeeded" and job["user"] == "u1"
    assert job["request"]["width"] == 32 and job["request"]["steps"] == 4  # defaults filled in
    assert [r["url"] for r in job["results"]] == [d["url"] for d in out["data"]]


def test_job_api_create_poll_list_search_page(client: TestClient, wait_job: Callable[..., Any]) -> None:
    prompts = ["a green triangle", "100% blue_square", "A GREEN circle"]
    ids = []
    for p in prompts:
        r = client.post("/v1/jobs", json={"prompt": p, "steps": 2})
        assert r.status_code == 202, r.text
        assert r.headers["location"].endswith(f"/v1/jobs/{r.json()['id']}")
        assert r.json()["status"] in ("queued", "running")
        ids.append(r.json()["id"])
    for job_id in ids:
        job = wait_job(client, job_id)
        assert job["status"] == "succeeded" and len(job["results"]) == 1
        assert job["progress"] == {"step": 2, "total": 2, "fraction": 1.0}
    listing = client.get("/v1/jobs").json()
    assert [j["id"] for j in listing["data"]] == ids[::-1]  # newest first
    assert listing["total"] == 3 and not listing["has_more"]
    green = client.get("/v1/jobs", params={"q": "green"}).json()
    assert {j["id"] for j in green["data"]} == {ids[0], ids[2]}  # case-insensitive
    # LIKE wildcards are literal text in a search
    assert [j["id"] for j in client.get("/v1/jobs", params={"q": "100%"}).json()["data"]] == [ids[1]]
    assert client.get("/v1/jobs", params={"q": "_"}).json()["total"] == 1
    page = client.get("/v1/jobs", params={"limit": 2, "offset": 0}).json()
    assert len(page["data"]) == 2 and page["has_more"]
    rest = client.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]


def test_events_stream_progress_until_done(client: TestClient) -> None:
    job = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 5, "n": 2}).json()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = sse_events(stream.read().decode())
    names = [name for name, _ in events]
    assert names[0] == "status" and names[-1] == "done"
    steps = [data["step"] for name, data in events if name == "progress"]
    assert steps == sorted(steps) and steps[-1] == 5
    final = events[-1][1]
    assert final["status"] == "succeeded" and len(final["results"]) == 2
    # a finished job's stream is just its state
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        assert [n for n, _ in sse_events(stream.read().decode())] == ["status", "done"]


def test_cancel_queued_and_running(
    make_client: Callable[..., TestClient], gated: Any, wait_job: Callable[..., Any]
) -> None:
    client = make_client(gated)
    running = client.post("/v1/jobs", json={"prompt": "long", "steps": 50}).json()
    assert gated.gate.reached.wait(10)
    queued = client.post("/v1/jobs", json={"prompt": "waiting", "steps": 2}).json()
    assert client.get(f"/v1/jobs/{queued['id']}").json()["queue_position"] == 0

    r = client.delete(f"/v1/jobs/{queued['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = client.delete(f"/v1/jobs/{running['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    calls_before = len(gated.calls)
    gated.gate.release.set()
    # the worker is free again: the cancelled run stopped, the cancelled queued job never ran
    after = client.post("/v1/jobs", json={"prompt": "after", "steps": 2}).json()
    assert wait_job(client, after["id"])["status"] == "succeeded"
    assert len(gated.calls) == calls_before + 1
    assert gated.steps[0] == [1]  # the cancelled run stopped at the step after its cancel
    assert client.get(f"/v1/jobs/{running['id']}").json()["results"] == []
    assert client.get("/metrics").text.count('pictor_jobs_finished_total{state="cancelled"} 2') == 1

    finished = client.delete(f"/v1/jobs/{after['id']}")
    assert finished.status_code == 409 and finished.json()["error"]["code"] == "job_finished"
    missing = client.delete("/v1/jobs/" + "0" * 32)
    assert missing.status_code == 404 and "no job" in missing.json()["error"]["message"]


def test_sync_request_whose_job_is_cancelled_gets_409(
    make_client: Callable[..., TestClient], gated: Any
) -> None:
    client = make_client(gated)
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.update(
            r=client.post("/v1/images/generations", json={"prompt": "x", "steps": 9})
        )
    )
    thread.start()
    assert gated.gate.reached.wait(10)
    job_id = client.get("/v1/jobs").json()["data"][0]["id"]
    client.delete(f"/v1/jobs/{job_id}")
    gated.gate.release.set()
    thread.join(10)
    assert result["r"].status_code == 409
    assert result["r"].json()["error"]["code"] == "job_cancelled"


def test_health_ready_models_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    card = client.get("/v1/models").json()["data"][0]
    assert card["ready"] and card["defaults"]["width"] == 32 and "euler" in card["samplers"]
    client.post("/v1/images/generations", json={"prompt": PROMPT, "n": 3})
    text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    metrics = text.text
    assert "pictor_queue_depth 0" in metrics
    assert 'pictor_jobs{state="succeeded"} 1' in metrics
    assert "pictor_images_generated_total 3" in metrics
    assert 'pictor_job_latency_seconds_bucket{le="+Inf"} 1' in metrics
    assert "pictor_job_latency_seconds_count 1" in metrics


def test_the_model_card_lists_every_schedule_and_each_runs(client: TestClient) -> None:
    from pictor.sampling import SCHEDULES

    card = client.get("/v1/models").json()["data"][0]
    assert card["schedules"] == list(SCHEDULES), card["schedules"]  # the page's Schedule select, in order
    for name in card["schedules"]:  # every one listed is one a request may name: its record says it ran
        body = {"prompt": PROMPT, "seed": 3, "steps": 2, "schedule": name, "response_format": "b64_json"}
        answer = client.post("/v1/images/generations", json=body)
        assert answer.status_code == 200, (name, answer.text)
        _, chunks = png_chunks(base64.b64decode(answer.json()["data"][0]["b64_json"]))
        assert json.loads(chunks["pictor"])["schedule"] == name


def test_model_that_fails_to_load_is_reported(make_client: Callable[..., TestClient]) -> None:
    client = make_client(None, model="no-such-model")  # no pipeline: the worker loads settings.model
    deadline = time.monotonic() + 20
    while client.get("/readyz").json()["status"] == "loading" and time.monotonic() < deadline:
        time.sleep(0.02)
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "error"
    assert "no-such-model" in ready.json()["detail"]
    r = client.post("/v1/jobs", json={"prompt": PROMPT})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"


def test_page_and_openapi(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert client.get("/static/app.js").status_code == 200
    spec = client.get("/openapi.json").json()
    ops = {(m.upper(), path): op for path, item in spec["paths"].items() for m, op in item.items()}
    expected = {
        ("POST", "/v1/images/generations"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/{job_id}"), ("DELETE", "/v1/jobs/{job_id}"), ("GET", "/v1/jobs/{job_id}/events"),
        ("GET", "/v1/images/{image_id}"), ("GET", "/v1/images/{image_id}/metadata"), ("GET", "/healthz"),
        ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v1/models"),
    }  # fmt: skip
    assert expected <= set(ops)
    # invalid input is a 400 (A1111's /sdapi answers a field it cannot take with a 422, as A1111 does)
    v1 = [op for (_, path), op in ops.items() if not path.startswith("/sdapi/")]
    assert all("422" not in op["responses"] for op in v1)
    gen = ops[("POST", "/v1/images/generations")]["responses"]
    assert {"200", "400", "401", "403", "429", "503"} <= set(gen)
    assert "image/png" in ops[("GET", "/v1/images/{image_id}")]["responses"]["200"]["content"]
    assert "text/event-stream" in ops[("GET", "/v1/jobs/{job_id}/events")]["responses"]["200"]["content"]
    assert ops[("POST", "/v1/jobs")]["responses"].get("202")
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
