"""/sdapi/v1: AUTOMATIC1111's API on pictor's job queue. txt2img and img2img make the pixels the OpenAI
endpoints (and the library) make with the same settings; refusals are clear 4xx in A1111's error shape;
the other endpoints have A1111's shapes; Basic auth takes the server's key."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.pipeline import GenerationRequest, Pipeline
from pictor.serve.a1111_models import Txt2ImgRequest
from pictor.serve.a1111_names import sampler_of, schedule_of
from pictor.serve.a1111_params import guidance
from pictor.serve.errors import APIError

KEY = "a1111-test-key"
BASE = {"prompt": "a red circle", "width": 32, "height": 32, "steps": 3, "seed": 7}


def pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im.convert("RGB"))


def chunks(b64: str) -> dict[str, str]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        im.load()
        return dict(im.text)


def b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def gradient(size: int = 32) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def square_mask(size: int = 32, white: bool = True) -> Image.Image:
    mask = np.zeros((size, size), np.uint8) if white else np.full((size, size), 255, np.uint8)
    mask[8:20, 10:24] = 255 if white else 0
    return Image.fromarray(mask)


def a1111(client: Any, path: str, **body: Any) -> dict[str, Any]:
    r = client.post(f"/sdapi/v1/{path}", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    out["info"] = json.loads(out["info"])
    return out


def openai(client: Any, **body: Any) -> list[str]:
    r = client.post("/v1/images/generations", json={"response_format": "b64_json", **body})
    assert r.status_code == 200, r.text
    return [d["b64_json"] for d in r.json()["data"]]


def openai_edit(client: Any, image: Image.Image, mask: Image.Image | None = None, **fields: Any) -> list[str]:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    files = {"image": ("image.png", buf.getvalue(), "image/png")}
    if mask is not None:
        mbuf = io.BytesIO()
        mask.save(mbuf, format="PNG")
        files["mask"] = ("mask.png", mbuf.getvalue(), "image/png")
    data = {"response_format": "b64_json", "prompt_weights": "true", **{k: str(v) for k, v in fields.items()}}
    r = client.post("/v1/images/edits", files=files, data=data)
    assert r.status_code == 200, r.text
    return [d["b64_json"] for d in r.json()["data"]]


def refused(response: Any, status: int, field: str, words: str) -> None:
    """An A1111-shaped error: its status, the field named (and first in `detail`), the words said."""
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) >= {"error", "detail", "body", "errors"}, error
    assert error["field"] == field and error["detail"].startswith(field) and words in error["detail"], error


def test_txt2img_equals_the_openai_endpoint_and_the_library(client: TestClient, tiny: Pipeline) -> None:
    body = {**BASE, "negative_prompt": "blue", "cfg_scale": 5, "batch_size": 2, "n_iter": 2}
    body |= {"sampler_name": "Euler a", "scheduler": "Karras"}
    out = a1111(client, "txt2img", **body)
    info = out["info"]
    assert len(out["images"]) == 4 and info["all_seeds"] == [7, 8, 9, 10] and info["seed"] == 7
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (32, 32, 3, 5)
    assert info["sampler_name"] == "Euler a" and info["batch_size"] == 2 and info["sd_model_name"] == "tiny"
    assert out["parameters"]["sampler_name"] == "Euler a" and out["parameters"]["n_iter"] == 2
    # each image's A1111 text is the one in its PNG, beside pictor's record
    texts = [chunks(b) for b in out["images"]]
    assert info["infotexts"] == [t["parameters"] for t in texts]
    records = [json.loads(t["pictor"]) for t in texts]
    assert [(r["sampler"], r["schedule"], r["seed"]) for r in records[:2]] == [
        ("euler_ancestral", "karras", 7),
        ("euler_ancestral", "karras", 8),
    ]
    same = {"prompt": "a red circle", "negative_prompt": "blue", "size": "32x32", "steps": 3, "seed": 7}
    same |= {
        "guidance": 5,
        "sampler": "euler_ancestral",
        "schedule": "karras",
        "n": 4,
        "prompt_weights": True,
    }
    for got, want in zip(out["images"], openai(client, **same), strict=True):
        assert np.array_equal(pixels(got), pixels(want))
    direct = tiny.generate(
        GenerationRequest(
            prompt="a red circle", negative_prompt="blue", width=32, height=32, steps=3, seed=7, guidance=5,
            sampler="euler_ancestral", schedule="karras", num_images=4, prompt_weights=True,
        )
    )  # fmt: skip
    for got, want in zip(out["images"], direct, strict=True):
        assert np.array_equal(pixels(got), np.asarray(want.image))
    # the job is in the history, marked as sent here, its images with their provenance
    job = client.get(f"/v1/jobs/{info['job_id']}").json()
    assert job["status"] == "succeeded" and job["request"]["api"] == "a1111" and len(job["results"]) == 4
    assert client.get(f"/v1/images/{job['results'][0]['image_id']}").content == base64.b64decode(
        out["images"][0]
    )


def test_random_seed_is_recorded_and_send_images_false(client: TestClient) -> None:
    out = a1111(client, "txt2img", **{**BASE, "seed": -1, "batch_size": 2, "send_images": False})
    info = out["info"]
    assert out["images"] == [] and info["seed"] >= 0 and info["all_seeds"] == [info["seed"], info["seed"] + 1]
    job = client.get(f"/v1/jobs/{info['job_id']}").json()
    assert [r["seed"] for r in job["results"]] == info["all_seeds"]
    # variation seeds: A1111's subseed, every image keeping the seed
    varied = a1111(client, "txt2img", **{**BASE, "subseed": 40, "subseed_strength": 0.3, "batch_size": 2})
    assert varied["info"]["all_seeds"] == [7, 7] and varied["info"]["all_subseeds"] == [40, 41]


def test_sampler_and_schedule_names(client: TestClient) -> None:
    def ran(**fields: Any) -> tuple[str, str]:
        record = json.loads(
            chunks(a1111(client, "txt2img", **{**BASE, "steps": 1, **fields})["images"][0])["pictor"]
        )
        return record["sampler"], record["schedule"]

    assert ran(sampler_name="DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert ran(sampler_name="DPM++ 2M Karras", scheduler="Exponential") == ("dpmpp_2m", "exponential")
    assert ran(sampler_index="k_euler_a", scheduler="automatic") == ("euler_ancestral", "flux")
    assert ran(sampler_name="UniPC", scheduler="Beta") == ("unipc", "beta")
    assert ran() == ("euler", "flux")  # left out: the model's defaults
    assert sampler_of("dpm++ 2m sde exponential") == ("dpmpp_2m_sde", "exponential")
    assert ran(sampler_name="DPM++ SDE Karras") == ("dpmpp_sde", "karras")
    assert ran(sampler_name="DPM++ 3M SDE Exponential") == ("dpmpp_3m_sde", "exponential")
    assert sampler_of("LMS Karras") == ("lms", "karras") and sampler_of("k_dpm_2") == ("dpm_2", None)
    assert sampler_of("DPM2 a") == ("dpm_2_ancestral", None)
    assert sampler_of("DPM++ 2S a Karras") == ("dpmpp_2s_ancestral", "karras")
    assert schedule_of("SGM Uniform") is None and schedule_of("karras") == "karras"
    refused(
        client.post("/sdapi/v1/txt2img", json={**BASE, "sampler_name": "DDIM"}), 422, "sampler_name", "DDIM"
    )
    refused(
        client.post("/sdapi/v1/txt2img", json={**BASE, "scheduler": "Polyexponential"}), 422, "scheduler", ""
    )


def test_hires_fix_maps_onto_pictors(client: TestClient) -> None:
    hires = {"enable_hr": True, "hr_scale": 2, "denoising_strength": 0.4, "hr_second_pass_steps": 2}
    out = a1111(client, "txt2img", **{**BASE, **hires, "hr_upscaler": "Lanczos"})
    record = json.loads(chunks(out["images"][0])["pictor"])
    assert (
        record["hires"]["scale"] == 2 and record["hires"]["strength"] == 0.4 and record["hires"]["steps"] == 2
    )
    assert (
        pixels(out["images"][0]).shape == (64, 64, 3) and out["info"]["width"] == 32
    )  # A1111: the first pass
    same = {"prompt": "a red circle", "size": "32x32", "steps": 3, "seed": 7, "prompt_weights": True}
    want = openai(client, **same, hires_scale=2, hires_strength=0.4, hires_steps=2)
    assert np.array_equal(pixels(out["images"][0]), pixels(want[0]))
    by_size = a1111(client, "txt2img", **{**BASE, **hires, "hr_resize_x": 64, "hr_scale": 3})
    assert np.array_equal(pixels(by_size["images"][0]), pixels(want[0]))
    bad = {**BASE, **hires}
    refused(
        client.post("/sdapi/v1/txt2img", json={**bad, "hr_upscaler": "Latent"}), 422, "hr_upscaler", "Lanczos"
    )
    refused(
        client.post("/sdapi/v1/txt2img", json={**bad, "hr_upscaler": "4x-UltraSharp"}), 422, "hr_upscaler", ""
    )
    refused(
        client.post("/sdapi/v1/txt2img", json={**bad, "hr_sampler_name": "Heun"}), 422, "hr_sampler_name", ""
    )
    refused(
        client.post("/sdapi/v1/txt2img", json={**bad, "hr_prompt": "other"}), 422, "hr_prompt", "first pass"
    )
    refused(client.post("/sdapi/v1/txt2img", json={**bad, "hr_scale": 5}), 422, "hr_scale", "")


def test_img2img_equals_the_openai_edit(client: TestClient) -> None:
    source = gradient()
    body = {**BASE, "denoising_strength": 0.6, "init_images": ["data:image/png;base64," + b64_png(source)]}
    out = a1111(client, "img2img", **body, batch_size=2)
    assert out["info"]["all_seeds"] == [7, 8] and out["info"]["denoising_strength"] == 0.6
    assert out["parameters"]["init_images"] is None  # A1111 echoes them only with include_init_images
    want = openai_edit(client, source, prompt="a red circle", strength=0.6, steps=3, seed=7, n=2)
    for got, expected in zip(out["images"], want, strict=True):
        assert np.array_equal(pixels(got), pixels(expected))
    # width and height other than the picture's: resized to them first (A1111's resize mode 0, Lanczos)
    resized = a1111(client, "img2img", **{**body, "width": 64, "height": 64})
    direct = openai_edit(client, source.resize((64, 64), Image.LANCZOS), prompt="a red circle", strength=0.6,
                         steps=3, seed=7)  # fmt: skip
    assert np.array_equal(pixels(resized["images"][0]), pixels(direct[0]))
    # transparency is flattened onto white (A1111's img2img background), not repainted as OpenAI's edits do
    clear = source.convert("RGBA")
    clear.putalpha(
        Image.fromarray(np.where(np.arange(32)[None, :] < 12, 0, 255).repeat(32, 0).astype(np.uint8))
    )
    flat = a1111(client, "img2img", **{**body, "init_images": [b64_png(clear)]})
    on_white = Image.new("RGBA", (32, 32), "white")
    on_white.alpha_composite(clear)
    want = openai_edit(client, on_white.convert("RGB"), prompt="a red circle", strength=0.6, steps=3, seed=7)
    assert np.array_equal(pixels(flat["images"][0]), pixels(want[0]))
    refused(
        client.post("/sdapi/v1/img2img", json={**body, "width": 64, "resize_mode": 1}), 422, "resize_mode", ""
    )
    refused(
        client.post("/sdapi/v1/img2img", json={**body, "init_images": ["not base64!"]}),
        422,
        "init_images",
        "",
    )
    refused(
        client.post("/sdapi/v1/img2img", json={**body, "init_images": []}), 422, "init_images", "one picture"
    )


def test_inpainting_equals_the_openai_edit(client: TestClient) -> None:
    source, mask = gradient(), square_mask()
    body = {**BASE, "init_images": [b64_png(source)], "denoising_strength": 0.8, "mask_blur": 3}
    whole = a1111(client, "img2img", **body, mask=b64_png(mask), inpaint_full_res=False, inpainting_fill=1)
    want = openai_edit(client, source, mask, prompt="a red circle", strength=0.8, feather=3, steps=3, seed=7)
    assert np.array_equal(pixels(whole["images"][0]), pixels(want[0]))
    # the same mask inverted, or as the opaque part of a transparent picture, reads the same
    inverted = square_mask(white=False)
    flipped = a1111(client, "img2img", **body, mask=b64_png(inverted), inpainting_mask_invert=1,
                    inpaint_full_res=0)  # fmt: skip
    assert np.array_equal(pixels(flipped["images"][0]), pixels(want[0]))
    alpha = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    alpha.putalpha(mask)
    by_alpha = a1111(client, "img2img", **body, mask=b64_png(alpha), inpaint_full_res=False)
    assert np.array_equal(pixels(by_alpha["images"][0]), pixels(want[0]))
    # only masked (A1111's API default): pictor's masked inpaint area, drawn at width x height
    masked = a1111(client, "img2img", **body, mask=b64_png(mask), inpaint_full_res_padding=8)
    record = json.loads(chunks(masked["images"][0])["pictor"])
    assert record["inpaint_area"] == "masked" and record["mask_padding"] == 8
    want = openai_edit(client, source, mask, prompt="a red circle", strength=0.8, feather=3, steps=3, seed=7,
                       inpaint_area="masked", mask_padding=8, inpaint_size="32x32")  # fmt: skip
    assert np.array_equal(pixels(masked["images"][0]), pixels(want[0]))
    # fills pictor does not start from are refused below strength 1 (0, A1111's default, is taken as 1)
    fill = {**body, "mask": b64_png(mask), "inpainting_fill": 3}
    refused(client.post("/sdapi/v1/img2img", json=fill), 422, "inpainting_fill", "original")
    uneven = {**body, "mask": b64_png(mask), "mask_blur": None, "mask_blur_x": 2, "mask_blur_y": 5}
    refused(client.post("/sdapi/v1/img2img", json=uneven), 422, "mask_blur_x", "")


def test_refusals_are_clear_and_queue_nothing(client: TestClient) -> None:
    before = client.get("/v1/jobs").json()["total"]
    cases = [
        ({"restore_faces": True}, 422, "restore_faces", "face restoration"),
        ({"tiling": True}, 422, "tiling", "tileable"),
        (
            {"alwayson_scripts": {"controlnet": {"args": [{"enabled": True}]}}},
            422,
            "alwayson_scripts",
            "controlnet",
        ),
        ({"script_name": "x/y/z plot"}, 422, "script_name", "scripts"),
        ({"styles": ["cinematic"]}, 422, "styles", "prompt"),
        ({"infotext": "a cat\nSteps: 20"}, 422, "infotext", "fields"),
        ({"override_settings": {"sd_model_checkpoint": "sdxl_base"}}, 400, "override_settings", "one model"),
        (
            {"seed_resize_from_w": 64, "seed_resize_from_h": 64, "init_images": ["x"]},
            422,
            "seed_resize_from_w",
            "picture",
        ),
        ({"prompt": "a cat <lora:style:1>"}, 422, "prompt", "--lora-dir"),
        ({"negative_prompt": "<lora:style:1>"}, 422, "negative_prompt", "LoRA"),
        ({"cfg_scale": 1, "negative_prompt": "blue"}, 422, "negative_prompt", "guidance 1"),
        ({"batch_size": 4, "n_iter": 3}, 422, "batch_size", "at most 8"),
        ({"steps": 2.5}, 422, "steps", "integer"),
    ]
    for extra, status, field, words in cases:
        path = "img2img" if "init_images" in extra else "txt2img"
        refused(client.post(f"/sdapi/v1/{path}", json={**BASE, **extra}), status, field, words)
    assert client.get("/v1/jobs").json()["total"] == before
    # ignored, and said so: sampler knobs pictor's samplers fix, UI settings, fields A1111 has not
    fields = {"eta": 0.5, "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "tiny"}}
    out = a1111(client, "txt2img", **BASE, **fields, alwayson_scripts={"ADetailer": {}}, steps_typo=3)
    assert out["info"]["ignored_fields"] == [
        "eta",
        "override_settings.CLIP_stop_at_last_layers",
        "alwayson_scripts.ADetailer",
        "steps_typo",
    ]


def test_guidance_fields_follow_the_models_kind() -> None:
    def taken(mode: str, **fields: Any) -> tuple[Any, str, list[str]]:
        svc = SimpleNamespace(manager=SimpleNamespace(pipeline=SimpleNamespace(guidance_mode=mode)))
        ignored: list[str] = []
        value, source = guidance(svc, Txt2ImgRequest(**fields), ignored)  # type: ignore[arg-type]
        return value, source, ignored

    assert taken("distilled", distilled_cfg_scale=3.5, cfg_scale=1) == (3.5, "distilled_cfg_scale", [])
    assert taken("distilled", cfg_scale=3.0) == (3.0, "cfg_scale", [])  # an A1111 client knows no other
    with pytest.raises(APIError, match="real classifier-free guidance"):
        taken("distilled", distilled_cfg_scale=3.5, cfg_scale=7)
    assert taken("cfg", cfg_scale=6, distilled_cfg_scale=3.5) == (6, "cfg_scale", ["distilled_cfg_scale"])
    assert taken("none", cfg_scale=1)[0] is None and taken("none", cfg_scale=7)[0] == 7  # the model refuses 7
    assert taken("cfg") == (None, "cfg_scale", [])


def test_lora_tags_choose_the_servers_loras(
    make_client: Callable[..., TestClient], lora_dir: Path, fresh_tiny: Callable[[], Pipeline]
) -> None:
    client = make_client(fresh_tiny(), lora_dir=lora_dir)
    listed = client.get("/sdapi/v1/loras").json()
    assert [x["name"] for x in listed] == ["detail", "style"] and listed[1]["path"].endswith(
        "style.safetensors"
    )
    out = a1111(client, "txt2img", **{**BASE, "prompt": "a red circle <lora:style:0.8>"})
    record = json.loads(chunks(out["images"][0])["pictor"])
    assert record["prompt"] == "a red circle" and [(x["name"], x["scale"]) for x in record["loras"]] == [
        ("style", 0.8)
    ]
    same = {"prompt": "a red circle", "size": "32x32", "steps": 3, "seed": 7, "prompt_weights": True}
    want = openai(client, **same, loras=[{"name": "style", "scale": 0.8}])
    assert np.array_equal(pixels(out["images"][0]), pixels(want[0]))
    plain = a1111(
        client,
        "txt2img",
        **{**BASE, "prompt": "a red circle <lora:style:0.8>", "disable_extra_networks": True},
    )
    assert json.loads(chunks(plain["images"][0])["pictor"])["loras"] == []
    refused(
        client.post("/sdapi/v1/txt2img", json={**BASE, "prompt": "x <lora:nope:1>"}), 422, "prompt", "style"
    )
    refused(
        client.post("/sdapi/v1/txt2img", json={**BASE, "prompt": "x <lora:style:1:0.5>"}),
        422,
        "prompt",
        "one",
    )
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200


def test_info_endpoints_have_a1111s_shapes(client: TestClient) -> None:
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "UniPC", "Heun", "DEIS", "LCM"} <= {
        s["name"] for s in samplers
    }
    k_diffusion = {"LMS", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"}
    assert k_diffusion <= {s["name"] for s in samplers}
    assert next(s for s in samplers if s["name"] == "DPM2 a")["aliases"] == ["dpm_2_ancestral", "k_dpm_2_a"]
    assert all(set(s) == {"name", "aliases", "options"} and sampler_of(s["name"])[0] for s in samplers)
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert {"automatic", "karras", "exponential", "beta"} <= {s["name"] for s in schedulers}
    (model,) = client.get("/sdapi/v1/sd-models").json()
    assert set(model) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert model["title"] == f"tiny [{model['hash']}]" and model["sha256"].startswith(model["hash"])
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == model["title"]
    assert client.post("/sdapi/v1/options", json=options).status_code == 200  # Open WebUI posts them all back
    for name in (model["title"], "tiny", model["hash"]):  # what Open WebUI and others send to pick a model
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name}).status_code == 200
    assert (
        client.post(
            "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "samples_save": False}
        ).status_code
        == 200
    )
    refused(
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl"}),
        400,
        "sd_model_checkpoint",
        "one",
    )
    refused(client.post("/sdapi/v1/options", json={"sd_vae": "sdxl_vae.safetensors"}), 400, "sd_vae", "")
    assert [u["name"] for u in client.get("/sdapi/v1/upscalers").json()] == ["None", "Lanczos"]
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    assert client.get("/sdapi/v1/sd-vae").json() == [] and client.get("/sdapi/v1/scripts").status_code == 200
    assert client.get("/internal/ping").json() == {}  # A1111's liveness probe
    # png-info: the parameters text of a picture, read into fields, and its other text chunks
    image = a1111(client, "txt2img", **BASE)["images"][0]
    info = client.post("/sdapi/v1/png-info", json={"image": image}).json()
    assert info["info"] == chunks(image)["parameters"] and "pictor" in info["items"]
    assert info["parameters"]["Prompt"] == "a red circle" and info["parameters"]["Steps"] == "3"
    assert (info["parameters"]["Size-1"], info["parameters"]["Size-2"]) == ("32", "32")
    refused(client.post("/sdapi/v1/png-info", json={"image": "%%%"}), 422, "image", "base64")
    # what pictor has not, in A1111's shape
    missing = client.post("/sdapi/v1/interrogate", json={})
    assert missing.status_code == 404 and "txt2img" in missing.json()["detail"]
    wrong = client.get("/sdapi/v1/txt2img")
    assert (
        wrong.status_code == 405 and wrong.headers["allow"] == "POST" and "use POST" in wrong.json()["detail"]
    )
    # the document lists the routes, their 422s in A1111's shape
    document = client.get("/openapi.json").json()
    ref = document["paths"]["/sdapi/v1/txt2img"]["post"]["responses"]["422"]["content"]["application/json"]
    assert ref["schema"]["$ref"].endswith("/A1111Error")


def test_progress_and_interrupt(make_client: Callable[..., TestClient], gated: Any) -> None:
    client = make_client(gated)
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.update(r=client.post("/sdapi/v1/txt2img", json={**BASE, "steps": 9}))
    )
    thread.start()
    assert gated.gate.reached.wait(10)
    queued = client.post("/v1/jobs", json={"prompt": "an OpenAI job", "steps": 1}).json()  # not interrupted
    progress = client.get("/sdapi/v1/progress").json()
    state = progress["state"]
    assert state["job_count"] == 1 and state["sampling_steps"] == 9 and 0 <= progress["progress"] <= 1
    job_id = state["job"]
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    assert client.post("/sdapi/v1/interrupt").json() == {}
    gated.gate.armed = False
    gated.gate.release.set()
    thread.join(20)
    interrupted = result["r"]
    assert interrupted.status_code == 409 and "interrupted" in interrupted.json()["detail"]
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{queued['id']}").json()["status"] in ("queued", "running", "succeeded")
    assert client.post("/sdapi/v1/skip").status_code == 200


def test_basic_auth_takes_the_key(make_client: Callable[..., TestClient], tiny: Pipeline) -> None:
    keyed = make_client(tiny, api_key=KEY)
    missing = keyed.get("/sdapi/v1/options")
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Basic")
    assert "HTTP Basic" in missing.json()["detail"] and missing.json()["error"] == "invalid_api_key"
    wrong = keyed.get("/sdapi/v1/options", auth=("user", "not-the-key"))
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Basic")
    assert keyed.get("/sdapi/v1/options", headers={"Authorization": "Basic %%%"}).status_code == 401
    assert keyed.get("/sdapi/v1/options", headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    assert keyed.get("/sdapi/v1/options", auth=("anyone", KEY)).status_code == 200
    assert keyed.get("/sdapi/v1/options", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert keyed.post("/sdapi/v1/txt2img", json=BASE, auth=(KEY, "wrong")).status_code == 401  # the password
    # the other rules stay: Basic opens /sdapi only, and cross-site state changes are refused
    assert keyed.get("/v1/jobs", auth=("anyone", KEY)).status_code == 401
    evil = keyed.post(
        "/sdapi/v1/txt2img", json=BASE, auth=("u", KEY), headers={"Origin": "https://evil.example"}
    )
    assert evil.status_code == 403 and "cross-site" in evil.json()["detail"]
    assert keyed.post("/sdapi/v1/txt2img", json=BASE, auth=("u", KEY)).status_code == 200


def test_a_real_server_with_an_a1111_client(serve_process: Any, tmp_path: Path) -> None:
    server = serve_process(tmp_path / "data", "--api-key", KEY)
    with httpx.Client(base_url=server.url, auth=("webui", KEY), timeout=60) as http:
        (model,) = http.get("/sdapi/v1/sd-models").json()
        assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": model["title"]}).status_code == 200
        r = http.post("/sdapi/v1/txt2img", json={**BASE, "batch_size": 2, "sampler_name": "DPM++ 2M Karras"})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["all_seeds"] == [7, 8] and "Schedule type: karras" in info["infotexts"][0]
    jobs = httpx.get(f"{server.url}/v1/jobs", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert jobs["data"][0]["id"] == info["job_id"] and jobs["data"][0]["request"]["api"] == "a1111"
    assert httpx.get(f"{server.url}/sdapi/v1/progress").status_code == 401
