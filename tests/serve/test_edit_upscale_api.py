"""Upscaling edits through the server (A1111's SD upscale): POST /v1/images/edits and /v1/jobs/edits take
`upscale` (the factor) and `upscaler` (lanczos or the server's upscale model, `pictor serve --upscaler FILE`).
The answer, the job and its history are at the enlarged size, the same pixels as `Pipeline.edit`'s; the
server's pixel limit applies to the enlarged size, also while the model loads; misuse is a 400 naming the
field in the API's words; a queued edit whose upscale model the restarted server lacks fails as the server's
fault; variations take no upscale; the web page's edit form has the two fields."""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.editing import EditRequest, scaled_size
from pictor.pipeline import Pipeline
from tests.serve import test_upscale_api
from tests.serve.conftest import (
    TEST_LIMITS,
    GatedPipeline,
    assert_refused,
    decode_images,
    new_tiny,
    upload_names,
)
from tests.serve.test_upscale_api import NAME

# The upscale model tests' fixtures: a tiny x2 upscale model's file, and the tiny model with it loaded.
upscaler_file = test_upscale_api.upscaler_file
upscaling = test_upscale_api.upscaling

EDITS, JOBS = "/v1/images/edits", "/v1/jobs/edits"
PROMPT = "a sharper square"


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def source(width: int = 32, height: int = 16) -> np.ndarray:
    """Gradients plus noise: what an enlarging shows; not square, so width and height cannot swap unseen."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    noise = np.random.default_rng(1).integers(0, 50, (height, width, 3))
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def edit(client: TestClient, pixels: np.ndarray, path: str = EDITS, **fields: Any) -> Any:
    data = {"prompt": PROMPT, "seed": "7", "steps": "2", "response_format": "b64_json"}
    data |= {k: str(v) for k, v in fields.items() if k != "mask"}
    files = {"image": ("source.png", png(pixels), "image/png")}
    if "mask" in fields:
        files["mask"] = ("mask.png", png(fields["mask"]), "image/png")
    return client.post(path, data=data, files=files)


def stored(client: TestClient, job: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """A finished job's one image as the server keeps it, and its record (GET .../metadata)."""
    image_id = job["results"][0]["image_id"]
    with Image.open(client.app.state.service.store.image_path(image_id)) as im:
        pixels = np.asarray(im.convert("RGB"))
    return pixels, client.get(f"/v1/images/{image_id}/metadata").json()["record"]


def no_flags(message: str) -> None:
    """An answer to a request says what to send, in the API's words: no CLI flag but the one that starts a
    server with an upscale model (the operator's, as the hires upscaler's help says it)."""
    flags = re.findall(r"--[a-z][a-z-]*(?: FILE)?", message.replace("pictor serve --upscaler FILE", ""))
    assert not flags and "load its file" not in message, message


# -- what an upscaling edit makes ------------------------------------------------------------------------


