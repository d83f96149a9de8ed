"""Regional prompts (`pictor.regional_prompts`) through the server: the JSON generations and the job queue
take `regions` (a list of {box, prompt, strength}), the edit forms its JSON text; the records and jobs keep
them normalised and the pictures are the pipeline's; bad regions, and regions beside what their passes do not
run with, are 400s naming `regions` in the API's words (also for a job refused only when it runs); the prompt
policy reads each region's prompt; jobs that differ in their regions never share a sampler run, and a queued
job keeps its regions across a restart. The page: tests/serve/test_browser_regions.py."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.editing import EditRequest
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.serve.job_requests import batch_key, edit_request, generation_request
from pictor.serve.pipeline_errors import api_message, field_of, job_error
from pictor.serve.security import BlockList
from tests.serve.conftest import TEST_LIMITS, assert_refused, decode_images, wait_for
from tests.serve.test_edits import edit, png_bytes, source_image
from tests.serve.test_prompt_editing_api import _px, _stored
from tests.serve.test_security import error_of

GENERATIONS = "/v1/images/generations"
SENT = [
    {"box": [0, 0, 0.5, 1], "prompt": "a red circle"},
    {"box": [0.5, 0.25, 1, 0.75], "prompt": "a blue square", "strength": 2},
]
# As the records and jobs keep them: numbers as floats, every strength spelled out.
KEPT = [
    {"box": [0.0, 0.0, 0.5, 1.0], "prompt": "a red circle", "strength": 1.0},
    {"box": [0.5, 0.25, 1.0, 0.75], "prompt": "a blue square", "strength": 2.0},
]
OTHER = [{"box": [0.0, 0.0, 1.0, 0.5], "prompt": "a green triangle", "strength": 1.0}]
BODY = {"prompt": "two shapes", "size": "32x32", "steps": 2, "seed": 3, "response_format": "b64_json"}


def _direct(pipe: Pipeline, regions: list[dict[str, Any]] | None, **fields: Any) -> np.ndarray:
    """The pipeline's own first image for BODY's settings with these regions."""
    request = {"width": 32, "height": 32, "steps": 2, "seed": 3, **fields}
    first, *_ = pipe.generate(GenerationRequest("two shapes", regions=regions, **request))
    return _px(first.image)


def test_a_generation_with_regions_is_the_pipelines_and_its_record_and_job_keep_them(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    ((pixels, record),) = decode_images(client.post(GENERATIONS, json={**BODY, "regions": SENT}))
    assert record["regions"] == KEPT, record
    assert np.array_equal(pixels, _direct(tiny, KEPT))
    ((plain, record),) = decode_images(client.post(GENERATIONS, json=BODY))
    assert "regions" not in record and not np.array_equal(plain, pixels)  # the regions changed the image

    r = client.post("/v1/jobs", json={**BODY, "regions": SENT})
    assert r.status_code == 202 and r.json()["request"]["regions"] == KEPT, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded" and job["request"]["regions"] == KEPT, job
    stored, record = _stored(client, job["results"][0]["image_id"])
    assert record["regions"] == KEPT and np.array_equal(stored, pixels)


def test_an_edit_takes_regions_as_json_text(client: TestClient, tiny: Pipeline) -> None:
    source = source_image()
    form = {"seed": "4", "steps": "2", "strength": "0.9"}
    ((pixels, record),) = decode_images(
        edit(client, png_bytes(source), "two shapes", regions=json.dumps(SENT), **form)
    )
    assert record["regions"] == KEPT and record["mode"] == "img2img", record
    (direct,) = tiny.edit(EditRequest(source, "two shapes", seed=4, steps=2, strength=0.9, regions=KEPT))
    assert np.array_equal(pixels, _px(direct.image))
    ((plain, record),) = decode_images(edit(client, png_bytes(source), "two shapes", **form))
    assert "regions" not in record and not np.array_equal(plain, pixels)
    # A blank field is no regions, as an absent one.
    ((blank, _),) = decode_images(edit(client, png_bytes(source), "two shapes", regions=" ", **form))
    assert np.array_equal(blank, plain)
    job = client.get("/v1/jobs").json()["data"][-1]  # the oldest: the first edit, with the regions
    assert job["request"]["kind"] == "edit" and job["request"]["regions"] == KEPT, job["request"]


@pytest.mark.parametrize(
    ("regions", "param", "words"),
    [
        ([{"box": [0, 0, 2, 1], "prompt": "x"}], "regions", "region 0: 'box' [0.0, 0.0, 2.0, 1.0] must be"),
        ([{"box": [0.5, 0, 0.2, 1], "prompt": "x"}], "regions", "0 <= x0 < x1 <= 1"),
        ([*SENT, {"box": [0, 0, 1, 1], "prompt": "  "}], "regions", "region 2: 'prompt' must be a non-empty"),
        ([], "regions", "give a non-empty list of regions, like"),
        (SENT * 5, "regions", "at most 8 regions (each is one more transformer pass a step), got 10"),
        ([{"box": [0, 0, 1], "prompt": "x"}], "regions.0.box", "at least 4 items"),
        ([{"box": [0, 0, 1, 1], "prompt": "x", "strength": 0}], "regions.0.strength", "greater than 0"),
        (
            [{"box": [0, 0, 1, 1], "prompt": "x", "strength": 11}],
            "regions.0.strength",
            "less than or equal to 10",
        ),
        # a layout's key: the body's regions say "prompt" (the schema's one shape)
        (
            [{"box": [0, 0, 1, 1], "phrase": "x"}],
            "regions.0.prompt",
            "'regions.0.prompt' is required; unknown",
        ),
        ([{"box": [0, 0, 1, 1], "prompt": "x" * 2001}], "regions", "'prompt' is 2001 characters; the limit"),
    ],
)
def test_bad_regions_are_400s_that_say_what_is_wrong(
    client: TestClient, regions: Any, param: str, words: str
) -> None:
    for path in (GENERATIONS, "/v1/jobs"):
        assert_refused(client.post(path, json={**BODY, "regions": regions}), param, words)
    assert client.get("/v1/jobs").json()["total"] == 0  # nothing queued


def test_bad_regions_in_an_edit_form_are_400s_and_leave_no_upload(client: TestClient) -> None:
    image = png_bytes(source_image())
    for text, words in (
        ("[{", "regions: not valid JSON"),
        ('{"box": [0, 0, 1, 1], "prompt": "x"}', "give a non-empty list of regions"),
        ('[{"box": [0, 0, 1, 2], "prompt": "x"}]', "region 0: 'box'"),
        (
            '[{"box": [0, 0, 1, 1], "prompt": "x", "strength": -1}]',
            "region 0: 'strength' must be a number above 0",
        ),
        ("[" * 3000 + "]" * 3000, "nested too deeply"),
    ):
        for path in ("/v1/images/edits", "/v1/jobs/edits"):
            assert_refused(edit(client, image, "two shapes", path=path, regions=text), "regions", words)
    assert not any(client.app.state.service.store.uploads_dir.iterdir())
    # The variation form takes no regions (the picture says where things go): named, not ignored.
    assert_refused(
        edit(client, image, path="/v1/images/variations", regions=json.dumps(SENT)), "regions", "unknown"
    )


def test_a_region_prompt_longer_than_the_servers_limit_is_refused(
    make_client: Callable[..., TestClient], tiny: Pipeline
) -> None:
    client = make_client(tiny, limits=dataclasses.replace(TEST_LIMITS, max_prompt_chars=50))
    regions = [SENT[0], {"box": [0, 0, 1, 1], "prompt": "x" * 51}]
    r = client.post(GENERATIONS, json={**BODY, "regions": regions})
    assert_refused(r, "regions", "region 1: 'prompt' is 51 characters; this server's limit is 50")
    assert r.json()["error"]["code"] == "prompt_too_long"
    r = edit(client, png_bytes(source_image()), "two shapes", regions=json.dumps(regions))
    assert_refused(r, "regions", "region 1: 'prompt' is 51 characters")


def test_regions_with_the_cache_and_denoise_tiles_are_the_pipelines(
    client: TestClient, tiny: Pipeline
) -> None:
    """Each prompt's pass is a row of its own for the first-block cache and windows blend per token, so both
    go with regions."""
    for extra in ({"cache_threshold": 0.5}, {"denoise_tile": 16, "denoise_tile_overlap": 8}):
        ((pixels, record),) = decode_images(client.post(GENERATIONS, json={**BODY, "regions": SENT, **extra}))
        assert record["regions"] == KEPT and all(record[k] == v for k, v in extra.items()), record
        assert np.array_equal(pixels, _direct(tiny, KEPT, **extra))


def test_regions_go_with_an_ip_adapter_picture(client: TestClient) -> None:
    """Regions do not refuse an IP-Adapter picture (every prompt's pass reads it): on a server without the
    IP-Adapter the picture is what is refused; nothing is kept."""
    picture = base64.b64encode(png_bytes(source_image())).decode("ascii")
    r = client.post(GENERATIONS, json={**BODY, "regions": SENT, "ip_adapter_image": picture})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ip_adapter_image", r.text
    assert not any(client.app.state.service.store.uploads_dir.iterdir())


def test_an_edit_of_only_the_masked_area_refuses_regions_naming_the_area(client: TestClient) -> None:
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    r = edit(
        client,
        png_bytes(source_image()),
        "two shapes",
        mask=png_bytes(mask),
        regions=json.dumps(SENT),
        inpaint_area="masked",
    )
    assert_refused(r, "inpaint_area", "regions cover the whole image, but inpaint area 'masked'")


def test_the_pipelines_messages_about_regions_name_the_field(tiny: Pipeline) -> None:
    """The messages the pipeline really gives (it is shared with the CLI), through the server's table."""
    messages = []
    weighted = [{"box": [0, 0, 1, 1], "prompt": "(a red circle:99)"}]
    with pytest.raises(GenerationError) as info:  # a bad weight in a region's prompt
        tiny.resolve_request(GenerationRequest("a", steps=2, regions=weighted, prompt_weights=True))
    messages.append(str(info.value))
    for regions in (
        [],
        [{"box": [0, 0, 2, 1], "prompt": "x"}],
        [{"box": [0, 0, 1, 1], "prompt": "x", "strength": 0}],
    ):
        with pytest.raises(GenerationError) as info:
            tiny.resolve_request(GenerationRequest("a", steps=2, regions=regions))
        messages.append(str(info.value))
    for text in messages:
        assert field_of(text) == "regions", text
        assert not re.findall(r"--[a-z]", api_message(text)), api_message(text)
        error = job_error(GenerationError(text))
        assert error["param"] == "regions" and error["message"].startswith("regions"), error
    # Messages about other fields keep theirs, even where they name regions.
    masked = "regions cover the whole image, but inpaint area 'masked' draws only the masked area"
    assert field_of(masked) == "inpaint_area"
    assert field_of("regional prompts do not run with the first-block cache or ControlNets yet") == "regions"


def test_the_prompt_policy_reads_each_regions_prompt(
    make_client: Callable[..., TestClient], tiny: Pipeline
) -> None:
    client = make_client(tiny, policy=BlockList(["forbidden"]))
    regions = [SENT[0], {"box": [0, 0, 1, 1], "prompt": "a Forbidden square"}]
    for path in (GENERATIONS, "/v1/jobs"):
        error = error_of(client.post(path, json={**BODY, "regions": regions}), 400)
        assert error["code"] == "content_policy_violation" and error["param"] == "regions", error
        assert "region 1: the prompt contains the blocked term 'forbidden'" in error["message"], error
    for path in ("/v1/images/edits", "/v1/jobs/edits"):
        r = edit(client, png_bytes(source_image()), "two shapes", path=path, regions=json.dumps(regions))
        error = error_of(r, 400)
        assert error["code"] == "content_policy_violation" and error["param"] == "regions", error
    assert client.get("/v1/jobs").json()["total"] == 0
    assert not any(client.app.state.service.store.uploads_dir.iterdir())
    # The same regions without the blocked word run.
    assert client.post("/v1/jobs", json={**BODY, "regions": SENT}).status_code == 202


def test_jobs_that_differ_in_their_regions_never_share_a_run(
    make_client: Callable[..., TestClient], gated: Any, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    client = make_client(gated, max_batch=8)
    seedless = {k: v for k, v in BODY.items() if k != "seed"}  # jobs without a seed may share a run
    held = client.post("/v1/jobs", json={**seedless, "prompt": "hold the worker"})
    assert held.status_code == 202 and gated.gate.reached.wait(10), held.text
    extras: list[dict[str, Any]] = [{"regions": SENT}, {"regions": OTHER}, {"regions": SENT}, {}]
    answers = [client.post("/v1/jobs", json={**seedless, **extra}) for extra in extras]
    assert [a.status_code for a in answers] == [202] * 4, [a.text for a in answers]
    gated.gate.release.set()
    jobs = [wait_job(client, a.json()["id"]) for a in answers]
    assert [job["status"] for job in jobs] == ["succeeded"] * 4, jobs
    runs = gated.calls[1:]
    # the two jobs with equal regions share one run; the others run on their own
    assert [(run.regions, run.num_images) for run in runs] == [(KEPT, 2), (OTHER, 1), (None, 1)], runs
    stored = [_stored(client, job["results"][0]["image_id"]) for job in jobs]
    assert [record.get("regions") for _, record in stored] == [KEPT, OTHER, KEPT, None]
    first = jobs[0]["results"][0]["seed"]
    assert jobs[2]["results"][0]["seed"] == first + 1  # the next seed in the shared run
    shared = tiny.generate(
        GenerationRequest("two shapes", width=32, height=32, steps=2, seed=first, num_images=2, regions=KEPT)
    )
    assert np.array_equal(stored[0][0], _px(shared[0].image))
    assert np.array_equal(stored[2][0], _px(shared[1].image))
    seed = jobs[1]["results"][0]["seed"]
    assert np.array_equal(stored[1][0], _direct(tiny, OTHER, seed=seed))
    assert not np.array_equal(stored[1][0], _direct(tiny, KEPT, seed=seed))  # its own regions, not the run's


def test_a_queued_job_keeps_its_regions_across_a_restart(
    make_client: Callable[..., TestClient], gated: Any, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    client = make_client(gated)
    assert client.post("/v1/jobs", json={**BODY, "prompt": "hold the worker"}).status_code == 202
    assert gated.gate.reached.wait(10)
    queued = client.post("/v1/jobs", json={**BODY, "regions": SENT})
    assert queued.status_code == 202, queued.text
    client.app.state.service.manager.begin_drain()  # the queued job stays for the next server
    make_client.close(client)

    again = make_client(tiny)
    job = wait_job(again, queued.json()["id"])
    assert job["status"] == "succeeded" and job["request"]["regions"] == KEPT, job
    pixels, record = _stored(again, job["results"][0]["image_id"])
    assert record["regions"] == KEPT and np.array_equal(pixels, _direct(tiny, KEPT))


def test_jobs_queued_before_regions_existed_read_as_without_them(tmp_path: Path) -> None:
    params = {"prompt": "two shapes", "steps": 2}
    assert generation_request(params).regions is None
    assert generation_request({**params, "regions": KEPT}).regions == KEPT
    assert batch_key({**params, "regions": KEPT}) != batch_key({**params, "regions": OTHER})
    assert batch_key({**params, "regions": KEPT}) != batch_key(params)

    class Uploads:  # the store's one method edit_request asks of it here
        def upload_path(self, upload: str) -> Path:
            return tmp_path / upload

    edit_params = {**params, "kind": "edit", "image": "a" * 32}
    assert edit_request(edit_params, Uploads()).regions is None  # type: ignore[arg-type]
    assert edit_request({**edit_params, "regions": KEPT}, Uploads()).regions == KEPT  # type: ignore[arg-type]


def test_a_job_refused_only_when_it_runs_names_regions(
    make_client: Callable[..., TestClient],
    tiny: Pipeline,
    monkeypatch: pytest.MonkeyPatch,
    wait_job: Callable[..., Any],
) -> None:
    """Accepted while the model loads (its regions are checked then, not what the model refuses), refused
    when it runs: the job's error names regions, in the API's words."""
    loaded = threading.Event()

    def slow_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        assert loaded.wait(30)
        return tiny

    monkeypatch.setattr("pictor.loading.load", slow_load)
    client = make_client(None, model="tiny")
    try:
        # a bad box is refused while the model loads too
        bad = client.post("/v1/jobs", json={**BODY, "regions": [{"box": [0, 0, 2, 1], "prompt": "x"}]})
        assert_refused(bad, "regions", "region 0: 'box'")
        # a region prompt's weights are read with the model's text encoder: when the job runs
        weighted = [{"box": [0, 0, 1, 1], "prompt": "(a red circle:99)"}]
        r = client.post("/v1/jobs", json={**BODY, "regions": weighted, "prompt_weights": True})
        assert r.status_code == 202 and r.json()["request"]["regions"][0]["prompt"] == "(a red circle:99)"
        manager = client.app.state.service.manager
        wait_for(lambda: manager.queue_depth() == 1, what="the job to queue")
    finally:
        loaded.set()
    job = wait_job(client, r.json()["id"])
    error = job["error"]
    assert job["status"] == "failed" and error["param"] == "regions" and error["code"] == "invalid_parameters"
    assert error["message"].startswith("regions: the prompt of region 0: prompt weight"), error


@pytest.mark.filterwarnings("ignore::pictor.notices.PictorWarning")  # the server log's copy
def test_a_jobs_notices_name_a_region_whose_prompt_is_cut_off(
    client: TestClient, wait_job: Callable[..., Any]
) -> None:
    """Each region's prompt is encoded as the prompt is: one longer than the text encoder reads is said, with
    the region it belongs to."""
    long = "a " + " ".join(["word"] * 40) + " end"
    r = client.post("/v1/jobs", json={**BODY, "regions": [SENT[0], {"box": [0, 0, 1, 1], "prompt": long}]})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    (notice,) = job["warnings"]
    assert notice.startswith("the prompt of region 1 is longer than the text encoder's") and notice.endswith(
        "end'"
    ), notice
    r = client.post("/v1/jobs", json={**BODY, "regions": SENT})
    assert wait_job(client, r.json()["id"])["warnings"] == []


def test_the_schema_documents_regions(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    field = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]["regions"]
    assert "Regional prompts" in field["description"], field
    region = schema["components"]["schemas"]["Region"]
    assert set(region["properties"]) == {"box", "prompt", "strength"} and region["required"] == [
        "box",
        "prompt",
    ]
    assert region["additionalProperties"] is False
    form = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]
    fields = schema["components"]["schemas"][form["schema"]["$ref"].rsplit("/", 1)[1]]["properties"]
    assert "regional prompts as JSON" in fields["regions"]["description"], fields["regions"]


def test_a_bad_weight_in_a_regions_prompt_is_a_400_naming_regions(client: TestClient) -> None:
    regions = [{"box": [0, 0, 1, 1], "prompt": "(a red circle:99)"}]
    r = client.post(GENERATIONS, json={**BODY, "prompt_weights": True, "regions": regions})
    assert_refused(r, "regions", "the prompt of region 0: prompt weight")


def test_regions_with_prompt_editing_are_the_pipelines(client: TestClient, tiny: Pipeline) -> None:
    editing = {"prompt_weights": True, "prompt_editing": True}
    regions = [{"box": [0.0, 0.0, 0.5, 1.0], "prompt": "[a red circle|a blue square]", "strength": 1.0}]
    body = {**BODY, "prompt": "[two shapes:a star:1]", "regions": regions, **editing}
    ((pixels, record),) = decode_images(client.post(GENERATIONS, json=body))
    assert record["regions"] == regions and record["prompt_editing"] is True
    request = GenerationRequest(
        "[two shapes:a star:1]", width=32, height=32, steps=2, seed=3, regions=regions, **editing
    )
    assert np.array_equal(pixels, _px(tiny.generate(request)[0].image))
