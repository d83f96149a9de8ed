"""`pictor generate --settings-from IMAGE` for ComfyUI's own PNGs: the API graph in their `prompt` chunk read
for the saved picture's prompt, seed, steps, guidance, sampler, scheduler and size (`pictor.comfy_workflow`,
mapped in `pictor.settings_import`), what is not taken said aloud, and damaged graphs refused."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from pictor.cli import main
from pictor.comfy_graph import ComfyGraph
from pictor.comfy_prompt_weights import comfy_prompt_as_a1111
from pictor.loading import pipeline_from_preset
from pictor.pipeline import GenerationRequest
from pictor.prompt_weights import parse_weights
from pictor.provenance import read_record
from pictor.settings_import import (
    SettingsImportError,
    settings_from_chunks,
    settings_from_comfy,
    settings_from_image,
)

Graph = dict[str, dict[str, Any]]


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": class_type}}


def flux_ksampler_graph() -> Graph:
    """ComfyUI's FLUX.1 [dev] example as its API graph: KSampler at CFG 1, FluxGuidance, a zeroed negative."""
    return {
        "4": node("CheckpointLoaderSimple", ckpt_name="flux1-dev-fp8.safetensors"),
        "6": node("CLIPTextEncode", text="a (red:1.2) circle [left] of a blue square", clip=["4", 1]),
        "7": node("ConditioningZeroOut", conditioning=["6", 0]),
        "35": node("FluxGuidance", guidance=3.5, conditioning=["6", 0]),
        "27": node("EmptySD3LatentImage", width=64, height=48, batch_size=1),
        "3": node(
            "KSampler",
            seed=42,
            steps=12,
            cfg=1.0,
            sampler_name="dpmpp_2m",
            scheduler="karras",
            denoise=1.0,
            model=["4", 0],
            positive=["35", 0],
            negative=["7", 0],
            latent_image=["27", 0],
        ),
        "8": node("VAEDecode", samples=["3", 0], vae=["4", 2]),
        "9": node("SaveImage", filename_prefix="ComfyUI", images=["8", 0]),
    }


def flux_custom_graph() -> Graph:
    """ComfyUI's FLUX.1 [dev] example with SamplerCustomAdvanced, and UNet, text encoder and VAE files."""
    return {
        "6": node("CLIPTextEncode", text="a harbour at dusk", clip=["11", 0]),
        "8": node("VAEDecode", samples=["13", 0], vae=["10", 0]),
        "9": node("SaveImage", filename_prefix="ComfyUI", images=["8", 0]),
        "10": node("VAELoader", vae_name="ae.safetensors"),
        "11": node(
            "DualCLIPLoader",
            clip_name1="t5xxl_fp16.safetensors",
            clip_name2="clip_l.safetensors",
            type="flux",
        ),
        "12": node("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default"),
        "13": node(
            "SamplerCustomAdvanced",
            noise=["25", 0],
            guider=["22", 0],
            sampler=["16", 0],
            sigmas=["17", 0],
            latent_image=["27", 0],
        ),
        "16": node("KSamplerSelect", sampler_name="uni_pc_bh2"),
        "17": node("BasicScheduler", scheduler="beta", steps=20, denoise=1.0, model=["30", 0]),
        "22": node("BasicGuider", model=["30", 0], conditioning=["26", 0]),
        "25": node("RandomNoise", noise_seed=219670278747233),
        "26": node("FluxGuidance", guidance=2.5, conditioning=["6", 0]),
        "27": node("EmptySD3LatentImage", width=1024, height=768, batch_size=1),
        "30": node(
            "ModelSamplingFlux", max_shift=1.15, base_shift=0.5, width=1024, height=768, model=["12", 0]
        ),
    }


def comfy_png(path: Path, graph: Graph | str, parameters: str | None = None) -> Path:
    """A PNG as ComfyUI's SaveImage writes it: the API graph as `prompt`, the editor's graph as `workflow`."""
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", graph if isinstance(graph, str) else json.dumps(graph))
    info.add_text("workflow", json.dumps({"nodes": [], "links": [], "version": 0.4}))
    if parameters is not None:
        info.add_itxt("parameters", parameters)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def comfy(graph: Graph) -> Any:
    return settings_from_comfy(json.dumps(graph))


def test_a_flux_ksampler_graph_gives_its_settings(tmp_path: Path) -> None:
    got = settings_from_image(comfy_png(tmp_path / "comfy.png", flux_ksampler_graph()))
    assert got.source == "comfyui"
    assert got.values == {
        "prompt": "a (red:1.2) circle \\[left\\] of a blue square",  # [ ] are text to ComfyUI
        "negative": "",  # ConditioningZeroOut
        "prompt_weights": True,  # ComfyUI, like A1111, always reads its brackets
        "steps": 12,
        "seed": 42,
        "guidance": 3.5,  # FluxGuidance, not the KSampler's CFG 1
        "size": (64, 48),
        "sampler": "dpmpp_2m",
        "schedule": "karras",
    }
    assert got.notices[0] == (
        "the image was made by model 'flux1-dev-fp8.safetensors'; this run uses the one you load (--model)"
    )
    assert got.notices[1].startswith("the graph's scheduler karras is taken as pictor's karras schedule")
    assert got.notices[2].startswith("the graph has no ModelSamplingFlux node")  # 64x48, not 1024x1024
    assert len(got.notices) == 3


def test_without_flux_guidance_the_cfg_is_the_guidance_and_with_it_a_real_cfg_is_said() -> None:
    graph = flux_ksampler_graph()
    graph["7"] = node("CLIPTextEncode", text="blurry", clip=["4", 1])
    graph["3"]["inputs"] |= {"positive": ["6", 0], "cfg": 7.0}
    got = comfy(graph)
    assert (got.values["guidance"], got.values["negative"]) == (7.0, "blurry")  # as A1111's CFG scale
    graph["3"]["inputs"]["positive"] = ["35", 0]
    got = comfy(graph)
    assert (got.values["guidance"], got.values["negative"]) == (3.5, "")
    notices = " | ".join(got.notices)
    assert "sampler's CFG 7 (real CFG on top, which pictor does not run beside distilled guidance)" in notices
    assert "negative prompt 'blurry' is not taken: it acts through the sampler's CFG 7" in notices


