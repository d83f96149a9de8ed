"""FLUX.1 ControlNets through the HTTP API: `pictor serve --controlnet MODEL` loads them with the model, in
order; `controlnet_images` (base64 on generations) or `controlnet_image` files (the field repeated, on edits)
and `controlnet_scales`, `controlnet_modes`, `controlnet_start`, `controlnet_end` reach the pipeline as the
Python API's requests do (the same pixels); the pictures are kept for the job (a queued job runs from them
after a restart) and deleted with it; the model card lists the ControlNets; every misuse is a 400 that names
its field and keeps nothing."""

from __future__ import annotations

import base64
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from pictor.cli_args import build_parser
from pictor.controlnet_requests import controlnet_problem
from pictor.editing import EditRequest
from pictor.loading import pipeline_from_preset
from pictor.models.controlnet import ControlNetParams, FluxControlNet
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.reproduce import reproduce
from pictor.serve.pipeline_errors import api_message, field_of, job_error
from pictor.serve.security import json_limit, multipart_limit
from pictor.serve.server import serve
from pictor.serve.settings import Limits, ServeSettings
from pictor.serve.store import Store
from tests.serve.conftest import (
    GatedPipeline,
    assert_refused,
    decode_images,
    served_pixels,
    upload_names,
    wait_for,
)
from tests.serve.test_edits import png_bytes as png

from tiny_flux import randomize_

PROMPT = "a robot in a library"
GENERATIONS = "/v1/images/generations"


def tiny_pipeline() -> Pipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny preset is untrained on purpose
        return pipeline_from_preset("tiny", device="cpu")


