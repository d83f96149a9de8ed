"""A guidance method with an interval keeps each adapter's conditioning on the right rows: on a step outside
the interval (no negative pass) the velocity is a guidance-1 request's (the prompts' passes alone, with the
ControlNet's residuals, the IP-Adapter's picture, the reference's conditioning and the layout's residuals of
those passes), and on a guided step it is plain CFG's (a request without a method); with regions (passes or
regional attention), A1111's AND and the first-block cache too."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch

from pictor.controlnet_runs import ControlNetRun
from pictor.guidance_methods import GuidanceMethod
from pictor.guided_velocity import guided_velocity
from pictor.loading import pipeline_from_preset
from pictor.models.block_cache import FirstBlockCache
from pictor.pipeline import GenerationRequest, Pipeline

pytestmark = pytest.mark.filterwarnings("ignore:model 'tiny:UserWarning")

REGIONS = [{"box": [0, 0, 0.5, 1], "prompt": "a blue square", "strength": 2.0}]
CASES = {
    "prompt": ("a red circle", {}),
    "and": ("a red circle:0.5 AND two shapes:0.5", {"composable": True}),
    "regions": ("a red circle", {"regions": REGIONS}),
    "regional-attention": ("a red circle", {"regions": REGIONS, "regional_attention": True}),
    "cache": ("a red circle", {"cache_threshold": 0.9}),  # high: later calls reuse
}
TS = torch.linspace(1, 0, 5)  # 4 steps; GuidanceMethod(stop=0.5) guides steps 0 and 1


def _check(
    pipe: Pipeline,
    prompt: str,
    x: torch.Tensor,
    lat: int,
    kw: dict[str, Any],
    atol: float | None = None,
    nets: Callable[[Any], ControlNetRun] | None = None,
) -> None:
    """Steps 2 and 3 of an interval request equal a guidance-1 request's (exactly, or to `atol`), step 0
    equals plain CFG's and differs from guidance 1's, step 2 differs from plain CFG's."""
    base = {"width": 32, "height": 32, "steps": 4, "seed": 1, **kw}
    cfg = {"guidance": 3.0, "negative_prompt": "a blur"}

    def velocity(caches: list[FirstBlockCache] | None = None, **extra: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = pipe.resolve_request(GenerationRequest(prompt, **base, **extra))
        run = nets(r) if nets else None
        return guided_velocity(pipe, r, 2, lat, lat, caches=caches, ts=TS, controlnets=run)

    def at(i: int) -> torch.Tensor:
        return TS[i].expand(2)

    with torch.inference_mode():
        caches: list[FirstBlockCache] = []
        interval = velocity(caches, **cfg, guidance_method=GuidanceMethod(stop=0.5))
        got = [interval(x, at(i)) for i in range(4)]
        one = velocity(guidance=1.0)  # the prompts' passes alone, fresh at step 2 as the interval's rows are
        want = [one(x, at(i)) for i in (2, 3)]
        plain0 = velocity(**cfg)(x, at(0))
        plain2 = velocity(**cfg)(x, at(2))
        one0 = velocity(guidance=1.0)(x, at(0))
    for g, w in zip(got[2:], want, strict=True):
        if atol is None:
            assert torch.equal(g, w), (g - w).abs().max()
        else:
            assert torch.allclose(g, w, atol=atol, rtol=0), (g - w).abs().max()
    assert torch.allclose(got[0], plain0, atol=1e-5, rtol=0), (got[0] - plain0).abs().max()
    assert (got[0] - one0).abs().max() > 1e-3  # the guided step did guide
    assert (got[2] - plain2).abs().max() > 1e-3  # the unguided step did not
    if kw.get("cache_threshold"):  # the cache did skip blocks (step 1's call, or step 3's)
        assert sum(c.skipped for c in caches) > 0


# -- ControlNet --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controlnet_pipe(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    pytest.importorskip("diffusers")
    from tests.test_controlnet_pipeline import _cfg_pipeline, _controlnet, _with

    root = tmp_path_factory.mktemp("guidance-controlnet")
    return _with(_cfg_pipeline(root), _controlnet(root, "net", 8, guidance_embeds=False))


@pytest.mark.parametrize("case", list(CASES))
def test_controlnet_rows_outside_and_inside_the_interval(controlnet_pipe: Pipeline, case: str) -> None:
    from tests.test_controlnet_pipeline import MODEL, _picture

    pipe = controlnet_pipe
    prompt, kw = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(2, 64, MODEL.in_channels)  # 32x32: 16x16 latents, 8x8 tokens

    def nets(r: Any) -> ControlNetRun:  # as Pipeline builds a run's
        return ControlNetRun(pipe.controlnets, r, pipe.autoencoder, pipe.dtype, TS, pipe.transformer.params)

    _check(pipe, prompt, x, 16, {**kw, "controlnet_images": [_picture(4)]}, nets=nets)


# -- IP-Adapter --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ip_pipe(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tests.test_ip_adapter_pipeline import MODEL, _pipeline

    from tiny_ip_adapter import clip_vision_folder, ip_adapter_file

    root = tmp_path_factory.mktemp("guidance-ip-adapter")
    clip_vision_folder(root / "clip-vision")
    ip_adapter_file(root / "ip_adapter.safetensors", MODEL.context_in_dim, MODEL.hidden_size, MODEL.depth)
    pipe = _pipeline(root, replace(MODEL, guidance_embed=False), guidance_mode="cfg")
    pipe.set_ip_adapter(root / "ip_adapter.safetensors", root / "clip-vision")
    return pipe


@pytest.mark.parametrize("case", list(CASES))
def test_ip_adapter_rows_outside_and_inside_the_interval(ip_pipe: Pipeline, case: str) -> None:
    from tests.test_ip_adapter_pipeline import MODEL
    from tests.test_redux import _picture

    prompt, kw = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(2, 64, MODEL.in_channels)
    # CLIP embeds one picture under guidance 1 and two (the picture, a black one) under CFG: equal to rounding
    kw = {**kw, "ip_adapter_image": _picture(2), "ip_adapter_scale": 0.8}
    _check(ip_pipe, prompt, x, 16, kw, atol=1e-5)


# -- reference and layout adapters ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    from tests.test_layout_generation import _adapter as layout_adapter
    from tests.test_layout_generation import _save as save_layout
    from tests.test_reference_generation import _adapter as reference_adapter
    from tests.test_reference_generation import _save as save_reference

    root = tmp_path_factory.mktemp("guidance-adapters")
    pipe = pipeline_from_preset("tiny", device="cpu")
    # torch's default init instead of adaLN-Zero's zero gates: the text reaches the image
    torch.manual_seed(0)
    for module in pipe.transformer.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    pipe.set_reference_adapter(
        save_reference(reference_adapter(pipe), root / "reference.safetensors", pipe.hash)
    )
    pipe.set_layout_adapter(save_layout(layout_adapter(pipe), root / "layout.safetensors", pipe.hash))
    return pipe


@pytest.mark.parametrize("case", list(CASES))
def test_reference_rows_outside_and_inside_the_interval(tiny_pipe: Pipeline, case: str) -> None:
    from tests.test_reference_generation import _picture

    prompt, kw = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(2, 16, 16)  # 32x32 on the tiny preset: 8x8 latents, 4x4 tokens
    _check(tiny_pipe, prompt, x, 8, {**kw, "reference": _picture(0)})


@pytest.mark.parametrize("case", list(CASES))
def test_layout_rows_outside_and_inside_the_interval(tiny_pipe: Pipeline, case: str) -> None:
    from tests.test_layout_generation import LAYOUT

    prompt, kw = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(2, 16, 16)
    _check(tiny_pipe, prompt, x, 8, {**kw, "layout": LAYOUT})