def test_a_sampler_custom_advanced_graph_gives_its_settings() -> None:
    got = comfy(flux_custom_graph())
    assert got.values == {
        "prompt": "a harbour at dusk",
        "negative": "",  # BasicGuider: no negative
        "prompt_weights": True,
        "steps": 20,
        "seed": 219670278747233,
        "guidance": 2.5,
        "size": (1024, 768),
        "sampler": "unipc",
        "schedule": "beta",
    }
    # the files named together, and ModelSamplingFlux at its defaults is pictor's own FLUX.1 shift: quiet
    assert got.notices == [
        "the image was made by model 'flux1-dev.safetensors' (with 'ae.safetensors', "
        "'t5xxl_fp16.safetensors', 'clip_l.safetensors'); this run uses the one you load (--model)",
        "the graph's sampler uni_pc_bh2 is taken as pictor's unipc, which differs in detail: ComfyUI runs "
        "UniPC at order 3 (and its KSampler drops the second-to-last step for it), where pictor's unipc is "
        "bh2 at order 2",
        "the graph's scheduler beta is taken as pictor's beta schedule, which differs: ComfyUI's beta spaces "
        "its table of the model's sigmas, pictor's spaces diffusers' FLUX.1 sigmas (the last before 0 at the "
        "shifted 1/N): the steps differ",
    ]


def test_advanced_and_custom_samplers_give_their_seed_and_say_what_they_leave() -> None:
    graph = flux_ksampler_graph()
    inputs = {k: v for k, v in graph["3"]["inputs"].items() if k not in ("seed", "denoise")}
    graph["3"] = node(
        "KSamplerAdvanced",
        **inputs,
        add_noise="enable",
        noise_seed=2**64 - 5,  # ComfyUI's seeds run to 2**64 - 1
        start_at_step=0,
        end_at_step=8,
        return_with_leftover_noise="disable",
    )
    graph["27"]["inputs"]["batch_size"] = 4
    graph["3"]["inputs"]["scheduler"] = "ddim_uniform"
    got = comfy(graph)
    assert got.values["seed"] == (2**64 - 5) % 2**32 and "schedule" not in got.values
    notices = " | ".join(got.notices)
    assert "runs steps 0 to 8 of 12, which pictor does not" in notices
    assert "its low 32 bits, draws the same noise in torch's generator" in notices
    assert "scheduler 'ddim_uniform' has no pictor equivalent: the model's own is used" in notices
    assert "the graph drew a batch of 4 from one seed" in notices
    custom = flux_custom_graph()
    custom["13"] = node(
        "SamplerCustom",
        model=["30", 0],
        add_noise=True,
        noise_seed=11,
        cfg=3.0,
        positive=["6", 0],
        negative=["6", 0],
        sampler=["16", 0],
        sigmas=["17", 0],
        latent_image=["27", 0],
    )
    v = comfy(custom).values
    assert (v["seed"], v["guidance"], v["negative"], v["steps"]) == (11, 3.0, "a harbour at dusk", 20)


def test_a_cfg_guider_graph_gives_its_negative_and_cfg_and_names_what_it_leaves() -> None:
    graph = flux_custom_graph()
    graph["22"] = node("CFGGuider", model=["30", 0], positive=["6", 0], negative=["40", 0], cfg=4.5)
    graph["40"] = node("CLIPTextEncode", text="blurry, (text:1.3)", clip=["11", 0])
    graph["30"]["inputs"]["max_shift"] = 2.0  # not FLUX.1's own shift any more
    graph["16"] = node("KSamplerSelect", sampler_name="uni_pc")
    graph["17"]["inputs"]["scheduler"] = "simple"
    got = comfy(graph)
    v = got.values
    assert (v["negative"], v["guidance"], v["sampler"]) == ("blurry, (text:1.3)", 4.5, "unipc")
    assert "schedule" not in v  # simple: the model's own schedule, pictor's default, so nothing to say
    assert not any("scheduler" in n for n in got.notices)
    notices = " | ".join(got.notices)
    assert "uni_pc is UniPC's bh1 variant; pictor's unipc (bh2) is taken" in notices
    assert (
        "ModelSamplingFlux (node 30) shifts the schedule (max_shift 2, base_shift 0.5, width 1024, height "
        "768) other than FLUX.1's own"
    ) in notices
    assert "not taken (no" not in notices  # said once, with its values


def test_loras_in_the_model_chain_are_named_with_their_strengths() -> None:
    graph = flux_ksampler_graph()
    graph["10"] = node(
        "LoraLoader", lora_name="style_v2.safetensors", strength_model=0.8, strength_clip=1.0, model=["4", 0]
    )
    graph["10"]["inputs"]["clip"] = ["4", 1]
    graph["11"] = node(
        "LoraLoaderModelOnly", lora_name="detail.safetensors", strength_model=0.5, model=["10", 0]
    )
    graph["3"]["inputs"]["model"] = ["11", 0]
    graph["6"]["inputs"]["clip"] = ["10", 1]
    got = comfy(graph)
    assert (
        "the graph's LoRAs (style_v2.safetensors: model 0.8, text encoder 1, detail.safetensors:0.5) are "
        "not taken: give the files with --lora FILE:SCALE"
    ) in got.notices
    assert not any(n.startswith("not taken") for n in got.notices)  # said once, with their strengths


def test_text_and_seed_through_primitive_nodes_are_followed_and_worked_out_text_is_said() -> None:
    graph = flux_ksampler_graph()
    graph["40"] = node("PrimitiveStringMultiline", value="a lighthouse (at night)")
    graph["41"] = node("PrimitiveInt", value=7)
    graph["42"] = node("StringConcatenate", string_a="ugly", string_b=["40", 0], delimiter=", ")
    graph["43"] = node("CLIPTextEncode", text=["42", 0], clip=["4", 1])
    graph["6"]["inputs"]["text"] = ["40", 0]
    graph["3"]["inputs"] |= {"seed": ["41", 0], "negative": ["43", 0]}
    got = comfy(graph)
    assert got.values["prompt"] == "a lighthouse (at night:1.1)" and got.values["seed"] == 7
    assert got.values["negative"] == ""
    assert (
        "CLIPTextEncode (node 43)'s text comes from StringConcatenate (node 42), which is not a plain value: "
        "not taken"
    ) in got.notices
    assert not any(n.startswith("not taken (no") for n in got.notices)  # each said once


