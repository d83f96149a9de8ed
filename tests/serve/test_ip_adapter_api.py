"""XLabs' FLUX.1 IP-Adapter through the HTTP API: `ip_adapter_image` (base64 or a data: URL on generations,
a file on edits) and `ip_adapter_scale` reach the pipeline as the Python API's requests do (the same pixels),
the picture is kept for the job (a queued job runs from it after a restart, `pictor reproduce --ip-adapter`
takes the kept upload) and deleted with it, `pictor serve --ip-adapter-model --clip-vision` gives the loaded
model the IP-Adapter, the model card says `ip_adapter`, and every misuse is a 400 that names its field and
keeps nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.cli_args import build_parser
from pictor.pipeline import Pipeline
from pictor.reproduce import reproduce
from pictor.serve.server import serve
from pictor.serve.settings import ServeSettings
from pictor.serve.store import Store
from tests.serve.conftest import GatedPipeline, decode_images, wait_for
from tests.serve.conftest import assert_refused as _refused
from tests.serve.conftest import served_pixels as _served
from tests.serve.conftest import upload_names as _uploads
from tests.serve.test_control_api import b64
from tests.serve.test_edits import png_bytes as png
from tests.serve.test_redux_api import (
    PICTURE,
    SOURCE,
    _body,
    _direct,
    _direct_edit,
    dev_pipeline,
    picture_edit,
    redux_picture,
)

from tiny_ip_adapter import clip_vision_folder, ip_adapter_file


def ip_adapter_files(root: Path) -> tuple[Path, Path]:
    """An ip_adapter.safetensors for the tiny [dev]-like model (`dev_pipeline`) and a tiny CLIP vision
    folder, under `root`."""
    params = dev_pipeline().transformer.params
    adapter = ip_adapter_file(
        root / "ip_adapter.safetensors", params.context_in_dim, params.hidden_size, params.depth
    )
    return adapter, clip_vision_folder(root / "clip-vision")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return ip_adapter_files(tmp_path_factory.mktemp("ip-adapter-serve"))


@pytest.fixture(scope="module")
def dev(files: tuple[Path, Path]) -> Pipeline:
    pipe = dev_pipeline()
    pipe.set_ip_adapter(*files)
    return pipe


_edit = picture_edit("ip_adapter_image")
ip_picture = redux_picture  # the same blocks of colour, by the name tests/serve/test_browser.py imports


def test_an_ip_adapter_picture_draws_what_the_python_api_draws(
    make_client: Callable[..., TestClient], dev: Pipeline, tmp_path: Path
) -> None:
    client = make_client(dev)
    ((pixels, record),) = decode_images(
        client.post("/v1/images/generations", json=_body(ip_adapter_image=b64(PICTURE)))
    )
    want, direct = _direct(dev, ip_adapter_image=PICTURE)
    assert np.array_equal(pixels, want)
    assert record["ip_adapter_image"] == direct["ip_adapter_image"] and record["ip_adapter"]["scale"] == 1.0
    assert record["ip_adapter"]["sha256"] == dev.ip_adapter.info["sha256"]  # type: ignore[union-attr]
    assert not np.array_equal(pixels, _direct(dev)[0])  # the picture speaks
    job = client.get("/v1/jobs").json()["data"][0]
    assert job["request"]["ip_adapter_image"] and job["request"]["ip_adapter_scale"] == 1.0
    # The history's image metadata carries it, and the kept upload reproduces the image
    meta = client.get(f"/v1/images/{job['results'][0]['image_id']}/metadata").json()
    assert meta["record"]["ip_adapter"]["scale"] == 1.0 and "IP-Adapter scale: 1" in meta["parameters"]
    kept = client.app.state.service.store.upload_path(job["request"]["ip_adapter_image"])
    assert np.array_equal(np.asarray(reproduce(dev, meta["record"], ip_adapter=kept).image), pixels)
    # A data: URL, a scale, and an empty prompt (the picture alone says what to draw)
    data_url = "data:image/png;base64," + b64(PICTURE)
    body = _body(prompt="", ip_adapter_image=data_url, ip_adapter_scale=0.5)
    ((pixels, record),) = decode_images(client.post("/v1/images/generations", json=body))
    assert np.array_equal(pixels, _direct(dev, "", ip_adapter_image=PICTURE, ip_adapter_scale=0.5)[0])
    assert record["ip_adapter"]["scale"] == 0.5 and record["prompt"] == ""


def test_an_edit_takes_an_ip_adapter_file_and_scale_as_the_python_api_does(
    make_client: Callable[..., TestClient], dev: Pipeline, wait_job: Callable[..., Any]
) -> None:
    client = make_client(dev)
    ((pixels, record),) = decode_images(_edit(client, png(PICTURE), ip_adapter_scale=0.5))
    want, direct = _direct_edit(dev, ip_adapter_image=PICTURE, ip_adapter_scale=0.5)
    assert np.array_equal(pixels, want)
    assert record["mode"] == "img2img" and record["ip_adapter_image"] == direct["ip_adapter_image"]
    assert record["ip_adapter"]["scale"] == 0.5
    r = _edit(client, png(PICTURE), path="/v1/jobs/edits", response_format="url")
    assert r.status_code == 202, r.text
    assert r.json()["request"]["ip_adapter_image"] and r.json()["request"]["ip_adapter_scale"] == 1.0
    done = wait_job(client, r.json()["id"])
    assert done["status"] == "succeeded", done
    assert np.array_equal(_served(client, done), _direct_edit(dev, ip_adapter_image=PICTURE)[0])


def test_the_model_card_says_whether_the_ip_adapter_is_loaded(
    make_client: Callable[..., TestClient], dev: Pipeline, client: TestClient
) -> None:
    ours = make_client(dev)
    (card,) = ours.get("/v1/models").json()["data"]
    assert card["ip_adapter"] is True and card["redux"] is False
    assert ours.get(f"/v1/models/{card['id']}").json()["ip_adapter"] is True
    assert client.get("/v1/models").json()["data"][0]["ip_adapter"] is False


def test_serve_loads_the_ip_adapter_into_the_model_it_loads(
    make_client: Callable[..., TestClient],
    files: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    wait_job: Callable[..., Any],
) -> None:
    """`pictor serve --ip-adapter-model FILE --clip-vision DIR`: the flags parse, the loaded model gets the
    IP-Adapter (the card says false until then), and the images are the Python API's."""
    adapter, clip = files
    args = build_parser().parse_args(
        ["serve", "--ip-adapter-model", str(adapter), "--clip-vision", str(clip)]
    )
    assert (args.ip_adapter_model, args.clip_vision) == (str(adapter), str(clip))
    loading = threading.Event()

    def slow_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        assert loading.wait(30)
        return dev_pipeline()

    monkeypatch.setattr("pictor.loading.load", slow_load)
    client = make_client(None, model="tiny", ip_adapter_model=adapter, clip_vision=clip)
    try:
        assert client.get("/v1/models").json()["data"][0]["ip_adapter"] is False  # still loading
        body = _body(ip_adapter_image=b64(PICTURE), ip_adapter_scale=0.5, response_format=None)
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text  # checked when it runs; its picture kept meanwhile
        assert _uploads(client) == [f"{r.json()['request']['ip_adapter_image']}.png"]
    finally:
        loading.set()
    done = wait_job(client, r.json()["id"])
    assert done["status"] == "succeeded", done
    assert client.get("/v1/models").json()["data"][0]["ip_adapter"] is True
    direct = dev_pipeline()
    direct.set_ip_adapter(adapter, clip)
    assert np.array_equal(
        _served(client, done), _direct(direct, ip_adapter_image=PICTURE, ip_adapter_scale=0.5)[0]
    )


