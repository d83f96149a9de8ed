"""FLUX.1 Redux through the HTTP API: `redux_image` (base64 on generations, a file on edits) and
`redux_strength` reach the pipeline as the Python API's requests do (the same pixels), the picture is kept for
the job (a queued job runs from it after a restart), `pictor serve --redux-model --siglip` gives the loaded
model Redux, the model card says `redux`, a variation on such a server is a generation from the picture's
Redux tokens, and every misuse is a 400 that names its field and keeps nothing."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from pictor.checkpoint import BundleConfig
from pictor.cli_args import build_parser
from pictor.editing import EditRequest
from pictor.loading import pipeline_from_preset
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import FluxParams
from pictor.models.redux import ReduxEncoder
from pictor.models.text import build_text_encoder
from pictor.pipeline import GenerationRequest, Pipeline
from pictor.presets import get_preset
from pictor.reproduce import reproduce
from pictor.serve.server import serve
from pictor.serve.settings import ServeSettings
from pictor.serve.store import Store
from pictor.serve.variations import on_white
from tests.serve.conftest import GatedPipeline, decode_images
from tests.serve.conftest import assert_refused as _refused
from tests.serve.conftest import served_pixels as _served
from tests.serve.conftest import upload_names as _uploads
from tests.serve.test_control_api import b64
from tests.serve.test_edits import png_bytes as png
from tests.test_redux import SIGLIP_DIM, _siglip_folder

from tiny_flux import random_flux

PROMPT = "a robot in a library"


def dev_pipeline() -> Pipeline:
    """The tiny preset made guidance-distilled, as FLUX.1 [dev] (Redux refuses classifier-free guidance)."""
    p = get_preset("tiny")
    model = {**p["model"], "guidance_embed": True}
    config = BundleConfig(
        name="tiny-dev",
        preset="tiny",
        model=model,
        autoencoder=p["autoencoder"],
        text_encoder=p["text_encoder"],
        defaults={**p["defaults"], "guidance": 3.5, "guidance_mode": "distilled", "steps": 2},
    )
    flux = random_flux(FluxParams.from_dict(model), seed=0)
    torch.manual_seed(0)
    text = build_text_encoder(config.text_encoder)
    ae = AutoEncoder(AutoEncoderParams.from_dict(p["autoencoder"])).eval()
    return Pipeline(flux, ae, text, config, device="cpu", dtype=torch.float32)


def redux_files(root: Path) -> tuple[Path, Path]:
    """A Redux embedder file for the tiny model's text width and a tiny SigLIP folder (as tests/test_redux.py
    makes them), under `root`."""
    siglip = _siglip_folder(root / "siglip")
    torch.manual_seed(2)
    encoder = ReduxEncoder(SIGLIP_DIM, get_preset("tiny")["model"]["context_in_dim"])
    with torch.no_grad():  # larger than default init, so the picture's tokens clearly matter
        for p in encoder.parameters():
            p.mul_(8.0)
    redux = root / "flux1-redux-dev.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, redux)
    return redux, siglip


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return redux_files(tmp_path_factory.mktemp("redux-serve"))


@pytest.fixture(scope="module")
def dev(files: tuple[Path, Path]) -> Pipeline:
    pipe = dev_pipeline()
    pipe.set_redux(*files)
    return pipe


def redux_picture(seed: int = 0, size: tuple[int, int] = (40, 24)) -> Image.Image:
    """Blocks of random colours, of another size than the images (SigLIP, or the IP-Adapter's CLIP processor,
    resizes it)."""
    small = np.random.default_rng(seed).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


PICTURE = redux_picture()
SOURCE = redux_picture(7, (32, 32))


def _body(**extra: object) -> dict[str, object]:
    return {"prompt": PROMPT, "response_format": "b64_json", "seed": 3, "steps": 2, **extra}


def _direct(pipe: Pipeline, prompt: str = PROMPT, **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    (result,) = pipe.generate(GenerationRequest(prompt, seed=3, steps=2, **kw))
    return np.asarray(result.image), result.record


def picture_edit(field: str) -> Callable[..., Any]:
    """An edit of SOURCE posted with, when given, a picture file as `field` (`redux_image` here,
    `ip_adapter_image` in test_ip_adapter_api.py) and any other form fields."""

    def edit(
        client: TestClient, picture: bytes | None = None, path: str = "/v1/images/edits", **data: object
    ) -> Any:
        files = {"image": ("source.png", png(SOURCE), "image/png")}
        if picture is not None:
            files[field] = (f"{field.removesuffix('_image')}.png", picture, "image/png")
        form = {"prompt": PROMPT, "response_format": "b64_json", "seed": "3", "steps": "2", "strength": "0.8"}
        return client.post(path, files=files, data={**form, **{k: str(v) for k, v in data.items()}})

    return edit


_edit = picture_edit("redux_image")


def _direct_edit(pipe: Pipeline, **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    (result,) = pipe.edit(EditRequest(SOURCE, PROMPT, strength=0.8, seed=3, steps=2, **kw))
    return np.asarray(result.image), result.record


def _vary(client: TestClient, image: Image.Image, path: str = "/v1/images/variations", **data: object) -> Any:
    form = {"response_format": "b64_json", "seed": "3", "steps": "2", **{k: str(v) for k, v in data.items()}}
    return client.post(path, files={"image": ("picture.png", png(image), "image/png")}, data=form)


def test_a_redux_picture_draws_what_the_python_api_draws(
    make_client: Callable[..., TestClient], dev: Pipeline
) -> None:
    client = make_client(dev)
    ((pixels, record),) = decode_images(
        client.post("/v1/images/generations", json=_body(redux_image=b64(PICTURE)))
    )
    want, direct = _direct(dev, redux_image=PICTURE)
    assert np.array_equal(pixels, want)
    assert record["redux_image"] == direct["redux_image"] and record["redux"]["strength"] == 1.0
    assert record["redux"]["sha256"] == dev.redux.info["sha256"]  # type: ignore[union-attr]
    assert not np.array_equal(pixels, _direct(dev)[0])  # the picture speaks
    job = client.get("/v1/jobs").json()["data"][0]
    assert job["request"]["redux_image"] and job["request"]["redux_strength"] == 1.0
    # A data: URL, a strength, and an empty prompt (the picture alone says what to draw)
    data_url = "data:image/png;base64," + b64(PICTURE)
    body = _body(prompt="", redux_image=data_url, redux_strength=0.5)
    ((pixels, record),) = decode_images(client.post("/v1/images/generations", json=body))
    assert np.array_equal(pixels, _direct(dev, "", redux_image=PICTURE, redux_strength=0.5)[0])
    assert record["redux"]["strength"] == 0.5 and record["prompt"] == ""


def test_an_edit_takes_a_redux_file_and_strength_as_the_python_api_does(
    make_client: Callable[..., TestClient], dev: Pipeline, wait_job: Callable[..., Any]
) -> None:
    client = make_client(dev)
    ((pixels, record),) = decode_images(_edit(client, png(PICTURE), redux_strength=0.5))
    want, direct = _direct_edit(dev, redux_image=PICTURE, redux_strength=0.5)
    assert np.array_equal(pixels, want)
    assert record["mode"] == "img2img" and record["redux_image"] == direct["redux_image"]
    assert record["redux"]["strength"] == 0.5
    r = _edit(client, png(PICTURE), path="/v1/jobs/edits", response_format="url")
    assert r.status_code == 202, r.text
    assert r.json()["request"]["redux_image"] and r.json()["request"]["redux_strength"] == 1.0
    done = wait_job(client, r.json()["id"])
    assert done["status"] == "succeeded", done
    assert np.array_equal(_served(client, done), _direct_edit(dev, redux_image=PICTURE)[0])


def test_the_model_card_says_whether_redux_is_loaded(
    make_client: Callable[..., TestClient], dev: Pipeline, client: TestClient
) -> None:
    ours = make_client(dev)
    (card,) = ours.get("/v1/models").json()["data"]
    assert card["redux"] is True and card["reference"] is False
    assert ours.get(f"/v1/models/{card['id']}").json()["redux"] is True
    assert client.get("/v1/models").json()["data"][0]["redux"] is False


def test_serve_loads_redux_into_the_model_it_loads(
    make_client: Callable[..., TestClient],
    files: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    wait_job: Callable[..., Any],
) -> None:
    """`pictor serve --redux-model FILE --siglip DIR`: the flags reach the settings, the loaded model gets
    Redux (the card says false until then), and the images are the Python API's."""
    redux, siglip = files
    args = build_parser().parse_args(["serve", "--redux-model", str(redux), "--siglip", str(siglip)])
    assert (args.redux_model, args.siglip) == (str(redux), str(siglip))
    loading = threading.Event()

    def slow_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        assert loading.wait(30)
        return dev_pipeline()

    monkeypatch.setattr("pictor.loading.load", slow_load)
    client = make_client(None, model="tiny", redux_model=redux, siglip=siglip)
    try:
        assert client.get("/v1/models").json()["data"][0]["redux"] is False  # still loading
        r = client.post("/v1/jobs", json=_body(redux_image=b64(PICTURE), response_format=None))
        assert r.status_code == 202, r.text  # checked when it runs; its picture kept meanwhile
        assert _uploads(client) == [f"{r.json()['request']['redux_image']}.png"]
    finally:
        loading.set()
    done = wait_job(client, r.json()["id"])
    assert done["status"] == "succeeded", done
    assert client.get("/v1/models").json()["data"][0]["redux"] is True
    direct = dev_pipeline()
    direct.set_redux(redux, siglip)
    assert np.array_equal(_served(client, done), _direct(direct, redux_image=PICTURE)[0])