def test_several_samplers_the_one_that_made_the_saved_picture_is_taken() -> None:
    """A two-pass graph (a hires fix by hand) saves the second pass and previews the first."""
    graph = flux_ksampler_graph()
    graph["50"] = node("LatentUpscaleBy", upscale_method="nearest-exact", scale_by=1.5, samples=["3", 0])
    graph["51"] = node(
        "KSampler",
        **{**graph["3"]["inputs"], "seed": 2, "steps": 5, "denoise": 0.5, "latent_image": ["50", 0]},
    )
    graph["8"]["inputs"]["samples"] = ["51", 0]
    graph["52"] = node("VAEDecode", samples=["3", 0], vae=["4", 2])
    graph["53"] = node("PreviewImage", images=["52", 0])
    # a hires fix: its first pass's settings, the second as --hires (tests/test_comfy_hires_import.py)
    got = comfy(graph)
    assert (got.values["seed"], got.values["steps"], got.values["hires"]) == (42, 12, 1.5)
    # through a node the hires reading does not know, only the last pass is taken, as before
    graph["50"] = node("LatentSharpen", sharpen_radius=1, samples=["3", 0])
    got = comfy(graph)
    assert (got.values["seed"], got.values["steps"]) == (2, 5) and "size" not in got.values
    notices = " | ".join(got.notices)
    assert "starts from another sampler's output (through LatentSharpen (node 50))" in notices
    assert "KSampler (node 51) denoises 0.5 of the way" in notices
    assert (
        "not taken (no pictor equivalent, or given another way): KSampler (node 3), EmptySD3LatentImage"
        in notices
    )
    assert "samplers" not in notices  # a preview is not a saved picture: no doubt which sampler made it
    # both passes saved: this file may be either, and the last pass is taken, with a notice
    graph["53"] = node("SaveImage", filename_prefix="first", images=["52", 0])
    got = comfy(graph)
    assert got.values["seed"] == 2
    assert (
        "the graph's pictures come from 2 samplers (KSampler (node 3), KSampler (node 51)); the settings of "
        "KSampler (node 51) (the last pass) are taken"
    ) in got.notices


def test_two_final_samplers_the_first_by_node_id_is_taken_and_said() -> None:
    graph = flux_ksampler_graph()
    graph["10"] = node("KSampler", **{**graph["3"]["inputs"], "seed": 99})
    graph["11"] = node("VAEDecode", samples=["10", 0], vae=["4", 2])
    graph["12"] = node("SaveImage", filename_prefix="other", images=["11", 0])
    got = comfy(graph)
    assert got.values["seed"] == 42  # node 3 comes before node 10 (by number, not as text)
    assert (
        "the graph's pictures come from 2 samplers (KSampler (node 3), KSampler (node 10)); the settings of "
        "KSampler (node 3) (of the last passes, the first by node id) are taken"
    ) in got.notices
    for saver in ("9", "12"):  # without a saved picture, the samplers that feed no other are the last
        del graph[saver]
    assert comfy(graph).values["seed"] == 42


def test_flux_text_controlnets_and_a_pass_without_noise_are_read() -> None:
    graph = flux_ksampler_graph()
    graph["6"] = node(
        "CLIPTextEncodeFlux", clip_l="harbour, dusk", t5xxl="a harbour at dusk", guidance=4.0, clip=["4", 1]
    )
    graph["36"] = node("FluxGuidance", guidance=2.0, conditioning=["35", 0])  # the last applied wins
    graph["7"] = node("CLIPTextEncode", text="fog", clip=["4", 1])
    graph["60"] = node("ControlNetLoader", control_net_name="canny.safetensors")
    graph["61"] = node("LoadImage", image="edges.png")
    graph["62"] = node(
        "ControlNetApplyAdvanced",
        positive=["36", 0],
        negative=["7", 0],
        control_net=["60", 0],
        image=["61", 0],
        strength=0.7,
        start_percent=0.0,
        end_percent=1.0,
    )
    graph["3"]["inputs"] |= {"positive": ["62", 0], "negative": ["62", 1]}
    got = comfy(graph)
    assert (got.values["prompt"], got.values["negative"], got.values["guidance"]) == (
        "a harbour at dusk",
        "",  # followed through the ControlNet's second output, and not used at CFG 1
        2.0,
    )
    notices = " | ".join(got.notices)
    assert "the graph's negative prompt 'fog' is not taken: ComfyUI does not use it at CFG 1" in notices
    assert "CLIP-L text differs from its T5 text, which is taken as the prompt: 'harbour, dusk'" in notices
    assert "ControlNetLoader (node 60), LoadImage (node 61), ControlNetApplyAdvanced (node 62)" in notices
    del graph["35"], graph["36"]
    graph["62"]["inputs"]["positive"] = ["6", 0]
    assert comfy(graph).values["guidance"] == 4.0  # CLIPTextEncodeFlux's own
    inputs = {k: v for k, v in graph["3"]["inputs"].items() if k not in ("seed", "denoise")}
    graph["3"] = node("KSamplerAdvanced", **inputs, add_noise="disable", noise_seed=5, start_at_step=0)
    got = comfy(graph)
    assert "seed" not in got.values
    assert "KSamplerAdvanced (node 3) adds no noise (a later pass): its seed is not taken" in got.notices


def test_an_img2img_graph_says_its_picture_is_not_taken() -> None:
    graph = flux_ksampler_graph()
    graph["20"] = node("LoadImage", image="photo.png", upload="image")
    graph["21"] = node("VAEEncode", pixels=["20", 0], vae=["4", 2])
    graph["3"]["inputs"] |= {"latent_image": ["21", 0], "denoise": 0.6}
    del graph["27"]
    got = comfy(graph)
    assert "size" not in got.values and got.values["seed"] == 42
    notices = " | ".join(got.notices)
    assert "an edit (img2img) of another picture ('photo.png', through VAEEncode (node 21))" in notices
    assert "pictor edit takes one" in notices and "denoises 0.6" in notices
    assert "not taken (no" not in notices  # the picture's nodes are said once


def test_comfyui_weights_are_written_so_that_pictor_reads_the_same_pieces() -> None:
    assert comfy_prompt_as_a1111("a (red:1.2) circle") == "a (red:1.2) circle"
    assert comfy_prompt_as_a1111("[left] \\(x\\) a\\b (open") == "\\[left\\] \\(x\\) a\\\\b \\(open"
    assert comfy_prompt_as_a1111("((red:1.5))") == "(red:1.5)"  # ComfyUI: the written weight replaces
    cases = {
        "a (b (c) d) e": [("a ", 1.0), ("b ", 1.1), ("c", 1.21), (" d", 1.1), (" e", 1.0)],
        "(style: ink) (x:0.5) y": [("style: ink", 1.1), (" ", 1.0), ("x", 0.5), (" y", 1.0)],
        "[a] \\(b\\) c)": [("[a] (b) c)", 1.0)],
    }
    for prompt, pieces in cases.items():
        read = parse_weights(comfy_prompt_as_a1111(prompt)).pieces
        assert [(t, round(w, 6)) for t, w in read] == pieces, prompt


