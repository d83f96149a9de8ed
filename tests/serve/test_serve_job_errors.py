"""The pipeline's errors about request values in the API's words (serve/pipeline_errors.py): the field in
`param`, API field names instead of CLI flags, for a 400 at submit time and for a job refused when it runs."""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.context_images import context_problem
from pictor.control_images import control_problem
from pictor.editing import EditRequest
from pictor.fill_images import check_fill_request
from pictor.ip_adapter_files import ip_adapter_problem
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.redux_images import redux_problem
from pictor.serve.pipeline_errors import api_message, field_of, job_error
from pictor.serve.service import failure
from pictor.serve.settings import ServeSettings
from pictor.serve.store import FAILED, JobRow
from tests.serve.conftest import wait_for
from tests.serve.test_edits import png_bytes, source_image

PICTURE = Image.new("RGB", (32, 32), "red")
LAYOUT = [{"box": [0, 0, 1, 1], "phrase": "a red circle"}]
# Flags an API message may still name: the server's own, which tell its operator what to change, and
# `pictor convert`'s, which say how to make the model that would take the request.
SERVER_FLAGS = {"--redux-model", "--siglip", "--ip-adapter-model", "--clip-vision", "--kontext", "--upscaler"}


def _generation_error(pipe: Pipeline, **request: Any) -> str:
    with pytest.raises(GenerationError) as info:
        pipe.resolve_request(GenerationRequest(prompt="a", **request))
    return str(info.value)


def _edit_error(pipe: Pipeline, **request: Any) -> str:
    with pytest.raises(ValueError) as info:
        pipe.resolve_edit(EditRequest(**{"image": PICTURE, "prompt": "a", **request}))
    return str(info.value)


def _problem(text: str | None) -> str:
    assert text, "the pipeline no longer refuses this"
    return text


def _fill_error(**request: Any) -> str:
    with pytest.raises(GenerationError) as info:
        check_fill_request(SimpleNamespace(**request), has_mask="mask" in request)
    return str(info.value)


def _control(kind: str | None, **request: Any) -> str:
    """control_problem's message for a request on a FLUX.1 Canny / Depth model (`kind`) or another one."""
    fields = {"control_image": None, "control_canny": None, "layout": None, "reference": None}
    r = SimpleNamespace(**{**fields, "context_image": None, "hires_scale": None, **request})
    return _problem(control_problem("m", kind is not None, kind, r))


def _redux(redux: Any, guidance_mode: str = "distilled", **request: Any) -> str:
    fields = {"redux_image": 1, "redux_strength": None, "reference": None, "guidance": None}
    return _problem(redux_problem(SimpleNamespace(**{**fields, **request}), redux, guidance_mode))


def _ip_adapter(model: Any, **request: Any) -> str:
    fields = {"ip_adapter_image": 1, "ip_adapter_scale": None}
    return _problem(ip_adapter_problem(SimpleNamespace(**{**fields, **request}), model))


def _context(**request: Any) -> str:
    return _problem(context_problem("k", True, GenerationRequest("a", context_image=1, **request)))


