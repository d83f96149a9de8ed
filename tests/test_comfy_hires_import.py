"""ComfyUI's two-pass ("hires fix") graphs read by `--settings-from` (`pictor.comfy_passes`): the first
pass's settings, the second as pictor's hires scale, strength (the noise level ComfyUI's denoise starts at),
steps and upscaler, sizes worked out as ComfyUI's nodes round them, what pictor cannot express said, split
KSamplerAdvanced runs joined, and shapes not understood left to the last pass alone with a notice."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from pictor.cli import main
from pictor.provenance import read_record
from pictor.settings_import import settings_from_comfy, settings_from_image

Graph = dict[str, dict[str, Any]]


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": class_type}}


def sampler(latent: str, **over: Any) -> dict[str, Any]:
    inputs = {
        "seed": 42,
        "steps": 20,
        "cfg": 1.0,
        "sampler_name": "euler",
        "scheduler": "simple",
        "denoise": 1.0,
        "model": ["4", 0],
        "positive": ["35", 0],
        "negative": ["7", 0],
        "latent_image": [latent, 0],
    }
    return node("KSampler", **(inputs | over))


def base(width: int = 1024, height: int = 768) -> Graph:
    """Pass 1 of ComfyUI's FLUX.1 [dev] example: KSampler at CFG 1 on an EmptySD3LatentImage."""
    return {
        "4": node("CheckpointLoaderSimple", ckpt_name="flux1-dev-fp8.safetensors"),
        "6": node("CLIPTextEncode", text="a lighthouse on a cliff", clip=["4", 1]),
        "7": node("ConditioningZeroOut", conditioning=["6", 0]),
        "35": node("FluxGuidance", guidance=3.5, conditioning=["6", 0]),
        "27": node("EmptySD3LatentImage", width=width, height=height, batch_size=1),
        "3": sampler("27"),
    }


def finish(graph: Graph, latent: str, **second: Any) -> Graph:
    """Pass 2 (KSampler at denoise 0.5, 10 steps) on `latent`, decoded and saved."""
    graph["60"] = sampler(latent, **({"steps": 10, "denoise": 0.5} | second))
    graph["61"] = node("VAEDecode", samples=["60", 0], vae=["4", 2])
    graph["62"] = node("SaveImage", filename_prefix="ComfyUI", images=["61", 0])
    return graph


def latent_graph(scale_by: float = 1.5, **second: Any) -> Graph:
    graph = base()
    graph["50"] = node("LatentUpscaleBy", upscale_method="nearest-exact", scale_by=scale_by, samples=["3", 0])
    return finish(graph, "50", **second)


def image_graph(*scalers: tuple[str, dict[str, Any]], width: int = 1024, height: int = 768) -> Graph:
    """Pass 1 decoded, through the image nodes given (each fed by the one before), encoded, pass 2."""
    graph = base(width, height)
    graph["40"] = node("VAEDecode", samples=["3", 0], vae=["4", 2])
    last = "40"
    for i, (cls, inputs) in enumerate(scalers):
        graph[str(41 + i)] = node(cls, image=[last, 0], **inputs)
        last = str(41 + i)
    graph["49"] = node("VAEEncode", pixels=[last, 0], vae=["4", 2])
    return finish(graph, "49")


def comfy(graph: Graph) -> Any:
    return settings_from_comfy(json.dumps(graph))


def start_level(steps: int, denoise: float, mu: float = 1.15) -> float:
    """ComfyUI's KSampler at denoise d: the last `steps` of int(steps / d) simple-scheduler steps, its first
    sigma from ModelSamplingFlux's table (comfy/samplers.py, comfy/model_sampling.py), written out here."""
    total = int(steps / denoise)
    u = (10_000 - int((total - steps) * (10_000 / total))) / 10_000
    return round(math.exp(mu) / (math.exp(mu) + (1 / u - 1)), 4)


def joined(notices: list[str]) -> str:
    return " | ".join(notices)


