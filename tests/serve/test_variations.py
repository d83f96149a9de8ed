"""POST /v1/images/variations and /v1/jobs/variations: an img2img edit of the picture at the documented
strength, with an empty prompt by default, resized to `size`, transparency flattened onto white, the picture
as its own reference on a model with a reference adapter, and stored so its images reproduce."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.editing import EditRequest
from pictor.pipeline import Pipeline
from pictor.reproduce import reproduce
from pictor.serve.variations import on_white
from tests.serve.conftest import decode_images, wait_for, with_reference_adapter

# The strength the README and the module docstring promise; written out, not imported, so a changed
# default fails here.
DOCUMENTED_STRENGTH = 0.7


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def picture(size: int = 32, seed: int = 0) -> Image.Image:
    """Smooth gradients plus a little noise: something a resize visibly changes."""
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1)
    noise = np.random.default_rng(seed).integers(0, 40, (size, size, 3))
    return Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8))


def vary(client: TestClient, image: bytes | None, path: str = "/v1/images/variations", **fields: Any) -> Any:
    files = {"image": ("picture.png", image, "image/png")} if image is not None else {}
    data = {"response_format": "b64_json", "steps": "2", **{k: str(v) for k, v in fields.items()}}
    return client.post(path, files=files, data=data)


def error_of(response: Any, words: str, param: str) -> None:
    assert response.status_code == 400, (response.status_code, response.text)
    error = response.json()["error"]
    assert words in error["message"] and error["param"] == param, error


def test_a_variation_is_an_img2img_edit_at_the_documented_strength(
    client: TestClient, tiny: Pipeline
) -> None:
    source = picture()
    served = decode_images(vary(client, png(source), n=2, seed=3))
    direct = tiny.edit(
        EditRequest(image=source, prompt="", strength=DOCUMENTED_STRENGTH, seed=3, steps=2, num_images=2)
    )
    assert len(served) == 2
    for (pixels, record), expected in zip(served, direct, strict=True):
        assert np.array_equal(pixels, np.asarray(expected.image))
        assert record["mode"] == "img2img" and record["strength"] == DOCUMENTED_STRENGTH
        assert record["prompt"] == "" and "reference_image" not in record
    assert [r["seed"] for _, r in served] == [3, 4]
    assert not np.array_equal(served[0][0], served[1][0])  # two seeds: two different variations
    job = client.get("/v1/jobs").json()["data"][0]
    assert job["request"]["kind"] == "edit" and job["request"]["mask"] is None  # an edit job, no mask

    by_url = client.post(
        "/v1/images/variations", files={"image": ("p.png", png(source), "image/png")}, data={"strength": "0"}
    )
    assert by_url.status_code == 200, by_url.text
    (item,) = by_url.json()["data"]
    assert set(item) == {"url"}  # OpenAI's default response_format
    with Image.open(io.BytesIO(client.get(item["url"]).content)) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(source))  # strength 0 keeps it


def test_size_resizes_the_picture_first(make_client: Callable[..., TestClient], tiny: Pipeline) -> None:
    client = make_client(tiny)
    big = picture(64)
    ((pixels, record),) = decode_images(vary(client, png(big), size="32x16", seed=1))
    assert pixels.shape == (16, 32, 3) and (record["width"], record["height"]) == (32, 16)
    resized = big.resize((32, 16), Image.Resampling.LANCZOS)
    (direct,) = tiny.edit(
        EditRequest(image=resized, prompt="", strength=DOCUMENTED_STRENGTH, seed=1, steps=2)
    )
    assert np.array_equal(pixels, np.asarray(direct.image))
    # absent, "" and "auto" keep the picture's size (strength 0: the picture itself comes back)
    for size in ("auto", "", "32x32"):
        ((kept, _),) = decode_images(vary(client, png(picture()), size=size, strength=0))
        assert np.array_equal(kept, np.asarray(picture())), size
    # a picture larger than any output is fine when a size says what to make of it
    huge = png(picture(128))
    ((small, _),) = decode_images(vary(client, huge, size="16x16", strength=0))
    assert np.array_equal(small, np.asarray(picture(128).resize((16, 16), Image.Resampling.LANCZOS)))
    error_of(vary(client, huge), "give a size (e.g. 64x64, its shape) and the picture is resized", "image")
    wide = png(picture(128).resize((256, 64)))
    error_of(vary(client, wide), "give a size (e.g. 128x32, its shape)", "image")  # 4096 pixels at most


def test_transparency_is_flattened_onto_white_not_a_mask(client: TestClient) -> None:
    source = np.asarray(picture())
    holey = Image.fromarray(source).convert("RGBA")
    holey.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half transparent, stored as black
    half = Image.fromarray(source).convert("RGBA")
    half.putalpha(128)
    for image, expected_left in (
        (holey, np.full((32, 16, 3), 255)),
        (half, (source[:, :16].astype(int) * 128 + 255 * 127 + 127) // 255),
    ):
        ((pixels, record),) = decode_images(vary(client, png(image), strength=0))
        assert record["mode"] == "img2img" and "mask" not in record  # not inpainting
        assert np.abs(pixels[:, :16].astype(int) - expected_left).max() <= 1
    ((pixels, _),) = decode_images(vary(client, png(holey), strength=0))
    assert np.array_equal(pixels[:, 16:], source[:, 16:])  # opaque pixels keep their colour exactly


@pytest.fixture
def imaging(tmp_path: Path) -> Pipeline:
    """The tiny model with a reference adapter whose output maps are not zero, so a reference changes the
    images (a freshly initialised adapter changes nothing)."""
    return with_reference_adapter(tmp_path, out_std=0.5)


def test_with_a_reference_adapter_the_picture_is_also_the_reference(
    make_client: Callable[..., TestClient], imaging: Pipeline
) -> None:
    client = make_client(imaging)
    (card,) = client.get("/v1/models").json()["data"]
    assert card["reference"] is True and card["layout"] is False  # clients can tell what a variation does
    source = picture(seed=5)
    response = vary(client, png(source), seed=2)
    ((pixels, record),) = decode_images(response)
    edit = EditRequest(image=source, prompt="", strength=DOCUMENTED_STRENGTH, seed=2, steps=2)
    (with_reference,) = imaging.edit(EditRequest(**{**vars(edit), "reference": source}))
    (without,) = imaging.edit(edit)
    assert np.array_equal(pixels, np.asarray(with_reference.image))
    assert not np.array_equal(pixels, np.asarray(without.image))  # the reference made a difference
    assert record["reference_image"] == with_reference.record["reference_image"]

    # what the job keeps reproduces the image from its metadata, as for any edit
    job = client.get(f"/v1/jobs/{response.json()['job_id']}").json()
    image_id = job["results"][0]["image_id"]
    meta = client.get(f"/v1/images/{image_id}/metadata").json()
    store = client.app.state.service.store
    again = reproduce(
        imaging,
        meta["record"],
        source=store.upload_path(job["request"]["image"]),
        reference=store.upload_path(job["request"]["reference"]),
    )
    assert np.array_equal(np.asarray(again.image), pixels)


def test_queued_variation_answers_at_once_and_draws_the_same_images(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    holey = picture().convert("RGBA")
    holey.paste((0, 0, 0, 0), (0, 0, 8, 8))  # flattened on white, and kept so
    r = vary(client, png(holey), path="/v1/jobs/variations", seed=7, prompt="a red circle", strength=0.5)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["request"]["kind"] == "edit" and job["request"]["strength"] == 0.5
    assert r.headers["location"].endswith(f"/v1/jobs/{job['id']}")
    done = wait_job(client, job["id"])
    assert done["status"] == "succeeded", done
    (result,) = done["results"]
    with Image.open(io.BytesIO(client.get(result["url"]).content)) as im:
        queued = np.asarray(im.convert("RGB"))
    ((sync, _),) = decode_images(vary(client, png(holey), seed=7, prompt="a red circle", strength=0.5))
    assert np.array_equal(queued, sync)  # one grammar, one pipeline: the same image

    meta = client.get(f"/v1/images/{result['image_id']}/metadata").json()
    kept = client.app.state.service.store.upload_path(done["request"]["image"])
    assert np.array_equal(np.asarray(reproduce(tiny, meta["record"], source=kept).image), queued)
    assert client.get("/v1/jobs/variations").status_code == 405
    assert client.get("/v1/images/variations").status_code == 405


def test_bad_variations_are_400s_that_name_the_problem(client: TestClient) -> None:
    good = png(picture())
    error_of(vary(client, good, mask="x"), "unknown field 'mask'; the variation form takes", "mask")
    error_of(vary(client, good, size="big"), "size must be WIDTHxHEIGHT", "size")
    error_of(vary(client, good, size="30x30"), "size 30x30: width 30 does not fit", "size")
    error_of(vary(client, good, size="0x32"), "positive multiple of 4", "size")
    error_of(vary(client, good, size="99999x99999"), "the limit is 4096", "size")
    error_of(vary(client, good, strength=2), "less than or equal to 1", "strength")
    error_of(vary(client, good, strength=-0.1), "greater than or equal to 0", "strength")
    error_of(vary(client, b"hello, I am text"), "image is not a readable PNG, JPEG or WebP", "image")
    error_of(vary(client, png(picture(30))), "multiples of 4", "image")
    error_of(vary(client, good, n=9), "at most 8 images", "n")
    error_of(vary(client, None), "'image' is required", "image")
    listed = client.post("/v1/images/variations", files={"image[]": ("p.png", good, "image/png")})
    error_of(listed, "a variation takes one image", "image")
    assert client.get("/v1/jobs").json()["total"] == 0
    assert not any(client.app.state.service.store.uploads_dir.iterdir())  # nothing kept from refusals


def test_what_costs_nothing_is_checked_before_the_picture_is_decode_images(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 56 KB PNG can decode to 24 megapixels: a request refused for its n, steps, prompt, names or model
    is refused before the picture is read."""

    def no_decoding(*_args: object) -> None:
        raise AssertionError("the picture was decoded before the cheap checks")

    monkeypatch.setattr("pictor.serve.edits.decode_upload", no_decoding)
    good = png(picture())
    error_of(vary(client, good, n=9), "at most 8 images", "n")
    error_of(vary(client, good, sampler="nope"), "nope", "sampler")
    error_of(vary(client, good, size="99999x99999"), "the limit is 4096", "size")
    error_of(vary(client, good, prompt="x" * 100_000), "characters", "prompt")
    response = vary(client, good, model="not-served")
    assert response.status_code in (400, 404) and "not-served" in response.text


