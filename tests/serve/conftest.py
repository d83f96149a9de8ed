"""Fixtures for the server tests: the tiny model, in-process apps, a live uvicorn thread, subprocesses."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from pictor.layout_files import layout_params_for, save_layout_adapter
from pictor.loading import pipeline_from_preset
from pictor.lora_files import save_lora
from pictor.lora_tools import model_linears, read_lora, write_lora
from pictor.models.layout import LayoutAdapter
from pictor.models.lora import add_lora
from pictor.models.reference import ReferenceAdapter
from pictor.pipeline import Pipeline
from pictor.reference_files import reference_params_for, save_reference_adapter
from pictor.serve.app import create_app
from pictor.serve.settings import Limits, ServeSettings

# Limits for tests: long jobs are possible (cancel, timeout), huge ones are not.
TEST_LIMITS = Limits(max_pixels=64 * 64, max_steps=2000, max_images=8)


@pytest.fixture(scope="session")
def tiny() -> Pipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "untrained" is the point of the tiny preset
        return pipeline_from_preset("tiny", device="cpu")


class Gate:
    """Holds a running job at its first step until released: a job that is certainly running."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.reached = threading.Event()
        self.armed = True

    def __call__(self, step: int, total: int) -> None:
        if self.armed:
            self.reached.set()
            assert self.release.wait(30), "gate never released"


class GatedPipeline:
    """The tiny pipeline, with a gate in the progress callback. Everything else is the real pipeline."""

    def __init__(self, inner: Pipeline) -> None:
        self._inner = inner
        self.gate = Gate()
        self.calls: list[Any] = []
        self.steps: list[list[int]] = []  # per generate() call, the steps the server's callback let through

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def generate(self, request: Any, progress: Any = None, previews: Any = None) -> Any:
        self.calls.append(request)
        steps: list[int] = []
        self.steps.append(steps)

        def gated(step: int, total: int) -> None:
            if progress is not None:
                progress(step, total)  # the server's callback first: cancel/timeout raise from it
            steps.append(step)
            self.gate(step, total)

        return self._inner.generate(request, gated, previews)


@pytest.fixture
def gated(tiny: Pipeline) -> Iterator[GatedPipeline]:
    pipe = GatedPipeline(tiny)
    yield pipe
    pipe.gate.release.set()


class ClientFactory:
    """make_client(pipeline, **settings) -> a started TestClient (lifespan run); all closed at teardown."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.open: list[TestClient] = []

    def __call__(self, pipeline: Any, policy: Any = None, **overrides: Any) -> TestClient:
        settings = ServeSettings(**{"data_dir": self.data_dir, "limits": TEST_LIMITS, **overrides})
        client = TestClient(create_app(settings, pipeline=pipeline, policy=policy))
        client.__enter__()
        self.open.append(client)
        return client

    def close(self, client: TestClient) -> None:
        """Shut the app down as the server would (lifespan end: drain, wait for the running batch)."""
        gate = getattr(client.app.state.service.manager.pipeline, "gate", None)
        if gate is not None:
            gate.armed = False
            gate.release.set()
        self.open.remove(client)
        client.__exit__(None, None, None)


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[ClientFactory]:
    factory = ClientFactory(tmp_path / "data")
    yield factory
    for client in reversed(factory.open[:]):
        factory.close(client)


@pytest.fixture
def laid_out(tmp_path: Path) -> Pipeline:
    """The tiny model with a layout adapter whose output maps are not zero, so a layout changes images."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = pipeline_from_preset("tiny", device="cpu")
    params = layout_params_for(pipe.transformer.params, pipe.text_encoder.pooled_dim)
    torch.manual_seed(0)
    adapter = LayoutAdapter(params).init_weights()
    with torch.no_grad():
        for lin in adapter.block_out:
            lin.weight.normal_(0, 0.3)
    save_layout_adapter(adapter, params, tmp_path / "layout.safetensors", {"base_model_hash": pipe.hash})
    pipe.set_layout_adapter(tmp_path / "layout.safetensors")
    return pipe


def with_reference_adapter(folder: Path, out_std: float = 0.0) -> Pipeline:
    """The tiny model with a reference adapter: zero-initialised output maps (the picture changes nothing),
    or maps drawn with standard deviation `out_std`, so that a reference changes the images."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = pipeline_from_preset("tiny", device="cpu")
    torch.manual_seed(0)
    adapter = ReferenceAdapter(
        reference_params_for(pipe.transformer.params, pipe.text_encoder.max_length)
    ).init_weights()
    if out_std:
        with torch.no_grad():
            adapter.out.weight.normal_(0, out_std)
            adapter.vec_out.weight.normal_(0, out_std)
    path = folder / "reference.safetensors"
    save_reference_adapter(adapter, adapter.params, path, {"base_model_hash": pipe.hash})
    pipe.set_reference_adapter(path)
    return pipe


@pytest.fixture
def referenced(tmp_path: Path) -> Pipeline:
    """The tiny model with a (zero-initialised) reference adapter."""
    return with_reference_adapter(tmp_path)


def decode_images(response: Any) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """A 200 answer's b64_json images as (RGB pixels, their pictor record)."""
    assert response.status_code == 200, response.text
    out = []
    for item in response.json()["data"]:
        with Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as im:
            im.load()
            out.append((np.asarray(im.convert("RGB")), json.loads(im.text["pictor"])))
    return out