def test_a_latent_upscale_hires_fix_gives_the_first_pass_and_the_hires_settings() -> None:
    got = comfy(latent_graph())
    v = got.values
    assert (v["prompt"], v["seed"], v["steps"], v["sampler"], v["size"], v["guidance"]) == (
        "a lighthouse on a cliff",
        42,
        20,
        "euler",
        (1024, 768),
        3.5,
    )
    assert "schedule" not in v  # simple: the model's own
    assert (v["hires"], v["hires_steps"]) == (1.5, 10)
    # denoise 0.5 of 10 steps: the last 10 of 20, from u = 0.5, shifted by FLUX.1 [dev]'s 1.15: t = 0.7595
    assert v["hires_strength"] == start_level(10, 0.5) == 0.7595
    notices = joined(got.notices)
    assert "enlarges the latent (LatentUpscaleBy (node 50), nearest-exact), which pictor does not" in notices
    assert "ComfyUI runs the last 10 of 20 steps, from noise level 0.7595" in notices
    assert "second pass is" not in notices  # 1536x1152 both ways
    assert "second pass (" not in notices  # the two passes agree: nothing else to say
    assert "not taken (no pictor equivalent" not in notices  # every node read
    assert got.hires_upscaler_name is None


def test_the_start_level_follows_comfyuis_rounding_of_steps_over_denoise() -> None:
    got = comfy(latent_graph(steps=7, denoise=0.3))  # int(7 / 0.3) = 23 steps: u = 0.3044
    assert got.values["hires_strength"] == start_level(7, 0.3) != start_level(7, 7 / 23 + 0.01)
    assert got.values["hires_steps"] == 7
    assert comfy(latent_graph(denoise=1.0)).values["hires_strength"] == 1.0  # all of it, from noise


def test_latent_upscale_by_rounds_latent_sides_as_comfyui_does() -> None:
    # 1024x768 is 128x96 latents; x1.33 is round(170.24) x round(127.68) = 170 x 128: 1360x1024, which
    # pictor's 16s give too
    got = comfy(latent_graph(scale_by=1.33))
    assert got.values["hires"] == 1.33
    assert "second pass is" not in joined(got.notices)
    got = comfy(latent_graph(scale_by=1.1))  # 140.8 x 105.6 -> 141 x 106 latents: 1128x848; pictor 1120x848
    assert "the graph's second pass is 1128x848; pictor's hires fix at scale 1.1 makes 1120x848" in joined(
        got.notices
    )


def test_latent_upscale_to_a_size_gives_the_scale_and_says_other_sides() -> None:
    graph = base()
    graph["50"] = node("LatentUpscale", upscale_method="bilinear", width=1536, height=1152, crop="disabled")
    graph["50"]["inputs"]["samples"] = ["3", 0]
    got = comfy(finish(graph, "50"))
    assert got.values["hires"] == 1.5 and "second pass is" not in joined(got.notices)
    graph["50"]["inputs"] |= {"width": 1536, "height": 0}  # 0 keeps the aspect
    assert comfy(graph).values["hires"] == 1.5
    graph["50"]["inputs"] |= {"height": 1024}
    notices = joined(comfy(graph).notices)
    assert (
        "the graph's second pass is 1536x1024; pictor's hires fix at scale 1.5 makes 1536x1152 (sides in "
        "16s): its sides grow 1.5 and 1.33333 times, where pictor's hires scale grows both alike"
    ) in notices


def test_an_image_upscale_hires_fix_is_lanczos_or_says_its_method() -> None:
    got = comfy(image_graph(("ImageScaleBy", {"upscale_method": "lanczos", "scale_by": 2.0})))
    assert (got.values["hires"], got.values["size"]) == (2.0, (1024, 768))
    notices = joined(got.notices)
    assert "Lanczos" not in notices and "not taken (no pictor equivalent" not in notices
    got = comfy(image_graph(("ImageScale", {"upscale_method": "bicubic", "width": 2048, "height": 1536})))
    assert got.values["hires"] == 2.0
    assert "ImageScale (node 41) resizes with bicubic, where pictor's hires fix uses Lanczos" in got.notices


