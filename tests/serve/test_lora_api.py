"""LoRAs chosen per request from the server's folder (`pictor serve --lora-dir`): listed, checked, applied for
exactly the jobs that ask, recorded in the images."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file

from pictor.lora_files import lora_file_hash
from pictor.lora_tools import model_linears
from pictor.models.lora import linear_layers
from pictor.pipeline import GenerationRequest, Pipeline
from pictor.serve.job_requests import batch_key
from pictor.serve.lora_library import LoraLibrary, LoraUnavailable

BODY = {"prompt": "a red circle", "size": "32x32", "seed": 7, "response_format": "b64_json"}


def _image(client: TestClient, **extra: object) -> tuple[np.ndarray, dict]:
    r = client.post("/v1/images/generations", json={**BODY, **extra})
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))) as im:
        return np.asarray(im.convert("RGB")), json.loads(im.text["pictor"])


def test_chosen_loras_apply_to_their_jobs_only(
    make_client: Callable[..., TestClient], lora_dir: Path, fresh_tiny: Callable[[], Pipeline]
) -> None:
    client = make_client(fresh_tiny(), lora_dir=lora_dir)
    listing = client.get("/v1/loras").json()
    assert [(x["name"], x["rank"]) for x in listing["data"]] == [("detail", 4), ("style", 4)]
    assert listing["data"][1]["sha256"] == lora_file_hash(lora_dir / "style.safetensors")
    (unusable,) = listing["unusable"]
    assert unusable["file"] == "wide.safetensors" and "double_blocks.0.img_attn.qkv" in unusable["reason"]

    plain, record = _image(client)
    assert record["loras"] == []
    styled, record = _image(client, loras=[{"name": "style", "scale": 0.8}])
    (entry,) = record["loras"]
    assert (entry["name"], entry["scale"]) == ("style", 0.8)
    assert entry["sha256"] == lora_file_hash(lora_dir / "style.safetensors")
    assert np.abs(styled.astype(int) - plain).max() > 10
    again, record = _image(client)  # the LoRA stays loaded, at scale 0: the base model's picture exactly
    assert record["loras"] == [] and np.array_equal(again, plain)

    # The same picture as the library gives with that LoRA applied by hand.
    direct = fresh_tiny()
    direct.add_lora(lora_dir / "style.safetensors", 0.8)
    (want,) = direct.generate(GenerationRequest("a red circle", width=32, height=32, seed=7))
    assert np.array_equal(styled, np.asarray(want.image))

    both, record = _image(client, loras=[{"name": "detail", "scale": 1.0}, {"name": "style", "scale": -0.5}])
    assert [(e["name"], e["scale"]) for e in record["loras"]] == [("detail", 1.0), ("style", -0.5)]
    assert not np.array_equal(both, plain) and not np.array_equal(both, styled)


def test_jobs_with_other_loras_never_share_a_run() -> None:
    params = {"prompt": "a red circle", "width": 32, "height": 32, "steps": 4}
    assert batch_key({**params, "loras": [["style", 0.8]]}) != batch_key(params)
    assert batch_key({**params, "loras": [["style", 0.8]]}) != batch_key(
        {**params, "loras": [["style", 0.5]]}
    )
    assert batch_key({**params, "loras": [["style", 0.8]]}) == batch_key(
        {**params, "loras": [["style", 0.8]]}
    )


def test_bad_choices_are_400s_that_say_why(
    make_client: Callable[..., TestClient], lora_dir: Path, fresh_tiny: Callable[[], Pipeline]
) -> None:
    client = make_client(fresh_tiny(), lora_dir=lora_dir)
    cases = [
        ([{"name": "nope"}], "unknown LoRA 'nope'; this server offers detail, style"),
        ([{"name": "wide"}], "unknown LoRA 'wide'"),  # left out at start: not offered
        ([{"name": "style"}, {"name": "style", "scale": 0.5}], "named twice"),
        ([{"name": "style", "scale": 100}], "loras.0.scale"),
        ([{"name": "style", "weight": 1}], "unknown field 'loras.0.weight'"),
        ([{"name": f"x{i}"} for i in range(9)], "loras"),
    ]
    for loras, message in cases:
        r = client.post("/v1/images/generations", json={**BODY, "loras": loras})
        assert r.status_code == 400 and message in r.json()["error"]["message"], (loras, r.text)
    no_folder = make_client(fresh_tiny())
    r = no_folder.post("/v1/images/generations", json={**BODY, "loras": [{"name": "style"}]})
    assert r.status_code == 400 and "offers no LoRAs (start it with --lora-dir DIR)" in r.text
    assert no_folder.get("/v1/loras").json() == {"refreshable": False, "data": [], "unusable": []}


def test_edits_take_loras_as_json_text(
    make_client: Callable[..., TestClient], lora_dir: Path, fresh_tiny: Callable[[], Pipeline]
) -> None:
    client = make_client(fresh_tiny(), lora_dir=lora_dir)
    source = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(source, format="PNG")
    files = {"image": ("s.png", source.getvalue(), "image/png")}
    form = {"prompt": "a blue square", "seed": "3", "steps": "2", "response_format": "b64_json"}
    r = client.post(
        "/v1/images/edits", files=files, data={**form, "loras": '[{"name": "style", "scale": 0.7}]'}
    )
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))) as im:
        record = json.loads(im.text["pictor"])
    assert [(e["name"], e["scale"]) for e in record["loras"]] == [("style", 0.7)]
    r = client.post("/v1/images/edits", files=files, data={**form, "loras": "style"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "loras", r.text
    assert "loras must be JSON like" in r.json()["error"]["message"]


def test_serve_refuses_a_missing_lora_folder_before_listening(tmp_path: Path) -> None:
    pictor = shutil.which("pictor")
    assert pictor
    done = subprocess.run(
        [pictor, "serve", "--model", "tiny", "--port", "0", "--lora-dir", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "--lora-dir" in done.stderr and "no such folder" in done.stderr and "listening" not in done.stdout


def test_the_folder_is_read_carefully_and_failures_later_are_the_servers(
    make_client: Callable[..., TestClient],
    lora_dir: Path,
    fresh_tiny: Callable[[], Pipeline],
    wait_job: Callable[..., Any],
    tmp_path: Path,
) -> None:
    folder = tmp_path / "more"
    folder.mkdir()
    shutil.copy(lora_dir / "style.safetensors", folder / "my style.safetensors")
    shutil.copy(lora_dir / "style.safetensors", folder / "Upper.SAFETENSORS")  # any case of the suffix
    shutil.copy(lora_dir / "style.safetensors", folder / "gone.safetensors")
    tensors = load_file(lora_dir / "style.safetensors")
    tensors[next(k for k in tensors if "lora_B" in k)][0, 0] = float("nan")
    save_file(tensors, folder / "nan.safetensors")
    client = make_client(fresh_tiny(), lora_dir=folder)
    listing = client.get("/v1/loras").json()
    assert [x["name"] for x in listing["data"]] == ["Upper", "gone", "my style"]
    (unusable,) = listing["unusable"]
    assert unusable["file"] == "nan.safetensors" and "holds NaN or infinite values" in unusable["reason"]

    # Records name the LoRA as the request did (the adapter inside is called my_style).
    _, record = _image(client, loras=[{"name": "my style", "scale": 0.5}])
    assert [(e["name"], e["scale"]) for e in record["loras"]] == [("my style", 0.5)]

    # A file deleted after the start fails its job as the server's fault, saying which and why.
    (folder / "gone.safetensors").unlink()
    r = client.post("/v1/jobs", json={**BODY, "loras": [{"name": "gone"}]})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "lora_unavailable" and job["error"]["type"] == "server_error"
    assert "LoRA 'gone'" in job["error"]["message"] and "cannot be read" in job["error"]["message"]
    _, record = _image(client)  # the server goes on, without it
    assert record["loras"] == []


def test_a_job_queued_before_a_restart_without_its_lora_fails_clearly(
    fresh_tiny: Callable[[], Pipeline],
) -> None:
    library = LoraLibrary()
    with pytest.raises(LoraUnavailable, match="LoRA 'style' is no longer offered by this server"):
        library.activate(fresh_tiny(), [["style", 1.0]])


def test_refresh_reads_the_folder_again(
    make_client: Callable[..., TestClient], lora_dir: Path, fresh_tiny: Callable[[], Pipeline], tmp_path: Path
) -> None:
    """New files are offered, removed ones not, a changed one is checked anew and the worker drops the old
    version it had loaded: the next job draws with the new file, as a server started now would."""
    folder = tmp_path / "live"
    folder.mkdir()
    shutil.copy(lora_dir / "style.safetensors", folder / "look.safetensors")
    shutil.copy(lora_dir / "detail.safetensors", folder / "gone.safetensors")
    client = make_client(fresh_tiny(), lora_dir=folder)
    old, _ = _image(client, loras=[{"name": "look", "scale": 1.0}])  # loaded by the worker

    shutil.copy(lora_dir / "detail.safetensors", folder / "look.safetensors")  # changed
    shutil.copy(lora_dir / "style.safetensors", folder / "new.safetensors")  # added
    (folder / "gone.safetensors").unlink()  # removed
    shutil.copy(lora_dir / "wide.safetensors", folder / "wide.safetensors")  # fits no layer
    r = client.post("/v1/loras/refresh")
    assert r.status_code == 200, r.text
    listing = r.json()
    assert [x["name"] for x in listing["data"]] == ["look", "new"]
    assert listing["data"][0]["sha256"] == lora_file_hash(lora_dir / "detail.safetensors")
    assert [x["file"] for x in listing["unusable"]] == ["wide.safetensors"]
    assert client.get("/v1/loras").json() == listing

    now, record = _image(client, loras=[{"name": "look", "scale": 1.0}])
    assert record["loras"][0]["sha256"] == lora_file_hash(lora_dir / "detail.safetensors")
    fresh = make_client(fresh_tiny(), lora_dir=folder, data_dir=tmp_path / "other")  # a server started now
    want, _ = _image(fresh, loras=[{"name": "look", "scale": 1.0}])
    assert np.array_equal(now, want) and not np.array_equal(now, old)
    plain, record = _image(client)  # the dropped version left nothing behind in the model
    base, _ = _image(fresh)
    assert record["loras"] == [] and np.array_equal(plain, base)
    r = client.post("/v1/images/generations", json={**BODY, "loras": [{"name": "gone"}]})
    assert r.status_code == 400 and "unknown LoRA 'gone'" in r.text, r.text


def test_refresh_without_a_folder_and_an_empty_folder_say_so(
    make_client: Callable[..., TestClient], tiny: Pipeline, tmp_path: Path
) -> None:
    r = make_client(tiny).post("/v1/loras/refresh")
    assert r.status_code == 400 and "started without --lora-dir" in r.text, r.text
    (tmp_path / "empty").mkdir()
    client = make_client(tiny, lora_dir=tmp_path / "empty", data_dir=tmp_path / "other")
    assert client.get("/v1/loras").json() == {"refreshable": True, "data": [], "unusable": []}
    r = client.post("/v1/images/generations", json={**BODY, "loras": [{"name": "style"}]})
    assert r.status_code == 400 and "holds no usable LoRA now" in r.text, r.text


def test_odd_files_are_left_out_and_a_refresh_reads_outside_the_lock(
    lora_dir: Path, fresh_tiny: Callable[[], Pipeline], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kohya alpha of several numbers, a rank-0 pair and any unforeseen failure of one file leave that file
    out and the others offered; a refresh reads files without holding the lock that the worker's runs take."""
    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(lora_dir / "detail.safetensors", folder / "good.safetensors")
    kohya = load_file(lora_dir / "detail.safetensors")
    alpha = next(k for k in kohya if k.endswith(".alpha"))
    save_file({**kohya, alpha: torch.ones(2)}, folder / "vector_alpha.safetensors")
    native = load_file(lora_dir / "style.safetensors")
    save_file(
        {k: v[:0] if "lora_A" in k else v[:, :0] for k, v in native.items()}, folder / "rank0.safetensors"
    )
    pipe = fresh_tiny()
    linears = {p: (m.in_features, m.out_features) for p, m in linear_layers(pipe.transformer).items()}
    library = LoraLibrary(folder, linears)
    listing = library.listing()
    assert [x["name"] for x in listing["data"]] == ["good"]
    reasons = {x["file"]: x["reason"] for x in listing["unusable"]}
    assert "holds 2 numbers; a LoRA's alpha is one number" in reasons["vector_alpha.safetensors"]
    assert "has rank 0" in reasons["rank0.safetensors"]

    shutil.copy(lora_dir / "style.safetensors", folder / "slow.safetensors")
    shutil.copy(lora_dir / "style.safetensors", folder / "weird.safetensors")
    reading, release = threading.Event(), threading.Event()
    check = LoraLibrary._check

    def slow_check(self: LoraLibrary, path: Path) -> Any:
        if path.stem == "weird":
            raise RuntimeError("an unforeseen failure")
        if path.stem == "slow":
            reading.set()
            assert release.wait(30)
        return check(self, path)

    monkeypatch.setattr(LoraLibrary, "_check", slow_check)
    refresh = threading.Thread(target=library.refresh)
    refresh.start()
    assert reading.wait(30)
    runs = threading.Thread(target=library.activate, args=(pipe, [["good", 1.0]]))
    runs.start()
    runs.join(30)
    ran_during_refresh = not runs.is_alive()
    release.set()
    refresh.join(30)
    assert ran_during_refresh  # the worker applied its LoRAs while the refresh was still reading a file
    listing = library.listing()
    assert [x["name"] for x in listing["data"]] == ["good", "slow"]
    assert (
        "RuntimeError('an unforeseen failure')"
        in {x["file"]: x["reason"] for x in listing["unusable"]}["weird.safetensors"]
    )