@pytest.fixture
def client(make_client: Callable[..., TestClient], tiny: Pipeline) -> TestClient:
    return make_client(tiny)


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- a live server in a thread (for schemathesis and the browser) -----------------------------------------


@dataclass
class LiveServer:
    url: str
    settings: ServeSettings
    server: uvicorn.Server
    thread: threading.Thread


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(
    tiny: Pipeline, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., LiveServer]]:
    """live_server(**settings) -> a uvicorn thread serving the tiny model (or ``pipeline=``) on a free
    loopback port.

    With ``lazy=True`` the server loads ``settings.model`` itself, as `pictor serve` does, and is returned
    as soon as it answers /healthz, while its model may still be loading.
    """
    started: list[LiveServer] = []

    def start(lazy: bool = False, pipeline: Pipeline | None = None, **overrides: Any) -> LiveServer:
        port = _free_port()
        settings = ServeSettings(
            **{"data_dir": tmp_path_factory.mktemp("live"), "port": port, "limits": TEST_LIMITS, **overrides}
        )
        app = create_app(settings, pipeline=None if lazy else (pipeline or tiny))
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(url) if lazy else _ready(url), what="live server readiness")
        live = LiveServer(url, settings, server, thread)
        started.append(live)
        return live

    yield start
    for live in started:
        live.server.should_exit = True
        live.thread.join(30)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- `pictor serve` as a real process ----------------------------------------------------------------------

SERVE_COMMAND = (
    sys.executable,
    "-m",
    "pictor.cli",
    "serve",
    "--model",
    "tiny",
    "--device",
    "cpu",
    "--port",
    "0",
)


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class ServerStarter:
    """start(data_dir, *extra_args) -> `pictor serve --model tiny --port 0 ...`, ready; killed at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[ServerProcess] = []

    def __call__(self, data_dir: Path, *args: str) -> ServerProcess:
        log = self.log_dir / f"server-{len(self.procs)}.log"
        # Output to a file: a pipe nobody reads would fill up and block the server.
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*SERVE_COMMAND, "--data-dir", str(data_dir), "--log-level", "warning", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        server = ServerProcess(proc, "", log)
        self.procs.append(server)

        def address() -> str | None:
            if proc.poll() is not None:
                raise AssertionError(f"pictor serve exited with {proc.returncode}:\n{server.output()}")
            m = re.search(r"listening on (http://\S+?)/? ", server.output())
            return m.group(1) if m else None

        server.url = wait_for(address, timeout=60, what="the server's address line")
        wait_for(lambda: _ready(server.url), timeout=60, what="readiness")
        return server

    def kill_all(self) -> None:
        for server in self.procs:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait(10)


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[ServerStarter]:
    starter = ServerStarter(tmp_path)
    yield starter
    starter.kill_all()


@pytest.fixture(scope="module")
def module_serve_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerStarter]:
    starter = ServerStarter(tmp_path_factory.mktemp("server-logs"))
    yield starter
    starter.kill_all()


def _wait_job(
    client: Any,
    job_id: str,
    states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Poll GET /v1/jobs/{id} (TestClient or httpx.Client) until the job is in one of ``states``."""
    last: dict[str, Any] = {}

    def check() -> bool:
        nonlocal last
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        last = response.json()
        return last["status"] in states

    wait_for(check, timeout=timeout, what=f"job {job_id} to reach {states} (last: {last.get('status')})")
    return last


@pytest.fixture
def wait_job() -> Callable[..., dict[str, Any]]:
    return _wait_job


def new_tiny() -> Pipeline:
    """A tiny pipeline of its own (LoRAs get added to it; the session's `tiny` stays as it is)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny preset is untrained on purpose
        return pipeline_from_preset("tiny", device="cpu")


@pytest.fixture
def fresh_tiny() -> Callable[[], Pipeline]:
    return new_tiny


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    """style.safetensors (pictor's layout), detail.safetensors (kohya's), wide.safetensors (fits no layer of
    the tiny model) and a file that is no LoRA."""
    folder = tmp_path / "loras"
    folder.mkdir()
    pipe = new_tiny()
    tree = add_lora(pipe.transformer, name="style", targets="all", rank=4)
    with torch.no_grad():
        for name, p in tree.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    save_lora(pipe.transformer, folder / "style.safetensors", adapter="style")
    # the same kind of file in kohya's layout, under another name
    updates, _ = read_lora(folder / "style.safetensors", model_linears("tiny"))
    write_lora({k: v for k, v in updates.items() if "single" in k}, folder / "detail.safetensors", "kohya")
    wide = {k: torch.zeros(4, 999) for k in ("double_blocks.0.img_attn.qkv.lora_A.weight",)}
    save_file(
        {**wide, "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(999, 4)},
        folder / "wide.safetensors",
    )
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


def served_pixels(client: Any, job: dict[str, Any]) -> np.ndarray:
    """A finished job's first image as the server serves it, RGB pixels."""
    with Image.open(io.BytesIO(client.get(job["results"][0]["url"]).content)) as im:
        return np.asarray(im.convert("RGB"))


def upload_names(client: Any) -> list[str]:
    """The files in the server's upload folder now."""
    return sorted(p.name for p in client.app.state.service.store.uploads_dir.iterdir())


def assert_refused(response: Any, param: str, words: str) -> None:
    """A 400 whose error names `param` and says `words`."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