def test_pictor_serve_hands_the_flags_to_the_server(files: tuple[Path, Path], monkeypatch: Any) -> None:
    """`pictor serve` (cli.cmd_serve) builds the server's settings with the IP-Adapter's files."""
    from pictor import cli

    adapter, clip = files
    got: list[ServeSettings] = []
    monkeypatch.setattr("pictor.serve.server.serve", lambda settings, log_level="info": got.append(settings))
    argv = ["serve", "--model", "tiny", "--ip-adapter-model", str(adapter), "--clip-vision", str(clip)]
    cli.main(argv)
    assert (got[0].ip_adapter_model, got[0].clip_vision) == (adapter, clip)


def test_serve_wants_both_ip_adapter_files_and_checks_they_are_there(tmp_path: Path) -> None:
    for one in ({"ip_adapter_model": tmp_path / "ip.safetensors"}, {"clip_vision": tmp_path}):
        with pytest.raises(ValueError, match="both --ip-adapter-model FILE and --clip-vision DIR"):
            ServeSettings(data_dir=tmp_path, **one)  # type: ignore[arg-type]
    (tmp_path / "ip.safetensors").write_bytes(b"")  # there, so the folder's absence is what is named
    for adapter, clip, said in (
        (tmp_path / "no.st", tmp_path, r"--ip-adapter-model .*no\.st: no such file"),
        (tmp_path, tmp_path, "--ip-adapter-model .*: no such file"),  # a folder is not the file
        (tmp_path / "ip.safetensors", tmp_path / "nope", r"--clip-vision .*nope: no such folder"),
    ):
        settings = ServeSettings(data_dir=tmp_path, model="tiny", ip_adapter_model=adapter, clip_vision=clip)
        with pytest.raises(ValueError, match=said):
            serve(settings)  # before anything listens


