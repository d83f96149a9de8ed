"""A model that fails to load: the jobs queued for it end failed and say why and what to do, the server stays
up and refuses jobs for a while (503, Retry-After), then loads the model again for the next job."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pictor.cli import main as cli_main
from pictor.cli_args import build_parser
from pictor.pipeline import Pipeline
from pictor.serve.settings import ServeSettings
from pictor.serve.store import QUEUED, JobRow, Store
from tests.serve.conftest import wait_for
from tests.serve.test_edits import png_bytes, source_image


class Loads:
    """Stands in for `pictor.loading.load`: each call waits for `go`, then raises or returns the next of
    `outcomes`."""

    def __init__(self, outcomes: list[Any]) -> None:
        self.outcomes = outcomes
        self.go = threading.Event()
        self.calls = 0
        self.options: list[dict[str, Any]] = []  # the keyword options of each call (offload ...)

    def __call__(self, model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        self.options.append(options)
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
    # a pause long enough that a loaded machine still asks within it (0.5 s was not, under load)
    client = make_client(None, model="tiny", load_retry=2.0)
    manager = client.app.state.service.manager
    wait_for(lambda: manager.load_error, what="the first load to fail")
    assert client.post("/v1/jobs", json={"prompt": "too soon"}).status_code == 503
    time.sleep(2.1)
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
    client = make_client(None, model="tiny", load_retry=2.0)  # as above: room for a loaded machine
    manager = client.app.state.service.manager
    wait_for(lambda: manager.load_error, what="the first load to fail")
    files = {"image": ("picture.png", png_bytes(source_image()), "image/png")}
    soon = client.post("/v1/images/variations", files=files)
    assert soon.status_code == 503 and soon.json()["error"]["code"] == "model_unavailable", soon.text
    time.sleep(2.1)
    later = client.post("/v1/images/variations", files=files)
    assert later.status_code == 503 and later.json()["error"]["code"] == "model_loading", later.text
    wait_for(lambda: manager.ready, what="the model to load again")
    assert load.calls == 2
    assert client.post("/v1/images/variations", files=files, data={"steps": "2"}).status_code == 200


def test_a_hires_request_without_a_size_after_a_failed_load_asks_for_the_model_again(
    make_client: Callable[..., TestClient], loads: Callable[[list[Any]], Loads], tiny: Pipeline
) -> None:
    """Without the model a hires request without a size cannot be checked: inside the pause it is refused as
    every job is (model_unavailable), after it it asks for the model (queueing nothing) and says it loads."""
    load = loads([BROKEN, tiny])
    load.go.set()
    # a pause long enough that the first request lands inside it on a busy machine (0.5 s did not, once)
    client = make_client(None, model="tiny", load_retry=3)
    manager = client.app.state.service.manager
    wait_for(lambda: manager.load_error, what="the first load to fail")
    hires = {"prompt": "a", "steps": 2, "hires_scale": 2}
    soon = client.post("/v1/jobs", json=hires)
    assert soon.status_code == 503 and soon.json()["error"]["code"] == "model_unavailable", soon.text
    assert 0 < int(soon.headers["retry-after"]) <= 3
    time.sleep(3.1)
    later = client.post("/v1/jobs", json=hires)
    assert later.status_code == 503 and later.json()["error"]["code"] == "model_loading", later.text
    assert "give a size" in later.json()["error"]["message"]
    wait_for(lambda: manager.ready, what="the model to load again")
    assert load.calls == 2 and client.get("/readyz").json()["status"] == "ready"
    assert client.post("/v1/jobs", json=hires).status_code == 202


def test_requests_refused_anyway_are_refused_before_their_pictures_are_read(
    make_client: Callable[..., TestClient], loads: Callable[[list[Any]], Loads]
) -> None:
    """While a failed load is not to be tried again (and while the server drains), generations, edits and
    variations get the 503 before their pictures are decoded: unreadable pictures are not what is blamed."""
    load = loads([BROKEN])
    load.go.set()
    client = make_client(None, model="tiny", load_retry=60)
    manager = client.app.state.service.manager
    wait_for(lambda: manager.load_error, what="the load to fail")
    junk = "bm90IGEgcGljdHVyZQ=="  # base64, but no picture
    garbage = {"image": ("source.png", b"not a picture", "image/png")}
    answers = [
        client.post("/v1/jobs", json={"prompt": "a", "reference_image": junk}),
        client.post("/v1/images/generations", json={"prompt": "a", "controlnet_images": [junk]}),
        client.post("/v1/jobs/edits", files=garbage, data={"prompt": "a"}),
        client.post("/v1/images/edits", files=garbage, data={"prompt": "a"}),
        client.post("/v1/jobs/variations", files=garbage),
    ]
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "model_unavailable", answer.text
    manager.begin_drain()
    for answer in (
        client.post("/v1/jobs/edits", files=garbage, data={"prompt": "a"}),
        client.post("/v1/jobs", json={"prompt": "a", "reference_image": junk}),
    ):
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down", answer.text
    assert not any(client.app.state.service.store.uploads_dir.iterdir())


def test_jobs_resumed_after_a_restart_wait_through_a_failed_load(
    make_client: Callable[..., TestClient],
    tiny: Pipeline,
    monkeypatch: pytest.MonkeyPatch,
    wait_job: Callable[..., Any],
) -> None:
    """A restart promises to run the unfinished jobs again: a failed load leaves them queued with their
    uploads (a job sent since the start fails, its client told at once), the worker tries the load again
    by itself after load_retry, and they run once it succeeds."""
    first, second, calls = threading.Event(), threading.Event(), []

    def load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        calls.append(model)
        if len(calls) == 1:
            assert first.wait(30)
            raise BROKEN
        assert second.wait(30)
        return tiny

    monkeypatch.setattr("pictor.loading.load", load)
    store = Store(make_client.data_dir)
    picture = store.write_upload(source_image())
    edit = {"kind": "edit", "prompt": "a red circle", "steps": 2, "n": 1, "strength": 0.5, "image": picture}
    store.add_job(JobRow("a" * 32, time.time(), QUEUED, edit))
    store.add_job(JobRow("b" * 32, time.time(), QUEUED, {"prompt": "a red circle", "steps": 2, "n": 1}))
    store.mark_running(["b" * 32], time.time())  # running when the server stopped
    store.close()
    try:
        client = make_client(None, model="tiny", load_retry=1.0)
        sent = client.post("/v1/jobs", json={"prompt": "sent since the start", "steps": 2})
        assert sent.status_code == 202, sent.text
        first.set()
        failed = wait_job(client, sent.json()["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "model_unavailable", failed
        for job_id in ("a" * 32, "b" * 32):
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "queued" and job["error"] is None, job
        assert client.app.state.service.store.upload_path(picture).is_file()
        assert len(calls) == 1  # not again at once
        wait_for(lambda: len(calls) == 2, what="the worker to load the model again by itself")
    finally:
        second.set()
    for job_id in ("a" * 32, "b" * 32):
        assert wait_job(client, job_id)["status"] == "succeeded"
    assert client.get("/readyz").json()["status"] == "ready"


def test_serve_takes_load_retry_from_the_command_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`pictor serve --load-retry SECONDS` (the name its error message uses), checked."""
    given: list[ServeSettings] = []

    def serve(settings: ServeSettings, log_level: str = "info") -> int:
        given.append(settings)
        return 0

    monkeypatch.setattr("pictor.serve.server.serve", serve)
    base = ["serve", "--port", "0", "--data-dir", str(tmp_path)]
    assert build_parser().parse_args(base).load_retry == ServeSettings().load_retry == 60
    assert cli_main([*base, "--load-retry", "2.5"]) == 0
    assert given[-1].load_retry == 2.5
    for bad in ("-1", "nan", "inf"):
        assert cli_main([*base, "--load-retry", bad]) == 2
        assert "load-retry must be a number of seconds >= 0" in capsys.readouterr().err
    assert len(given) == 1


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_a_job_timeout_that_is_no_positive_number_is_refused(value: float) -> None:
    from pictor.serve.settings import ServeSettings

    with pytest.raises(ValueError, match="job-timeout must be a number of seconds > 0"):
        ServeSettings(job_timeout=value)
    assert ServeSettings(job_timeout=float("inf")).job_timeout == float("inf")  # no limit stays possible


