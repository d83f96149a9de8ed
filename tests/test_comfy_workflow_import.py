"""`pictor generate --settings-from IMAGE` for ComfyUI's own PNGs: the API graph in their `prompt` chunk read
for the saved picture's prompt, seed, steps, guidance, sampler, scheduler and size (`pictor.comfy_workflow`,
mapped in `pictor.settings_import`), what is not taken said aloud, and damaged graphs refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from pictor.cli import main
from pictor.comfy_workflow import comfy_prompt_as_a1111
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
    assert got.notices == [
        "the image was made by model 'flux1-dev-fp8.safetensors'; this run uses the one you load (--model)"
    ]


def test_without_flux_guidance_the_cfg_is_the_guidance_and_with_it_a_real_cfg_is_said() -> None:
    graph = flux_ksampler_graph()
    graph["3"]["inputs"] |= {"positive": ["6", 0], "cfg": 7.0}
    assert comfy(graph).values["guidance"] == 7.0  # as A1111's CFG scale is taken
    graph["3"]["inputs"]["positive"] = ["35", 0]
    got = comfy(graph)
    assert got.values["guidance"] == 3.5
    assert any("sampler's CFG 7 (real CFG on top) is not" in n for n in got.notices)


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
        "'t5xxl_fp16.safetensors', 'clip_l.safetensors'); this run uses the one you load (--model)"
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
    assert "not taken (no pictor equivalent, or given another way): ModelSamplingFlux (node 30)" in notices


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
    got = comfy(graph)
    assert (got.values["seed"], got.values["steps"]) == (2, 5) and "size" not in got.values
    notices = " | ".join(got.notices)
    assert "starts from another sampler's output (through LatentUpscaleBy (node 50))" in notices
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
        "fog",
        2.0,
    )
    notices = " | ".join(got.notices)
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
    graph["3"]["inputs"] |= {"steps": 2, "sampler_name": "dpmpp_2m_sde"}
    png = comfy_png(tmp_path / "sde.png", graph)
    assert comfy(graph).sampler_name == "dpmpp_2m_sde"
    base = ["generate", "--settings-from", str(png), "--model", "tiny"]
    assert main([*base, "-o", str(tmp_path / "a")]) == 2
    assert (
        "sampler 'dpmpp_2m_sde' has no pictor equivalent; choose one with --sampler"
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
    graph["3"]["inputs"]["steps"] = 12
    graph["6"]["inputs"]["text"] = "(" * 500 + "red" + ")" * 500  # ComfyUI itself would recurse that deep
    with pytest.raises(SettingsImportError, match="its prompt nests brackets more than 64 deep"):
        settings_from_chunks({"prompt": json.dumps(graph)})
    graph = copy.deepcopy(flux_ksampler_graph())
    graph["3"]["inputs"]["positive"] = ["77", 0]
    with pytest.raises(SettingsImportError, match="a link leads to node 77, which the graph does not have"):
        settings_from_chunks({"prompt": json.dumps(graph)})