def test_a_broken_ip_adapter_file_fails_the_load_and_readyz_says_why(
    make_client: Callable[..., TestClient],
    files: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    wait_job: Callable[..., Any],
) -> None:
    broken = tmp_path / "ip_adapter.safetensors"
    broken.write_bytes(b"not safetensors")
    monkeypatch.setattr("pictor.loading.load", lambda *_a, **_k: dev_pipeline())
    client = make_client(None, model="tiny", ip_adapter_model=broken, clip_vision=files[1])
    # The model loads in the background from the start: a job sent before the load failed is accepted and
    # fails with model_unavailable, one sent after it is refused with that code; either way nothing runs
    r = client.post("/v1/jobs", json=_body(response_format=None))
    if r.status_code == 202:
        done = wait_job(client, r.json()["id"])
        assert done["status"] == "failed" and done["error"]["code"] == "model_unavailable", done
    else:
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable", r.text
        assert str(broken) in r.json()["error"]["message"]
    ready = client.get("/readyz")
    assert ready.status_code == 503 and str(broken) in ready.json()["detail"], ready.json()


def test_misuse_is_a_400_that_names_the_field_and_keeps_nothing(
    make_client: Callable[..., TestClient], dev: Pipeline, client: TestClient
) -> None:
    generations = "/v1/images/generations"
    ours = make_client(dev)
    # No IP-Adapter loaded: the picture is refused, saying how the server would be started with one
    sent = client.post(generations, json=_body(ip_adapter_image=b64(PICTURE)))
    for refused in (sent, _edit(client, png(PICTURE))):
        _refused(refused, "ip_adapter_image", "pictor serve --ip-adapter-model FILE --clip-vision DIR")
        assert "drop ip_adapter_image" in refused.json()["error"]["message"]
    # A scale without a picture
    without = "without an IP-Adapter picture; add ip_adapter_image"
    _refused(ours.post(generations, json=_body(ip_adapter_scale=0.5)), "ip_adapter_scale", without)
    _refused(_edit(ours, ip_adapter_scale=0.5), "ip_adapter_scale", without)
    # Scales outside [0, 10], checked by the schema (so also while a model loads)
    for value in (-1, 10.5, "1", True, [1]):
        r = ours.post(generations, json=_body(ip_adapter_image=b64(PICTURE), ip_adapter_scale=value))
        _refused(r, "ip_adapter_scale", "ip_adapter_scale")
    for text in ("11", "-0.5", "nan", "strong"):
        _refused(_edit(ours, png(PICTURE), ip_adapter_scale=text), "ip_adapter_scale", "ip_adapter_scale")
    # Pictures that cannot be read
    unreadable = ours.post(generations, json=_body(ip_adapter_image="not base64!"))
    _refused(unreadable, "ip_adapter_image", "not base64")
    _refused(_edit(ours, b"GIF89a not an image"), "ip_adapter_image", "not a readable PNG")
    # An empty prompt without any picture is still refused
    _refused(ours.post(generations, json=_body(prompt="")), "prompt", "ip_adapter_image")
    for c in (ours, client):
        assert c.get("/v1/jobs").json()["total"] == 0
        assert _uploads(c) == []