def test_vae_encode_crops_the_scaled_picture_to_whole_latents() -> None:
    # 1024 x 1.45 = 1484.8 -> 1485 pixels, which VAEEncode crops to 1480; pictor's 16s make 1488
    got = comfy(image_graph(("ImageScaleBy", {"upscale_method": "lanczos", "scale_by": 1.45}), height=1024))
    assert got.values["hires"] == 1.45
    assert "the graph's second pass is 1480x1480; pictor's hires fix at scale 1.45 makes 1488x1488" in joined(
        got.notices
    )


def test_an_upscale_model_is_named_for_hires_upscaler_with_its_scale_from_its_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = image_graph(
        ("ImageUpscaleWithModel", {"upscale_model": ["70", 0]}),
        ("ImageScaleBy", {"upscale_method": "lanczos", "scale_by": 0.5}),
    )
    graph["70"] = node("UpscaleModelLoader", model_name="ESRGAN/4x-UltraSharp.pth")
    got = comfy(graph)
    assert (got.values["hires"], got.hires_upscaler_name) == (2.0, "4x-UltraSharp.pth")
    assert "the graph's upscale model '4x-UltraSharp.pth' is taken to enlarge 4x, as its name says" in (
        got.notices
    )
    graph["70"]["inputs"]["model_name"] = "RealESRGAN_x2plus.pth"  # x2 then x0.5: the first pass's size
    got = comfy(graph)
    assert "hires" not in got.values and "is 1 times the first's 1024x768" in joined(got.notices)
    graph["70"]["inputs"]["model_name"] = "UltraSharp.pth"
    got = comfy(graph)
    assert "hires" not in got.values
    assert "'UltraSharp.pth' does not say its scale in its name" in joined(got.notices)
    # the command line asks for the model's file, as for A1111's text naming one
    graph["70"]["inputs"]["model_name"] = "4x-UltraSharp.pth"
    png = comfy_png(tmp_path / "model.png", graph)
    assert main(["generate", "--settings-from", str(png), "--model", "tiny", "-o", str(tmp_path)]) == 2
    assert "upscale model '4x-UltraSharp.pth'; pass its file with --hires-upscaler" in capsys.readouterr().err


def test_second_pass_differences_are_said_and_the_first_pass_taken() -> None:
    graph = latent_graph(seed=7, cfg=2.0, sampler_name="dpmpp_2m", scheduler="beta")
    graph["36"] = node("CLIPTextEncode", text="a lighthouse, detailed", clip=["4", 1])
    graph["60"]["inputs"]["positive"] = ["36", 0]
    graph["37"] = node(
        "LoraLoaderModelOnly", lora_name="detail.safetensors", strength_model=0.6, model=["4", 0]
    )
    graph["60"]["inputs"]["model"] = ["37", 0]
    got = comfy(graph)
    assert (got.values["seed"], got.values["sampler"], got.values["prompt"]) == (
        42,
        "euler",
        "a lighthouse on a cliff",
    )
    notices = joined(got.notices)
    assert (
        "the graph's second pass (KSampler (node 60)) has prompt 'a lighthouse, detailed' (the first pass's: "
        "'a lighthouse on a cliff'); seed 7 (the first pass's: 42); cfg 2 (the first pass's: 1); sampler "
        "name 'dpmpp_2m' (the first pass's: 'euler'); scheduler 'beta' (the first pass's: 'simple'); model "
        "files "
    ) in notices
    assert "detail.safetensors:0.6" in notices and "so these are not taken" in notices
    assert (
        "the second pass's scheduler beta: its starting noise level is worked out as under simple" in notices
    )


