"""Input found by fuzzing the server: each once made a 500, a job that failed as a server fault, a history
that could no longer be listed, or an error that did not say what to do. Each must be a clear 4xx now,
and the server must go on serving."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pictor.pipeline import Pipeline
from pictor.serve.settings import Limits
from pictor.serve.uploads import decode_base64_image
from tests.serve.test_edits import edit, png_bytes, source_image
from tests.serve.test_security import AUTH, KEY, error_of

SURROGATE = "\\ud800"  # as a JSON escape: json.loads makes a lone surrogate, which UTF-8 cannot encode


def _json(client: TestClient, path: str, text: str) -> Any:
    return client.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/jobs"])
def test_lone_surrogates_are_refused_and_the_history_still_lists(client: TestClient, path: str) -> None:
    for body, param in (
        ('{"prompt": "red %s"}', "prompt"),
        ('{"prompt": "red", "negative_prompt": "%s"}', "negative_prompt"),
        ('{"prompt": "red", "user": "%s"}', "user"),
        ('{"prompt": "red", "layout": [{"box": [0, 0, 1, 1], "phrase": "a %s"}]}', "layout.0.phrase"),
    ):
        error = error_of(_json(client, path, body % SURROGATE), 400)
        assert "unicode" in error["message"].lower() and error["param"] == param, (body, error)
    listing = client.get("/v1/jobs")
    assert listing.status_code == 200 and listing.json()["total"] == 0  # nothing stored, nothing broken
    assert _json(client, path, '{"prompt": "red \\u00e9\\u2605"}').status_code in (200, 202)  # real Unicode


def test_edit_fields_are_checked_as_generation_fields_are(client: TestClient) -> None:
    image = png_bytes(source_image())
    layout = f'[{{"box": [0, 0, 1, 1], "phrase": "a {SURROGATE}"}}]'
    for fields, param, words in (
        ({"layout": layout}, "layout", "not valid Unicode"),
        ({"layout": "[" * 3000 + "]" * 3000}, "layout", "nested too deeply"),
        ({"schedule": "foo"}, "schedule", "unknown schedule 'foo'"),
        ({"sampler": "foo"}, "sampler", "unknown sampler 'foo'"),
        ({"step": 50}, "step", "unknown field 'step'"),
        ({"output_format": "jpeg"}, "output_format", "only png"),
        ({"stream": "true"}, "stream", "streaming is not offered"),
        ({"negative_prompt": "x" * 5000}, "negative_prompt", "limit is 4000"),
    ):
        error = error_of(edit(client, image, **fields), 400)
        assert words in error["message"] and error["param"] == param, (fields, error)
    ok = edit(client, image, quality="high", background="auto")  # OpenAI's fields: accepted, ignored
    assert ok.status_code == 200, ok.text
    listing = client.get("/v1/jobs")
    assert listing.status_code == 200 and listing.json()["total"] == 1


def test_long_layout_phrases_are_refused(client: TestClient) -> None:
    body = {"prompt": "x", "layout": [{"box": [0, 0, 1, 1], "phrase": "p" * 1001}]}
    error = error_of(client.post("/v1/jobs", json=body), 400)
    assert "limit is 1000" in error["message"] and error["param"] == "layout"


def test_edit_errors_name_the_upload_and_speak_http(client: TestClient) -> None:
    image = png_bytes(source_image())
    mask = error_of(edit(client, image, mask=png_bytes(source_image(16).crop((0, 0, 16, 8)))), 400)
    assert mask["param"] == "mask" and "--expand" not in mask["message"]
    odd = error_of(edit(client, png_bytes(source_image(33))), 400)
    assert odd["param"] == "image" and "multiples of" in odd["message"]
    junk = error_of(edit(client, b"this is not an image"), 400)
    assert "not a readable PNG, JPEG or WebP image" in junk["message"] and "BytesIO" not in junk["message"]
    files = [("image[]", ("a.png", image, "image/png")), ("image[]", ("b.png", image, "image/png"))]
    listed = error_of(client.post("/v1/images/edits", files=files, data={"prompt": "x"}), 400)
    assert "takes one image" in listed["message"] and listed["param"] == "image"


def test_bodies_that_are_not_json_objects_say_so(client: TestClient) -> None:
    latin = client.post(
        "/v1/jobs", content=b'{"prompt": "red \xff"}', headers={"Content-Type": "application/json"}
    )
    assert "UTF-8" in error_of(latin, 400)["message"]
    huge = _json(client, "/v1/jobs", '{"prompt": "x", "seed": ' + "9" * 5000 + "}")
    assert "4,300 digits" in error_of(huge, 400)["message"]
    plain = client.post("/v1/jobs", content=b"a red circle", headers={"Content-Type": "text/plain"})
    assert "Content-Type: application/json" in error_of(plain, 400)["message"]


def test_image_endpoints_that_do_not_exist_are_404(client: TestClient) -> None:
    for path in ("/v1/images/inpaint", "/v1/images/anything"):
        error = error_of(client.post(path, json={"prompt": "x"}), 404)
        assert "no such endpoint" in error["message"]
        assert "/v1/images/edits" in error["message"] and "/v1/images/variations" in error["message"]
        assert "/v1/images/upscale" in error["message"]


def test_search_with_nul_is_refused(client: TestClient) -> None:
    client.post("/v1/images/generations", json={"prompt": "red"})
    assert error_of(client.get("/v1/jobs", params={"q": "\x00"}), 400)["param"] == "q"
    assert client.get("/v1/jobs", params={"q": "blue"}).json()["total"] == 0


def test_head_answers_like_get_without_a_body(client: TestClient) -> None:
    for path in ("/healthz", "/", "/v1/models"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
        assert head.headers["content-length"] == get.headers["content-length"]


def test_models_retrieve_and_created(client: TestClient, tiny: Pipeline) -> None:
    card = client.get("/v1/models").json()["data"][0]
    assert card["created"] > 1_700_000_000
    for name in (card["id"], "pictor"):
        assert client.get(f"/v1/models/{name}").json() == card
    missing = error_of(client.get("/v1/models/dall-e-3"), 404)
    assert missing["code"] == "model_not_found" and card["id"] in missing["message"]


def test_signed_urls_say_when_they_are_stale(make_client: Callable[..., TestClient], tiny: Pipeline) -> None:
    keyed = make_client(tiny, api_key=KEY)
    url = keyed.post("/v1/images/generations", json={"prompt": "x"}, headers=AUTH).json()["data"][0]["url"]
    assert keyed.head(url).status_code == 200  # HEAD on a signed URL, as the guard allows
    stale = error_of(keyed.get(url.replace("sig=", "sig=0")), 401)
    assert "invalid or has expired" in stale["message"]


def test_body_limits_count_the_pictures_a_request_may_carry(
    make_client: Callable[..., TestClient], tiny: Pipeline
) -> None:
    client = make_client(tiny, limits=Limits(max_upload_bytes=1000, max_pixels=64 * 64, max_body_bytes=500))
    headers = {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(10**6)}
    error = error_of(client.post("/v1/images/edits", content=b"", headers=headers), 413)
    assert "7 images of at most 1000 bytes each" in error["message"]
    # JSON: the fields and five base64 pictures (reference, context, control, Redux, IP-Adapter):
    # 500 + 5 x 1334 bytes
    big = {"Content-Type": "application/json", "Content-Length": str(500 + 5 * 1334 + 1)}
    error = error_of(client.post("/v1/images/generations", content=b"", headers=big), 413)
    assert "the limit is 7170 bytes (500 for the fields, and up to 5 base64 pictures" in error["message"]
    fits = {"Content-Type": "application/json", "Content-Length": str(500 + 5 * 1334)}
    assert client.post("/v1/images/generations", content=b"{}", headers=fits).status_code != 413


def test_names_are_checked_while_the_model_loads(
    make_client: Callable[..., TestClient], tiny: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def slow_load(*_args: Any, **_kwargs: Any) -> Pipeline:
        assert release.wait(30)
        return tiny

    monkeypatch.setattr("pictor.loading.load", slow_load)
    client = make_client(None, model="tiny")
    try:
        assert client.get("/readyz").json()["status"] == "loading"
        for field in ("schedule", "sampler"):
            error = error_of(client.post("/v1/jobs", json={"prompt": "x", field: "foo"}), 400)
            assert error["param"] == field
        assert client.get("/v1/jobs").json()["total"] == 0
    finally:
        release.set()


def test_wrapped_base64_is_accepted() -> None:
    import base64

    b64 = base64.encodebytes(png_bytes(source_image())).decode()  # lines of 76 characters
    assert "\n" in b64
    assert decode_base64_image(b64, "reference_image", Limits()).size == (32, 32)


def test_a_stored_job_with_a_lone_surrogate_does_not_break_the_history(client: TestClient) -> None:
    """Jobs stored before requests were checked may hold one: they are listed, with U+FFFD in its place."""
    from pictor.serve.store import JobRow, new_id

    store = client.app.state.service.store  # type: ignore[attr-defined]
    job = JobRow(
        id=new_id(), created=1.0, status="failed", params={"prompt": "red", "negative_prompt": "\ud800"}
    )
    store.add_job(job)
    listing = client.get("/v1/jobs")
    assert listing.status_code == 200, listing.text
    (shown,) = listing.json()["data"]
    assert shown["request"]["negative_prompt"] == "\ufffd"
    assert client.get(f"/v1/jobs/{job.id}").status_code == 200
