"""FLUX.1 Canny / Depth through the HTTP API: `control_image` (base64 on generations, a file on edits) and
`control_canny` reach the pipeline as the Python API's requests do (the same pixels), the picture is kept
for the job (a queued job runs from it after a restart), the model card says `control`, and every misuse is
a 400 that names its field and keeps nothing."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from pictor.checkpoint import BundleConfig
from pictor.control_images import DEFAULT_CANNY
from pictor.editing import EditRequest
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import FluxParams
from pictor.models.text import build_text_encoder
from pictor.pipeline import GenerationRequest, Pipeline
from pictor.presets import get_preset
from pictor.serve.store import Store
from tests.serve.conftest import GatedPipeline, decode_images
from tests.serve.conftest import assert_refused as _refused
from tests.serve.conftest import upload_names as _uploads
from tests.serve.test_edits import png_bytes as png

from tiny_flux import random_flux

PROMPT = "a robot in a library"


def control_pipeline(kind: str = "canny") -> Pipeline:
    """The tiny preset widened to FLUX.1 Canny / Depth's input (the noise and a control picture's latents),
    guidance-distilled like them; `kind` is what the bundle's config says it reads."""
    p = get_preset("tiny")
    out = p["model"]["out_channels"]
    model = {**p["model"], "mlp_ratio": 4.0, "guidance_embed": True, "in_channels": 2 * out}
    config = BundleConfig(
        name=f"tiny-{kind}",
        preset="tiny",
        model=model,
        autoencoder=p["autoencoder"],
        text_encoder=p["text_encoder"],
        defaults={**p["defaults"], "guidance": 10.0, "guidance_mode": "distilled", "steps": 2},
        control=kind,
    )
    flux = random_flux(FluxParams.from_dict(model), seed=0)
    torch.manual_seed(0)
    text = build_text_encoder(config.text_encoder)
    ae = AutoEncoder(AutoEncoderParams.from_dict(p["autoencoder"])).eval()
    return Pipeline(flux, ae, text, config, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def canny() -> Pipeline:
    return control_pipeline("canny")


@pytest.fixture(scope="module")
def depth() -> Pipeline:
    return control_pipeline("depth")


def control_picture(seed: int = 0, size: tuple[int, int] = (40, 24)) -> Image.Image:
    """Blocks of random colours (hard edges for Canny), of another size than the images: it is resized."""
    small = np.random.default_rng(seed).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.NEAREST)