# (what, how to get the pipeline's message from the tiny model or the pipeline's checks, the field the API
# names). The messages come from the pipeline itself: one reworded so the table misses it fails here.
CASES: list[tuple[str, Callable[[Pipeline], str], str | None]] = [
    ("size", lambda p: _generation_error(p, width=30, height=32), "size"),
    ("pixels", lambda p: _generation_error(p, width=8192, height=8192), "size"),
    ("steps", lambda p: _generation_error(p, steps=0), "steps"),
    ("guidance", lambda p: _generation_error(p, guidance=-1.0), "guidance"),
    ("sampler", lambda p: _generation_error(p, sampler="x"), "sampler"),
    ("schedule", lambda p: _generation_error(p, schedule="x"), "schedule"),
    ("seed", lambda p: _generation_error(p, seed=-1), "seed"),
    ("n", lambda p: _generation_error(p, num_images=0), "n"),
    ("negative", lambda p: _generation_error(p, negative_prompt="x", guidance=1.0), "negative_prompt"),
    ("cache", lambda p: _generation_error(p, cache_threshold=-1.0), "cache_threshold"),
    ("hires scale", lambda p: _generation_error(p, hires_scale=9.0), "hires_scale"),
    ("hires same size", lambda p: _generation_error(p, hires_scale=1.01), "hires_scale"),
    ("hires strength", lambda p: _generation_error(p, hires_scale=2.0, hires_strength=2.0), "hires_strength"),
    ("hires steps", lambda p: _generation_error(p, hires_scale=2.0, hires_steps=0), "hires_steps"),
    ("hires steps without scale", lambda p: _generation_error(p, hires_steps=3), "hires_scale"),
    ("hires strength without scale", lambda p: _generation_error(p, hires_strength=0.5), "hires_scale"),
    ("hires upscaler without scale", lambda p: _generation_error(p, hires_upscaler="x"), "hires_scale"),
    ("hires upscaler", lambda p: _generation_error(p, hires_scale=2.0, hires_upscaler="x"), "hires_upscaler"),
    ("no control model", lambda p: _generation_error(p, control_image=PICTURE), "control_image"),
    ("canny alone", lambda p: _generation_error(p, control_canny=[50, 200]), "control_canny"),
    ("layout", lambda p: _generation_error(p, layout=LAYOUT), "layout"),
    ("reference", lambda p: _generation_error(p, reference=PICTURE), "reference_image"),
    ("context", lambda p: _generation_error(p, context_image=PICTURE), "context_image"),
    ("redux strength alone", lambda p: _generation_error(p, redux_strength=1.0), "redux_strength"),
    ("no redux", lambda p: _generation_error(p, redux_image=PICTURE), "redux_image"),
    (
        "redux and reference",
        lambda p: _generation_error(p, redux_image=PICTURE, reference=PICTURE),
        "reference_image",
    ),
    ("ip-adapter scale alone", lambda p: _generation_error(p, ip_adapter_scale=0.5), "ip_adapter_scale"),
    ("no ip-adapter", lambda p: _generation_error(p, ip_adapter_image=PICTURE), "ip_adapter_image"),
    ("edit without ip-adapter", lambda p: _edit_error(p, ip_adapter_image=PICTURE), "ip_adapter_image"),
    ("ip-adapter scale range", lambda p: _ip_adapter(1, ip_adapter_scale=11.0), "ip_adapter_scale"),
    ("edit strength", lambda p: _edit_error(p, strength=2.0), "strength"),
    ("black mask", lambda p: _edit_error(p, mask=Image.new("L", (32, 32), 0)), "mask"),
    ("odd image", lambda p: _edit_error(p, image=Image.new("RGB", (33, 32))), "image"),
    ("edit control", lambda p: _edit_error(p, control_image=PICTURE), "control_image"),
    ("depth without picture", lambda p: _control("depth"), "control_image"),
    ("canny without picture", lambda p: _control("canny"), "control_image"),
    ("canny on depth", lambda p: _control("depth", control_image=1, control_canny=[1, 2]), "control_canny"),
    ("thresholds", lambda p: _control("canny", control_image=1, control_canny=[1]), "control_canny"),
    ("control and layout", lambda p: _control("canny", control_image=1, layout=LAYOUT), "layout"),
    ("control and reference", lambda p: _control("canny", control_image=1, reference=1), "reference_image"),
    ("control and hires", lambda p: _control("canny", control_image=1, hires_scale=2), "hires_scale"),
    ("context and hires", lambda p: _context(hires_scale=2.0), "hires_scale"),
    ("context and layout", lambda p: _context(layout=LAYOUT), "context_image"),
    ("redux strength range", lambda p: _redux(1, redux_strength=99), "redux_strength"),
    ("redux on cfg", lambda p: _redux(1, "cfg", guidance=4.0), "redux_image"),
    ("fill without mask", lambda p: _fill_error(), "mask"),
    ("fill and layout", lambda p: _fill_error(mask=1, layout=LAYOUT), "layout"),
    ("fill and hires", lambda p: _fill_error(mask=1, hires_scale=2.0), "hires_scale"),
]


@pytest.mark.parametrize(("what", "message", "field"), CASES, ids=[c[0] for c in CASES])
def test_pipeline_messages_name_their_field_in_the_apis_words(
    tiny: Pipeline, what: str, message: Callable[[Pipeline], str], field: str
) -> None:
    text = message(tiny)
    assert field_of(text) == field, text
    api = api_message(text)
    assert set(re.findall(r"--[a-z][a-z-]*", api)) <= SERVER_FLAGS, api
    error = job_error(GenerationError(text))
    # the field first, as the history shows the message without the request (said once, if it was already)
    assert error["param"] == field and error["message"] in (api, f"{field}: {api}"), error
    assert re.match(rf"{field}\b", error["message"]), error  # as a word: "n: number of...", not "number"
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_parameters"


