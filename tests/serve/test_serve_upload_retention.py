"""Uploaded pictures live as long as something needs them (serve/upload_retention.py): a queued or running
job, or a succeeded job's history entry (for `pictor reproduce`); failed and cancelled jobs' go, a deleted
history entry's go, and a restart sweeps what nothing names."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from pathlib import Path, PosixPath
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.pipeline import Pipeline
from pictor.provenance import read_record
from pictor.reproduce import reproduce
from pictor.serve.store import CANCELLED, FAILED, QUEUED, SUCCEEDED, JobRow, Store
from pictor.serve.upload_retention import missing_upload
from tests.serve.conftest import GatedPipeline, wait_for, with_reference_adapter
from tests.serve.test_edits import png_bytes, source_image


class GatedEdits(GatedPipeline):
    """The tiny pipeline with the gate in edits' progress too: an edit that is certainly running."""

    def edit(self, request: Any, progress: Any = None, previews: Any = None) -> Any:
        def gated(step: int, total: int) -> None:
            if progress is not None:
                progress(step, total)
            self.gate(step, total)

        return self._inner.edit(request, gated, previews)


class FailingEdits:
    """The tiny pipeline whose edits fail as a fault of the server would (not the request's)."""

    def __init__(self, inner: Pipeline) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def edit(self, request: Any, progress: Any = None, previews: Any = None) -> Any:
        raise RuntimeError("the accelerator fell over")


@pytest.fixture
def gated_edits(tiny: Pipeline) -> Any:
    pipe = GatedEdits(tiny)
    yield pipe
    pipe.gate.release.set()


def queue_edit(client: TestClient, mask: bool = True, **fields: Any) -> dict[str, Any]:
    files = {"image": ("source.png", png_bytes(source_image()), "image/png")}
    if mask:
        white = Image.new("L", (32, 32), 0)
        white.paste(255, (8, 8, 24, 24))
        files["mask"] = ("mask.png", png_bytes(white), "image/png")
    data = {"prompt": "a red circle", "steps": "2", **{k: str(v) for k, v in fields.items()}}
    r = client.post("/v1/jobs/edits", files=files, data=data)
    assert r.status_code == 202, r.text
    return r.json()


def upload_files(client: TestClient) -> set[str]:
    return {p.name for p in client.app.state.service.store.uploads_dir.iterdir()}


def named(job: dict[str, Any]) -> set[str]:
    """The upload files a job's settings name."""
    keys = ("image", "mask", "reference", "context_image", "control_image", "redux_image", "ip_adapter_image")
    return {f"{job['request'][k]}.png" for k in keys if job["request"].get(k)}


def test_a_cancelled_queued_edit_deletes_its_uploads(
    make_client: Callable[..., TestClient], gated: GatedPipeline, wait_job: Callable[..., Any]
) -> None:
    client = make_client(gated)
    holder = client.post("/v1/jobs", json={"prompt": "hold the worker", "steps": 2}).json()
    assert gated.gate.reached.wait(10)
    kept, cancelled = queue_edit(client), queue_edit(client)
    assert len(named(cancelled)) == 2 and upload_files(client) == named(kept) | named(cancelled)
    assert client.delete(f"/v1/jobs/{cancelled['id']}").json()["status"] == "cancelled"
    assert upload_files(client) == named(kept)  # the other queued edit still needs its own
    gated.gate.release.set()
    assert wait_job(client, holder["id"])["status"] == "succeeded"
    assert wait_job(client, kept["id"])["status"] == "succeeded"


def test_a_cancelled_running_edit_keeps_its_uploads_until_its_run_stops(
    make_client: Callable[..., TestClient], gated_edits: GatedEdits
) -> None:
    client = make_client(gated_edits)
    job = queue_edit(client, steps=50)
    assert gated_edits.gate.reached.wait(10)
    assert client.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    # Final for the client, but the sampler may still read the pictures until its next step.
    assert upload_files(client) == named(job)
    gated_edits.gate.release.set()
    wait_for(lambda: not upload_files(client), what="the cancelled edit's uploads to go")


