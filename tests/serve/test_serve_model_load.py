"""A model that fails to load: the jobs queued for it end failed and say why and what to do, the server stays
up and refuses jobs for a while (503, Retry-After), then loads the model again for the next job."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pictor.pipeline import Pipeline
from tests.serve.conftest import wait_for
from tests.serve.test_edits import png_bytes, source_image


class Loads:
    """Stands in for `pictor.loading.load`: each call waits for `go`, then raises or returns the next of
    `outcomes`."""

    def __init__(self, outcomes: list[Any]) -> None:
        self.outcomes = outcomes
        self.go = threading.Event()
        self.calls = 0

    def __call__(self, model: Any = None, device: Any = None, dtype: Any = None) -> Any:
        assert self.go.wait(30)
        outcome = self.outcomes[min(self.calls, len(self.outcomes) - 1)]
        self.calls += 1
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[list[Any]], Loads]]:
    made: list[Loads] = []

    def make(outcomes: list[Any]) -> Loads:
        fake = Loads(outcomes)
        monkeypatch.setattr("pictor.loading.load", fake)  # the server's loader imports it when it runs
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.go.set()  # a failed test must not leave the worker blocked


BROKEN = ValueError("flux1-dev.safetensors: not a readable safetensors file (truncated)")


def test_jobs_queued_while_the_model_fails_to_load_end_failed(
    make_client: Callable[..., TestClient], loads: Callable[[list[Any]], Loads], wait_job: Callable[..., Any]
) -> None:
    load = loads([BROKEN])
    client = make_client(None, model="flux1-dev", load_retry=60)
    generation = client.post("/v1/jobs", json={"prompt": "a red circle"})
    files = {"image": ("source.png", png_bytes(source_image()), "image/png")}
    edit = client.post("/v1/jobs/edits", files=files, data={"prompt": "a red circle"})
    assert generation.status_code == edit.status_code == 202, (generation.text, edit.text)
    uploads = client.app.state.service.store.uploads_dir
    assert any(uploads.iterdir())  # the edit's picture, kept while its job waits for the model
    waiting: dict[str, Any] = {}
    sync = threading.Thread(
        target=lambda: waiting.update(r=client.post("/v1/images/generations", json={"prompt": "sync"}))
    )
    sync.start()
    wait_for(lambda: client.app.state.service.manager.queue_depth() == 3, what="the sync job to queue")
    load.go.set()

    for accepted in (generation, edit):
        job = wait_job(client, accepted.json()["id"], timeout=10)
        error = job["error"]
        assert job["status"] == "failed" and error["code"] == "model_unavailable", job
        assert error["type"] == "server_error"
        assert "could not load model 'flux1-dev'" in error["message"] and "truncated" in error["message"]
        assert "send the job again" in error["message"] and "GET /readyz" in error["message"]
    sync.join(10)
    answer = waiting["r"]
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_unavailable", answer.text
    assert answer.headers["retry-after"] == "60"
    assert not any(uploads.iterdir())  # a failed job's pictures go with it

    # The server is up and says why; new jobs are refused, for as long as a reload would be too soon.
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "truncated" in ready.json()["detail"]
    refused = client.post("/v1/jobs", json={"prompt": "a red circle"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
    assert (
        55 <= int(refused.headers["retry-after"]) <= 60 and "truncated" in refused.json()["error"]["message"]
    )
    assert load.calls == 1
    assert client.get("/v1/jobs").json()["total"] == 3


def test_a_failed_load_is_tried_again_for_a_later_job(
    make_client: Callable[..., TestClient],
    loads: Callable[[list[Any]], Loads],
    tiny: Pipeline,
    wait_job: Callable[..., Any],
) -> None:
    """A model file fixed after a failed load (copied in full, a LoRA or Redux file replaced) is picked up
    without a restart, by the first job after the pause."""
    load = loads([BROKEN, tiny])
    load.go.set()
    client = make_client(None, model="tiny", load_retry=0.5)
    manager = client.app.state.service.manager
    wait_for(lambda: manager.load_error, what="the first load to fail")
    assert client.post("/v1/jobs", json={"prompt": "too soon"}).status_code == 503
    time.sleep(0.6)
    job = client.post("/v1/jobs", json={"prompt": "a red circle", "steps": 2})
    assert job.status_code == 202, job.text
    assert wait_job(client, job.json()["id"])["status"] == "succeeded"
    assert load.calls == 2 and client.get("/readyz").json()["status"] == "ready"


def test_a_variation_after_a_failed_load_asks_for_the_model_again(
    make_client: Callable[..., TestClient], loads: Callable[[list[Any]], Loads], tiny: Pipeline
) -> None:
    """A variation needs the model to be checked at all, so it queues nothing: it asks for the model and
    answers 503 model_loading, as while the model first loads."""
    load = loads([BROKEN, tiny])
    load.go.set()
    client = make_client(None, model="tiny", load_retry=0.5)
    manager = client.app.state.service.manager
    wait_for(lambda: manager.load_error, what="the first load to fail")
    files = {"image": ("picture.png", png_bytes(source_image()), "image/png")}
    soon = client.post("/v1/images/variations", files=files)
    assert soon.status_code == 503 and soon.json()["error"]["code"] == "model_unavailable", soon.text
    time.sleep(0.6)
    later = client.post("/v1/images/variations", files=files)
    assert later.status_code == 503 and later.json()["error"]["code"] == "model_loading", later.text
    wait_for(lambda: manager.ready, what="the model to load again")
    assert load.calls == 2
    assert client.post("/v1/images/variations", files=files, data={"steps": "2"}).status_code == 200