def test_cli_wording_becomes_api_wording() -> None:
    assert api_message(
        "a Redux strength was given without a Redux picture; add --redux IMAGE or drop it"
    ) == ("a Redux strength was given without a Redux picture; add redux_image or drop it")
    assert "drop control_image, or use a control model" in api_message(_control(None, control_image=1))
    canny = api_message(_control("canny"))
    assert canny.endswith("give an edge map, or a photo with control_canny as control_image"), canny
    no_redux = api_message(_redux(None))
    assert "this server was started without them (pictor serve --redux-model" in no_redux
    assert no_redux.endswith("drop redux_image")
    no_ip = api_message(_ip_adapter(None))
    assert "this server was started without (pictor serve --ip-adapter-model FILE --clip-vision DIR)" in no_ip
    assert no_ip.endswith("drop ip_adapter_image"), no_ip
    alone = api_message(_ip_adapter(None, ip_adapter_image=None, ip_adapter_scale=0.5))
    assert alone.endswith("add ip_adapter_image or drop it"), alone
    assert "--vae-tile" in api_message("VAE tile 3 does not fit; set --vae-tile 8")  # a server setting stays


def test_hires_settings_without_a_scale_name_the_scale(client: TestClient) -> None:
    """hires_steps (or hires_strength, or an upscale model as hires_upscaler) sent without hires_scale: the
    scale is what is missing, said in the API's words."""
    for extra in ({"hires_steps": 3}, {"hires_strength": 0.5}, {"hires_upscaler": "4x-UltraSharp"}):
        r = client.post("/v1/jobs", json={"prompt": "a", "steps": 2, **extra})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "hires_scale", error
        assert error["message"].startswith("hires_strength, hires_steps and hires_upscaler need hires_scale")
        assert "give hires_scale too" in error["message"], error


def test_a_synchronous_request_refused_when_its_job_ran_names_the_field(tmp_path: Any) -> None:
    error = job_error(GenerationError(_control(None, control_image=1)))
    job = JobRow("a" * 32, 0.0, FAILED, {}, error=error)
    answer = failure(job, ServeSettings(data_dir=tmp_path))
    assert answer.status == 400 and answer.param == "control_image" and answer.code == "invalid_parameters"


def b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def test_jobs_refused_when_they_run_name_the_field(
    make_client: Callable[..., TestClient],
    tiny: Pipeline,
    monkeypatch: pytest.MonkeyPatch,
    wait_job: Callable[..., Any],
) -> None:
    """Jobs accepted while the model loads are checked against it only when they run."""
    loaded = threading.Event()

    def slow_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        assert loaded.wait(30)
        return tiny

    monkeypatch.setattr("pictor.loading.load", slow_load)
    client = make_client(None, model="tiny")
    try:
        sent = {
            "control_image": client.post("/v1/jobs", json={"prompt": "a", "control_image": b64(PICTURE)}),
            "control_canny": client.post("/v1/jobs", json={"prompt": "a", "control_canny": True}),
            "redux_strength": client.post("/v1/jobs", json={"prompt": "a", "redux_strength": 2}),
            "size": client.post("/v1/jobs", json={"prompt": "a", "size": "30x32"}),
            "layout": client.post(
                "/v1/jobs/edits",
                files={"image": ("source.png", png_bytes(source_image()), "image/png")},
                data={"prompt": "a", "layout": '[{"box": [0, 0, 1, 1], "phrase": "a red circle"}]'},
            ),
        }
        waiting: dict[str, Any] = {}
        body = {"prompt": "a", "reference_image": b64(PICTURE)}
        sync = threading.Thread(
            target=lambda: waiting.update(r=client.post("/v1/images/generations", json=body))
        )
        sync.start()
        manager = client.app.state.service.manager
        wait_for(lambda: manager.queue_depth() == len(sent) + 1, what="every job to queue")
    finally:
        loaded.set()
    for field, response in sent.items():
        assert response.status_code == 202, response.text
        job = wait_job(client, response.json()["id"])
        error = job["error"]
        assert job["status"] == "failed" and error["param"] == field, job
        assert error["message"].startswith(f"{field}: ") and error["code"] == "invalid_parameters"
        assert set(re.findall(r"--[a-z][a-z-]*", error["message"])) <= SERVER_FLAGS, error
    sync.join(30)
    answer = waiting["r"]
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "reference_image", answer.text
    assert not any(client.app.state.service.store.uploads_dir.iterdir())  # failed: pictures deleted