def test_an_unknown_sampler_is_refused_unless_the_command_line_gives_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = flux_ksampler_graph()
    graph["27"]["inputs"] |= {"width": 32, "height": 32}
    graph["3"]["inputs"] |= {"steps": 2, "sampler_name": "dpm_adaptive"}
    png = comfy_png(tmp_path / "sde.png", graph)
    assert comfy(graph).sampler_name == "dpm_adaptive"
    base = ["generate", "--settings-from", str(png), "--model", "tiny"]
    assert main([*base, "-o", str(tmp_path / "a")]) == 2
    assert (
        "sampler 'dpm_adaptive' has no pictor equivalent; choose one with --sampler"
        in capsys.readouterr().err
    )
    assert main([*base, "--sampler", "heun", "-o", str(tmp_path / "b")]) == 0
    record = read_record(Path(capsys.readouterr().out.split()[0]))
    assert record["sampler"] == "heun" and record["seed"] == 42 and record["steps"] == 2


def test_a_comfyui_image_is_generated_from_with_its_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = flux_ksampler_graph()
    graph["27"]["inputs"] |= {"width": 32, "height": 32}
    graph["3"]["inputs"] |= {"steps": 2, "seed": 5, "sampler_name": "euler"}
    graph["10"] = node(
        "LoraLoaderModelOnly", lora_name="style.safetensors", strength_model=0.7, model=["4", 0]
    )
    graph["3"]["inputs"]["model"] = ["10", 0]
    png = comfy_png(tmp_path / "comfy.png", graph)
    assert main(["generate", "--settings-from", str(png), "--model", "tiny", "-o", str(tmp_path / "o")]) == 0
    out = capsys.readouterr()
    record = read_record(Path(out.out.split()[0]))
    assert record["prompt"] == "a (red:1.2) circle \\[left\\] of a blue square" and record["prompt_weights"]
    assert (record["seed"], record["steps"], record["sampler"], record["schedule"]) == (
        5,
        2,
        "euler",
        "karras",
    )
    assert (record["width"], record["height"], record["guidance"]) == (32, 32, 3.5)
    assert "LoRAs (style.safetensors:0.7) are not taken" in out.err  # the notices, on stderr
    assert "model 'flux1-dev-fp8.safetensors'" in out.err


def test_a1111_text_beside_a_graph_is_read_first(tmp_path: Path) -> None:
    text = "a green star\nSteps: 3, Sampler: Euler, CFG scale: 2, Seed: 8, Size: 32x32"
    got = settings_from_image(comfy_png(tmp_path / "both.png", flux_ksampler_graph(), parameters=text))
    assert got.source == "a1111" and got.values["prompt"] == "a green star" and got.values["seed"] == 8
    record = json.dumps({"prompt": "a record", "steps": 1})
    chunks = {"pictor": record, "parameters": text, "prompt": json.dumps(flux_ksampler_graph())}
    assert settings_from_chunks(chunks).values["prompt"] == "a record"


@pytest.mark.parametrize(
    ("chunk", "message"),
    [
        ('{"3": {"class_type": "KSampler", ', "it is not valid JSON (Expecting"),
        ("a cat on a mat", "it is not valid JSON"),
        ('["KSampler"]', "it is JSON list, not ComfyUI's {node id: node} graph"),
        ('{"3": {"inputs": {}}}', "its node 3 has no class_type"),
    ],
)
def test_a_damaged_graph_is_refused_naming_the_image(tmp_path: Path, chunk: str, message: str) -> None:
    png = comfy_png(tmp_path / "bad.png", chunk)
    with pytest.raises(SettingsImportError) as caught:
        settings_from_image(png)
    assert str(caught.value).startswith(f"{png}: its ComfyUI graph (the 'prompt' chunk): ")
    assert message in str(caught.value)


def test_a_graph_without_a_sampler_or_with_an_unreadable_value_is_refused() -> None:
    no_sampler = {"1": node("LoadImage", image="x.png"), "2": node("SaveImage", images=["1", 0])}
    with pytest.raises(SettingsImportError, match=r"has no sampler node \(KSampler, KSamplerAdvanced"):
        settings_from_chunks({"prompt": json.dumps(no_sampler)})
    other = {**no_sampler, "3": node("KSampler (Efficient)", seed=1)}
    with pytest.raises(
        SettingsImportError, match=r"it has KSampler \(Efficient\), which pictor does not read"
    ):
        settings_from_chunks({"prompt": json.dumps(other)})
    graph = flux_ksampler_graph()
    graph["3"]["inputs"]["steps"] = "many"
    with pytest.raises(SettingsImportError, match="its KSampler \\(node 3\\)'s steps is 'many', not a whole"):
        settings_from_chunks({"prompt": json.dumps(graph)})
    graph = copy.deepcopy(flux_ksampler_graph())
    graph["3"]["inputs"]["positive"] = ["77", 0]
    with pytest.raises(SettingsImportError, match="a link leads to node 77, which the graph does not have"):
        settings_from_chunks({"prompt": json.dumps(graph)})


def settings_error(graph: Graph | str) -> SettingsImportError:
    """The error a graph (or a `prompt` chunk's text) is refused with."""
    text = graph if isinstance(graph, str) else json.dumps(graph)
    with pytest.raises(SettingsImportError) as caught:
        settings_from_chunks({"prompt": text})
    return caught.value


def test_json_nested_too_deep_and_numbers_too_long_are_refused_not_raised() -> None:
    """json.loads raises RecursionError on arrays nested thousands deep and ValueError on a number of more
    than 4,300 digits: both are a damaged graph, said so (a traceback in the CLI, a 500 in the server)."""
    for chunk in ("[" * 5000 + "]" * 5000, '{"a": ' * 5000 + "1" + "}" * 5000):
        error = settings_error(chunk)
        assert "its JSON nests too deep to read" in str(error) and error.__cause__ is None
    error = settings_error('{"3": {"class_type": "KSampler", "inputs": {"seed": ' + "1" * 5000 + "}}}")
    assert "it is not ComfyUI's graph: Exceeds the limit" in str(error)