def test_a_sampler_custom_advanced_hires_fix_reads_its_scheduler_and_shift() -> None:
    graph = base()
    del graph["3"]
    graph["12"] = node("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default")
    graph["25"] = node("RandomNoise", noise_seed=5)
    graph["16"] = node("KSamplerSelect", sampler_name="euler")
    graph["22"] = node("BasicGuider", model=["12", 0], conditioning=["35", 0])
    graph["17"] = node("BasicScheduler", scheduler="simple", steps=16, denoise=1.0, model=["12", 0])
    graph["3"] = node(
        "SamplerCustomAdvanced",
        noise=["25", 0],
        guider=["22", 0],
        sampler=["16", 0],
        sigmas=["17", 0],
        latent_image=["27", 0],
    )
    graph["50"] = node("LatentUpscaleBy", upscale_method="bislerp", scale_by=2.0, samples=["3", 0])
    graph["30"] = node(
        "ModelSamplingFlux", max_shift=1.15, base_shift=0.5, width=2048, height=1536, model=["12", 0]
    )
    graph["18"] = node("BasicScheduler", scheduler="simple", steps=8, denoise=0.4, model=["30", 0])
    graph["60"] = node(
        "SamplerCustomAdvanced",
        noise=["25", 0],
        guider=["22", 0],
        sampler=["16", 0],
        sigmas=["18", 0],
        latent_image=["50", 0],
    )
    graph["61"] = node("VAEDecode", samples=["60", 0], vae=["4", 2])
    graph["62"] = node("SaveImage", filename_prefix="ComfyUI", images=["61", 0])
    got = comfy(graph)
    v = got.values
    assert (v["seed"], v["steps"], v["size"], v["hires"], v["hires_steps"]) == (5, 16, (1024, 768), 2.0, 8)
    mu = 2048 * 1536 / 256 * (0.65 / 3840) + 0.5 - 0.65 / 3840 * 256  # ModelSamplingFlux at 2048x1536
    assert v["hires_strength"] == start_level(8, 0.4, mu)
    notices = joined(got.notices)
    assert "BasicScheduler (node 18) denoises 0.4 in 8 steps" in notices
    # at the second pass's own size: pictor's hires pass shifts so too
    assert "ModelSamplingFlux (node 30)" not in notices and "second pass shifts" not in notices
    # the first pass's model has none: FLUX.1 [dev]'s constant 1.15, where pictor shifts 1024x768 by 0.98
    assert "the graph has no ModelSamplingFlux node" in notices


def test_a_split_ksampler_advanced_run_is_taken_as_one() -> None:
    graph = base()
    common = {k: v for k, v in graph["3"]["inputs"].items() if k not in ("seed", "denoise")}
    graph["3"] = node(
        "KSamplerAdvanced",
        **common,
        add_noise="enable",
        noise_seed=9,
        start_at_step=0,
        end_at_step=12,
        return_with_leftover_noise="enable",
    )
    graph["60"] = node(
        "KSamplerAdvanced",
        **(common | {"latent_image": ["3", 0]}),
        add_noise="disable",
        noise_seed=0,
        start_at_step=12,
        end_at_step=10000,
        return_with_leftover_noise="disable",
    )
    graph["61"] = node("VAEDecode", samples=["60", 0], vae=["4", 2])
    graph["62"] = node("SaveImage", filename_prefix="ComfyUI", images=["61", 0])
    got = comfy(graph)
    assert (got.values["seed"], got.values["steps"], got.values["size"]) == (9, 20, (1024, 768))
    assert "hires" not in got.values
    notices = joined(got.notices)
    assert "split" not in notices and "runs steps" not in notices and "adds no noise" not in notices
    assert "not taken (no pictor equivalent" not in notices
    graph["3"]["inputs"]["return_with_leftover_noise"] = "disable"  # the first half ends at sigma 0
    assert (
        "split a run in two, but with not the first adding noise and returning its leftover noise, the "
        "second adding none"
    ) in joined(comfy(graph).notices)
    graph["3"]["inputs"]["return_with_leftover_noise"] = "enable"
    graph["60"]["inputs"] |= {"sampler_name": "dpmpp_2m", "start_at_step": 14}
    notices = joined(comfy(graph).notices)
    assert (
        "KSamplerAdvanced (node 3) and KSamplerAdvanced (node 60) split a run in two, but with sampler name "
        "'dpmpp_2m' (the first half's: 'euler'); steps 0 to 12 and 14 to 10000, which do not join into 0 to "
        "20: pictor runs one sampler over all the steps, so the first half's settings are taken"
    ) in notices


