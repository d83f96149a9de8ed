"""Guidance methods (`pictor.guidance_methods`) read back from other images: pictor's own A1111-text fields
("Guidance method: apg, Guidance rescale: 0.7, Guidance interval: 0-0.7, APG eta: ...") and its record,
both through one path of `pictor.settings_import`, so `pictor generate --settings-from` takes an image's
method from its A1111 text alone; and ComfyUI's guidance patches: its TCFG node is pictor's tcfg (the same
math on a flow model, checked here against ComfyUI's formula), while its APG, CFGZeroStar, RescaleCFG and
CFGNorm are not (each formula, as ComfyUI computes it on a flow model's denoised prediction, checked to
differ) and say why."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from pictor.guidance_methods import GuidanceMethod, Guider
from pictor.provenance import PARAMETERS_KEY, _guidance_method_fields, read_record
from pictor.settings_import import (
    GUIDANCE_DESTS,
    SettingsImportError,
    settings_from_chunks,
    settings_from_parameters,
    settings_from_record,
)
from tests.test_cli_prompt_variants import cli
from tests.test_comfy_workflow_import import comfy, flux_custom_graph, flux_ksampler_graph, node
from tests.test_guidance_methods import bundle  # noqa: F401

METHODS = [
    GuidanceMethod("apg", eta=0.25, norm_threshold=3.5, momentum=-0.5, rescale=0.7, start=0.0, stop=0.7),
    GuidanceMethod("cfg-zero-star", zero_init_steps=2, start=0.25),
    GuidanceMethod("tcfg", rescale=0.3, start=1e-05, stop=0.5),
    GuidanceMethod("cfg", rescale=0.7),
    GuidanceMethod("apg"),  # every parameter at its default: the text still names each one
]


def _text(method: GuidanceMethod) -> str:
    """pictor's A1111 text of an image made with `method` (provenance writes these fields)."""
    fields = ", ".join(f"{k}: {v}" for k, v in _guidance_method_fields(method.normalized().record()))
    return f"a red circle\nNegative prompt: blue\nSteps: 4, Sampler: Euler, CFG scale: 4, {fields}, Seed: 3"


@pytest.mark.parametrize("method", METHODS, ids=[m.method + str(i) for i, m in enumerate(METHODS)])
def test_the_a1111_text_and_the_record_give_the_same_method(method: GuidanceMethod) -> None:
    from_text = settings_from_parameters(_text(method))
    from_record = settings_from_record({"prompt": "a red circle", "guidance_method": method.record()})
    assert from_text.guidance_method == from_record.guidance_method == method.normalized()
    assert {k: v for k, v in from_text.values.items() if k in GUIDANCE_DESTS} == {
        k: v for k, v in from_record.values.items() if k in GUIDANCE_DESTS
    }
    v = from_text.values
    assert (v["guidance_method"], v["guidance_rescale"]) == (method.method, method.rescale)
    assert v["guidance_interval"] == [method.start, method.stop]
    assert ("apg_eta" in v) == (method.method == "apg") and ("zero_init_steps" in v) == (
        method.method == "cfg-zero-star"
    )
    if method.method == "apg":  # each of the method's own as its option
        assert (v["apg_eta"], v["apg_norm_threshold"], v["apg_momentum"]) == (
            method.eta,
            method.norm_threshold,
            method.momentum,
        )
    if method.method == "cfg-zero-star":
        assert v["zero_init_steps"] == method.zero_init_steps
    assert not any("Guidance" in n or "APG" in n or "Zero init" in n for n in from_text.notices), from_text


def test_plain_cfg_and_an_image_without_a_method_take_none() -> None:
    for text in ("a\nSteps: 4, Seed: 1", "a\nSteps: 4, Guidance method: cfg, Seed: 1"):
        got = settings_from_parameters(text)
        assert got.guidance_method is None and not set(GUIDANCE_DESTS) & set(got.values), got
    assert settings_from_record({"prompt": "a"}).guidance_method is None


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ("Guidance method: pag", "the image's Guidance method 'pag': guidance method must be one of"),
        ("Guidance method: apg, APG eta: much", "the image's APG eta 'much' is not readable"),
        ("Guidance method: apg, APG eta: 2", "the image's APG eta '2': APG eta (eta) must be"),
        ("Guidance interval: 0.7", "the image's Guidance interval '0.7' is not readable"),
        ("Guidance interval: 0.7-0.2", "the image's Guidance interval '0.7-0.2': guidance interval start"),
        ("Guidance method: cfg-zero-star, Zero init steps: 1.5", "Zero init steps '1.5' is not readable"),
    ],
)
def test_unreadable_text_is_an_error_naming_its_key(fields: str, words: str) -> None:
    with pytest.raises(SettingsImportError, match=re.escape(words)):
        settings_from_parameters(f"a\nSteps: 4, {fields}, Seed: 1")


