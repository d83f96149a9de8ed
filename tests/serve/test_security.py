"""Bad input, API key, cross-site requests, limits, path tricks, prompt policy: each a clear 4xx."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.cli import main as cli_main
from pictor.pipeline import Pipeline
from pictor.serve.security import BlockList, sign_image
from pictor.serve.settings import Limits, ServeSettings, is_loopback

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def error_of(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    assert {"message", "type", "code"} <= set(body["error"])
    return body["error"]


@pytest.fixture
def keyed(make_client: Callable[..., TestClient], tiny: Pipeline) -> TestClient:
    return make_client(tiny, api_key=KEY)


BAD_BODIES: list[tuple[str, str, str]] = [
    ("{not json", "malformed JSON", ""),
    ("", "body is missing", ""),
    ("[1, 2]", "request body", ""),
    ('{"n": 1}', "'prompt' is required", "prompt"),
    ('{"prompt": ""}', "prompt is empty", "prompt"),
    ('{"prompt": "x", "n": 0}', "greater than or equal to 1", "n"),
    ('{"prompt": "x", "n": 500}', "at most 8 images", "n"),
    ('{"prompt": "x", "n": "two"}', "valid integer", "n"),
    ('{"prompt": "x", "size": "99999x99999"}', "the limit is 4096", "size"),
    ('{"prompt": "x", "size": "64x65"}', "the limit is 4096", "size"),
    ('{"prompt": "x", "size": "big"}', "WIDTHxHEIGHT", "size"),
    ('{"prompt": "x", "size": "100000x100000"}', "WIDTHxHEIGHT", "size"),
    ('{"prompt": "x", "size": "0x0"}', "positive multiple", "size"),
    ('{"prompt": "x", "size": "30x32"}', "multiple of 4", "size"),
    ('{"prompt": "x", "steps": -3}', "greater than or equal to 1", "steps"),
    ('{"prompt": "x", "steps": 5000}', "the limit is 2000", "steps"),
    ('{"prompt": "x", "guidance": -1}', "greater than or equal to 0", "guidance"),
    ('{"prompt": "x", "guidance": NaN}', "", "guidance"),
    ('{"prompt": "x", "seed": -1}', "greater than or equal to 0", "seed"),
    ('{"prompt": "x", "seed": 99999999999999999999999}', "", "seed"),
    ('{"prompt": "x", "sampler": "magic"}', "unknown sampler", "sampler"),
    ('{"prompt": "x", "schedule": "magic"}', "unknown schedule", "schedule"),
    ('{"prompt": "x", "model": "dall-e-3"}', "not served here", "model"),
    ('{"prompt": "x", "stream": true}', "streaming is not offered", "stream"),
    ('{"prompt": "x", "stream": 0}', "streaming is not offered", "stream"),
    ('{"prompt": "x", "output_format": "jpeg"}', "output_format", "output_format"),
    ('{"prompt": "x", "response_format": "bmp"}', "response_format", "response_format"),
    ('{"prompt": "x", "stepz": 3}', "unknown field 'stepz'", "stepz"),
]


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/jobs"])
def test_bad_bodies_are_400_with_a_clear_message(client: TestClient, path: str) -> None:
    for body, words, param in BAD_BODIES:
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
        error = error_of(r, 400)
        assert words in error["message"], (body, error)
        assert error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"] == (param or None), (body, error)
    assert client.get("/v1/jobs").json()["total"] == 0  # nothing bad was queued


def test_prompt_length_limit(make_client: Callable[..., TestClient], tiny: Pipeline) -> None:
    from pictor.serve.settings import Limits

    client = make_client(tiny, limits=Limits(max_prompt_chars=20))
    error = error_of(client.post("/v1/jobs", json={"prompt": "x" * 21}), 400)
    assert error["code"] == "prompt_too_long" and "limit is 20" in error["message"]


def test_bad_query_and_path_values(client: TestClient) -> None:
    for query in ({"limit": 0}, {"limit": 1000}, {"offset": -1}, {"offset": 10**30}, {"limit": "x"}):
        error_of(client.get("/v1/jobs", params=query), 400)
    error_of(client.get("/v1/jobs", params={"q": "x" * 500}), 400)
    typo = error_of(client.get("/v1/jobs", params={"query": "red"}), 400)
    assert "unknown query parameter 'query'" in typo["message"] and "q" in typo["message"]
    for path in ("/v1/jobs/abc", "/v1/jobs/" + "A" * 32, "/v1/images/" + "g" * 32, "/v1/images/x/metadata"):
        assert "32 lowercase hex" in error_of(client.get(path), 400)["message"]
    assert "no job" in error_of(client.get("/v1/jobs/" + "0" * 32), 404)["message"]
    assert "no image" in error_of(client.get("/v1/images/" + "0" * 32), 404)["message"]
    assert "no image" in error_of(client.get(f"/v1/images/{'0' * 32}/metadata"), 404)["message"]
    error_of(client.post("/v1/jobs/" + "0" * 32), 405)
    error_of(client.get("/v1/nothing-here"), 404)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/images/..%2f..%2fetc%2fpasswd",
        "/v1/images/..%2F..%2Fpictor.db",
        "/v1/images/%2e%2e/%2e%2e/pictor.db",
        "/v1/images/....//....//etc/passwd",
        "/v1/images/%00" + "0" * 31,
        "/static/..%2fpictor.db",
        "/static/%2e%2e/%2e%2e/pictor.db",
        "/v1/jobs/..%2f..%2fetc/events",
    ],
)
def test_path_tricks_never_leave_the_data_dir(client: TestClient, path: str) -> None:
    client.post("/v1/images/generations", json={"prompt": "x"})  # the db and an image exist
    r = client.get(path)
    assert 400 <= r.status_code < 500, (path, r.status_code)
    assert b"SQLite" not in r.content and b"root:" not in r.content


def test_body_size_cap(make_client: Callable[..., TestClient], tiny: Pipeline) -> None:
    # A JSON body may hold 1 MiB of fields and four base64 pictures of the upload size: 1 MiB + 4 x 1,334
    # bytes here, so 2 MiB is over it.
    client = make_client(tiny, limits=Limits(max_upload_bytes=1000))
    big = b'{"prompt": "' + b"x" * (2 << 20) + b'"}'
    error = error_of(client.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"}), 413)
    assert "too large" in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap counts the bytes as they come
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    r = client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert "too large" in error_of(r, 413)["message"]


def test_api_key_on_every_v1_request(keyed: TestClient) -> None:
    missing = keyed.post("/v1/images/generations", json={"prompt": "x"})
    error = error_of(missing, 401)
    assert "Authorization: Bearer" in error["message"] and error["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert error_of(keyed.get("/v1/jobs", headers={"Authorization": "Bearer nope"}), 401)["message"] == (
        "invalid API key"
    )
    error_of(keyed.get("/v1/jobs", headers={"Authorization": KEY}), 401)  # no scheme
    # authentication comes before validation: strangers learn nothing about the API
    error_of(keyed.post("/v1/jobs", content="{bad", headers={"Content-Type": "application/json"}), 401)
    for path in ("/v1/jobs", "/v1/models", "/v1/jobs/" + "0" * 32, "/v1/images/" + "0" * 32):
        error_of(keyed.get(path), 401)
    error_of(keyed.delete("/v1/jobs/" + "0" * 32), 401)
    # probes and the page stay open; the metrics need the key
    for path in ("/healthz", "/readyz", "/", "/openapi.json"):
        assert keyed.get(path).status_code == 200, path
    error_of(keyed.get("/metrics"), 401)
    assert "pictor_queue_depth 0" in keyed.get("/metrics", headers=AUTH).text

    ok = keyed.post("/v1/images/generations", json={"prompt": "x"}, headers=AUTH)
    assert ok.status_code == 200, ok.text
    assert keyed.get("/v1/jobs", headers={"Authorization": f"bearer {KEY}"}).status_code == 200


def test_signed_image_urls(keyed: TestClient) -> None:
    url = keyed.post("/v1/images/generations", json={"prompt": "x"}, headers=AUTH).json()["data"][0]["url"]
    assert "sig=" in url and "exp=" in url
    assert keyed.get(url).status_code == 200  # <img src> works without the header
    image_id = url.split("/v1/images/")[1].split("?")[0]
    assert keyed.get(f"/v1/images/{image_id}", headers=AUTH).status_code == 200
    error_of(keyed.get(url.replace("sig=", "sig=0")), 401)
    expired = int(time.time()) - 10
    error_of(keyed.get(f"/v1/images/{image_id}?exp={expired}&sig={sign_image(KEY, image_id, expired)}"), 401)
    # a signature opens that image only, not its metadata or other endpoints
    error_of(keyed.get(url.replace(image_id, f"{image_id}/metadata")), 401)
    other = keyed.post("/v1/images/generations", json={"prompt": "y"}, headers=AUTH).json()["data"][0]["url"]
    other_id = other.split("/v1/images/")[1].split("?")[0]
    error_of(keyed.get(url.replace(image_id, other_id)), 401)


def test_cross_site_state_changes_are_refused(client: TestClient) -> None:
    evil = {"Origin": "https://evil.example"}
    error = error_of(client.post("/v1/jobs", json={"prompt": "x"}, headers=evil), 403)
    assert "cross-site" in error["message"] and "evil.example" in error["message"]
    error_of(client.delete("/v1/jobs/" + "0" * 32, headers=evil), 403)
    error_of(client.post("/v1/jobs", json={"prompt": "x"}, headers={"Origin": "null"}), 403)
    error_of(client.post("/v1/jobs", json={"prompt": "x"}, headers={"Origin": "http://testserver.evil"}), 403)
    assert client.get("/v1/jobs", headers=evil).status_code == 200  # reads are not state changes
    assert (
        client.post("/v1/jobs", json={"prompt": "x"}, headers={"Origin": "http://testserver"}).status_code
        == 202
    )
    assert client.post("/v1/jobs", json={"prompt": "x"}).status_code == 202  # no Origin: not a browser
    assert client.get("/v1/jobs").json()["total"] == 2


def test_prompt_policy_block_list(
    make_client: Callable[..., TestClient], tiny: Pipeline, tmp_path: Path
) -> None:
    words = tmp_path / "blocked.txt"
    words.write_text("# one per line\nforbidden\nvery bad phrase\n\n")
    client = make_client(tiny, policy=BlockList.from_file(words))
    for prompt in ("a FORBIDDEN circle", "a very  bad phrase".replace("  ", " ")):
        error = error_of(client.post("/v1/images/generations", json={"prompt": prompt}), 400)
        assert error["code"] == "content_policy_violation" and "prompt policy" in error["message"]
    assert client.post("/v1/jobs", json={"prompt": "unforbiddenness is fine"}).status_code == 202
    assert client.get("/v1/jobs").json()["total"] == 1
    # A layout's phrases steer the image as the prompt does: the policy reads them too, on edits as well.
    boxes = [{"box": [0, 0, 0.5, 1], "phrase": "a circle"}, {"box": [0.5, 0, 1, 1], "phrase": "forbidden"}]
    body = {"prompt": "two shapes", "layout": boxes}
    error = error_of(client.post("/v1/images/generations", json=body), 400)
    assert error["code"] == "content_policy_violation" and error["param"] == "layout"
    assert "layout box 1: the prompt contains the blocked term 'forbidden'" in error["message"]
    source = io.BytesIO()
    Image.new("RGB", (32, 32)).save(source, "PNG")
    edit = client.post(
        "/v1/images/edits",
        files={"image": ("s.png", source.getvalue(), "image/png")},
        data={"prompt": "two shapes", "layout": json.dumps(boxes)},
    )
    assert error_of(edit, 400)["param"] == "layout"
    assert client.get("/v1/jobs").json()["total"] == 1


def test_a_blank_prompt_is_refused(client: TestClient) -> None:
    for path in ("/v1/images/generations", "/v1/jobs"):
        error = error_of(client.post(path, json={"prompt": "  \n "}), 400)
        assert "prompt is empty" in error["message"] and error["param"] == "prompt"


def test_block_words_from_settings(make_client: Callable[..., TestClient], tiny: Pipeline) -> None:
    client = make_client(tiny, block_words=("secret",))
    assert "secret" in error_of(client.post("/v1/jobs", json={"prompt": "the Secret plan"}), 400)["message"]


def test_non_loopback_host_needs_an_api_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli_main(["serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path)]) == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in capsys.readouterr().err
    with pytest.raises(ValueError, match="without an API key"):
        ServeSettings(host="192.168.1.5").check_exposure()
    ServeSettings(host="0.0.0.0", api_key="k").check_exposure()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")
    with pytest.raises(ValueError, match="queue-size"):
        ServeSettings(queue_size=0)


def test_decompression_bomb_guard_stays_on(client: TestClient) -> None:
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS <= 2**28