def test_an_upscaling_edit_answers_queues_and_keeps_the_enlarged_size(
    make_client: Callable[..., TestClient], tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    """Lanczos (no upscaler sent) with a mask: the answer is 64x32 from a 32x16 source, the pipeline's
    pixels, with source_upscale in its record; the queued job's request, result and history say 64x32 and
    hold the same pixels for the same seed."""
    client, pixels = make_client(tiny), source()
    mask = np.zeros((16, 32), np.uint8)
    mask[4:12, 8:24] = 255
    ((answered, record),) = decode_images(edit(client, pixels, upscale=2, mask=mask, size="auto"))
    request = EditRequest(
        Image.fromarray(pixels), PROMPT, mask=Image.fromarray(mask), seed=7, steps=2, upscale=2.0
    )
    (direct,) = tiny.edit(request)
    assert answered.shape == (32, 64, 3) and np.array_equal(answered, np.asarray(direct.image))
    assert record["source_upscale"] == {"scale": 2.0, "upscaler": "lanczos", "width": 64, "height": 32}
    assert (record["width"], record["height"]) == (64, 32) and record["source_image"]["width"] == 32

    queued = edit(client, pixels, JOBS, upscale=2, mask=mask, upscaler="Lanczos")
    assert queued.status_code == 202, queued.text
    sent = queued.json()["request"]
    assert (sent["width"], sent["height"]) == (64, 32) and sent["upscale"] == 2, sent
    assert sent.get("upscaler") is None, sent  # Lanczos, however spelt, is the default: edits read alike
    job = wait_job(client, queued.json()["id"])
    assert job["status"] == "succeeded", job
    kept, kept_record = stored(client, job)
    assert np.array_equal(kept, answered) and kept_record["source_upscale"] == record["source_upscale"]
    (listed,) = [j for j in client.get("/v1/jobs").json()["data"] if j["id"] == job["id"]]
    assert (listed["request"]["width"], listed["request"]["height"]) == (64, 32)


def test_the_servers_upscale_model_enlarges_by_name(
    make_client: Callable[..., TestClient], upscaling: Pipeline, wait_job: Callable[..., Any]
) -> None:
    """img2img enlarged by the loaded model (named as GET /v1/models' upscaler card does): the pipeline's
    pixels at the default upscale strength 0.3, its file in the record, the same image from the queue."""
    client, pixels = make_client(upscaling), source()
    card = client.get("/v1/models").json()["data"][0]["upscaler"]
    assert card["name"] == NAME
    ((answered, record),) = decode_images(edit(client, pixels, upscale=1.5, upscaler=NAME))
    request = EditRequest(Image.fromarray(pixels), PROMPT, seed=7, steps=2, upscale=1.5, upscaler=NAME)
    (direct,) = upscaling.edit(request)
    assert answered.shape == (24, 48, 3) and np.array_equal(answered, np.asarray(direct.image))
    assert record["strength"] == 0.3 and record["source_upscale"]["upscaler"] == NAME
    assert record["source_upscale"]["upscaler_file"]["sha256"], record["source_upscale"]
    ((lanczos, _),) = decode_images(edit(client, pixels, upscale=1.5))
    assert not np.array_equal(lanczos, answered)  # the model, not Lanczos, made the canvas

    queued = edit(client, pixels, JOBS, upscale=1.5, upscaler=NAME)
    assert queued.status_code == 202 and queued.json()["request"]["upscaler"] == NAME, queued.text
    job = wait_job(client, queued.json()["id"])
    assert job["status"] == "succeeded", job
    assert np.array_equal(stored(client, job)[0], answered)


def test_the_limit_applies_to_the_enlarged_size_and_only_to_it(
    make_client: Callable[..., TestClient], tiny: Pipeline
) -> None:
    """TEST_LIMITS allows 64x64 pixels. A 32x32 source enlarged by 3 (96x96) is refused, naming upscale;
    an enlarged size within the limit is made, even where a side rounded up to 16 would not be (40x44 by
    1.5 makes 60x68 = 4,080 pixels)."""
    assert TEST_LIMITS.max_pixels == 64 * 64
    client = make_client(tiny)
    for path in (EDITS, JOBS):
        r = edit(client, source(32, 32), path, upscale=3)
        assert_refused(r, "upscale", "96x96")
        assert r.json()["error"]["code"] == "size_too_large" and "4096" in r.json()["error"]["message"]
    assert not upload_names(client)
    assert scaled_size(40, 44, 1.5, tiny.patch) == (60, 68)
    ((answered, record),) = decode_images(edit(client, source(40, 44), upscale=1.5))
    assert answered.shape == (68, 60, 3) and record["source_upscale"]["height"] == 68


# -- what is refused ---------------------------------------------------------------------------------------


def test_bad_upscaling_edits_are_400s_that_name_the_field_and_keep_nothing(
    make_client: Callable[..., TestClient], upscaling: Pipeline, tiny: Pipeline
) -> None:
    client, pixels = make_client(upscaling), source()
    for fields, param, words in (
        ({"upscale": "two"}, "upscale", "valid number"),
        ({"upscale": "nan"}, "upscale", "finite number"),
        ({"upscale": "1"}, "upscale", "above 1"),
        ({"upscale": "-2"}, "upscale", "above 1"),
        ({"upscale": "4.5"}, "upscale", "at most 4"),
        ({"upscaler": NAME}, "upscale", "give the upscale factor too"),
        ({"upscale": "2", "upscaler": "4x-Ultra"}, "upscaler", f"'4x-Ultra' is not loaded ('{NAME}' is)"),
        ({"upscale": "2", "size": "64x32"}, "size", "omit size"),
        ({"upscale": "2", "size": "32x16"}, "size", "omit size"),
    ):  # fmt: skip
        for path in (EDITS, JOBS):
            r = edit(client, pixels, path, **fields)
            assert_refused(r, param, words)
            no_flags(r.json()["error"]["message"])
    r = edit(client, pixels, upscale=2, upscaler="4x-UltraSharp")
    assert "GET /v1/models" in r.json()["error"]["message"]  # where the loaded model's name is
    plain = make_client(tiny, data_dir=client.app.state.service.settings.data_dir.parent / "plain")
    r = edit(plain, pixels, JOBS, upscale=2, upscaler=NAME)
    assert_refused(r, "upscaler", f"upscaler '{NAME}' is not loaded (none is)")
    no_flags(r.json()["error"]["message"])
    assert not upload_names(client) and not upload_names(plain)


def test_variations_take_no_upscale(client: TestClient) -> None:
    """A variation's size already resizes its picture; an upscaling variation is an upscaling edit."""
    files = {"image": ("p.png", png(source(32, 32)), "image/png")}
    r = client.post("/v1/images/variations", files=files, data={"upscale": "2"})
    assert_refused(r, "upscale", "unknown field 'upscale'")


# -- while the model loads, and after the server lost its upscale model -----------------------------------


def test_while_the_model_loads_the_upscaler_and_the_limit_are_checked_at_once(
    make_client: Callable[..., TestClient],
    upscaler_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    wait_job: Callable[..., Any],
) -> None:
    """Before the model is there, `pictor serve --upscaler FILE` names the upscale model it loads with:
    another name is refused, as is a factor that could pass the limit (bounded from above) or is out of
    range; the file's own name is queued (its size not known yet) and runs once the model loaded."""
    loading = threading.Event()

    def slow_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        assert loading.wait(30)
        return new_tiny()

    monkeypatch.setattr("pictor.loading.load", slow_load)
    client = make_client(None, model="tiny", upscaler=upscaler_file)
    pixels = source()
    try:
        assert client.get("/readyz").json()["status"] == "loading"
        r = edit(client, pixels, JOBS, upscale=2, upscaler="4x-UltraSharp")
        assert_refused(r, "upscaler", f"upscaler '4x-UltraSharp' is not loaded ('{NAME}' is)")
        no_flags(r.json()["error"]["message"])
        assert_refused(edit(client, source(32, 32), JOBS, upscale=3), "upscale", "96x96")
        assert_refused(edit(client, pixels, JOBS, upscale=0.5), "upscale", "above 1")
        queued = edit(client, pixels, JOBS, upscale=2, upscaler=NAME)
        assert queued.status_code == 202, queued.text
        sent = queued.json()["request"]
        assert (sent["width"], sent["height"]) == (None, None), sent  # not the source's 32x16
    finally:
        loading.set()
    job = wait_job(client, queued.json()["id"])
    assert job["status"] == "succeeded", job
    kept, record = stored(client, job)
    assert kept.shape == (32, 64, 3) and record["source_upscale"]["upscaler"] == NAME


def test_a_queued_upscaling_edit_fails_as_the_servers_fault_when_its_model_is_gone(
    make_client: Callable[..., TestClient], upscaling: Pipeline, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    """Queued with the server's upscale model, then the server restarts without it: the job fails with
    upscaler_unavailable (a server_error, as a hires generation's), not as a bad request."""
    gated = GatedPipeline(upscaling)
    first = make_client(gated)
    first.post("/v1/jobs", json={"prompt": "hold the worker", "steps": 2})
    assert gated.gate.reached.wait(10)
    queued = edit(first, source(), JOBS, upscale=2, upscaler=NAME)
    assert queued.status_code == 202, queued.text
    make_client.close(first)
    second = make_client(tiny)
    failed = wait_job(second, queued.json()["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "upscaler_unavailable", failed
    assert failed["error"]["type"] == "server_error"
    assert f"upscale model '{NAME}'" in failed["error"]["message"], failed


# -- the web page ------------------------------------------------------------------------------------------


def test_the_edit_form_has_upscale_and_upscaler_fields(client: TestClient) -> None:
    """The page's edit form: Upscale (a number, empty = none) and Upscaler (Lanczos, and the server's model,
    filled from the model card as the hires upscaler's select is)."""
    page = client.get("/").text
    upscale = re.search(r"<input [^>]*id=\"edit-upscale\"[^>]*>", page)
    assert upscale and 'name="upscale"' in upscale[0] and 'type="number"' in upscale[0], upscale
    assert 'max="4"' in upscale[0]
    upscaler = re.search(r"<select [^>]*id=\"edit-upscaler\"[^>]*>(.*?)</select>", page, re.S)
    assert upscaler and 'name="upscaler"' in upscaler[0] and "Lanczos" in upscaler[1], upscaler
    for field in ("edit-upscale", "edit-upscaler"):
        label = re.search(rf"<label for=\"{field}\"[^>]*>", page)
        assert label and "title=" in label[0], field  # explained on hover, as the hires fields are
    script = client.get("/static/app.js").text
    assert 'form.append("upscale"' in script and 'form.append("upscaler"' in script
    assert re.search(r"\$\(\"hires_upscaler\"\), \$\(\"edit-upscaler\"\)", script)  # filled alike