def controlnet_file(path: Path, seed: int, modes: int | None = None) -> Path:
    """A single-file ControlNet (pictor's names, XLabs' layout) for the tiny model, every weight random (the
    zero-initialised output layers too, so that its picture changes the images); `modes`: a Union one."""
    flux = tiny_pipeline().transformer.params
    params = ControlNetParams(
        hidden_size=flux.hidden_size,
        num_heads=flux.num_heads,
        in_channels=flux.in_channels,
        vec_in_dim=flux.vec_in_dim,
        context_in_dim=flux.context_in_dim,
        depth=1,
        depth_single_blocks=1,
        axes_dim=list(flux.axes_dim),
        mlp_ratio=flux.mlp_ratio,
        num_modes=modes,
    )
    net = FluxControlNet(params)
    randomize_(net, seed)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An InstantX-like ControlNet ("edges") and a Union one with three modes ("union")."""
    root = tmp_path_factory.mktemp("controlnets")
    return controlnet_file(root / "edges.safetensors", 1), controlnet_file(root / "union.safetensors", 2, 3)


def with_controlnets(*paths: Path) -> Pipeline:
    pipe = tiny_pipeline()
    for path in paths:
        pipe.add_controlnet(path)
    return pipe


@pytest.fixture(scope="module")
def two(nets: tuple[Path, Path]) -> Pipeline:
    return with_controlnets(*nets)


def picture(seed: int = 0, size: tuple[int, int] = (40, 24)) -> Image.Image:
    """Blocks of random colours, of another size than the images: it is resized."""
    small = np.random.default_rng(seed).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.NEAREST)


def b64(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode("ascii")


EDGES, DEPTH, SOURCE = picture(0), picture(1), picture(7, (32, 32))


def _body(**extra: object) -> dict[str, object]:
    return {"prompt": PROMPT, "response_format": "b64_json", "seed": 3, "steps": 2, **extra}


def _pictures(*images: Image.Image) -> dict[str, object]:
    return {"controlnet_images": [b64(im) for im in images]}


def _direct(pipe: Pipeline, **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    (result,) = pipe.generate(GenerationRequest(PROMPT, seed=3, steps=2, **kw))
    return np.asarray(result.image), result.record


def _direct_edit(pipe: Pipeline, **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    (result,) = pipe.edit(EditRequest(SOURCE, PROMPT, strength=0.8, seed=3, steps=2, **kw))
    return np.asarray(result.image), result.record


def _edit(
    client: TestClient,
    pictures: Sequence[bytes] = (),
    path: str = "/v1/images/edits",
    **data: object,
) -> Any:
    files = [("image", ("source.png", png(SOURCE), "image/png"))]
    files += [("controlnet_image", (f"net{i}.png", p, "image/png")) for i, p in enumerate(pictures)]
    form: dict[str, Any] = {"prompt": PROMPT, "response_format": "b64_json", "seed": "3", "steps": "2"}
    form["strength"] = "0.8"
    # a list value is the field repeated
    form.update({k: [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in data.items()})
    return client.post(path, files=files, data=form)


def test_controlnet_pictures_draw_what_the_python_api_draws(
    make_client: Callable[..., TestClient], two: Pipeline
) -> None:
    client = make_client(two)
    settings = {"controlnet_scales": [0.6, 0.8], "controlnet_modes": [None, "depth"]}
    ((pixels, record),) = decode_images(
        client.post(GENERATIONS, json=_body(**_pictures(EDGES, DEPTH), **settings))
    )
    want, direct = _direct(two, controlnet_images=[EDGES, DEPTH], **settings)
    assert pixels.shape == (32, 32, 3) and np.array_equal(pixels, want)
    assert record["controlnets"] == direct["controlnets"]
    assert [e["scale"] for e in record["controlnets"]] == [0.6, 0.8] and record["controlnets"][1]["mode"] == 2
    # what the pictures and settings change: another picture, another mode, no ControlNets at all
    assert not np.array_equal(pixels, _direct(two, controlnet_images=[DEPTH, DEPTH], **settings)[0])
    other_mode = {**settings, "controlnet_modes": [None, "canny"]}
    assert not np.array_equal(pixels, _direct(two, controlnet_images=[EDGES, DEPTH], **other_mode)[0])
    assert not np.array_equal(pixels, _direct(tiny_pipeline())[0])
    # the job keeps the pictures as uploads, in order, and the settings spelled out (one per ControlNet)
    request = client.get("/v1/jobs").json()["data"][0]["request"]
    assert sorted(f"{u}.png" for u in request["controlnet_images"]) == upload_names(client)
    assert request["controlnet_scales"] == [0.6, 0.8] and request["controlnet_modes"] == [None, 2]
    assert (request["controlnet_start"], request["controlnet_end"]) == (0.0, 1.0)

    # data: URLs, one scale and one mode for all (the Union one's), and a step window
    body = _body(
        controlnet_images=["data:image/png;base64," + b64(EDGES), b64(DEPTH)],
        controlnet_scales=0.5,
        controlnet_modes="depth",
        controlnet_start=0.5,
    )
    ((pixels, record),) = decode_images(client.post(GENERATIONS, json=body))
    kw = {"controlnet_scales": [0.5], "controlnet_modes": ["depth"], "controlnet_start": 0.5}
    assert np.array_equal(pixels, _direct(two, controlnet_images=[EDGES, DEPTH], **kw)[0])
    assert record["controlnet_start"] == 0.5 and [e["scale"] for e in record["controlnets"]] == [0.5, 0.5]
    request = client.get("/v1/jobs").json()["data"][0]["request"]
    assert request["controlnet_scales"] == [0.5, 0.5] and request["controlnet_modes"] == [None, 2]


def test_an_edit_takes_controlnet_files_as_the_python_api_does(
    make_client: Callable[..., TestClient], two: Pipeline, wait_job: Callable[..., Any]
) -> None:
    client = make_client(two)
    files = [png(EDGES), png(DEPTH)]
    settings = {"controlnet_scales": [0.6, 0.8], "controlnet_modes": [None, "depth"]}
    want, direct = _direct_edit(two, controlnet_images=[EDGES, DEPTH], **settings)
    # the lists as the field repeated, as comma-separated text, as JSON text and as name[] fields (what the
    # openai client sends for a list in extra_body)
    for fields in (
        {"controlnet_scales": ["0.6", "0.8"], "controlnet_modes": ["none", "depth"]},
        {"controlnet_scales": "0.6,0.8", "controlnet_modes": "none,depth"},
        {"controlnet_scales": "[0.6, 0.8]", "controlnet_modes": '[null, "depth"]'},
        {"controlnet_scales[]": ["0.6", "0.8"], "controlnet_modes[]": ["none", "2"]},
    ):
        ((pixels, record),) = decode_images(_edit(client, files, **fields))
        assert np.array_equal(pixels, want), fields
        assert record["mode"] == "img2img" and record["controlnets"] == direct["controlnets"]
    assert not np.array_equal(pixels, _direct_edit(two, controlnet_images=[DEPTH, EDGES], **settings)[0])
    r = _edit(client, files, path="/v1/jobs/edits", response_format="url", controlnet_modes="depth")
    assert r.status_code == 202, r.text
    request = r.json()["request"]
    assert len(request["controlnet_images"]) == 2 and request["controlnet_modes"] == [None, 2]
    assert request["controlnet_scales"] == [1.0, 1.0]
    done = wait_job(client, r.json()["id"])
    assert done["status"] == "succeeded", done
    direct_pixels, _ = _direct_edit(two, controlnet_images=[EDGES, DEPTH], controlnet_modes=["depth"])
    assert np.array_equal(served_pixels(client, done), direct_pixels)


def test_the_model_card_lists_the_controlnets(
    make_client: Callable[..., TestClient], two: Pipeline, client: TestClient
) -> None:
    """The web page offers one picture (and scale, and a mode for a Union one) per listed ControlNet."""
    ours = make_client(two)
    (card,) = ours.get("/v1/models").json()["data"]
    assert card["controlnets"] == [
        {"name": "edges", "kind": "instantx", "modes": None},
        {"name": "union", "kind": "union", "modes": ["canny", "tile", "depth"]},
    ]
    assert ours.get(f"/v1/models/{card['id']}").json()["controlnets"] == card["controlnets"]
    assert client.get("/v1/models").json()["data"][0]["controlnets"] == []


def test_misuse_is_a_400_that_names_the_field_and_keeps_nothing(
    make_client: Callable[..., TestClient], two: Pipeline, client: TestClient
) -> None:
    ours = make_client(two)
    pair = _pictures(EDGES, DEPTH)
    union = {"controlnet_modes": [None, "depth"]}
    # No ControlNet loaded: the pictures, and settings alone, are refused, saying how the server gets one
    started_without = "started without ControlNets (pictor serve --controlnet MODEL)"
    assert_refused(
        client.post(GENERATIONS, json=_body(**_pictures(EDGES))), "controlnet_images", started_without
    )
    assert_refused(
        client.post(GENERATIONS, json=_body(controlnet_scales=0.5)), "controlnet_scales", started_without
    )
    assert_refused(_edit(client, [png(EDGES)]), "controlnet_image", started_without)
    assert_refused(_edit(client, controlnet_end="0.5"), "controlnet_end", started_without)
    # Loaded: a picture each, in order
    assert_refused(ours.post(GENERATIONS, json=_body()), "controlnet_images", "2 ControlNets are loaded")
    assert_refused(
        ours.post(GENERATIONS, json=_body(**_pictures(EDGES), **union)), "controlnet_images", "1 control"
    )
    assert_refused(_edit(ours, [png(EDGES)], **union), "controlnet_image", "give exactly one per ControlNet")
    assert_refused(_edit(ours, **union), "controlnet_image", "2 ControlNets are loaded")
    # Union modes: none for the Union one, one for the other, one it does not know, a word that is no mode
    assert_refused(ours.post(GENERATIONS, json=_body(**pair)), "controlnet_modes", "is a Union ControlNet")
    assert_refused(_edit(ours, [png(EDGES), png(DEPTH)]), "controlnet_modes", "is a Union ControlNet")
    modes = {"controlnet_modes": ["depth", "depth"]}
    assert_refused(ours.post(GENERATIONS, json=_body(**pair, **modes)), "controlnet_modes", "not a Union")
    modes = {"controlnet_modes": [None, 5]}
    assert_refused(ours.post(GENERATIONS, json=_body(**pair, **modes)), "controlnet_modes", "modes 0 to 2")
    for value in ("sketch", ["depth", True], [{"mode": 1}], ["x" * 40]):
        r = ours.post(GENERATIONS, json=_body(**pair, controlnet_modes=value))
        assert_refused(r, "controlnet_modes", "not a ControlNet mode")
    assert_refused(
        _edit(ours, [png(EDGES), png(DEPTH)], controlnet_modes="sketch"), "controlnet_modes", "sketch"
    )
    assert_refused(
        _edit(ours, [png(EDGES), png(DEPTH)], controlnet_modes="[none"), "controlnet_modes", "JSON list"
    )
    # Scales: how many, and what
    r = ours.post(GENERATIONS, json=_body(**pair, **union, controlnet_scales=[1, 1, 1]))
    assert_refused(r, "controlnet_scales", "3 ControlNet scales for 2 ControlNets")
    for value in (11, -1, "1", [True], [1, 1, 1, 1, 1]):
        r = ours.post(GENERATIONS, json=_body(**pair, **union, controlnet_scales=value))
        assert_refused(r, "controlnet_scales", "controlnet_scales")
    for text in ("strong", "nan", "11", ["1", "x"]):
        r = _edit(ours, [png(EDGES), png(DEPTH)], **union, controlnet_scales=text)
        assert_refused(r, "controlnet_scales", "a ControlNet scale is a number from 0 to 10")
    # The window: out of range (the schema), start >= end, one that holds none of the steps
    for field, value in (("controlnet_start", 1), ("controlnet_end", 0), ("controlnet_end", 1.5)):
        assert_refused(ours.post(GENERATIONS, json=_body(**pair, **union, **{field: value})), field, field)
    window = {"controlnet_start": 0.5, "controlnet_end": 0.5}
    assert_refused(
        ours.post(GENERATIONS, json=_body(**pair, **union, **window)), "controlnet_start", "start < end"
    )
    narrow = {"controlnet_start": 0.6, "controlnet_end": 0.7}
    assert_refused(
        ours.post(GENERATIONS, json=_body(**pair, **union, **narrow)), "controlnet_end", "holds none"
    )
    assert_refused(_edit(ours, [png(EDGES), png(DEPTH)], **union, **narrow), "controlnet_end", "holds none")
    # Too many pictures, refused by their count before any is read; pictures that cannot be read
    five = {"controlnet_images": ["x"] * 5}
    assert_refused(ours.post(GENERATIONS, json=_body(**five)), "controlnet_images", "at most 4")
    assert_refused(_edit(ours, [b"x"] * 5), "controlnet_image", "at most 4")
    bad = {"controlnet_images": [b64(EDGES), "not base64!"]}
    assert_refused(
        ours.post(GENERATIONS, json=_body(**bad, **union)), "controlnet_images", "[1] (ControlNet 2's"
    )
    assert_refused(_edit(ours, [png(EDGES), b"GIF89a no"], **union), "controlnet_image", "not a readable PNG")
    # What does not go beside ControlNets, and variations, which take no ControlNet pictures
    assert_refused(ours.post(GENERATIONS, json=_body(**pair, **union, hires_scale=2)), "hires_scale", "hires")
    variation = ours.post("/v1/images/variations", files={"image": ("a.png", png(SOURCE), "image/png")})
    assert_refused(variation, "image", "variations do not take")
    for c in (ours, client):
        assert c.get("/v1/jobs").json()["total"] == 0
        assert upload_names(c) == []


def test_a_queued_job_keeps_its_controlnet_pictures_across_a_restart(
    make_client: Callable[..., TestClient], two: Pipeline, wait_job: Callable[..., Any]
) -> None:
    """Queued behind another job, the server stops; the next server runs it from the kept uploads. A job the
    full queue refuses leaves none of its pictures behind."""
    gated = GatedPipeline(two)
    client = make_client(gated, queue_size=1)
    union = {"controlnet_modes": [None, "depth"]}
    busy = client.post(
        "/v1/jobs", json=_body(**_pictures(SOURCE, SOURCE), **union, response_format=None, steps=1)
    )
    assert busy.status_code == 202, busy.text
    assert gated.gate.reached.wait(10)
    settings = {**union, "controlnet_scales": [0.7, 0.9], "controlnet_end": 0.5}
    r = client.post("/v1/jobs", json=_body(**_pictures(EDGES, DEPTH), **settings, response_format=None))
    assert r.status_code == 202, r.text
    job = r.json()
    kept = upload_names(client)
    assert {f"{u}.png" for u in job["request"]["controlnet_images"]} <= set(kept) and len(kept) == 4
    full = client.post("/v1/jobs", json=_body(**_pictures(EDGES, DEPTH), **union, response_format=None))
    assert full.status_code == 429, full.text
    assert upload_names(client) == kept
    make_client.close(client)  # the running job finishes; the queued one stays queued
    store = Store(make_client.data_dir)
    try:
        queued = store.get_job(job["id"])
    finally:
        store.close()
    assert queued is not None and queued.status == "queued"

    again = make_client(two)
    done = wait_job(again, job["id"])
    assert done["status"] == "succeeded", done
    want, direct = _direct(two, controlnet_images=[EDGES, DEPTH], **settings)
    assert np.array_equal(served_pixels(again, done), want)
    meta = again.get(f"/v1/images/{done['results'][0]['image_id']}/metadata").json()
    assert meta["record"]["controlnets"] == direct["controlnets"] and meta["record"]["controlnet_end"] == 0.5
    # what the kept uploads are for: `pictor reproduce IMAGE --controlnet-image PICTURE ...` with them
    store = again.app.state.service.store
    kept_pictures = [store.upload_path(u) for u in done["request"]["controlnet_images"]]
    assert np.array_equal(
        np.asarray(reproduce(two, meta["record"], controlnet_images=kept_pictures).image), want
    )


def test_uploads_go_when_the_job_is_cancelled_fails_or_is_deleted(
    make_client: Callable[..., TestClient], two: Pipeline, wait_job: Callable[..., Any]
) -> None:
    gated = GatedPipeline(two)
    client = make_client(gated)
    union = {"controlnet_modes": [None, "depth"], "response_format": None}
    holder = client.post("/v1/jobs", json=_body(**_pictures(SOURCE, SOURCE), **union, steps=1)).json()
    assert gated.gate.reached.wait(10)
    cancelled = client.post("/v1/jobs", json=_body(**_pictures(EDGES, DEPTH), **union)).json()
    lost = client.post("/v1/jobs", json=_body(**_pictures(EDGES, DEPTH), **union)).json()
    mine = {name: {f"{u}.png" for u in job["request"]["controlnet_images"]} for name, job in
            (("holder", holder), ("cancelled", cancelled), ("lost", lost))}  # fmt: skip
    assert set(upload_names(client)) == set().union(*mine.values())
    assert client.delete(f"/v1/jobs/{cancelled['id']}").json()["status"] == "cancelled"
    assert set(upload_names(client)) == mine["holder"] | mine["lost"]
    # one of a job's pictures deleted by hand: the job fails as the server's fault, naming the field, and
    # its other picture goes too
    store = client.app.state.service.store
    store.upload_path(lost["request"]["controlnet_images"][1]).unlink()
    gated.gate.armed = False
    gated.gate.release.set()
    failed = wait_job(client, lost["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "upload_missing", failed
    assert failed["error"]["param"] == "controlnet_images"
    assert wait_job(client, holder["id"])["status"] == "succeeded"
    wait_for(lambda: set(upload_names(client)) == mine["holder"], what="the failed job's uploads to go")
    # a succeeded job keeps them (for pictor reproduce) until its history entry is deleted
    assert client.delete(f"/v1/history/{holder['id']}").status_code == 200
    assert upload_names(client) == []


def test_serve_loads_the_controlnets_into_the_model_it_loads(
    make_client: Callable[..., TestClient],
    nets: tuple[Path, Path],
    two: Pipeline,
    monkeypatch: pytest.MonkeyPatch,
    wait_job: Callable[..., Any],
) -> None:
    """`pictor serve --controlnet A --controlnet B`: the flags reach the settings; while the model loads the
    card lists none and the fields' words are still checked, and a job is kept with its pictures; once
    loaded the jobs run with the ControlNets in order (the Python API's pixels), and a job the model
    refuses when it runs fails naming its field (an edit's, the form's) and keeps nothing."""
    args = build_parser().parse_args(["serve", "--controlnet", str(nets[0]), "--controlnet", str(nets[1])])
    assert args.controlnet == [str(nets[0]), str(nets[1])]
    loading = threading.Event()

    def slow_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        assert loading.wait(30)
        return tiny_pipeline()

    monkeypatch.setattr("pictor.loading.load", slow_load)
    client = make_client(None, model="tiny", controlnets=tuple(nets))
    try:
        assert client.get("/v1/models").json()["data"][0]["controlnets"] == []  # still loading
        r = client.post("/v1/jobs", json=_body(**_pictures(EDGES, DEPTH), controlnet_modes="sketch"))
        assert_refused(r, "controlnet_modes", "not a ControlNet mode")
        good = _body(**_pictures(EDGES, DEPTH), controlnet_modes=[None, "depth"], response_format=None)
        r = client.post("/v1/jobs", json=good)
        assert r.status_code == 202, r.text  # checked when it runs; its pictures kept meanwhile
        assert r.json()["request"]["controlnet_modes"] == [None, "depth"]  # as sent until then
        assert len(upload_names(client)) == 2
        one = client.post("/v1/jobs", json=_body(**_pictures(EDGES)))
        edit = _edit(client, [png(EDGES)], path="/v1/jobs/edits", controlnet_modes="depth")
        assert one.status_code == 202 and edit.status_code == 202, (one.text, edit.text)
    finally:
        loading.set()
    done = wait_job(client, r.json()["id"])
    assert done["status"] == "succeeded", done
    assert [c["name"] for c in client.get("/v1/models").json()["data"][0]["controlnets"]] == [
        "edges",
        "union",
    ]
    want, _ = _direct(two, controlnet_images=[EDGES, DEPTH], controlnet_modes=[None, "depth"])
    assert np.array_equal(served_pixels(client, done), want)
    for job, field in ((one, "controlnet_images"), (edit, "controlnet_image")):
        failed = wait_job(client, job.json()["id"])
        error = failed["error"]
        assert failed["status"] == "failed" and error["param"] == field, failed
        assert error["message"].startswith(f"{field}: ") and "--controlnet-image" not in error["message"]
    wait_for(
        lambda: len(upload_names(client)) == 2, what="the failed jobs' uploads to go"
    )  # the succeeded job's


def test_a_bad_controlnet_fails_the_load_and_serve_checks_the_flags(
    make_client: Callable[..., TestClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lora = tmp_path / "style.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 32)}, lora)
    monkeypatch.setattr(
        "pictor.loading.load", lambda model=None, device=None, dtype=None, **_k: tiny_pipeline()
    )
    client = make_client(None, model="tiny", controlnets=(lora,))

    def failed() -> Any:
        r = client.get("/readyz")
        return r.status_code == 503 and r.json()["status"] == "error" and r.json()

    health = wait_for(failed, what="the load to fail")
    assert f"--controlnet {lora}" in health["detail"] and "not a FLUX.1 ControlNet" in health["detail"]
    # More than a request may carry pictures for, and a file that is not there, before anything listens
    with pytest.raises(ValueError, match="5 --controlnet models given; a server loads at most 4"):
        ServeSettings(data_dir=tmp_path, controlnets=(lora,) * 5)
    missing = ServeSettings(data_dir=tmp_path, model="tiny", controlnets=(tmp_path / "no.safetensors",))
    with pytest.raises(ValueError, match=r"--controlnet .*no\.safetensors: no such file or folder"):
        serve(missing)


def test_the_body_caps_grow_by_one_picture_per_loaded_controlnet(
    make_client: Callable[..., TestClient], two: Pipeline, tiny: Pipeline
) -> None:
    limits = Limits(max_upload_bytes=1000, max_pixels=64 * 64, max_body_bytes=500)
    assert (multipart_limit(limits), json_limit(limits)) == (7 * 1000 + 65536, 500 + 5 * 1334)
    ours, plain = make_client(two, limits=limits), make_client(tiny, limits=limits)
    multipart = {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(10**6)}
    error = ours.post("/v1/images/edits", content=b"", headers=multipart).json()["error"]
    assert "9 images of at most 1000 bytes each, 2 of them ControlNet pictures" in error["message"]
    over = {"Content-Type": "application/json", "Content-Length": str(500 + 7 * 1334 + 1)}
    error = ours.post(GENERATIONS, content=b"", headers=over).json()["error"]
    assert (
        "up to 7 base64 pictures of at most 1000 bytes each, 2 of them ControlNet pictures"
        in error["message"]
    )
    fits = {**over, "Content-Length": str(500 + 7 * 1334)}
    assert ours.post(GENERATIONS, content=b"{}", headers=fits).status_code != 413
    # a server without ControlNets keeps its caps
    assert plain.post(GENERATIONS, content=b"{}", headers=fits).status_code == 413


# The pipeline's own messages (controlnet_problem on the two loaded ControlNets, and without any), the field
# the API names, and words the API's message must hold: a reworded message no rule matches fails here.
MESSAGES: list[tuple[str, dict[str, Any], bool, str, str]] = [
    ("given without", {"controlnet_images": [1]}, False, "controlnet_images", "pictor serve --controlnet"),
    ("scales without", {"controlnet_scales": [1.0]}, False, "controlnet_scales", "drop it"),
    ("modes without", {"controlnet_modes": ["depth"]}, False, "controlnet_modes", "drop it"),
    ("start without", {"controlnet_start": 0.5}, False, "controlnet_start", "drop it"),
    ("end without", {"controlnet_end": 0.5}, False, "controlnet_end", "drop it"),
    (
        "none given",
        {"controlnet_images": None},
        True,
        "controlnet_images",
        "in the order GET /v1/models lists them",
    ),
    ("count", {"controlnet_images": [1]}, True, "controlnet_images", "one per ControlNet"),
    ("scales count", {"controlnet_scales": [1, 1, 1]}, True, "controlnet_scales", "3 ControlNet scales"),
    ("scale range", {"controlnet_scales": [99]}, True, "controlnet_scales", "from 0 to 10"),
    ("modes count", {"controlnet_modes": [None, 1, 1]}, True, "controlnet_modes", "3 ControlNet modes"),
    (
        "no mode",
        {"controlnet_modes": None},
        True,
        "controlnet_modes",
        "say what its picture is with controlnet_modes",
    ),
    ("mode for instantx", {"controlnet_modes": [1, 1]}, True, "controlnet_modes", "(or null in its place)"),
    ("unknown mode", {"controlnet_modes": [None, "x"]}, True, "controlnet_modes", "is not one of"),
    ("mode range", {"controlnet_modes": [None, 7]}, True, "controlnet_modes", "modes 0 to 2"),
    ("window", {"controlnet_start": 0.5, "controlnet_end": 0.2}, True, "controlnet_start", "start < end"),
    ("reference", {"reference": 1}, True, "reference_image", "reference picture"),
    ("context", {"context_image": 1}, True, "context_image", "context image"),
    ("control", {"control_image": 1}, True, "control_image", "control picture"),
    ("hires", {"hires_scale": 2.0}, True, "hires_scale", "leave hires_scale out"),
]


@pytest.mark.parametrize(
    ("what", "request_fields", "loaded", "field", "words"), MESSAGES, ids=[m[0] for m in MESSAGES]
)
def test_the_pipelines_controlnet_messages_name_their_field_in_the_apis_words(
    two: Pipeline, what: str, request_fields: dict[str, Any], loaded: bool, field: str, words: str
) -> None:
    fields = {"controlnet_images": [1, 2], "controlnet_modes": [None, "depth"], **request_fields}
    if not loaded:
        fields = request_fields
    message = controlnet_problem(GenerationRequest("a", **fields), two.controlnets if loaded else [])
    assert message, "the pipeline no longer refuses this"
    assert field_of(message) == field, message
    api = api_message(message)
    assert words in api, api
    flags = {f for f in api.split() if f.startswith("--")}
    assert flags <= {"--controlnet"}, api  # the server's own flag, which tells its operator what to do
    # an edit's form names its pictures controlnet_image, the file field it repeats
    error = job_error(GenerationError(message), form=True)
    assert "controlnet_images" not in error["message"]
    assert error["param"] == ("controlnet_image" if field == "controlnet_images" else field)