def _lokr_file(path: Path, seed: int = 0) -> Path:
    """A LyCORIS LoKr in kohya's names on every linear layer of the tiny model: two whole factors (scale 1),
    w1 2 x 2 where both sides are even."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for layer, (n_in, n_out) in model_linears("tiny").items():
        a, b = (2 if n_out % 2 == 0 else 1), (2 if n_in % 2 == 0 else 1)
        name = "lora_unet_" + layer.replace(".", "_")
        sd[f"{name}.lokr_w1"] = torch.randn(a, b, generator=gen)
        sd[f"{name}.lokr_w2"] = 0.05 * torch.randn(n_out // a, n_in // b, generator=gen)
    save_file(sd, path)
    return path


def test_a_lokr_file_is_listed_and_drawn_like_the_library_draws_it(
    make_client: Callable[..., TestClient], tmp_path: Path, fresh_tiny: Callable[[], Pipeline]
) -> None:
    folder = tmp_path / "lycoris"
    folder.mkdir()
    path = _lokr_file(folder / "kron.safetensors")
    client = make_client(fresh_tiny(), lora_dir=folder)
    (entry,) = client.get("/v1/loras").json()["data"]
    assert entry["name"] == "kron" and entry["sha256"] == lora_file_hash(path)
    plain, _ = _image(client)
    drawn, record = _image(client, loras=[{"name": "kron", "scale": 0.7}])
    assert record["loras"][0]["sha256"] == lora_file_hash(path)
    assert np.abs(drawn.astype(int) - plain).max() > 10
    direct = fresh_tiny()
    direct.add_lora(path, 0.7)
    (want,) = direct.generate(GenerationRequest("a red circle", width=32, height=32, seed=7))
    assert np.array_equal(drawn, np.asarray(want.image))
