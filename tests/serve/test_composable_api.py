"""A1111's composable diffusion (`pictor.composable_prompts`) through the server: the JSON generations, the
edit and variation forms and the job queue take `composable`; the records keep it and the pictures are the
pipeline's; what AND does not run with (regions, the cache, denoise tiles, too many parts, weights that
cannot be averaged) are 400s naming `composable` in the
API's words; jobs that differ in it never share a sampler run; A1111 text with AND comes back from
/v1/images/settings with it. The page: tests/serve/test_browser_composable.py."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pictor.editing import EditRequest
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.reproduce import reproduce
from pictor.serve.job_requests import batch_key, edit_request, generation_request
from pictor.serve.pipeline_errors import api_message, field_of, job_error
from tests.serve import test_redux_api
from tests.serve.conftest import assert_refused, decode_images
from tests.serve.test_controlnet_api import controlnet_file, with_controlnets
from tests.serve.test_edits import edit, png_bytes, source_image
from tests.serve.test_prompt_editing_api import _px, _stored
from tests.serve.test_settings_from_api import png_with, settings_of

PROMPT = "a red circle AND a blue square:0.8"
GENERATIONS = "/v1/images/generations"
BODY = {"prompt": PROMPT, "size": "32x32", "steps": 2, "seed": 3, "response_format": "b64_json"}
REGIONS = [{"box": [0, 0, 0.5, 1], "prompt": "a red circle"}]
FORMS = ("/v1/images/edits", "/v1/jobs/edits", "/v1/images/variations", "/v1/jobs/variations")
# A model with FLUX.1 Redux loaded (test_redux_api's), whose variations are generations.
files = test_redux_api.files
dev = test_redux_api.dev


def test_a_generation_with_and_is_the_pipelines_and_its_job_keeps_it(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    ((pixels, record),) = decode_images(client.post(GENERATIONS, json={**BODY, "composable": True}))
    assert record["composable"] is True, record
    (direct,) = tiny.generate(
        GenerationRequest(PROMPT, width=32, height=32, steps=2, seed=3, composable=True)
    )
    assert np.array_equal(pixels, _px(direct.image))
    assert np.array_equal(_px(reproduce(tiny, record).image), pixels)
    # Off (the default), AND is a word of one prompt: another picture, and the record does not say it.
    ((plain, record),) = decode_images(client.post(GENERATIONS, json=BODY))
    assert "composable" not in record and not np.array_equal(plain, pixels)

    r = client.post("/v1/jobs", json={**BODY, "composable": True})
    assert r.status_code == 202 and r.json()["request"]["composable"] is True, r.text
    job = wait_job(client, r.json()["id"])
    stored, record = _stored(client, job["results"][0]["image_id"])
    assert record["composable"] is True and np.array_equal(stored, pixels)


def test_an_edit_and_a_variation_take_composable(client: TestClient, tiny: Pipeline) -> None:
    source = source_image()
    form = {"composable": "true", "seed": "4", "steps": "2", "strength": "0.9"}
    ((pixels, record),) = decode_images(edit(client, png_bytes(source), PROMPT, **form))
    assert record["composable"] is True, record
    (direct,) = tiny.edit(EditRequest(source, PROMPT, seed=4, steps=2, strength=0.9, composable=True))
    assert np.array_equal(pixels, _px(direct.image))
    ((plain, record),) = decode_images(
        edit(client, png_bytes(source), PROMPT, **{**form, "composable": "false"})
    )
    assert "composable" not in record and not np.array_equal(plain, pixels)
    job = client.get("/v1/jobs").json()["data"][-1]  # the oldest: the first edit, with composable
    assert job["request"]["kind"] == "edit" and job["request"]["composable"] is True, job["request"]

    r = edit(client, png_bytes(source), PROMPT, path="/v1/images/variations", **form)
    ((varied, record),) = decode_images(r)
    assert record["composable"] is True, record
    plain_form = {**form, "composable": "false"}
    ((unvaried, _),) = decode_images(edit(client, png_bytes(source), PROMPT, path=FORMS[2], **plain_form))
    assert not np.array_equal(varied, unvaried)


def test_a_redux_variation_takes_composable(make_client: Callable[..., TestClient], dev: Pipeline) -> None:
    client = make_client(dev)
    picture = test_redux_api.redux_picture(3, (32, 32))
    r = client.post(
        FORMS[2],
        files={"image": ("picture.png", png_bytes(picture), "image/png")},
        data={
            "prompt": PROMPT,
            "composable": "true",
            "seed": "3",
            "steps": "2",
            "response_format": "b64_json",
        },
    )
    ((pixels, record),) = decode_images(r)
    assert record["composable"] is True, record
    (direct,) = dev.generate(
        GenerationRequest(PROMPT, seed=3, steps=2, width=32, height=32, redux_image=picture, composable=True)
    )
    assert np.array_equal(pixels, _px(direct.image))


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (
            {"regions": REGIONS},
            "regional prompts and AND (composable diffusion) do not go together: give each part of the "
            "prompt a region of its own and send composable false, or drop the regions",
        ),
        ({"prompt": " AND ".join("abcdefghi")}, "the prompt has 9 parts joined by AND; at most 8"),
        # guidance 1 on a CFG model: no classifier-free guidance, so the parts are averaged by their weights
        ({"prompt": "a AND b:-1", "guidance": 1.0}, "which here sum to 0 or less"),
    ],
)
def test_what_and_does_not_run_with_is_a_400_naming_composable(
    client: TestClient, extra: dict[str, Any], words: str
) -> None:
    for path in (GENERATIONS, "/v1/jobs"):
        r = client.post(path, json={**BODY, "composable": True, **extra})
        assert_refused(r, "composable", words)
        assert r.json()["error"]["code"] == "invalid_parameters" and "--" not in r.json()["error"]["message"]
    if "regions" in extra:  # the regions go as JSON text; the variation form takes none
        return
    form = {
        "composable": "true",
        "steps": "2",
        **{k: str(v).lower() if v is True else str(v) for k, v in extra.items()},
    }
    prompt = form.pop("prompt", PROMPT)
    for path in FORMS:
        assert_refused(
            edit(client, png_bytes(source_image()), prompt, path=path, **form), "composable", words
        )
    assert client.get("/v1/jobs").json()["total"] == 0
    assert not any(client.app.state.service.store.uploads_dir.iterdir())


def test_regions_with_composable_in_an_edit_form_name_composable(client: TestClient) -> None:
    """Refused for a prompt with AND: composable is the switch that does not go with regions; a prompt
    without AND is one text, which regions go with."""
    regions = json.dumps(REGIONS)
    r = edit(client, png_bytes(source_image()), PROMPT, composable="true", regions=regions)
    assert_refused(r, "composable", "regional prompts and AND (composable diffusion) do not go together")
    r = edit(client, png_bytes(source_image()), "two shapes", composable="true", regions=regions, steps="2")
    assert r.status_code == 200, r.text


def test_and_goes_with_an_ip_adapter_picture_and_controlnets(
    client: TestClient, make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    """AND goes with an IP-Adapter picture (every part's pass reads it: on a server without the IP-Adapter the
    picture is what is refused, and nothing is kept) and with ControlNets (every part's pass runs them)."""
    picture = base64.b64encode(png_bytes(source_image())).decode("ascii")
    r = client.post(GENERATIONS, json={**BODY, "composable": True, "ip_adapter_image": picture})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ip_adapter_image", r.text
    assert not any(client.app.state.service.store.uploads_dir.iterdir())

    nets = make_client(with_controlnets(controlnet_file(tmp_path / "net.safetensors", 1)))
    r = nets.post(GENERATIONS, json={**BODY, "composable": True, "controlnet_images": [picture]})
    ((_, record),) = decode_images(r)
    assert record["composable"] is True and len(record["controlnets"]) == 1, record


def test_the_pipelines_messages_about_and_name_composable(tiny: Pipeline) -> None:
    """The messages the pipeline really gives (it is shared with the CLI), through the server's table; a job
    refused only when it runs says the field first."""
    messages = []
    for extra in (
        {"regions": REGIONS},
        {"prompt": " AND ".join("abcdefghi")},
        {"prompt": "a AND b:-2", "guidance": 1.0},
    ):
        with pytest.raises(GenerationError) as info:
            tiny.resolve_request(
                GenerationRequest(**{"prompt": PROMPT, "steps": 2, "composable": True, **extra})
            )
        messages.append(str(info.value))
    for text in messages:
        assert field_of(text) == "composable", text
        assert not re.findall(r"--[a-z]", api_message(text)), api_message(text)
        error = job_error(GenerationError(text))
        assert error["param"] == "composable" and error["message"].startswith("composable: "), error
    assert api_message(messages[0]).endswith("send composable false, or drop the regions")
    # A bad weight in one AND part is about the prompt, which holds it.
    with pytest.raises(GenerationError) as info:
        tiny.resolve_request(
            GenerationRequest("a AND b (c:99)", steps=2, composable=True, prompt_weights=True)
        )
    assert (
        str(info.value).startswith("the prompt's AND part 2: prompt weight")
        and field_of(str(info.value)) == "prompt"
    )


def test_jobs_that_differ_in_composable_never_share_a_run(
    make_client: Callable[..., TestClient], gated: Any, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    """Three seedless jobs queued behind a running one, the same but for composable: the two with it share
    one sampler run (its seeds in a row), the one without runs alone."""
    client = make_client(gated, max_batch=8)
    seedless = {"prompt": PROMPT, "steps": 2}
    assert client.post("/v1/jobs", json={"prompt": "hold the worker", "steps": 2}).status_code == 202
    assert gated.gate.reached.wait(10)
    flags = [True, False, True]
    answers = [client.post("/v1/jobs", json={**seedless, "composable": flag}) for flag in flags]
    gated.gate.release.set()
    jobs = [wait_job(client, a.json()["id"]) for a in answers]
    assert [job["request"]["composable"] for job in jobs] == flags, jobs
    assert [(run.composable, run.num_images) for run in gated.calls[1:]] == [(True, 2), (False, 1)]
    stored = [_stored(client, job["results"][0]["image_id"]) for job in jobs]
    assert [record.get("composable", False) for _, record in stored] == flags
    seeds = [job["results"][0]["seed"] for job in jobs]
    assert seeds[2] == seeds[0] + 1  # the next seed in the shared run
    shared = tiny.generate(GenerationRequest(PROMPT, steps=2, seed=seeds[0], num_images=2, composable=True))
    assert np.array_equal(stored[2][0], _px(shared[1].image))


def test_jobs_queued_before_composable_existed_read_as_without_it(tmp_path: Path) -> None:
    params = {"prompt": PROMPT, "steps": 2}
    assert generation_request(params).composable is False
    assert generation_request({**params, "composable": True}).composable is True
    assert batch_key({**params, "composable": True}) != batch_key({**params, "composable": False})

    class Store:  # edit_request reads the uploads' paths only
        def upload_path(self, upload: str) -> Path:
            return tmp_path / upload

    edit = {**params, "kind": "edit", "image": "source"}
    assert edit_request(edit, Store()).composable is False  # type: ignore[arg-type]
    assert edit_request({**edit, "composable": True}, Store()).composable is True  # type: ignore[arg-type]


def test_a1111_text_with_and_comes_back_composable(client: TestClient) -> None:
    """A1111 always splits its prompt at AND: its text with AND is a composable body, said only then."""
    text = f"{PROMPT}\nSteps: 2, Seed: 3, Size: 32x32, CFG scale: 4"
    settings = settings_of(client, png_with(text)).json()["settings"]
    assert settings["composable"] is True and settings["prompt"] == PROMPT, settings
    made = client.post(GENERATIONS, json={**settings, "response_format": "b64_json"})
    ((pixels, record),) = decode_images(made)
    assert record["composable"] is True
    ((ours, _),) = decode_images(client.post(GENERATIONS, json={**BODY, "composable": True}))
    assert np.array_equal(pixels, ours)
    plain = settings_of(client, png_with("a red circle and a blue square\nSteps: 2, Seed: 3")).json()[
        "settings"
    ]
    assert "composable" not in plain, plain