def test_node_ids_of_any_length_or_digits_are_ordered_and_named_short() -> None:
    """Ids are ordered by number without becoming one (a 5000-digit id, a superscript digit) and cut short
    where a notice names them."""
    graph = flux_ksampler_graph()
    long_id = "1" * 5000
    graph[long_id] = node("KSampler", **{**graph["3"]["inputs"], "seed": 99})
    graph["11"] = node("VAEDecode", samples=[long_id, 0], vae=["4", 2])
    graph["12"] = node("SaveImage", filename_prefix="other", images=["11", 0])
    graph["²"] = node("LoraLoaderModelOnly", lora_name="x.safetensors", strength_model=1, model=["4", 0])
    graph["3"]["inputs"]["model"] = ["²", 0]
    got = comfy(graph)
    assert got.values["seed"] == 42  # node 3 comes first: a number of one digit before one of 5000
    assert any("LoRAs (x.safetensors:1)" in n for n in got.notices)  # "²" ordered with the rest, as text
    (said,) = [n for n in got.notices if n.startswith("the graph's pictures come from 2 samplers")]
    assert f"KSampler (node 3), KSampler (node {'1' * 77}...)" in said and len(said) < 300


def test_a_graph_no_rule_foresaw_is_refused_naming_the_image_with_its_cause_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last guard: an unexpected exception while reading the graph is a SettingsImportError naming the
    image, with the exception as its cause (so a bug still shows its traceback)."""
    import pictor.comfy_settings_import as comfy_settings_import

    def broken(text: str) -> Any:
        raise KeyError("class_type")

    monkeypatch.setattr(comfy_settings_import, "read_comfy_graph", broken)
    with pytest.raises(SettingsImportError) as caught:
        settings_from_chunks({"prompt": json.dumps(flux_ksampler_graph())}, "x.png")
    assert str(caught.value) == (
        "x.png: its ComfyUI graph (the 'prompt' chunk) could not be read (KeyError: 'class_type')"
    )
    assert isinstance(caught.value.__cause__, KeyError)


def hostile_graphs() -> dict[str, Graph | str]:
    """Damaged and odd graphs: each must give settings or a SettingsImportError of its own (never the last
    guard's, which would be a bug)."""
    cases: dict[str, Graph | str] = {}

    def change(name: str, node_id: str, **inputs: Any) -> None:
        graph = flux_ksampler_graph()
        graph[node_id]["inputs"] |= inputs
        cases[name] = graph

    change("a self link", "3", positive=["3", 0])
    change("a latent from the sampler itself", "3", latent_image=["3", 0])
    change("a seed from the sampler itself", "3", seed=["3", 0])
    change("a link of three", "3", positive=["6", 0, 1])
    change("a link from null", "3", positive=[None, 0])
    change("a link to a link", "3", positive=[["6", 0], 0])
    change("a deeply nested input", "3", extra=json.loads("[" * 900 + "]" * 900))
    change("a huge steps", "3", steps=1e308)
    change("a prompt of brackets", "6", text="(" * 3000 + ")" * 2999 + "((:" + "]" * 50)
    for name, node_id in (("a null node", "3"), ("a text node", "6")):
        graph = flux_ksampler_graph()
        graph[node_id] = None  # type: ignore[assignment]
        cases[name] = graph
    loop = flux_ksampler_graph()  # two samplers feeding each other, both saved: no last pass
    loop["10"] = node("KSampler", **{**loop["3"]["inputs"], "latent_image": ["3", 0]})
    loop["3"]["inputs"]["latent_image"] = ["10", 0]
    loop["11"] = node("SaveImage", images=["10", 0])
    cases["samplers in a loop"] = loop
    conditioning = flux_ksampler_graph()
    conditioning["6"] = node("ConditioningCombine", conditioning=["40", 0])
    conditioning["40"] = node("ConditioningSetArea", conditioning=["6", 0])
    cases["a conditioning loop"] = conditioning
    cases["no nodes"] = {}
    cases["a list"] = "[1, 2]"
    return cases


@pytest.mark.parametrize("name", list(hostile_graphs()))
def test_damaged_graphs_give_settings_or_their_own_error(name: str) -> None:
    graph = hostile_graphs()[name]
    try:
        settings_from_chunks({"prompt": graph if isinstance(graph, str) else json.dumps(graph)})
    except SettingsImportError as exc:
        assert exc.__cause__ is None, f"{name}: the last guard caught {exc.__cause__!r}"
        assert "could not be read" not in str(exc)


def test_a_sampler_that_feeds_only_itself_through_a_loop_is_still_the_last_pass() -> None:
    """A damaged graph where the second pass also draws on its own output: it feeds no other sampler, so it
    is the last pass (a loop back to itself does not count as feeding another)."""
    graph = flux_ksampler_graph()
    graph["10"] = node("KSampler", **{**graph["3"]["inputs"], "seed": 99, "latent_image": ["11", 0]})
    graph["11"] = node("LatentBlend", samples1=["3", 0], samples2=["10", 0], blend_factor=0.5)
    graph["12"] = node("VAEDecode", samples=["10", 0], vae=["4", 2])
    graph["13"] = node("SaveImage", filename_prefix="second", images=["12", 0])
    graph["5"] = node("VAEDecode", samples=["3", 0], vae=["4", 2])
    graph["9"]["inputs"]["images"] = ["5", 0]
    got = comfy(graph)
    assert got.values["seed"] == 99
    assert "the settings of KSampler (node 10) (the last pass) are taken" in " ".join(got.notices)


def saver_chain(length: int) -> Graph:
    """A picture through `length` image nodes, saved by `length` savers at the end of the chain."""
    graph = flux_ksampler_graph()
    before = "8"
    for i in range(length):
        graph[f"u{i}"] = node("ImageScale", image=[before, 0])
        before = f"u{i}"
    for i in range(length):
        graph[f"s{i}"] = node("SaveImage", images=[before, 0])
    return graph


def test_many_savers_on_a_long_chain_are_read_in_linear_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each saver's path was walked and kept on its own (6000 savers on a chain of 6000: 42 s and 1.8 GB);
    each question is now one walk over the graph, so the links looked up grow with the graph, not with its
    square. A graph beyond 10,000 nodes is refused."""
    looked_up = 0
    sources = ComfyGraph.sources

    def counted(graph: ComfyGraph, node_id: str) -> list[str]:
        nonlocal looked_up
        looked_up += 1
        return sources(graph, node_id)

    monkeypatch.setattr(ComfyGraph, "sources", counted)
    graph = saver_chain(2500)
    start = time.perf_counter()
    got = settings_from_chunks({"prompt": json.dumps(graph)})
    assert time.perf_counter() - start < 5.0  # about 0.1 s; walked per saver, about 7 s
    assert looked_up < 20 * len(graph)  # about 15,000; walked per saver, millions
    assert got.values["seed"] == 42
    (left,) = [n for n in got.notices if n.startswith("not taken (no")]
    assert left.endswith("and 2,480 more nodes") and "ImageScale (node u0)" in left  # a list cut short
    error = settings_error(saver_chain(5000))
    assert "it has 10,008 nodes, more than the 10,000 pictor reads" in str(error)


def test_a_long_prompt_deeply_nested_is_rewritten_in_linear_time() -> None:
    """ComfyUI reads a group's inside again at each depth; read that way a long prompt deep in brackets
    took seconds (1 MB at depth 60: 6.6 s). Here each character is read once, at any depth."""
    prompt = "(" * 2000 + "a " * 100_000 + ":1.5" + ")" * 2000
    start = time.perf_counter()
    written = comfy_prompt_as_a1111(prompt)
    assert time.perf_counter() - start < 2.0
    assert written == "(" + "a " * 100_000 + ":1.5)"  # the explicit weight replaces the 2000 around it


def comfy_reading(text: str) -> list[tuple[str, float]]:
    """ComfyUI's own reading of prompt weights (comfy/sd1_clip.py's token_weights, recursive), each
    character with its weight: the reference `comfy_prompt_as_a1111` is checked against."""
    assert "\ue000" not in text and "\ue001" not in text

    def groups(string: str) -> list[str]:
        found, current, depth = [], "", 0
        for char in string:
            if char == "(" and depth == 0:
                if current:
                    found.append(current)
                current = "("
                depth += 1
            elif char == ")":
                depth -= 1
                if depth == 0:
                    found.append(current + ")")
                    current = ""
                else:
                    current += char
            else:
                depth += char == "("
                current += char
        return [*found, current] if current else found

    def weigh(string: str, weight: float) -> list[tuple[str, float]]:
        pieces: list[tuple[str, float]] = []
        for group in groups(string):
            if not (len(group) >= 2 and group[0] == "(" and group[-1] == ")"):
                pieces.append((group, weight))
                continue
            inside, inner = group[1:-1], weight * 1.1
            colon = inside.rfind(":")
            if colon > 0:
                with contextlib.suppress(ValueError):  # "(a:b)": text weighed 1.1
                    inner, inside = float(inside[colon + 1 :]), inside[:colon]
            pieces.extend(weigh(inside, inner))
        return pieces

    hidden = text.replace("\\)", "\ue000").replace("\\(", "\ue001")
    return [
        (char.replace("\ue000", ")").replace("\ue001", "("), weight)
        for piece, weight in weigh(hidden, 1.0)
        for char in piece
    ]


def test_comfyui_weights_are_read_as_comfyui_reads_them_at_any_depth() -> None:
    """Random prompts of brackets, weights, escapes and text: pictor reads the rewritten prompt with
    ComfyUI's weights, character by character (to the 4 places weights are written with)."""
    words = ["(", ")", "(", ")", "a", "b ", ":", ":1.5", ":0.5", ": 2 ", ":1_2", "\\(", "\\)", "[", "]", "\\"]
    words += ["1e-1", "\x00", "\x01", "nan"]
    rng = random.Random(7)
    checked = 0
    for _ in range(3000):
        text = "".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
        expected = comfy_reading(text)
        if not all(math.isfinite(w) and abs(w) <= 10 for _, w in expected):
            continue
        pieces = parse_weights(comfy_prompt_as_a1111(text)).pieces
        read = [(char, weight) for piece, weight in pieces for char in piece]
        assert [c for c, _ in read] == [c for c, _ in expected], text
        assert all(abs(w - v) < 1e-4 for (_, w), (_, v) in zip(read, expected, strict=True)), text
        checked += 1
    assert checked > 2000