def test_a_job_refused_when_it_runs_names_the_field_and_deletes_its_picture(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch, wait_job: Callable[..., Any]
) -> None:
    """Accepted while a model without the IP-Adapter loads, the job fails when it runs with the 400 it would
    have had, and its picture goes (no image was made from it)."""
    loading = threading.Event()

    def slow_load(*_args: Any, **_kwargs: Any) -> Pipeline:
        assert loading.wait(30)
        return dev_pipeline()

    monkeypatch.setattr("pictor.loading.load", slow_load)
    client = make_client(None, model="tiny")
    try:
        r = client.post("/v1/jobs", json=_body(ip_adapter_image=b64(PICTURE), response_format=None))
        assert r.status_code == 202, r.text
        assert _uploads(client) == [f"{r.json()['request']['ip_adapter_image']}.png"]
    finally:
        loading.set()
    done = wait_job(client, r.json()["id"])
    assert done["status"] == "failed", done
    error = done["error"]
    assert error["param"] == "ip_adapter_image" and error["code"] == "invalid_parameters", error
    assert "--ip-adapter-model FILE --clip-vision DIR" in error["message"], error
    # The job reads "failed" as soon as its run ends; its picture goes right after, as the run lets go of it
    wait_for(lambda: _uploads(client) == [], timeout=10, what="the failed job's picture to be deleted")


def test_a_queued_job_keeps_its_ip_adapter_picture_across_a_restart(
    make_client: Callable[..., TestClient], dev: Pipeline, wait_job: Callable[..., Any]
) -> None:
    """Queued behind another job, the server stops; the next server runs it from the kept upload. A job the
    full queue refuses leaves no upload behind, and deleting the job from the history deletes its picture."""
    gated = GatedPipeline(dev)
    client = make_client(gated, queue_size=1)
    busy = client.post("/v1/jobs", json=_body(ip_adapter_image=b64(SOURCE), response_format=None, steps=1))
    assert busy.status_code == 202, busy.text
    assert gated.gate.reached.wait(10)
    body = _body(ip_adapter_image=b64(PICTURE), ip_adapter_scale=0.5, response_format=None)
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    kept = _uploads(client)
    assert f"{job['request']['ip_adapter_image']}.png" in kept and len(kept) == 2
    full = client.post("/v1/jobs", json=_body(ip_adapter_image=b64(PICTURE), response_format=None))
    assert full.status_code == 429, full.text
    assert _uploads(client) == kept
    make_client.close(client)  # the running job finishes; the queued one stays queued
    store = Store(make_client.data_dir)
    try:
        queued = store.get_job(job["id"])
    finally:
        store.close()
    assert queued is not None and queued.status == "queued"

    again = make_client(dev)
    done = wait_job(again, job["id"])
    assert done["status"] == "succeeded", done
    assert np.array_equal(
        _served(again, done), _direct(dev, ip_adapter_image=PICTURE, ip_adapter_scale=0.5)[0]
    )
    assert f"{job['request']['ip_adapter_image']}.png" in _uploads(again)  # kept for pictor reproduce
    assert again.delete(f"/v1/history/{job['id']}").status_code == 200
    assert f"{job['request']['ip_adapter_image']}.png" not in _uploads(again)


def test_a_transparent_picture_is_read_as_the_cli_reads_it(
    make_client: Callable[..., TestClient], dev: Pipeline, tmp_path: Path
) -> None:
    """Transparency goes on white (CLIP's processor's way), on both routes as in the CLI: the record's hash is
    the original file's, so `pictor reproduce --ip-adapter original.png` takes it."""
    rgba = np.zeros((24, 40, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:12, :, 3] = 255  # the bottom half transparent over a red the picture does not show
    original = tmp_path / "see-through.png"
    Image.fromarray(rgba, "RGBA").save(original)
    client = make_client(dev)
    body = _body(ip_adapter_image=b64(Image.open(original)))
    ((pixels, record),) = decode_images(client.post("/v1/images/generations", json=body))
    want, direct = _direct(dev, ip_adapter_image=original)
    assert np.array_equal(pixels, want) and record["ip_adapter_image"] == direct["ip_adapter_image"]
    assert np.array_equal(np.asarray(reproduce(dev, record, ip_adapter=original).image), pixels)
    ((pixels, record),) = decode_images(_edit(client, original.read_bytes()))
    want, direct = _direct_edit(dev, ip_adapter_image=original)
    assert np.array_equal(pixels, want) and record["ip_adapter_image"] == direct["ip_adapter_image"]