def test_serve_wants_both_redux_files_and_checks_they_are_there(tmp_path: Path) -> None:
    for one in ({"redux_model": tmp_path / "r.safetensors"}, {"siglip": tmp_path}):
        with pytest.raises(ValueError, match="both --redux-model FILE and --siglip DIR"):
            ServeSettings(data_dir=tmp_path, **one)  # type: ignore[arg-type]
    missing = ServeSettings(data_dir=tmp_path, model="tiny", redux_model=tmp_path / "no.st", siglip=tmp_path)
    with pytest.raises(ValueError, match=r"--redux-model .*no\.st: no such file"):
        serve(missing)  # before anything listens


def test_misuse_is_a_400_that_names_the_field_and_keeps_nothing(
    make_client: Callable[..., TestClient], dev: Pipeline, files: tuple[Path, Path], client: TestClient
) -> None:
    generations = "/v1/images/generations"
    ours = make_client(dev)
    # No Redux loaded: the picture, and a strength without a picture, are refused
    _refused(client.post(generations, json=_body(redux_image=b64(PICTURE))), "redux_image", "--redux-model")
    _refused(_edit(client, png(PICTURE)), "redux_image", "--redux-model")
    _refused(ours.post(generations, json=_body(redux_strength=0.5)), "redux_strength", "without a Redux")
    _refused(_edit(ours, redux_strength=0.5), "redux_strength", "without a Redux")
    # Strengths outside [0, 10], checked by the schema (so also while a model loads)
    for value in (-1, 10.5, "1", True, [1]):
        r = ours.post(generations, json=_body(redux_image=b64(PICTURE), redux_strength=value))
        _refused(r, "redux_strength", "redux_strength")
    for text in ("11", "-0.5", "nan", "strong"):
        _refused(_edit(ours, png(PICTURE), redux_strength=text), "redux_strength", "redux_strength")
    # Pictures that cannot be read
    _refused(ours.post(generations, json=_body(redux_image="not base64!")), "redux_image", "not base64")
    _refused(_edit(ours, b"GIF89a not an image"), "redux_image", "not a readable PNG")
    # A reference picture beside it (named by the field it does not go with), and a CFG model
    _refused(
        ours.post(generations, json=_body(redux_image=b64(PICTURE), reference_image=b64(PICTURE))),
        "reference_image",
        "reference",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained
        cfg = pipeline_from_preset("tiny", device="cpu")
    cfg.set_redux(*files)
    theirs = make_client(cfg)
    _refused(theirs.post(generations, json=_body(redux_image=b64(PICTURE))), "redux_image", "guidance")
    assert theirs.get("/v1/models").json()["data"][0]["redux"] is True
    for c in (ours, theirs, client):
        assert c.get("/v1/jobs").json()["total"] == 0
        assert _uploads(c) == []


def test_a_queued_job_keeps_its_redux_picture_across_a_restart(
    make_client: Callable[..., TestClient], dev: Pipeline, wait_job: Callable[..., Any]
) -> None:
    """Queued behind another job, the server stops; the next server runs it from the kept upload. A job the
    full queue refuses leaves no upload behind."""
    gated = GatedPipeline(dev)
    client = make_client(gated, queue_size=1)
    busy = client.post("/v1/jobs", json=_body(redux_image=b64(SOURCE), response_format=None, steps=1))
    assert busy.status_code == 202, busy.text
    assert gated.gate.reached.wait(10)
    r = client.post(
        "/v1/jobs", json=_body(redux_image=b64(PICTURE), redux_strength=0.5, response_format=None)
    )
    assert r.status_code == 202, r.text
    job = r.json()
    kept = _uploads(client)
    assert f"{job['request']['redux_image']}.png" in kept and len(kept) == 2
    full = client.post("/v1/jobs", json=_body(redux_image=b64(PICTURE), response_format=None))
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
    assert np.array_equal(_served(again, done), _direct(dev, redux_image=PICTURE, redux_strength=0.5)[0])


def test_a_variation_with_redux_is_a_generation_from_the_pictures_tokens(
    make_client: Callable[..., TestClient], dev: Pipeline, wait_job: Callable[..., Any], tmp_path: Path
) -> None:
    """No img2img: the picture is the Redux picture of a generation with an empty prompt, at the picture's
    aspect ratio and the model's default area (32x32 here, in multiples of 4: 44x20 for a 2:1 picture)."""
    client = make_client(dev)
    wide = redux_picture(3, (64, 32))
    ((pixels, record),) = decode_images(_vary(client, wide))
    assert dev.patch == 4
    want, direct = _direct(dev, "", redux_image=wide, width=44, height=20)
    assert pixels.shape == (20, 44, 3) and np.array_equal(pixels, want)
    assert record["redux_image"] == direct["redux_image"] and record["redux_image"]["width"] == 64
    assert record["prompt"] == "" and "strength" not in record and "source" not in record
    job = client.get("/v1/jobs").json()["data"][0]
    assert "kind" not in job["request"] and "image" not in job["request"] and job["request"]["redux_image"]
    assert job["request"]["variation"] is True  # its picture was sent as `image` (errors name that field)
    # `pictor reproduce IMAGE --redux PICTURE` with the uploaded file itself (an opaque picture)
    wide.save(tmp_path / "wide.png")
    assert np.array_equal(np.asarray(reproduce(dev, record, redux=tmp_path / "wide.png").image), pixels)
    # A prompt, a size (the images', the picture is not resized) and a strength
    fields = {"prompt": PROMPT, "size": "32x32", "redux_strength": 0.5, "n": 2}
    served = decode_images(_vary(client, wide, **fields))
    (first, second) = dev.generate(
        GenerationRequest(
            PROMPT, seed=3, steps=2, width=32, height=32, num_images=2, redux_image=wide, redux_strength=0.5
        )
    )
    assert [
        np.array_equal(p, np.asarray(d.image)) for (p, _), d in zip(served, (first, second), strict=True)
    ] == [True] * 2
    assert served[0][1]["redux"]["strength"] == 0.5
    # Transparency is flattened onto white, as for any variation; the queued variant does the same
    clear = wide.convert("RGBA")
    clear.putalpha(Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))))
    r = _vary(client, clear, path="/v1/jobs/variations", response_format="url")
    assert r.status_code == 202, r.text
    done = wait_job(client, r.json()["id"])
    assert done["status"] == "succeeded", done
    assert np.array_equal(
        _served(client, done), _direct(dev, "", redux_image=on_white(clear), width=44, height=20)[0]
    )
    # ... and reproduced from the picture the job keeps
    kept = client.app.state.service.store.upload_path(done["request"]["redux_image"])
    meta = client.get(f"/v1/images/{done['results'][0]['image_id']}/metadata").json()
    assert np.array_equal(np.asarray(reproduce(dev, meta["record"], redux=kept).image), _served(client, done))
    # strength (img2img's) has no meaning here; without Redux, redux_strength has none
    _refused(_vary(client, wide, strength=0.5), "strength", "redux_strength")
    assert len(client.get("/v1/jobs").json()["data"]) == 3


def test_a_variation_without_redux_refuses_redux_strength(client: TestClient) -> None:
    r = _vary(client, SOURCE, redux_strength=0.5)
    _refused(r, "redux_strength", "no FLUX.1 Redux loaded")


def test_a_variations_size_stays_within_the_area_for_thin_pictures() -> None:
    from pictor.serve.variations import redux_size

    assert redux_size(4000, 1, 1024, 4) == (256, 4) and redux_size(1, 4000, 1024, 4) == (4, 256)
    assert redux_size(20000, 3, 1024 * 1024, 16) == (65536, 16)
    assert redux_size(1024, 1024, 1024 * 1024, 16) == (1024, 1024)  # the default's own aspect: the default
    rng = np.random.default_rng(0)
    for w, h in rng.integers(1, 5000, (200, 2)):
        got = redux_size(int(w), int(h), 1024 * 1024, 16)
        assert got[0] * got[1] <= 1024 * 1024 and got[0] % 16 == 0 and got[1] % 16 == 0, (w, h, got)