def test_a_failed_edit_deletes_its_uploads(
    make_client: Callable[..., TestClient], tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    client = make_client(FailingEdits(tiny))
    job = wait_job(client, queue_edit(client)["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "generation_failed", job
    assert not upload_files(client)


def test_a_succeeded_edit_keeps_its_uploads_for_reproduce_until_its_history_entry_is_deleted(
    make_client: Callable[..., TestClient], tiny: Pipeline, gated: GatedPipeline, wait_job: Callable[..., Any]
) -> None:
    client = make_client(tiny)
    source = np.asarray(source_image().convert("RGBA")).copy()
    source[4:12, 4:20, 3] = 0  # transparent: the server makes the mask, which only its upload holds
    files = {"image": ("source.png", png_bytes(Image.fromarray(source)), "image/png")}
    r = client.post("/v1/jobs/edits", files=files, data={"prompt": "a red circle", "steps": "2", "seed": "4"})
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded" and job["request"]["mask"], job
    store = client.app.state.service.store
    assert upload_files(client) == named(job)
    # What they are kept for: `pictor reproduce IMAGE --source SRC --mask MASK` with the kept files.
    image_path = store.image_path(job["results"][0]["image_id"])
    again = reproduce(
        tiny,
        read_record(image_path),
        source=store.upload_path(job["request"]["image"]),
        mask=store.upload_path(job["request"]["mask"]),
    )
    with Image.open(image_path) as served:
        assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(again.image))

    deleted = client.delete(f"/v1/history/{job['id']}")
    assert deleted.status_code == 200 and deleted.json() == {
        "id": job["id"],
        "object": "job.deleted",
        "deleted": True,
    }
    assert not upload_files(client) and not image_path.exists()
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert client.get(f"/v1/images/{job['results'][0]['image_id']}").status_code == 404
    assert client.get("/v1/jobs").json()["total"] == 0
    gone = client.delete(f"/v1/history/{job['id']}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "job_not_found"


def test_an_unfinished_job_is_not_deleted_from_the_history(
    make_client: Callable[..., TestClient], gated_edits: GatedEdits, wait_job: Callable[..., Any]
) -> None:
    client = make_client(gated_edits)
    running = queue_edit(client, steps=50)
    assert gated_edits.gate.reached.wait(10)
    queued = queue_edit(client)
    for job in (running, queued):
        refused = client.delete(f"/v1/history/{job['id']}")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "job_unfinished"
        assert "DELETE /v1/jobs/" in refused.json()["error"]["message"]
    # cancelled, but its run has not stopped reading the pictures yet
    client.delete(f"/v1/jobs/{running['id']}")
    assert client.delete(f"/v1/history/{running['id']}").status_code == 409
    assert upload_files(client) == named(running) | named(queued)
    gated_edits.gate.armed = False
    gated_edits.gate.release.set()
    assert wait_job(client, queued["id"])["status"] == "succeeded"
    wait_for(lambda: not client.app.state.service.manager.busy(running["id"]), what="the run to stop")
    assert client.delete(f"/v1/history/{running['id']}").status_code == 200
    assert upload_files(client) == named(queued)


def test_a_restart_sweeps_the_uploads_no_job_needs(
    make_client: Callable[..., TestClient], gated_edits: GatedEdits, wait_job: Callable[..., Any]
) -> None:
    data = make_client.data_dir
    store = Store(data)
    ids = {name: store.write_upload(source_image()) for name in ("queued", "succeeded", "failed", "orphan")}
    cancelled_mask = store.write_upload(source_image())
    edit = {
        "kind": "edit",
        "prompt": "a red circle",
        "negative_prompt": "",
        "steps": 2,
        "n": 1,
        "strength": 0.5,
    }
    for job_id, status in (("a" * 32, QUEUED), ("b" * 32, SUCCEEDED), ("c" * 32, FAILED)):
        store.add_job(JobRow(job_id, time.time(), QUEUED, {**edit, "image": ids[status]}))
        if status != QUEUED:
            store.finish(job_id, status)  # as an older pictor left them: uploads kept whatever happened
    store.add_job(JobRow("d" * 32, time.time(), QUEUED, {**edit, "image": "e" * 32, "mask": cancelled_mask}))
    store.finish("d" * 32, CANCELLED)
    half = store.uploads_dir / f".{'f' * 32}.png.tmp"  # a write cut off by a crash
    half.write_bytes(b"\x89PNG")
    (store.uploads_dir / "notes.txt").write_text("not pictor's")
    store.close()

    client = make_client(gated_edits)  # the queued edit starts running and is held at its first step
    assert gated_edits.gate.reached.wait(10)
    assert upload_files(client) == {f"{ids['queued']}.png", f"{ids['succeeded']}.png", "notes.txt"}
    gated_edits.gate.armed = False
    gated_edits.gate.release.set()
    assert wait_job(client, "a" * 32)["status"] == "succeeded"
    assert f"{ids['queued']}.png" in upload_files(client)  # succeeded now: kept for reproduce


def test_a_job_whose_upload_was_deleted_by_hand_fails_as_the_servers_fault(
    make_client: Callable[..., TestClient], gated: GatedPipeline, wait_job: Callable[..., Any]
) -> None:
    client = make_client(gated)
    client.post("/v1/jobs", json={"prompt": "hold the worker", "steps": 2})
    assert gated.gate.reached.wait(10)
    job = queue_edit(client, mask=False)
    store = client.app.state.service.store
    store.upload_path(job["request"]["image"]).unlink()
    gated.gate.release.set()
    failed = wait_job(client, job["id"])
    error = failed["error"]
    assert failed["status"] == "failed" and error["type"] == "server_error", failed
    assert error["code"] == "upload_missing" and error["param"] == "image"
    assert str(store.data_dir) not in error["message"] and "send the request again" in error["message"]


def test_a_request_that_is_not_queued_leaves_no_upload(
    make_client: Callable[..., TestClient], tiny: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(tiny)
    store = client.app.state.service.store
    write, written = store.write_upload, []

    def second_write_fails(image: Image.Image) -> str:
        if written:
            raise OSError(28, "No space left on device")
        written.append(write(image))
        return written[-1]

    monkeypatch.setattr(store, "write_upload", second_write_fails)
    with pytest.raises(OSError, match="No space left"):
        queue_edit(client)  # the source is written, the mask is not
    assert written and not upload_files(client)
    monkeypatch.undo()

    def add_job_fails(job: JobRow) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store, "add_job", add_job_fails)
    with pytest.raises(OSError, match="Input/output error"):
        queue_edit(client)
    assert not upload_files(client)


def b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def test_a_missing_upload_is_named_by_the_field_it_was_sent_as(
    make_client: Callable[..., TestClient],
    tiny: Pipeline,
    monkeypatch: pytest.MonkeyPatch,
    wait_job: Callable[..., Any],
) -> None:
    """upload_missing's `param` is the request's field, not the job's setting: reference_image (kept as
    `reference`), controlnet_images or an edit's controlnet_image (the message says which picture), and a
    variation's `image` whatever its picture became (a reference, a Redux picture)."""
    loaded = threading.Event()

    def slow_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        assert loaded.wait(30)
        return tiny

    monkeypatch.setattr("pictor.loading.load", slow_load)
    client = make_client(None, model="tiny")  # while it loads, jobs are checked only when they run
    store = client.app.state.service.store
    picture = source_image()
    try:
        jobs = {
            "reference_image": client.post(
                "/v1/jobs", json={"prompt": "a", "steps": 2, "reference_image": b64(picture)}
            ).json(),
            "controlnet_images": client.post(
                "/v1/jobs", json={"prompt": "a", "steps": 2, "controlnet_images": [b64(picture)] * 2}
            ).json(),
            "controlnet_image": client.post(
                "/v1/jobs/edits",
                files=[
                    ("image", ("source.png", png_bytes(picture), "image/png")),
                    *[("controlnet_image", (f"{i}.png", png_bytes(picture), "image/png")) for i in (0, 1)],
                ],
                data={"prompt": "a", "steps": "2"},
            ).json(),
        }
        for field, job in jobs.items():
            key = {"reference_image": "reference", "controlnet_image": "controlnet_images"}.get(field, field)
            kept = job["request"][key]
            store.upload_path(kept[1] if isinstance(kept, list) else kept).unlink()
    finally:
        loaded.set()
    for field, job in jobs.items():
        error = wait_job(client, job["id"])["error"]
        assert error["code"] == "upload_missing" and error["param"] == field, error
        assert error["message"].startswith(f"{field}[1]: " if "controlnet" in field else f"{field}: "), error

    # A variation: its picture is also the reference on a model with a reference adapter.
    gated = GatedPipeline(with_reference_adapter(make_client.data_dir.parent))
    other = make_client(gated, data_dir=make_client.data_dir.parent / "other")
    other.post("/v1/jobs", json={"prompt": "hold the worker", "steps": 2})
    assert gated.gate.reached.wait(10)
    files = {"image": ("picture.png", png_bytes(picture), "image/png")}
    variation = other.post("/v1/jobs/variations", files=files, data={"steps": "2"}).json()
    assert variation["request"]["variation"] is True and variation["request"]["reference"], variation
    kept = other.app.state.service.store
    kept.upload_path(variation["request"]["reference"]).unlink()
    gated.gate.armed = False
    gated.gate.release.set()
    error = wait_job(other, variation["id"])["error"]
    assert error["code"] == "upload_missing" and error["param"] == "image", error
    # ... and a Redux variation's picture, kept as its redux_image (test_redux_api.py runs one)
    redux = {"prompt": "", "redux_image": "f" * 32, "variation": True}
    assert (missing_upload(kept, redux) or {})["param"] == "image"
    assert (missing_upload(kept, {**redux, "variation": None}) or {})["param"] == "redux_image"


def test_a_b64_answer_outrun_by_a_history_delete_says_so(
    make_client: Callable[..., TestClient], tiny: Pipeline
) -> None:
    """DELETE /v1/history/{id} between a synchronous job's end and its b64_json answer: a 410 that says what
    happened, not a 500."""
    client = make_client(tiny)
    svc = client.app.state.service
    real_wait = svc.manager.wait

    async def wait_then_deleted(job_id: str) -> Any:
        job = await real_wait(job_id)
        wait_for(lambda: not svc.manager.busy(job_id), what="the run to end")
        svc.forget(job_id)  # another client's DELETE /v1/history/{id}
        return job

    svc.manager.wait = wait_then_deleted  # type: ignore[method-assign]
    r = client.post("/v1/images/generations", json={"prompt": "a", "steps": 2, "response_format": "b64_json"})
    assert r.status_code == 410, r.text
    error = r.json()["error"]
    assert error["code"] == "job_deleted" and "deleted from the history meanwhile" in error["message"], error


def test_an_image_deleted_while_it_is_fetched(
    make_client: Callable[..., TestClient],
    tiny: Pipeline,
    monkeypatch: pytest.MonkeyPatch,
    wait_job: Callable[..., Any],
) -> None:
    """GET /v1/images/{id} racing DELETE /v1/history/{id}: deleted before the file is opened, a 404 that says
    so; deleted once it is open (or was checked for), the whole PNG, not a 500 mid-answer."""
    client = make_client(tiny)
    svc = client.app.state.service
    done = [
        wait_job(client, client.post("/v1/jobs", json={"prompt": "a", "steps": 2}).json()["id"]) for _ in "ab"
    ]
    (first, second) = (job["results"][0]["image_id"] for job in done)

    real_get = svc.store.get_image

    def found_then_deleted(image_id: str) -> Any:
        row = real_get(image_id)
        monkeypatch.setattr(svc.store, "get_image", real_get)
        svc.forget(done[0]["id"])
        return row

    monkeypatch.setattr(svc.store, "get_image", found_then_deleted)
    r = client.get(f"/v1/images/{first}")
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "image_not_found"
    assert "deleted from the history meanwhile" in r.json()["error"]["message"]

    png = svc.store.image_path(second).read_bytes()
    forgotten: list[str] = []

    class DeletedOnceUsed(PosixPath):
        """The image's path, whose job is deleted from the history as soon as the route checks for or opens
        the file."""

        def _deleted(self) -> None:
            if not forgotten:
                forgotten.append(done[1]["id"])
                svc.forget(done[1]["id"])

        def is_file(self) -> bool:  # type: ignore[override]
            there = super().is_file()
            self._deleted()
            return there

        def open(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            f = super().open(*args, **kwargs)
            self._deleted()
            return f

    real_path = svc.store.image_path
    monkeypatch.setattr(
        svc.store, "image_path", lambda i: DeletedOnceUsed(real_path(i)) if i == second else real_path(i)
    )
    r = client.get(f"/v1/images/{second}")
    assert forgotten and r.status_code == 200 and r.content == png
    assert not Path(real_path(second)).exists()
    assert client.get(f"/v1/images/{second}").status_code == 404