def test_before_the_model_is_there_a_variation_is_a_503(
    make_client: Callable[..., TestClient], tiny: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whether the picture also goes as the reference depends on the model, so nothing is queued without it.
    loaded = threading.Event()

    def slow_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        assert loaded.wait(30)
        return tiny

    monkeypatch.setattr("pictor.loading.load", slow_load)
    client = make_client(None, model="tiny")
    try:
        r = vary(client, png(picture()))
    finally:
        loaded.set()
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading", r.text
    assert r.headers["retry-after"] == "5"
    monkeypatch.undo()
    broken = make_client(None, model=str(tmp_path / "no-such-model"))
    manager = broken.app.state.service.manager
    wait_for(lambda: manager.load_error, what="the load to fail")
    r = vary(broken, png(picture()))
    assert r.status_code == 503 and "the model failed to load" in r.json()["error"]["message"], r.text
    assert client.get("/v1/jobs").json()["total"] == 0


def test_a_16_bit_grey_pictures_transparent_level_is_flattened_onto_white_too(tmp_path: Path) -> None:
    """A 16-bit grey PNG's tRNS level is transparency, as an 8-bit one's: white, not its stored black."""
    raw = np.full((8, 8), 40000, dtype=np.uint16)
    raw[:, :4] = 0
    path = tmp_path / "grey16.png"
    Image.fromarray(raw).save(path, transparency=0)  # uint16: mode I;16
    with Image.open(path) as im:
        im.load()
        assert im.mode.startswith("I") and im.info.get("transparency") == 0
        flat = np.asarray(on_white(im))
    assert (flat[:, :4] == 255).all()
    assert (flat[:, 4:] == round(40000 / 257)).all()
