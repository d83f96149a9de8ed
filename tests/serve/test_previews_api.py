"""Live previews of running jobs: GET /v1/jobs/{id}/preview, the `preview` events, `--previews`."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.pipeline import Pipeline
from pictor.serve.job_requests import Live
from pictor.serve.previews import shown_by_job
from pictor.serve.settings import ServeSettings
from tests.serve.conftest import wait_for
from tests.serve.test_api import sse_events
from tests.serve.test_edits import png_bytes, source_image

PROMPT = "a red circle"


class PreviewGated:
    """The tiny pipeline, held after its first preview was handed to the server until released: a job
    that certainly has a preview and is still running. Records the `previews` each call got."""

    def __init__(self, inner: Pipeline) -> None:
        self._inner = inner
        self.shown = threading.Event()
        self.release = threading.Event()
        self.asked: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def generate(self, request: Any, progress: Any = None, previews: Any = None) -> Any:
        self.asked.append(previews)
        if previews is None:
            return self._inner.generate(request, progress)

        def held(pictures: list[Image.Image], first_index: int) -> None:
            previews.on_frame(pictures, first_index)
            self.shown.set()
            assert self.release.wait(30), "never released"

        return self._inner.generate(request, progress, replace(previews, on_frame=held))


@pytest.fixture
def held(tiny: Pipeline) -> Iterator[PreviewGated]:
    pipe = PreviewGated(tiny)
    yield pipe
    pipe.release.set()


def _jpeg(response: Any) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["cache-control"] == "no-store"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG"
    return image


def test_a_running_job_has_a_preview_and_others_say_why_not(
    make_client: Callable[..., TestClient], held: PreviewGated, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    client = make_client(held)
    running = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 3, "seed": 1}).json()
    queued = client.post("/v1/jobs", json={"prompt": "another prompt", "steps": 3}).json()  # not merged
    assert held.shown.wait(30)
    shown = client.get(f"/v1/jobs/{running['id']}/preview")
    f = tiny.autoencoder.params.downsample_factor
    assert _jpeg(shown).size == (32 // f, 32 // f)  # approx (the default): the latent grid
    assert shown.headers["x-preview-step"] == "1" and shown.headers["x-preview-total"] == "3"
    waiting = client.get(f"/v1/jobs/{queued['id']}/preview")
    assert waiting.status_code == 404 and waiting.json()["error"]["code"] == "no_preview"
    assert "queued" in waiting.json()["error"]["message"]
    held.release.set()
    wait_job(client, running["id"], ("succeeded",))
    wait_job(client, queued["id"], ("succeeded",))
    done = client.get(f"/v1/jobs/{running['id']}/preview")
    assert done.status_code == 404 and "succeeded" in done.json()["error"]["message"]
    assert client.get(f"/v1/jobs/{'0' * 32}/preview").json()["error"]["code"] == "job_not_found"
    assert all(p is not None and p.method == "approx" for p in held.asked)


def test_full_previews_are_decoded_pictures(
    make_client: Callable[..., TestClient], held: PreviewGated
) -> None:
    client = make_client(held, previews="full")
    job = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 3}).json()
    assert held.shown.wait(30)
    assert _jpeg(client.get(f"/v1/jobs/{job['id']}/preview")).size == (32, 32)
    held.release.set()


def test_previews_off(
    make_client: Callable[..., TestClient], gated: Any, wait_job: Callable[..., Any]
) -> None:
    client = make_client(gated, previews="off")
    job = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 3}).json()
    assert gated.gate.reached.wait(30)
    wait_for(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", what="running")
    refused = client.get(f"/v1/jobs/{job['id']}/preview")
    assert refused.status_code == 404 and "previews are off" in refused.json()["error"]["message"]
    gated.gate.release.set()
    wait_job(client, job["id"], ("succeeded",))
    with pytest.raises(ValueError, match="previews must be one of approx, full, off"):
        ServeSettings(previews="taesd")


def test_events_announce_each_preview(client: TestClient) -> None:
    job = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 3, "n": 2}).json()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        events = sse_events(stream.read().decode())
    previews = [data for name, data in events if name == "preview"]
    assert [p["step"] for p in previews] == [1, 2, 3]
    assert all(p["total"] == 3 and p["id"] == job["id"] for p in previews)
    for p in previews:  # each carries its picture: the job's first image's, on the latent grid (f = 2)
        head, _, data = p["image"].partition(",")
        assert head == "data:image/jpeg;base64"
        assert Image.open(io.BytesIO(base64.b64decode(data))).size == (16, 16)
    assert previews[0]["image"] != previews[-1]["image"]
    assert all("image" not in data for name, data in events if name == "progress")
    assert events[-1][0] == "done" and events[-1][1]["status"] == "succeeded"


def test_edits_are_previewed(client: TestClient) -> None:
    files = {"image": ("source.png", png_bytes(source_image()), "image/png")}
    form = {"prompt": PROMPT, "steps": "2", "strength": "0.6"}
    job = client.post("/v1/jobs/edits", files=files, data=form).json()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        events = sse_events(stream.read().decode())
    assert [data["step"] for name, data in events if name == "preview"] == [1, 2]


def test_merged_jobs_each_show_their_own_first_image() -> None:
    """A run of jobs with 2, 1 and 3 images (request indices 0-1, 2, 3-5), shown in frames of runs."""
    batch = [cast(Live, SimpleNamespace(job=SimpleNamespace(n=n))) for n in (2, 1, 3)]
    pictures = [Image.new("RGB", (1, 1), (i, 0, 0)) for i in range(6)]

    def shown(first: int, count: int) -> list[tuple[int, int]]:
        frame = pictures[first : first + count]
        return [
            (batch.index(live), pic.getpixel((0, 0))[0]) for live, pic in shown_by_job(batch, frame, first)
        ]

    assert shown(0, 6) == [(0, 0), (1, 2), (2, 3)]
    assert shown(0, 4) == [(0, 0), (1, 2), (2, 3)]  # a run of 4: the third job's first image is in it
    assert shown(1, 2) == [(0, 1), (1, 2)]
    assert shown(4, 2) == [(2, 4)]  # the third job's later images, in a run of their own


class HeldRuns:
    """The tiny pipeline: the run of the prompt "first" waits for `go_first` (so the jobs sent behind it
    queue up and merge); every later run hands its first frame to the server and then waits for
    `release`."""

    def __init__(self, inner: Pipeline) -> None:
        self._inner = inner
        self.go_first = threading.Event()
        self.shown = threading.Event()
        self.release = threading.Event()
        self.requests: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def generate(self, request: Any, progress: Any = None, previews: Any = None) -> Any:
        self.requests.append(request)
        if request.prompt == "first":
            assert self.go_first.wait(30)
            return self._inner.generate(request, progress, previews)

        def held(pictures: list[Image.Image], first_index: int) -> None:
            previews.on_frame(pictures, first_index)
            self.shown.set()
            assert self.release.wait(30)

        return self._inner.generate(request, progress, replace(previews, on_frame=held))


@pytest.fixture
def held_runs(tiny: Pipeline) -> Iterator[HeldRuns]:
    pipe = HeldRuns(tiny)
    yield pipe
    pipe.go_first.set()
    pipe.release.set()


def _merged_pair(client: TestClient, pipe: HeldRuns) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two jobs of one prompt that share a sampler run (queued behind a held one)."""
    client.post("/v1/jobs", json={"prompt": "first", "steps": 1})
    wait_for(lambda: len(pipe.requests) == 1, what="the first job running")
    a = client.post("/v1/jobs", json={"prompt": "merged", "steps": 3}).json()
    b = client.post("/v1/jobs", json={"prompt": "merged", "steps": 3}).json()
    pipe.go_first.set()
    return a, b