def test_weights_beyond_pictors_range_are_taken_as_10_and_others_not_numbers_refused() -> None:
    """pictor reads weights in [-10, 10]: ComfyUI's (red:12), or 26 brackets deep (1.1**26 = 11.9), is
    taken as 10 with a notice, not written as a number pictor then refuses; inf and nan weights are refused.
    Control characters stay themselves, and brackets nest as deep as ComfyUI reads them."""
    notices: list[str] = []
    assert comfy_prompt_as_a1111("a (red:12) (b:-15)", notices) == "a (red:10) (b:-10)"
    assert notices == [
        "the prompt weighs 'red' 12, 'b' -15 in ComfyUI, beyond pictor's [-10, 10]: taken as 10 (or -10)"
    ]
    graph = flux_ksampler_graph()
    graph["6"]["inputs"]["text"] = "(" * 26 + "red" + ")" * 26
    got = comfy(graph)
    assert got.values["prompt"] == "(red:10)"
    assert "the prompt weighs 'red' 11.9182 in ComfyUI, beyond pictor's [-10, 10]" in " ".join(got.notices)
    parse_weights(got.values["prompt"])
    deep = "(" * 8000 + "x" + ")" * 8000  # 1.1**8000 is beyond a float
    for text, said in (("(red:inf) x", "'red' inf"), ("(red:nan)", "'red' nan"), (deep, "'x' inf")):
        graph["6"]["inputs"]["text"] = text
        assert f"its prompt weighs {said}, not a finite weight" in str(settings_error(graph))
    assert parse_weights(comfy_prompt_as_a1111("a\x00b\x01c (d)")).text == "a\x00b\x01c d"
    assert comfy_prompt_as_a1111("(" * 500 + "red:1.5" + ")" * 500) == "(red:1.5)"  # no depth limit


