"""POST /v1/images/edits and /v1/jobs/edits: uploads on Pipeline.edit, and every way an upload can be bad."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.editing import pixel_sha256
from pictor.pipeline import Pipeline
from pictor.serve.settings import Limits
from tests.serve.conftest import decode_images


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def source_image(size: int = 32) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def edit(client: TestClient, image: bytes | None, prompt: str = "a red circle", mask: bytes | None = None,
         path: str = "/v1/images/edits", **fields: Any) -> Any:  # fmt: skip
    files = {}
    if image is not None:
        files["image"] = ("source.png", image, "image/png")
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    data = {"prompt": prompt, "response_format": "b64_json", **{k: str(v) for k, v in fields.items()}}
    return client.post(path, files=files, data=data)


def test_img2img_records_its_source(client: TestClient) -> None:
    source = source_image()
    (pixels, record), second = decode_images(edit(client, png_bytes(source), strength=0.5, seed=3, n=2))
    assert record["mode"] == "img2img" and record["strength"] == 0.5 and record["seed"] == 3
    assert record["source_image"]["sha256"] == pixel_sha256(np.asarray(source))
    assert second[1]["seed"] == 4
    assert pixels.shape == (32, 32, 3)
    job = client.get("/v1/jobs").json()["data"][0]
    assert job["request"]["kind"] == "edit" and job["status"] == "succeeded"
    kept = decode_images(edit(client, png_bytes(source), strength=0))[0][0]
    assert np.array_equal(kept, np.asarray(source))  # strength 0 keeps the image exactly


def test_sixteen_bit_sources_and_masks_read_as_the_cli_reads_them(client: TestClient) -> None:
    grey = Image.fromarray(np.full((32, 32), 8000, np.uint16)).convert("I;16")  # 12 % grey
    kept = decode_images(edit(client, png_bytes(grey), strength=0))[0][0]
    assert kept[0, 0].tolist() == [31, 31, 31]  # scaled by its depth, not clipped to white
    dark_mask = Image.fromarray(np.full((32, 32), 30000, np.uint16)).convert("I;16")  # 46 %: keep all
    r = edit(client, png_bytes(source_image()), mask=png_bytes(dark_mask), steps=1)
    assert r.status_code == 400 and "the mask is all black" in r.text


def test_queued_edit_answers_at_once_and_runs_like_the_synchronous_one(
    make_client: Callable[..., TestClient], gated: Any, wait_job: Callable[..., Any]
) -> None:
    client = make_client(gated, queue_size=1)
    store = client.app.state.service.store
    source = png_bytes(source_image())
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    busy = client.post("/v1/jobs", json={"prompt": "keeps the worker busy", "steps": 2}).json()
    assert gated.gate.reached.wait(10)

    r = edit(client, source, mask=png_bytes(mask), path="/v1/jobs/edits", seed=3, steps=3)
    assert r.status_code == 202, r.text  # answered while the worker is still held on another job
    job = r.json()
    assert job["status"] == "queued" and job["request"]["kind"] == "edit"
    assert r.headers["location"].endswith(f"/v1/jobs/{job['id']}")
    kept = sorted(p.name for p in store.uploads_dir.iterdir())
    assert len(kept) == 2  # the source and the mask, kept so the job survives a restart

    full = edit(client, source, path="/v1/jobs/edits")
    assert full.status_code == 429, full.text  # queue_size=1: refused, and its upload is not kept
    assert sorted(p.name for p in store.uploads_dir.iterdir()) == kept
    bad = edit(client, source, path="/v1/jobs/edits", strength=2)
    assert bad.status_code == 400 and "less than or equal to 1" in bad.json()["error"]["message"]
    assert client.get("/v1/jobs/edits").status_code == 405

    gated.gate.armed = False
    gated.gate.release.set()
    assert wait_job(client, busy["id"])["status"] == "succeeded"
    done = wait_job(client, job["id"])
    assert done["status"] == "succeeded", done
    (result,) = done["results"]
    queued = client.get(result["url"])
    assert queued.status_code == 200
    with Image.open(io.BytesIO(queued.content)) as im:
        queued_pixels = np.asarray(im.convert("RGB"))
        record = json.loads(im.text["pictor"])
    assert record["mode"] == "inpaint" and record["seed"] == 3 and record["steps"] == 3

    ((sync_pixels, sync_record),) = decode_images(edit(client, source, mask=png_bytes(mask), seed=3, steps=3))
    assert np.array_equal(queued_pixels, sync_pixels)  # one grammar, one pipeline: the same image
    assert sync_record["source_image"] == record["source_image"]


def test_transparent_mask_repaints_only_there(client: TestClient) -> None:
    source = source_image()
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half transparent: OpenAI's "edit here"
    ((pixels, record),) = decode_images(edit(client, png_bytes(source), mask=png_bytes(mask), seed=1))
    assert record["mode"] == "inpaint"
    assert np.array_equal(pixels[:, 18:], np.asarray(source)[:, 18:])  # kept side untouched
    assert not np.array_equal(pixels[:, :14], np.asarray(source)[:, :14])

    grey = Image.new("L", (32, 32), 0)
    grey.paste(255, (16, 0, 32, 32))  # no alpha: white repaints (pictor's convention)
    ((pixels, _),) = decode_images(edit(client, png_bytes(source), mask=png_bytes(grey), seed=1))
    assert np.array_equal(pixels[:, :14], np.asarray(source)[:, :14])

    holey = source.convert("RGBA")
    holey.paste((0, 0, 0, 0), (0, 0, 32, 8))  # no mask: the image's own transparency is the mask
    ((pixels, record),) = decode_images(edit(client, png_bytes(holey), seed=1))
    assert record["mode"] == "inpaint"
    assert np.array_equal(pixels[10:], np.asarray(source)[10:])


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height 1-bit pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def error_of(r: Any, status: int, words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert words in r.json()["error"]["message"], r.json()


def test_bad_uploads_are_4xx(make_client: Callable[..., TestClient], tiny: Pipeline) -> None:
    limits = Limits(max_pixels=64 * 64, max_upload_bytes=20_000)
    client = make_client(tiny, limits=limits)
    good = png_bytes(source_image())
    error_of(edit(client, b"\x89PNG\r\n\x1a\n not really"), 400, "not a readable PNG, JPEG or WebP image")
    error_of(edit(client, b"hello, I am text"), 400, "not a readable")
    error_of(edit(client, good[: len(good) // 2]), 400, "not a readable")  # truncated
    gif = io.BytesIO()
    source_image().save(gif, format="GIF")
    error_of(edit(client, gif.getvalue()), 400, "not a readable PNG, JPEG or WebP")
    noisy = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    assert len(noisy) > 10_000
    error_of(edit(client, noisy + noisy), 413, "image is too large: the upload limit is 20000 bytes")
    error_of(edit(client, noisy * 20), 413, "request body too large")  # over the multipart cap: not even read
    error_of(edit(client, png_bytes(source_image(128))), 400, "128x128 = 16384 pixels; the limit is 4096")
    error_of(edit(client, bomb_png(30_000, 30_000)), 400, "too many pixels")
    error_of(edit(client, png_bytes(source_image(30))), 400, "multiples of 4")
    error_of(edit(client, good, mask=png_bytes(Image.new("L", (16, 8)))), 400, "the mask is 16x8")
    error_of(edit(client, good, mask=b"junk"), 400, "mask is not a readable")
    error_of(edit(client, good, size="64x64"), 400, "keeps the image's size (32x32)")
    error_of(edit(client, good, strength=2), 400, "less than or equal to 1")
    error_of(edit(client, None), 400, "'image' is required")
    error_of(edit(client, good, prompt=""), 400, "prompt")
    assert client.get("/v1/jobs").json()["total"] == 0
    assert not any((client.app.state.service.store.uploads_dir).iterdir())  # nothing kept from refusals


def test_decompression_bomb_guard(make_client: Callable[..., TestClient], tiny: Pipeline) -> None:
    # a pixel limit above Pillow's own guard: the guard still stops the bomb before decoding
    client = make_client(tiny, limits=Limits(max_pixels=10**12))
    error_of(edit(client, bomb_png(30_000, 30_000)), 400, "decompression bomb")
    error_of(edit(client, bomb_png(10_000, 10_000)), 400, "decompression bomb")  # Pillow's warning zone too
    assert Image.MAX_IMAGE_PIXELS is not None


def test_edits_need_the_key(make_client: Callable[..., TestClient], tiny: Pipeline) -> None:
    client = make_client(tiny, api_key="k")
    error_of(edit(client, png_bytes(source_image())), 401, "API key")
    r = client.post(
        "/v1/images/edits",
        files={"image": ("s.png", png_bytes(source_image()), "image/png")},
        data={"prompt": "x"},
        headers={"Authorization": "Bearer k"},
    )
    assert r.status_code == 200, r.text
    error_of(client.get("/v1/images/edits", headers={"Authorization": "Bearer k"}), 405, "use POST")


@pytest.mark.parametrize("field", ["steps", "seed", "n"])
def test_non_numbers_in_the_form(client: TestClient, field: str) -> None:
    error_of(edit(client, png_bytes(source_image()), **{field: "many"}), 400, field)