def test_serve_loads_the_model_with_the_offload_given_on_the_command_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    make_client: Callable[..., TestClient],
    loads: Callable[[list[Any]], Loads],
    tiny: Pipeline,
) -> None:
    """`pictor serve --offload blocks --blocks-on-device 2` reaches the settings, and the server's load of
    the model takes them; a block count without block offload is refused before the server starts."""
    given: list[ServeSettings] = []

    def serve(settings: ServeSettings, log_level: str = "info") -> int:
        given.append(settings)
        return 0

    monkeypatch.setattr("pictor.serve.server.serve", serve)
    base = ["serve", "--port", "0", "--data-dir", str(tmp_path)]
    assert cli_main(base) == 0
    assert (given[-1].offload, given[-1].blocks_on_device) == (None, 0)
    assert cli_main([*base, "--offload", "blocks", "--blocks-on-device", "2"]) == 0
    assert (given[-1].offload, given[-1].blocks_on_device) == ("blocks", 2)
    assert cli_main([*base, "--offload", "model", "--blocks-on-device", "2"]) == 2
    assert "add --offload blocks or drop --blocks-on-device" in capsys.readouterr().err
    assert len(given) == 2

    load = loads([tiny])
    load.go.set()
    client = make_client(None, model="tiny", offload="blocks", blocks_on_device=2)
    wait_for(lambda: load.calls == 1, what="the model to load")
    assert load.options == [{"offload": "blocks", "blocks_on_device": 2}]
    assert client.get("/healthz").status_code == 200