def b64(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode("ascii")


PICTURE = control_picture()
SOURCE = control_picture(7, (32, 32))


def _body(**extra: object) -> dict[str, object]:
    return {"prompt": PROMPT, "response_format": "b64_json", "seed": 3, "steps": 2, **extra}


def _direct(pipe: Pipeline, **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    (result,) = pipe.generate(GenerationRequest(PROMPT, seed=3, steps=2, **kw))
    return np.asarray(result.image), result.record


def _edit(
    client: TestClient, control: bytes | None = None, path: str = "/v1/images/edits", **data: object
) -> Any:
    files = {"image": ("source.png", png(SOURCE), "image/png")}
    if control is not None:
        files["control_image"] = ("control.png", control, "image/png")
    form = {"prompt": PROMPT, "response_format": "b64_json", "seed": "3", "steps": "2", "strength": "0.8"}
    return client.post(path, files=files, data={**form, **{k: str(v) for k, v in data.items()}})


def _direct_edit(pipe: Pipeline, **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    (result,) = pipe.edit(EditRequest(SOURCE, PROMPT, strength=0.8, seed=3, steps=2, **kw))
    return np.asarray(result.image), result.record


def test_a_control_picture_draws_what_the_python_api_draws(
    make_client: Callable[..., TestClient], canny: Pipeline
) -> None:
    client = make_client(canny)
    ((pixels, record),) = decode_images(
        client.post("/v1/images/generations", json=_body(control_image=b64(PICTURE)))
    )
    want, direct = _direct(canny, control_image=PICTURE)
    assert pixels.shape == (32, 32, 3)  # the model's size, not the picture's: the picture is fitted to it
    assert np.array_equal(pixels, want)
    assert record["control_image"] == direct["control_image"] and "control_canny" not in record
    other, _ = _direct(canny, control_image=control_picture(1))
    assert not np.array_equal(pixels, other)  # the picture steers the image
    job = client.get("/v1/jobs").json()["data"][0]
    assert job["request"]["control_image"] and job["request"]["control_canny"] is None


def test_control_canny_draws_the_edges_first(make_client: Callable[..., TestClient], canny: Pipeline) -> None:
    client = make_client(canny)
    data_url = "data:image/png;base64," + b64(PICTURE)
    ((pixels, record),) = decode_images(
        client.post("/v1/images/generations", json=_body(control_image=data_url, control_canny=True))
    )
    want, direct = _direct(canny, control_image=PICTURE, control_canny=DEFAULT_CANNY)
    assert (
        np.array_equal(pixels, want) and record["control_canny"] == [50.0, 200.0] == direct["control_canny"]
    )
    assert not np.array_equal(pixels, _direct(canny, control_image=PICTURE)[0])  # edges, not the picture
    ((pixels, record),) = decode_images(
        client.post("/v1/images/generations", json=_body(control_image=b64(PICTURE), control_canny=[30, 120]))
    )
    assert np.array_equal(pixels, _direct(canny, control_image=PICTURE, control_canny=(30.0, 120.0))[0])
    assert record["control_canny"] == [30.0, 120.0]
    # false is no edges, as null
    ((pixels, record),) = decode_images(
        client.post("/v1/images/generations", json=_body(control_image=b64(PICTURE), control_canny=False))
    )
    assert np.array_equal(pixels, _direct(canny, control_image=PICTURE)[0]) and "control_canny" not in record


def test_an_edit_takes_a_control_file_and_control_canny_as_the_python_api_does(
    make_client: Callable[..., TestClient], canny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    client = make_client(canny)
    ((pixels, record),) = decode_images(_edit(client, png(PICTURE)))
    want, direct = _direct_edit(canny, control_image=PICTURE)
    assert np.array_equal(pixels, want)
    assert record["mode"] == "img2img" and record["control_image"] == direct["control_image"]
    for canny_field, thresholds in (
        ("true", DEFAULT_CANNY),
        ("30,120", (30.0, 120.0)),
        ("[30, 120]", (30.0, 120.0)),
    ):
        ((pixels, record),) = decode_images(_edit(client, png(PICTURE), control_canny=canny_field))
        assert np.array_equal(pixels, _direct_edit(canny, control_image=PICTURE, control_canny=thresholds)[0])
        assert record["control_canny"] == list(thresholds)
    r = _edit(client, png(PICTURE), path="/v1/jobs/edits", response_format="url", control_canny="true")
    assert r.status_code == 202, r.text
    assert r.json()["request"]["control_image"] and r.json()["request"]["control_canny"] == [50.0, 200.0]
    done = wait_job(client, r.json()["id"])
    assert done["status"] == "succeeded", done
    with Image.open(io.BytesIO(client.get(done["results"][0]["url"]).content)) as im:
        served = np.asarray(im.convert("RGB"))
    assert np.array_equal(served, _direct_edit(canny, control_image=PICTURE, control_canny=DEFAULT_CANNY)[0])


def test_the_model_card_says_what_control_picture_the_model_reads(
    make_client: Callable[..., TestClient], canny: Pipeline, depth: Pipeline, client: TestClient
) -> None:
    """The web page offers its control picture (and Canny's checkbox) only where the card says so."""
    ours = make_client(canny)
    (card,) = ours.get("/v1/models").json()["data"]
    assert card["control"] == "canny" and card["kontext"] is False and card["fill"] is False
    assert ours.get(f"/v1/models/{card['id']}").json()["control"] == "canny"
    assert make_client(depth).get("/v1/models").json()["data"][0]["control"] == "depth"
    assert client.get("/v1/models").json()["data"][0]["control"] is None


def test_misuse_is_a_400_that_names_the_field_and_keeps_nothing(
    make_client: Callable[..., TestClient], canny: Pipeline, depth: Pipeline, client: TestClient
) -> None:
    generations = "/v1/images/generations"
    ours, theirs = make_client(canny), make_client(depth)
    # A control model needs a picture; a plain model refuses one, and control_canny alone.
    _refused(ours.post(generations, json=_body()), "control_image", "FLUX.1 Canny model")
    _refused(ours.post(generations, json=_body(control_canny=True)), "control_image", "FLUX.1 Canny model")
    _refused(_edit(ours), "control_image", "FLUX.1 Canny model")
    _refused(theirs.post(generations, json=_body()), "control_image", "a depth map")
    plain = "not a FLUX.1 Canny or Depth model"
    _refused(client.post(generations, json=_body(control_image=b64(PICTURE))), "control_image", plain)
    _refused(client.post(generations, json=_body(control_canny=True)), "control_canny", plain)
    _refused(_edit(client, png(PICTURE), path="/v1/jobs/edits"), "control_image", plain)
    _refused(_edit(client, control_canny="true"), "control_canny", plain)
    # --canny on a Depth model
    depth_canny = _body(control_image=b64(PICTURE), control_canny=True)
    _refused(theirs.post(generations, json=depth_canny), "control_canny", "reads depth maps")
    _refused(_edit(theirs, png(PICTURE), control_canny="true"), "control_canny", "reads depth maps")
    # Thresholds, checked by the server itself (so also while a model loads)
    for value in ([1], [1, 2, 3], "yes", [-1, 5], [10, 1e9], [True, 2], ["50", "200"], {"low": 1}):
        r = ours.post(generations, json=_body(control_image=b64(PICTURE), control_canny=value))
        _refused(r, "control_canny", "control_canny")
    for text in ("yes", "1,2,3", "50", "-1,5", "nan,5", "[50, 200"):
        _refused(_edit(ours, png(PICTURE), control_canny=text), "control_canny", "control_canny")
    # A picture that cannot be read, and what does not go beside a control picture
    _refused(ours.post(generations, json=_body(control_image="not base64!")), "control_image", "not base64")
    _refused(_edit(ours, b"GIF89a not an image"), "control_image", "not a readable PNG")
    picture = b64(PICTURE)
    layout = [{"box": [0, 0, 0.5, 1], "phrase": "a robot"}]
    _refused(ours.post(generations, json=_body(control_image=picture, layout=layout)), "layout", "beside")
    _refused(ours.post(generations, json=_body(control_image=picture, hires_scale=2)), "hires_scale", "hires")
    # variations take no control picture
    variation = ours.post("/v1/images/variations", files={"image": ("a.png", png(PICTURE), "image/png")})
    _refused(variation, "image", "which variations do not take")
    for c in (ours, theirs, client):
        assert c.get("/v1/jobs").json()["total"] == 0
        assert _uploads(c) == []


def test_a_queued_job_keeps_its_control_picture_across_a_restart(
    make_client: Callable[..., TestClient], canny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    """Queued behind another job, the server stops; the next server runs it from the kept upload. A job the
    full queue refuses leaves no upload behind."""
    gated = GatedPipeline(canny)
    client = make_client(gated, queue_size=1)
    busy = client.post("/v1/jobs", json=_body(control_image=b64(SOURCE), response_format=None, steps=1))
    assert busy.status_code == 202, busy.text
    assert gated.gate.reached.wait(10)
    r = client.post(
        "/v1/jobs", json=_body(control_image=b64(PICTURE), control_canny=True, response_format=None)
    )
    assert r.status_code == 202, r.text
    job = r.json()
    kept = _uploads(client)
    assert f"{job['request']['control_image']}.png" in kept and len(kept) == 2
    full = client.post("/v1/jobs", json=_body(control_image=b64(PICTURE), response_format=None))
    assert full.status_code == 429, full.text
    assert _uploads(client) == kept
    make_client.close(client)  # the running job finishes; the queued one stays queued
    store = Store(make_client.data_dir)
    try:
        queued = store.get_job(job["id"])
    finally:
        store.close()
    assert queued is not None and queued.status == "queued"

    again = make_client(canny)
    done = wait_job(again, job["id"])
    assert done["status"] == "succeeded", done
    with Image.open(io.BytesIO(again.get(done["results"][0]["url"]).content)) as im:
        served = np.asarray(im.convert("RGB"))
    assert np.array_equal(served, _direct(canny, control_image=PICTURE, control_canny=DEFAULT_CANNY)[0])


def test_control_fields_are_checked_and_kept_while_the_model_loads(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the model is there, wrong thresholds are still a 400 (not a job that fails when it runs), and a
    job's control picture and thresholds are kept for the worker."""
    loaded = threading.Event()

    def slow_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        loaded.wait(30)
        raise ValueError("not needed")

    monkeypatch.setattr("pictor.loading.load", slow_load)
    client = make_client(None, model="tiny")
    try:
        r = client.post("/v1/jobs", json=_body(control_image=b64(PICTURE), control_canny=[200]))
        _refused(r, "control_canny", "control_canny")
        r = client.post("/v1/jobs", json=_body(control_image="not base64!"))
        _refused(r, "control_image", "not base64")
        assert _uploads(client) == []
        r = client.post("/v1/jobs", json=_body(control_image=b64(PICTURE), control_canny=True))
        assert r.status_code == 202, r.text
        request = r.json()["request"]
        assert request["control_canny"] == [50.0, 200.0]
        assert _uploads(client) == [f"{request['control_image']}.png"]
    finally:
        loaded.set()