def test_shapes_not_read_as_a_hires_fix_take_the_last_pass_with_a_notice() -> None:
    # three passes: the middle one starts from another sampler's output
    graph = latent_graph()
    graph["51"] = node("LatentUpscaleBy", upscale_method="nearest-exact", scale_by=1.5, samples=["60", 0])
    graph["63"] = sampler("51", seed=3, steps=4, denoise=0.3)
    graph["61"]["inputs"]["samples"] = ["63", 0]
    got = comfy(graph)
    assert (got.values["seed"], got.values["steps"]) == (3, 4) and "hires" not in got.values
    notices = joined(got.notices)
    assert "KSampler (node 60), the pass before the last, does not start from an empty latent" in notices
    assert "in a way pictor does not read as a hires fix" in notices
    # a second pass at the same size is a refinement, not a hires fix
    graph = finish(base(), "3")
    got = comfy(graph)
    assert got.values["seed"] == 42 and "hires" not in got.values
    assert "KSampler (node 60) denoises 0.5 of the way" in joined(got.notices)
    # a scale pictor's hires fix cannot run (smaller): the first pass, without a hires fix
    got = comfy(latent_graph(scale_by=0.5))
    assert "hires" not in got.values and got.values["size"] == (1024, 768)
    assert "is 0.5 times the first's 1024x768, which pictor's hires fix cannot take" in joined(got.notices)


def comfy_png(path: Path, graph: Graph) -> Path:
    """A PNG as ComfyUI's SaveImage writes it: the API graph as `prompt`, the editor's graph as `workflow`."""
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(graph))
    info.add_text("workflow", json.dumps({"nodes": [], "links": [], "version": 0.4}))
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_generate_from_a_hires_graph_runs_its_hires_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = base(32, 32)
    graph["3"]["inputs"] |= {"steps": 2, "seed": 5}
    graph["50"] = node("LatentUpscaleBy", upscale_method="nearest-exact", scale_by=2.0, samples=["3", 0])
    png = comfy_png(tmp_path / "hires.png", finish(graph, "50", steps=3, denoise=0.6))
    assert settings_from_image(png).values["hires_strength"] == start_level(3, 0.6)
    assert main(["generate", "--settings-from", str(png), "--model", "tiny", "-o", str(tmp_path / "o")]) == 0
    out = capsys.readouterr()
    path = Path(out.out.split()[0])
    record = read_record(path)
    assert (record["seed"], record["steps"], record["width"], record["height"]) == (5, 2, 32, 32)
    hires = record["hires"]
    assert (hires["scale"], hires["strength"], hires["steps"]) == (2.0, start_level(3, 0.6), 3)
    assert (hires["width"], hires["height"]) == (64, 64) and Image.open(path).size == (64, 64)
    assert "enlarges the latent (LatentUpscaleBy (node 50)" in out.err  # the notices, on stderr


def test_the_server_gives_a_hires_graph_as_a_generation_body() -> None:
    """POST /v1/images/settings shares the reading: its body carries the hires fix."""
    from pictor.serve.settings_from import body_settings

    body, notices = body_settings(comfy(latent_graph()))
    assert (body["size"], body["hires_scale"], body["hires_steps"]) == ("1024x768", 1.5, 10)
    assert body["hires_strength"] == start_level(10, 0.5) and body["seed"] == 42
    assert any("enlarges the latent" in n for n in notices)