def schnell_graph() -> Graph:
    """ComfyUI's FLUX.1 [schnell] checkpoint example: KSampler at CFG 1, no FluxGuidance, empty negative."""
    return {
        "4": node("CheckpointLoaderSimple", ckpt_name="flux1-schnell-fp8.safetensors"),
        "6": node("CLIPTextEncode", text="a fox", clip=["4", 1]),
        "33": node("CLIPTextEncode", text="", clip=["4", 1]),
        "27": node("EmptySD3LatentImage", width=32, height=32, batch_size=1),
        "31": node(
            "KSampler",
            seed=972054013131368,
            steps=1,
            cfg=1.0,
            sampler_name="euler",
            scheduler="simple",
            denoise=1.0,
            model=["4", 0],
            positive=["6", 0],
            negative=["33", 0],
            latent_image=["27", 0],
        ),
        "8": node("VAEDecode", samples=["31", 0], vae=["4", 2]),
        "9": node("SaveImage", filename_prefix="ComfyUI", images=["8", 0]),
    }


def request_of(values: dict[str, Any]) -> GenerationRequest:
    """The imported settings as a generation request (as `pictor generate --settings-from` makes it)."""
    width, height = values.get("size", (None, None))
    fields = {"negative": "negative_prompt", "steps": "steps", "seed": "seed", "guidance": "guidance"}
    fields |= {"sampler": "sampler", "schedule": "schedule", "prompt_weights": "prompt_weights"}
    taken = {field: values[key] for key, field in fields.items() if key in values}
    return GenerationRequest(values["prompt"], width=width, height=height, **taken)


def test_at_cfg_1_no_negative_and_no_guidance_comfyui_did_not_use_are_taken() -> None:
    """At CFG 1 ComfyUI never reads the negative (comfy/samplers.py), and without FluxGuidance a FLUX.1
    model gets its default guidance 3.5 (comfy/model_base.py), not the CFG: neither is taken, so ComfyUI's
    schnell example runs on a model without guidance, and a [dev] graph with a leftover negative on one with
    distilled guidance, where both were refused."""
    got = comfy(schnell_graph())
    assert "guidance" not in got.values and got.values["negative"] == ""
    assert (
        "the graph sets no FLUX guidance (no FluxGuidance node) and samples at CFG 1: ComfyUI then gives a "
        "FLUX.1 [dev] model its default guidance 3.5"
    ) in " ".join(got.notices)
    with pytest.warns(UserWarning):
        pipe = pipeline_from_preset("tiny", device="cpu")
    pipe.guidance_mode, pipe.defaults["guidance"] = "none", 0.0  # as FLUX.1 [schnell]
    with pytest.warns(UserWarning, match="low 32 bits"):  # ComfyUI's seeds are large
        (image,) = pipe.generate(request_of(got.values))  # was refused: "takes no guidance ... guidance 1"
    assert (image.record["seed"], image.record["guidance"]) == (972054013131368, 0.0)
    dev = schnell_graph()
    dev["35"] = node("FluxGuidance", guidance=1.5, conditioning=["6", 0])
    dev["31"]["inputs"]["positive"] = ["35", 0]
    dev["33"]["inputs"]["text"] = "ignored"  # FLUX workflows keep one, which ComfyUI never evaluates
    got = comfy(dev)
    assert (got.values["guidance"], got.values["negative"]) == (1.5, "")
    assert (
        "the graph's negative prompt 'ignored' is not taken: ComfyUI does not use it at CFG 1" in got.notices
    )
    pipe.guidance_mode = "distilled"
    with pytest.warns(UserWarning, match="low 32 bits"):
        assert pipe.resolve_request(request_of(got.values)).guidance == 1.5  # no "has no negative prompt"
    guided = schnell_graph()
    guided["31"] = node("SamplerCustomAdvanced", noise=["40", 0], guider=["41", 0], latent_image=["27", 0])
    guided["40"] = node("RandomNoise", noise_seed=3)
    guided["41"] = node("BasicGuider", model=["4", 0], conditioning=["6", 0])  # ComfyUI's CFG 1 guider
    got = comfy(guided)
    assert "guidance" not in got.values and any("samples at CFG 1: ComfyUI then" in n for n in got.notices)


@pytest.mark.parametrize(
    ("scheduler", "schedule", "said"),
    [
        ("simple", None, None),  # the model's own times, evenly: pictor's own schedule
        ("sgm_uniform", None, None),
        ("normal", "normal", None),  # ComfyUI's on FLUX.1 (tests/test_schedules_comfy.py)
        ("karras", "karras", "scheduler karras is taken as pictor's karras schedule, which differs"),
        ("exponential", "exponential", "scheduler exponential is taken as pictor's exponential schedule"),
        ("beta", "beta", "scheduler beta is taken as pictor's beta schedule, which differs"),
        ("kl_optimal", "kl_optimal", None),
        ("linear_quadratic", "linear_quadratic", None),
    ],
)
def test_comfyui_schedulers_map_by_name_and_those_that_differ_are_said(
    scheduler: str, schedule: str | None, said: str | None
) -> None:
    """ComfyUI's karras, exponential and beta space its own table of sigmas: mapped, and said; simple and
    sgm_uniform are the model's own, and normal, kl_optimal and linear_quadratic pictor's of those names,
    unsaid. At 1024x1024 ComfyUI's constant shift is pictor's."""
    graph = flux_ksampler_graph()
    graph["27"]["inputs"] |= {"width": 1024, "height": 1024}
    graph["3"]["inputs"]["scheduler"] = scheduler
    got = comfy(graph)
    assert got.values.get("schedule") == schedule
    about = [n for n in got.notices if "schedul" in n]
    assert about == ([] if said is None else [n for n in about if said in n]) and len(about) == (
        said is not None
    )