def test_a_damaged_record_method_is_a_damaged_record() -> None:
    record = {"prompt": "a", "guidance_method": {"method": "apg", "eta": 7}}
    with pytest.raises(SettingsImportError, match=r"its pictor record is damaged .*APG eta"):
        settings_from_chunks({"pictor": json.dumps(record)}, "x.png")


def _a1111_only(path: Path, source: Path) -> Path:
    """`source`'s picture with only its A1111 text (its pictor record left out)."""
    with Image.open(source) as im:
        info = PngImagePlugin.PngInfo()
        info.add_itxt(PARAMETERS_KEY, im.text[PARAMETERS_KEY])
        im.convert("RGB").save(path, pnginfo=info)
    return path


def test_settings_from_an_images_a1111_text_alone_takes_its_method(
    capsys: pytest.CaptureFixture[str],
    bundle: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    base = ["--model", str(bundle), "--steps", "4", "--device", "cpu", "--seed", "3", "--negative", "blue"]
    method = ["--guidance-method", "apg", "--apg-eta", "0.25", "--guidance-interval", "0", "0.7"]
    code, _, err = cli(capsys, "generate", "a red circle", *base, *method, "-o", str(tmp_path / "a"))
    assert code == 0, err
    (png,) = (tmp_path / "a").glob("*.png")
    want = read_record(png)["guidance_method"]
    text_only = _a1111_only(tmp_path / "text.png", png)
    code, _, err = cli(capsys, "generate", "--settings-from", str(text_only), "--model", str(bundle),
                       "--device", "cpu", "-o", str(tmp_path / "b"))  # fmt: skip
    assert code == 0, err
    (again,) = (tmp_path / "b").glob("*.png")
    assert read_record(again)["guidance_method"] == want
    with Image.open(png) as a, Image.open(again) as b:
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
    # each guidance option the command line gives overrides that one field of the image's method (its
    # record's or its A1111 text's), as every other option does; the rest are the image's
    apg = GuidanceMethod("apg", eta=0.25, start=0.0, stop=0.7)
    for i, (image, own, got) in enumerate(
        [
            (png, ["--guidance-rescale", "0.5"], replace(apg, rescale=0.5)),
            (text_only, ["--guidance-rescale", "0.5"], replace(apg, rescale=0.5)),
            (png, ["--apg-eta", "0.2"], replace(apg, eta=0.2)),
            (text_only, ["--apg-eta", "0.2", "--apg-momentum", "-0.5"], replace(apg, eta=0.2, momentum=-0.5)),
            # another method: the image's interval and rescale, not its APG parameters
            (text_only, ["--guidance-method", "tcfg"], GuidanceMethod("tcfg", start=0.0, stop=0.7)),
            (png, ["--guidance-method", "cfg-zero-star"], GuidanceMethod("cfg-zero-star", stop=0.7)),
        ]
    ):
        out = tmp_path / f"c{i}"
        code, _, err = cli(capsys, "generate", "--settings-from", str(image), "--model", str(bundle),
                           "--device", "cpu", *own, "-o", str(out))  # fmt: skip
        assert code == 0, err
        (made,) = out.glob("*.png")
        assert read_record(made)["guidance_method"] == got.normalized().record(), own


# ---------------------------------------------------------------------------------------------- ComfyUI


def _real_cfg_graph(cfg: float = 4.5) -> dict[str, Any]:
    """A SamplerCustomAdvanced graph guided by CFGGuider (real CFG, no FluxGuidance), its model through
    `patches` added by the tests."""
    graph = flux_custom_graph()
    graph["22"] = node("CFGGuider", model=["30", 0], positive=["6", 0], negative=["40", 0], cfg=cfg)
    graph["40"] = node("CLIPTextEncode", text="blurry", clip=["11", 0])
    return graph


def _patched(graph: dict[str, Any], cls: str, **inputs: Any) -> dict[str, Any]:
    """The model patch `cls` between the sampling-shift node and the guider (and scheduler)."""
    graph["50"] = node(cls, model=["30", 0], **inputs)
    graph["22"]["inputs"]["model"] = ["50", 0]
    graph["17"]["inputs"]["model"] = ["50", 0]
    return graph


def test_comfyui_tcfg_is_taken_as_tcfg_where_real_cfg_is() -> None:
    got = comfy(_patched(_real_cfg_graph(), "TCFG"))
    assert got.guidance_method == GuidanceMethod("tcfg") and got.values["guidance"] == 4.5, got
    assert got.values["guidance_method"] == "tcfg"
    assert not any("TCFG" in n for n in got.notices), got.notices  # not listed as left out either
    # KSampler at a real CFG, no FluxGuidance: likewise
    graph = flux_ksampler_graph()
    graph["3"]["inputs"]["positive"], graph["3"]["inputs"]["cfg"] = ["6", 0], 3.0
    graph["50"] = node("TCFG", model=["4", 0])
    graph["3"]["inputs"]["model"] = ["50", 0]
    assert comfy(graph).guidance_method == GuidanceMethod("tcfg")


def test_comfyui_tcfg_at_cfg_1_or_beside_flux_guidance_is_said_not_taken() -> None:
    graph = flux_ksampler_graph()  # CFG 1 with FluxGuidance
    graph["50"] = node("TCFG", model=["4", 0])
    graph["3"]["inputs"]["model"] = ["50", 0]
    got = comfy(graph)
    assert got.guidance_method is None and "guidance_method" not in got.values
    assert any("TCFG (pictor's --guidance-method tcfg) is not taken: ComfyUI runs no negative pass at CFG 1"
               in n for n in got.notices), got.notices  # fmt: skip
    graph["3"]["inputs"]["cfg"] = 3.0  # a real CFG on top of FLUX guidance: the CFG is not taken
    got = comfy(graph)
    assert got.guidance_method is None
    assert any("acts through the sampler's CFG 3, which is not taken" in n for n in got.notices), got.notices


@pytest.mark.parametrize(
    ("cls", "inputs", "words"),
    [
        (
            "APG",
            {"eta": 1.0, "norm_threshold": 5.0, "momentum": 0.0},
            "projects the guidance on the denoised",
        ),
        ("CFGZeroStar", {}, "scales the unconditional denoised (x0) prediction"),
        ("RescaleCFG", {"multiplier": 0.7}, "which a flow model's (1 - sigma) x0 + sigma noise is not"),
        ("CFGNorm", {"strength": 1.0}, "has no pictor equivalent"),
    ],
)
def test_comfyui_guidance_patches_that_differ_are_said_with_why(
    cls: str, inputs: dict[str, Any], words: str
) -> None:
    got = comfy(_patched(_real_cfg_graph(), cls, **inputs))
    assert got.guidance_method is None and "guidance_method" not in got.values, got
    (said,) = [n for n in got.notices if cls in n]
    assert said.startswith(f"{cls} (node 50) is not taken: ") and words in said, said
    assert not any(n.startswith("not taken (no pictor") and cls in n for n in got.notices)


# ComfyUI's formulas (comfy_extras/nodes_tcfg.py, nodes_cfg.py, nodes_apg.py, nodes_model_advanced.py) on a
# flow model: its sampler combines denoised predictions x0 = x - sigma v (comfy.model_sampling.CONST), and a
# cfg function's "cond"/"uncond" are x - x0. Written out here from their code, to hold the mapping to the
# math.


def _flow(shape: tuple[int, ...] = (2, 4, 6, 6)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    g = torch.Generator().manual_seed(0)
    x, vc, vu = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    return x, vc, vc * 0.6 + vu * 0.5, 0.7


def _velocity(x: torch.Tensor, x0: torch.Tensor, sigma: float) -> torch.Tensor:
    return (x - x0) / sigma


def _comfy_tcfg(x: torch.Tensor, c0: torch.Tensor, u0: torch.Tensor, cfg: float) -> torch.Tensor:
    cond_score, uncond_score = (x - c0).flatten(1)[:, None], (x - u0).flatten(1)[:, None]
    _, _, vh = torch.linalg.svd(torch.cat((uncond_score, cond_score), dim=1), full_matrices=False)
    v1 = vh[:, 0:1, :]
    uncond_td = ((uncond_score @ v1.transpose(-2, -1)) * v1).reshape_as(u0)
    u0 = x - uncond_td
    return u0 + cfg * (c0 - u0)


def _comfy_zero_star(x: torch.Tensor, c0: torch.Tensor, u0: torch.Tensor, cfg: float) -> torch.Tensor:
    pos, neg = (x - c0).flatten(1), (x - u0).flatten(1)
    alpha = ((pos * neg).sum(1, keepdim=True) / ((neg**2).sum(1, keepdim=True) + 1e-8)).view(-1, 1, 1, 1)
    out = u0 + cfg * (c0 - u0)
    return out + u0 * (alpha - 1.0) + cfg * u0 * (1.0 - alpha)


def _comfy_apg(x: torch.Tensor, c0: torch.Tensor, u0: torch.Tensor, cfg: float, eta: float) -> torch.Tensor:
    guidance = c0 - u0
    v1 = torch.nn.functional.normalize(c0, dim=[-1, -2, -3])
    parallel = (guidance * v1).sum(dim=[-1, -2, -3], keepdim=True) * v1
    modified = (guidance - parallel) + eta * parallel
    cond = (u0 + modified) + (c0 - u0) / cfg  # its pre-CFG function's new conditional prediction
    return u0 + cfg * (cond - u0)


def _comfy_rescale(
    x: torch.Tensor, c0: torch.Tensor, u0: torch.Tensor, cfg: float, sigma: float
) -> torch.Tensor:
    cond, uncond = x - c0, x - u0
    xs = x / (sigma * sigma + 1.0)
    cond = (xs - (x - cond)) * (sigma**2 + 1.0) ** 0.5 / sigma
    uncond = (xs - (x - uncond)) * (sigma**2 + 1.0) ** 0.5 / sigma
    x_cfg = uncond + cfg * (cond - uncond)
    ro_pos, ro_cfg = (
        torch.std(cond, dim=(1, 2, 3), keepdim=True),
        torch.std(x_cfg, dim=(1, 2, 3), keepdim=True),
    )
    x_final = 0.7 * x_cfg * (ro_pos / ro_cfg) + 0.3 * x_cfg
    return xs - x_final * sigma / (sigma * sigma + 1.0) ** 0.5  # ComfyUI's cfg result (x - what it returns)


def test_comfyuis_tcfg_is_pictors_tcfg_on_a_flow_model() -> None:
    x, vc, vu, sigma = _flow()
    c0, u0 = x - sigma * vc, x - sigma * vu
    for cfg in (2.0, 4.5):
        pictor = Guider(GuidanceMethod("tcfg"), cfg, steps=4)(0, vc, vu)
        # the same up to float32's rounding: both take the SVD in float32, ComfyUI's of sigma v
        difference = (_velocity(x, _comfy_tcfg(x, c0, u0, cfg), sigma) - pictor).abs().max().item()
        assert difference < 1e-5, difference
        plain = Guider(GuidanceMethod(), cfg, steps=4)(0, vc, vu)
        assert not torch.allclose(pictor, plain, atol=1e-3)  # tcfg did something


def test_comfyuis_other_patches_are_not_pictors_methods_on_a_flow_model() -> None:
    x, vc, vu, sigma = _flow()
    c0, u0 = x - sigma * vc, x - sigma * vu
    cfg = 4.0
    zero_star = Guider(GuidanceMethod("cfg-zero-star", zero_init_steps=0), cfg, steps=4)(0, vc, vu)
    assert not torch.allclose(_velocity(x, _comfy_zero_star(x, c0, u0, cfg), sigma), zero_star, atol=1e-3)
    for eta in (0.0, 0.5):
        apg = Guider(GuidanceMethod("apg", eta=eta, norm_threshold=0), cfg, steps=4)(0, vc, vu)
        assert not torch.allclose(_velocity(x, _comfy_apg(x, c0, u0, cfg, eta), sigma), apg, atol=1e-3)
    rescaled = Guider(GuidanceMethod(rescale=0.7), cfg, steps=4)(0, vc, vu)
    assert not torch.allclose(_velocity(x, _comfy_rescale(x, c0, u0, cfg, sigma), sigma), rescaled, atol=1e-3)
    # (the formulas as written here agree with pictor where the math says they must: plain CFG is linear)
    plain = Guider(GuidanceMethod(), cfg, steps=4)(0, vc, vu)
    assert torch.allclose(_velocity(x, u0 + cfg * (c0 - u0), sigma), plain, atol=1e-9)


def test_a_png_of_a_graph_with_tcfg_gives_the_method(tmp_path: Path) -> None:
    graph = _patched(_real_cfg_graph(), "TCFG")
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(graph))
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PNG", pnginfo=info)
    with Image.open(io.BytesIO(out.getvalue())) as im:
        got = settings_from_chunks(dict(im.text), "x.png")
    assert got.source == "comfyui" and got.guidance_method == GuidanceMethod("tcfg")


def test_comfyui_tcfg_with_a_cfg_pp_sampler_says_where_the_renoise_differs() -> None:
    """ComfyUI's TCFG damps the unconditional prediction before CFG, which its CFG++ samplers renoise with;
    pictor's renoise reads the raw one: taken, with a notice. At CFG 1 (a CFG++ sampler's negative pass
    runs there) it is said not to be taken."""
    graph = flux_ksampler_graph()
    del graph["35"]  # no FluxGuidance: real CFG
    graph["3"]["inputs"].update(positive=["6", 0], cfg=3.0, sampler_name="euler_cfg_pp")
    graph["50"] = node("TCFG", model=["4", 0])
    graph["3"]["inputs"]["model"] = ["50", 0]
    got = comfy(graph)
    assert got.guidance_method == GuidanceMethod("tcfg")
    assert any("TCFG with a CFG++ sampler" in n and "damped" in n for n in got.notices), got.notices
    graph["3"]["inputs"]["cfg"] = 1.0
    got = comfy(graph)
    assert got.guidance_method is None and got.values["guidance"] == 1
    assert any("act above guidance 1 only" in n for n in got.notices), got.notices