def test_a_cancelled_job_of_a_merged_run_shows_no_preview(
    make_client: Callable[..., TestClient], held_runs: HeldRuns
) -> None:
    """(Found in review: the run goes on for its other job, and the cancelled one kept serving its
    preview.)"""
    client = make_client(held_runs)
    a, b = _merged_pair(client, held_runs)
    assert held_runs.shown.wait(30)
    assert held_runs.requests[-1].num_images == 2  # one run for both
    assert client.get(f"/v1/jobs/{b['id']}/preview").status_code == 200
    assert client.delete(f"/v1/jobs/{b['id']}").json()["status"] == "cancelled"
    gone = client.get(f"/v1/jobs/{b['id']}/preview")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "no_preview"
    assert client.get(f"/v1/jobs/{a['id']}/preview").status_code == 200  # its run-mate still has one


def test_a_finished_job_shows_no_preview_while_its_run_mates_are_saved(
    make_client: Callable[..., TestClient], held_runs: HeldRuns
) -> None:
    held_runs.release.set()  # frames are not held here: the second job's image write is
    client = make_client(held_runs)
    store = client.app.state.service.manager.store
    write, written, hold = store.write_image, [], threading.Event()

    def slow_write(image: Image.Image, record: dict[str, Any]) -> Any:
        if record.get("prompt") == "merged":
            written.append(record)
            if len(written) == 2:
                assert hold.wait(30)
        return write(image, record)

    store.write_image = slow_write
    try:
        a, _ = _merged_pair(client, held_runs)
        wait_for(lambda: client.get(f"/v1/jobs/{a['id']}").json()["status"] == "succeeded", what="a done")
        assert len(written) == 2  # the run is still saving its second job
        late = client.get(f"/v1/jobs/{a['id']}/preview")
        assert late.status_code == 404 and "succeeded" in late.json()["error"]["message"]
    finally:
        hold.set()