def test_the_hires_pass_steps_through_comfyuis_sigmas_where_the_shifts_agree() -> None:
    """At 1024x1024 pictor's shift is FLUX.1 [dev]'s 1.15, ComfyUI's constant one: the second pass's schedule
    at the imported strength and steps is then the sigmas ComfyUI's KSampler ran at denoise 0.5 (the last 10
    of a 20-step simple schedule over ModelSamplingFlux's table)."""
    from pictor.sampling_schedules import schedule_flux

    graph = base(512, 512)
    graph["50"] = node("LatentUpscaleBy", upscale_method="bilinear", scale_by=2.0, samples=["3", 0])
    v = comfy(finish(graph, "50")).values
    assert v["hires"] == 2.0
    e = math.exp(1.15)
    table = [e / (e + (1 / ((10_000 - int(x * 10_000 / 20)) / 10_000) - 1)) for x in range(20)] + [0.0]
    ours = schedule_flux(v["hires_steps"], (1024 // 16) ** 2, start=v["hires_strength"])
    assert [round(float(t), 4) for t in ours] == [round(t, 4) for t in table[-11:]]


def test_samplers_whose_penultimate_sigma_comfyui_drops_start_from_their_own_schedule() -> None:
    """ComfyUI's KSampler builds one step more for dpm_2, dpm_2_ancestral, uni_pc and uni_pc_bh2 and drops
    the second-to-last sigma (comfy/samplers.py, KSampler.calculate_sigmas): at denoise 0.5 of 10 steps the
    last 11 of 21 simple-scheduler sigmas, from u = 1 - int(10 * 10,000 / 21) / 10,000, not 0.5."""
    graph = latent_graph(sampler_name="uni_pc")
    graph["3"]["inputs"]["sampler_name"] = "uni_pc"
    e = math.exp(1.15)
    u = (10_000 - int(10 * (10_000 / 21))) / 10_000
    expected = round(e / (e + (1 / u - 1)), 4)
    assert comfy(graph).values["hires_strength"] == expected != start_level(10, 0.5)


def test_the_start_level_under_normal_and_sgm_uniform_follows_their_spacing() -> None:
    """normal spaces the model's timesteps (a FLUX.1 sigma is its own timestep) evenly from 1 down to
    sigma_min in N points, sgm_uniform in N + 1 dropping the last (comfy/samplers.py, normal_scheduler); the
    first of the last 10 of 20 lies elsewhere than simple's u = 0.5."""
    e = math.exp(1.15)
    smin = e / (e + (10_000 - 1))  # ModelSamplingFlux's sigma_min: the shifted 1 / 10,000

    def shifted(u: float) -> float:
        return round(e / (e + (1 / u - 1)), 4)

    normal = comfy(latent_graph(scheduler="normal"))
    assert normal.values["hires_strength"] == shifted(1 - 10 * (1 - smin) / 19) != start_level(10, 0.5)
    sgm = comfy(latent_graph(scheduler="sgm_uniform"))
    assert sgm.values["hires_strength"] == shifted(1 - 10 * (1 - smin) / 20)
    for got in (normal, sgm):
        assert "worked out as under simple" not in joined(got.notices)


def test_a_second_pass_shifted_otherwise_than_pictors_hires_pass_is_said() -> None:
    """The strength is ComfyUI's start noise level at its own shift; the steps below it follow pictor's
    shift for the second pass's size, which a ModelSamplingFlux at the first pass's size (feeding both), or
    FLUX.1 [dev]'s constant 1.15, is not."""
    graph = latent_graph()
    graph["30"] = node(
        "ModelSamplingFlux", max_shift=1.15, base_shift=0.5, width=1024, height=768, model=["4", 0]
    )
    graph["3"]["inputs"]["model"] = graph["60"]["inputs"]["model"] = ["30", 0]
    notices = joined(comfy(graph).notices)
    assert "the hires pass's steps differ: ComfyUI's second pass shifts by mu 0.977" in notices
    assert "pictor's flux schedule by 1.63 for 1536x1152" in notices
    notices = joined(comfy(latent_graph()).notices)  # no ModelSamplingFlux: the constant 1.15
    assert "the hires pass's steps differ: ComfyUI's second pass shifts by mu 1.15" in notices


def test_a_picture_saved_from_each_pass_says_which_is_taken() -> None:
    graph = latent_graph()
    graph["52"] = node("VAEDecode", samples=["3", 0], vae=["4", 2])
    graph["53"] = node("SaveImage", filename_prefix="first", images=["52", 0])
    got = comfy(graph)
    assert got.values["hires"] == 1.5 and got.values["seed"] == 42
    notices = joined(got.notices)
    assert "the settings of KSampler (node 60) (the last pass) are taken" not in notices
    assert (
        "the graph's pictures come from 2 samplers (KSampler (node 3), KSampler (node 60)); the picture of "
        "KSampler (node 60) (the last pass) is taken to be this one: its settings are those of KSampler "
        "(node 3) with a hires fix"
    ) in notices


@pytest.mark.parametrize(
    "change",
    [
        lambda g: g["50"]["inputs"].update(scale_by=1e308),  # the latent's sides past any float
        lambda g: g["50"]["inputs"].update(scale_by=1e300),  # past any picture
        lambda g: g["27"]["inputs"].update(width=10**30),
        lambda g: g.update(
            {
                "30": node("ModelSamplingFlux", max_shift=1.15, base_shift=0.5, width=1e200, height=1e200),
                "60": g["60"] | {"inputs": g["60"]["inputs"] | {"model": ["30", 0]}},
            }
        ),
    ],
)
def test_sizes_and_shifts_past_any_picture_give_notices_not_errors(change: Any) -> None:
    graph = latent_graph()
    change(graph)
    got = comfy(graph)  # no SettingsImportError ("could not be read")
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in got.values.values()), got.values
    assert "hires_strength" not in got.values or 0 < got.values["hires_strength"] <= 1


def test_an_image_scale_to_a_side_past_any_picture_is_said() -> None:
    got = comfy(image_graph(("ImageScale", {"upscale_method": "lanczos", "width": 0, "height": 10**400})))
    assert "hires" not in got.values
    assert "ImageScale (node 41) makes a picture larger than any pictor draws" in joined(got.notices)


def test_a_second_pass_of_no_steps_gives_no_hires_steps() -> None:
    got = comfy(latent_graph(steps=0))
    assert "hires_steps" not in got.values and "hires_strength" not in got.values
    assert "the graph's second pass runs 0 steps: no hires steps or strength are taken" in joined(got.notices)


def test_a_shift_node_on_the_second_pass_alone_leaves_the_first_pass_shift_said() -> None:
    """Without a ModelSamplingFlux on its own model's way the first pass shifts by FLUX.1 [dev]'s constant
    1.15 (1024x768: pictor's 0.98): said, though the second pass's model has one."""
    graph = latent_graph()
    graph["30"] = node(
        "ModelSamplingFlux", max_shift=1.15, base_shift=0.5, width=1536, height=1152, model=["4", 0]
    )
    graph["60"]["inputs"]["model"] = ["30", 0]
    notices = joined(comfy(graph).notices)
    assert "the graph has no ModelSamplingFlux node: ComfyUI then shifts" in notices
    assert "ComfyUI's second pass shifts" not in notices  # at the second pass's own size
    graph["3"]["inputs"]["model"] = ["30", 0]  # one node, at the second pass's size, for both
    assert "the graph has no ModelSamplingFlux node" not in joined(comfy(graph).notices)


def test_the_shift_of_a_custom_sampler_pass_is_its_sigmas_models_at_any_denoise() -> None:
    graph = latent_graph()
    graph["16"] = node("KSamplerSelect", sampler_name="euler")
    graph["25"] = node("RandomNoise", noise_seed=42)
    graph["22"] = node("BasicGuider", model=["4", 0], conditioning=["35", 0])
    graph["30"] = node(
        "ModelSamplingFlux", max_shift=1.15, base_shift=0.5, width=1536, height=1152, model=["4", 0]
    )
    graph["18"] = node("BasicScheduler", scheduler="simple", steps=10, denoise=1.0, model=["30", 0])
    graph["60"] = node(
        "SamplerCustomAdvanced",
        noise=["25", 0],
        guider=["22", 0],
        sampler=["16", 0],
        sigmas=["18", 0],
        latent_image=["50", 0],
    )
    got = comfy(graph)
    assert got.values["hires_strength"] == 1.0  # denoise 1: from pure noise
    assert "second pass shifts" not in joined(got.notices)  # at its own size, as pictor's hires pass
