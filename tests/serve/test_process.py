"""`pictor serve` as a real process: the openai client, many concurrent clients, kill -9, SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

KEY = "process-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def shared(module_serve_process: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    # A small queue so that 16 clients overload it; batching on.
    data = tmp_path_factory.mktemp("shared-data")
    return module_serve_process(data, "--api-key", KEY, "--queue-size", "4", "--max-batch", "4")


def png_record(data: bytes) -> dict[str, Any]:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return json.loads(im.text["pictor"])


# The openai client marks images.create_variation deprecated (OpenAI is retiring dall-e-2, the model behind
# it); it is still the client's method for this endpoint.
@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_official_openai_client(shared: Any) -> None:
    client = openai.OpenAI(base_url=f"{shared.url}/v1", api_key=KEY, max_retries=0)
    result = client.images.generate(
        prompt="a red circle", n=2, size="32x32", response_format="b64_json", extra_body={"seed": 1}
    )
    assert isinstance(result, openai.types.ImagesResponse) and result.created > 0
    assert len(result.data) == 2
    records = [png_record(base64.b64decode(d.b64_json or "")) for d in result.data]
    assert [r["seed"] for r in records] == [1, 2] and records[0]["prompt"] == "a red circle"
    assert (records[0]["width"], records[0]["height"]) == (32, 32)

    by_url = client.images.generate(prompt="a blue square", response_format="url", extra_body={"steps": 3})
    url = by_url.data[0].url
    assert url is not None and url.startswith(shared.url)
    image = httpx.get(url)  # signed: no Authorization header needed
    assert image.status_code == 200 and png_record(image.content)["steps"] == 3

    # pictor's `warnings` (a prompt past the tiny text encoder's 16 tokens) reach the client as an extra field
    long = client.images.generate(prompt="a red circle " * 20 + "and a green star", extra_body={"steps": 1})
    assert (long.model_extra or {})["warnings"][0].endswith("and a green star'")

    source = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(source, format="PNG")
    edited = client.images.edit(
        image=("source.png", source.getvalue(), "image/png"),
        prompt="a blue square",
        response_format="b64_json",
        extra_body={"strength": 0.6, "seed": 5},
    )
    record = png_record(base64.b64decode(edited.data[0].b64_json or ""))
    assert record["mode"] == "img2img" and record["strength"] == 0.6 and record["seed"] == 5

    # OpenAI's sizes are 256x256 and up; pictor's own WxH goes in extra_body, with its other fields.
    picture = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 30, 200)).save(picture, format="PNG")
    varied = client.images.create_variation(
        image=("picture.png", picture.getvalue(), "image/png"),
        n=2,
        response_format="b64_json",
        extra_body={"size": "32x32", "seed": 5, "steps": 2},
    )
    records = [png_record(base64.b64decode(d.b64_json or "")) for d in varied.data]
    assert [r["seed"] for r in records] == [5, 6] and records[0]["mode"] == "img2img"
    assert records[0]["strength"] == 0.7 and (records[0]["width"], records[0]["height"]) == (32, 32)
    by_url = client.images.create_variation(image=("picture.png", picture.getvalue(), "image/png"))
    assert (by_url.data[0].url or "").startswith(shared.url)

    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", n=50)
    assert "at most 10 images" in str(bad.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{shared.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")


def test_many_concurrent_clients(shared: Any) -> None:
    """16 threads x 6 requests, queue of 4: every accepted job runs exactly once, the rest get 429."""
    prompt = "load test"
    statuses: list[int] = []
    accepted: list[str] = []
    retry_after: list[str | None] = []
    lock = threading.Lock()

    def client_thread(_: int) -> None:
        with httpx.Client(base_url=shared.url, headers=AUTH, timeout=120) as http:
            for _ in range(6):
                r = http.post("/v1/images/generations", json={"prompt": prompt})
                with lock:
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        accepted.append(r.json()["job_id"])
                    elif r.status_code == 429:
                        retry_after.append(r.headers.get("retry-after"))

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(client_thread, range(16)))
    elapsed = time.monotonic() - start

    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    assert len(statuses) == 96 and elapsed < 150
    assert statuses.count(429) > 0 and all(r == "5" for r in retry_after)
    assert len(accepted) == len(set(accepted)) == statuses.count(200)

    with httpx.Client(base_url=shared.url, headers=AUTH) as http:
        image_ids = []
        for job_id in accepted:
            job = http.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "succeeded" and job["attempts"] == 1 and len(job["results"]) == 1
            image_ids.append(job["results"][0]["image_id"])
        assert len(set(image_ids)) == len(accepted)
        history = http.get("/v1/jobs", params={"q": prompt, "limit": 100}).json()
        assert history["total"] == len(accepted)  # refused requests left no trace, none ran twice
        metrics = http.get("/metrics").text
    batches = int(next(ln for ln in metrics.splitlines() if ln.startswith("pictor_batches_total")).split()[1])
    assert batches < len(accepted) + 3, "equal requests under load should share sampler runs"
    print(f"\nload: {len(accepted)} accepted, {statuses.count(429)} x 429, {elapsed:.1f} s, {batches} runs")


def submit(url: str, **body: Any) -> str:
    r = httpx.post(f"{url}/v1/jobs", json={"prompt": "restart", "steps": 2, **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def job(url: str, job_id: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/jobs/{job_id}").json()


def wait_until(predicate: Callable[[], Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def sync_request_in_thread(url: str, out: dict[str, Any], prompt: str) -> threading.Thread:
    def run() -> None:
        try:
            out["response"] = httpx.post(f"{url}/v1/images/generations", json={"prompt": prompt}, timeout=120)
        except httpx.HTTPError as exc:
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_kill_9_loses_nothing_accepted(serve_process: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = serve_process(data, "--max-steps", "2000")
    slow = submit(first.url, prompt="slow one", steps=400)
    wait_until(lambda: job(first.url, slow)["status"] == "running")
    quick = [submit(first.url, prompt=f"quick {i}") for i in range(4)]
    waiting: dict[str, Any] = {}
    thread = sync_request_in_thread(first.url, waiting, "sync at crash")
    wait_until(lambda: httpx.get(f"{first.url}/v1/jobs", params={"q": "sync at crash"}).json()["total"] == 1)
    assert job(first.url, slow)["status"] == "running" and job(first.url, quick[-1])["status"] == "queued"

    first.proc.kill()  # SIGKILL: no shutdown code runs
    first.proc.wait(10)
    thread.join(10)
    assert "error" in waiting  # that client saw the connection drop...

    second = serve_process(data, "--max-steps", "2000")
    (sync_job,) = httpx.get(f"{second.url}/v1/jobs", params={"q": "sync at crash"}).json()["data"]
    for job_id in [*quick, sync_job["id"], slow]:  # ...but its job, like every accepted one, completes
        wait_until(lambda j=job_id: job(second.url, j)["status"] == "succeeded", timeout=90)
    assert job(second.url, slow)["attempts"] == 2  # started again after the crash
    assert all(job(second.url, j)["attempts"] == 1 for j in quick)
    assert httpx.get(f"{second.url}/v1/jobs").json()["total"] == 6


def test_sigterm_finishes_running_job_and_keeps_queued(serve_process: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = serve_process(data, "--max-steps", "2000")
    running = submit(first.url, prompt="finishing", steps=250)
    wait_until(lambda: job(first.url, running)["status"] == "running")
    queued = submit(first.url, prompt="queued at stop")
    waiting: dict[str, Any] = {}
    thread = sync_request_in_thread(first.url, waiting, "sync at stop")
    wait_until(lambda: httpx.get(f"{first.url}/v1/jobs", params={"q": "sync at stop"}).json()["total"] == 1)
    assert job(first.url, running)["status"] == "running"

    first.proc.send_signal(signal.SIGTERM)
    thread.join(60)
    response = waiting.get("response")
    assert response is not None and response.status_code == 503, waiting
    assert response.json()["error"]["code"] == "shutting_down"
    # the running job is still going, and the server still answers new connections: 503, not refused
    assert job(first.url, running)["status"] == "running"
    late = httpx.post(f"{first.url}/v1/jobs", json={"prompt": "too late"}, timeout=30)
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down", late.text
    assert httpx.get(f"{first.url}/readyz").json()["status"] == "draining"
    assert first.proc.wait(90) in (0, -signal.SIGTERM)
    assert "Traceback" not in first.output()

    second = serve_process(data)
    done = job(second.url, running)
    assert done["status"] == "succeeded" and done["attempts"] == 1  # finished before the exit, not rerun
    (sync_job,) = httpx.get(f"{second.url}/v1/jobs", params={"q": "sync at stop"}).json()["data"]
    for job_id in (queued, sync_job["id"]):
        wait_until(lambda j=job_id: job(second.url, j)["status"] == "succeeded")


def test_a_second_server_on_the_same_data_dir_is_refused(serve_process: Any, tmp_path: Path) -> None:
    """It would take the first one's running jobs for a crash's leftovers and run them again: it stops before
    opening the history, naming the server that holds the folder, and the first goes on serving."""
    import subprocess

    from tests.serve.conftest import SERVE_COMMAND

    data = tmp_path / "data"
    first = serve_process(data)
    second = subprocess.run(
        [*SERVE_COMMAND, "--data-dir", str(data), "--log-level", "warning"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode != 0
    assert f"another pictor server is using it (pid {first.proc.pid}, {first.url}/)" in second.stderr
    assert httpx.get(f"{first.url}/healthz").status_code == 200
    job_id = submit(first.url, prompt="still here")
    wait_until(lambda: job(first.url, job_id)["status"] == "succeeded")
    first.terminate()
    third = serve_process(data)  # the lock went with the first server
    assert job(third.url, job_id)["status"] == "succeeded"