def test_the_schedule_shift_without_or_with_model_sampling_flux_is_said_where_it_differs() -> None:
    """Without ModelSamplingFlux ComfyUI's FLUX.1 [dev] shifts by 1.15 at every size, pictor by the size:
    said away from 1024x1024. ModelSamplingFlux at its defaults (as the editor saves them, 1.1500000000000001)
    for the picture's size is pictor's own; for another size it is said."""
    graph = flux_ksampler_graph()
    graph["3"]["inputs"]["scheduler"] = "simple"
    for size, said in (
        ((1024, 1024), False),
        ((1024, 1008), False),
        ((512, 512), True),
        ((2048, 2048), True),
    ):
        graph["27"]["inputs"] |= {"width": size[0], "height": size[1]}
        notices = [n for n in comfy(graph).notices if "ModelSamplingFlux" in n]
        assert bool(notices) == said, size
    assert notices == [
        "the graph has no ModelSamplingFlux node: ComfyUI then shifts a FLUX.1 [dev] model's schedule by a "
        "constant 1.15 at every size, where pictor's schedules shift by the image's size (3.23 at 2048x2048; "
        "1.15 at 1024x1024): the steps differ"
    ]
    custom = flux_custom_graph()
    custom["30"]["inputs"] |= {"max_shift": 1.1500000000000001, "base_shift": 0.5000000000000001}
    custom["17"]["inputs"]["scheduler"] = "simple"
    assert comfy(custom).notices == comfy(flux_custom_graph() | {"17": custom["17"]}).notices
    assert not any("ModelSamplingFlux" in n for n in comfy(custom).notices)
    custom["27"]["inputs"] |= {"width": 512, "height": 512}  # the shift still for 1024x768
    assert (
        "ModelSamplingFlux (node 30) shifts the schedule (max_shift 1.15, base_shift 0.5, width 1024, height "
        "768) for another size than the picture's"
    ) in " ".join(comfy(custom).notices)
    custom["30"] = node("ModelSamplingSD3", shift=3.0, model=["12", 0])  # another shift: no 1.15
    notices = comfy(custom).notices
    assert not any("no ModelSamplingFlux node" in n for n in notices)
    assert "not taken (no pictor equivalent, or given another way): ModelSamplingSD3 (node 30)" in notices


@pytest.mark.parametrize("sampler", ["deis", "uni_pc_bh2", "uni_pc"])
def test_samplers_comfyui_runs_otherwise_in_detail_are_taken_with_a_notice(sampler: str) -> None:
    """ComfyUI's deis is another DEIS variant, and its UniPC runs at order 3 (KSampler dropping the
    second-to-last sigma): pictor's of those names are taken, and the difference said."""
    graph = flux_ksampler_graph()
    graph["3"]["inputs"]["sampler_name"] = sampler
    got = comfy(graph)
    assert got.values["sampler"] == ("deis" if sampler == "deis" else "unipc")
    (said,) = [n for n in got.notices if f"sampler {sampler} is" in n]
    assert ("another DEIS variant" if sampler == "deis" else "UniPC at order 3") in said


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        ("dpmpp_2m_sde", "dpmpp_2m_sde"),
        ("dpmpp_2m_sde_gpu", "dpmpp_2m_sde"),  # the same sampler, its Brownian-tree noise on the GPU
        ("ipndm", "ipndm"),
        ("res_multistep", "res_multistep"),
        ("lcm", "lcm"),
        ("lms", "lms"),
        ("dpm_2", "dpm_2"),
        ("dpm_2_ancestral", "dpm_2_ancestral"),
        ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral"),
        ("dpmpp_sde", "dpmpp_sde"),
        ("dpmpp_sde_gpu", "dpmpp_sde"),
        ("dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun"),
        ("dpmpp_2m_sde_heun_gpu", "dpmpp_2m_sde_heun"),
        ("dpmpp_3m_sde", "dpmpp_3m_sde"),
        ("dpmpp_3m_sde_gpu", "dpmpp_3m_sde"),
        ("heunpp2", "heunpp2"),
        ("gradient_estimation", "gradient_estimation"),
    ],
)
def test_samplers_comfyui_runs_as_pictor_does_are_taken_as_they_are(name: str, ours: str) -> None:
    graph = flux_ksampler_graph()
    graph["3"]["inputs"]["sampler_name"] = name
    got = comfy(graph)
    assert got.values["sampler"] == ours and got.sampler_name is None
    assert not [n for n in got.notices if "sampler" in n and name in n]


@pytest.mark.parametrize("seed", [-5, 2**64, 2**70, 1e30])
def test_seeds_outside_comfyuis_are_refused(seed: float) -> None:
    """ComfyUI's seeds are 0 to 2**64 - 1: no other draws the same noise, so none is taken."""
    graph = flux_ksampler_graph()
    graph["3"]["inputs"]["seed"] = seed
    assert f"its seed {int(seed)} is outside ComfyUI's seeds (0 to 2**64 - 1)" in str(settings_error(graph))
    graph["3"]["inputs"]["seed"] = 2**64 - 1
    assert comfy(graph).values["seed"] == 2**32 - 1


@pytest.mark.parametrize(
    ("node_id", "name", "value", "said"),
    [
        ("3", "cfg", "Infinity", "KSampler (node 3)'s cfg is inf"),
        ("35", "guidance", "NaN", "FluxGuidance (node 35)'s guidance is nan"),
        ("3", "denoise", "-Infinity", "KSampler (node 3)'s denoise is -inf"),
        ("3", "steps", "1e400", "KSampler (node 3)'s steps is inf"),
    ],
)
def test_numbers_that_are_not_finite_are_refused(node_id: str, name: str, value: str, said: str) -> None:
    """JSON's Infinity and NaN (which Python's reader, as ComfyUI's, takes) are refused, not taken."""
    graph = flux_ksampler_graph()
    graph[node_id]["inputs"][name] = "@"
    text = json.dumps(graph).replace('"@"', value)
    assert f"its {said}, not a finite number" in str(settings_error(text))


def test_links_with_a_float_output_or_a_number_as_node_id_are_followed() -> None:
    """ComfyUI's is_link takes a float output index; a whole-number node id is taken as its text too."""
    graph = flux_ksampler_graph()
    graph["3"]["inputs"] |= {"positive": ["35", 0.0], "latent_image": [27, 0]}
    got = comfy(graph)
    assert (got.values["guidance"], got.values["size"]) == (3.5, (64, 48))
    graph["3"]["inputs"]["positive"] = ["35", 0.5]
    assert "a link to node 35 has output 0.5, not a whole number" in str(settings_error(graph))


def test_integers_past_any_float_are_said_not_overflowed() -> None:
    """(Found in review: a JSON integer like 10**400 raised OverflowError, which only the catch-all caught.)
    A setting that is read refuses the graph in its own words; one only named in a notice still gives the
    settings."""
    huge = 10**400
    graph = flux_ksampler_graph()
    graph["3"]["inputs"]["cfg"] = huge
    error = settings_error(graph)
    assert "not a finite number" in str(error) and "could not be read" not in str(error)
    graph = flux_ksampler_graph()
    model = graph["3"]["inputs"]["model"]
    graph["90"] = node("LoraLoaderModelOnly", lora_name="x.safetensors", strength_model=huge, model=model)
    graph["3"]["inputs"]["model"] = ["90", 0]
    taken = comfy(graph)
    assert any("x.safetensors" in n for n in taken.notices)
