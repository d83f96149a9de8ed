"""CPU offload with the `meta` device standing in for CUDA (`offload_meta`): every stage of a run gets its
inputs and builds its tensors on the execution device, not in the CPU memory where an offloaded model's
parameters wait. On a CPU-only machine offload's two devices are one, and these mistakes go unseen; on a
GPU they raise. (None of this has run on a GPU: these checks are the stand-in.)"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import pictor.pipeline_sampling
from pictor.context_images import context_tokens
from pictor.control_images import control_tokens
from pictor.loading import pipeline_from_preset
from pictor.models.offload import Offload
from pictor.models.text import build_text_encoder
from pictor.pipeline import GenerationRequest, Pipeline

from offload_meta import META, DevCheck, MetaMover, meta_offload, meta_tensors
from tiny_text_folders import flux_text_encoders


def _tiny() -> Pipeline:
    with pytest.warns(UserWarning):  # UNTRAINED
        return pipeline_from_preset("tiny", device="cpu")


@pytest.fixture(scope="module")
def text_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return flux_text_encoders(tmp_path_factory.mktemp("text"))


class Reached(Exception):
    """Raised by `_stop_sampler` once the velocity ran: meta tensors hold no values to sample on with."""


def _stop_sampler(name: str) -> Any:
    def sampler(fn: Any, x: torch.Tensor, ts: torch.Tensor, callback: Any = None, **_: Any) -> torch.Tensor:
        v = fn(x, ts[0])  # the transformer (and ControlNets, windows) with everything the run prepared
        raise Reached(v.device.type)

    return sampler


# -- finding: text encoding is no forward, and read the CPU as its device ---------------------------------


@pytest.mark.parametrize("kind", ["minilm", "t5", "flux"])
def test_text_encoders_encode_on_the_execution_device(kind: str, text_config: dict[str, Any]) -> None:
    """`encode` is not `forward`: it must bring its group in before it reads where to put token ids and
    masks (FLUX.1's encoder also calls its T5's and CLIP's `_encode` directly)."""
    if kind == "minilm":
        encoder = _tiny().text_encoder
    else:
        encoder = build_text_encoder(text_config if kind == "flux" else {**text_config["t5"], "kind": "t5"})
    off = Offload("model", META, mover=MetaMover())
    off.attach({"text_encoder": [encoder]})
    with DevCheck() as check:
        emb = encoder.encode(["a red circle", "a blue square"])
        weighted = encoder.encode_weighted([[("a red ", 1.0), ("circle", 1.5)]])
    assert check.hits == []
    for e in (emb, weighted):
        assert {e.tokens.device, e.mask.device, e.pooled.device} == {META}
    assert off.resident == "text_encoder"
    off.detach()
    assert meta_tensors(encoder) == []


def test_bring_in_answers_the_execution_device_and_brings_the_group() -> None:
    from pictor.models.offload import bring_in

    pipe = _tiny()
    assert bring_in(pipe.autoencoder) == torch.device("cpu")  # no offload: where its parameters are
    meta_offload(pipe)
    assert bring_in(pipe.autoencoder.decoder) == META  # a submodule brings its whole group
    assert pipe._offload is not None and pipe._offload.resident == "autoencoder"
    assert meta_tensors(pipe.text_encoder, pipe.transformer) == [] and meta_tensors(pipe.autoencoder)
    pipe.set_offload(None)
    assert bring_in(pipe.autoencoder) == META  # offload off moved everything to the device


# -- every stage before the sampler, and the model call, under offload --------------------------------------


@pytest.mark.parametrize("mode", ["model", "blocks"])
@pytest.mark.parametrize(
    "extra",
    [
        {"guidance": 3.0, "negative_prompt": "blue"},
        {"prompt_weights": True, "prompt": "a (red:1.3) circle"},
        {"vae_tile": 32, "vae_tile_overlap": 8, "width": 64, "height": 64},
        {"denoise_tile": 32, "denoise_tile_overlap": 8, "width": 64, "height": 64},
    ],
    ids=["cfg", "weights", "vae-tile", "denoise-tile"],
)
def test_a_run_prepares_everything_on_the_execution_device(
    mode: str, extra: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = _tiny()
    meta_offload(pipe, mode)
    monkeypatch.setattr(pictor.pipeline_sampling, "get_sampler", _stop_sampler)
    request = {"prompt": "a red circle", "width": 32, "height": 32, "steps": 2, "seed": 1, **extra}
    with DevCheck() as check, pytest.raises(Reached, match="meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starting from noise in windows
        pipe.generate(GenerationRequest(**request))
    assert check.hits == []
    assert pipe._offload is not None and pipe._offload.resident is None  # released after the failed run
    assert meta_tensors(pipe.transformer, pipe.autoencoder, pipe.text_encoder) == []


# -- Kontext's context picture, control pictures in VAE tiles ----------------------------------------------


@pytest.mark.parametrize("tile", [None, 64])
def test_a_kontext_context_picture_and_its_ids_are_on_the_device(tile: int | None) -> None:
    pipe = _tiny()
    meta_offload(pipe)
    pipe.encode_text(["a red circle"])  # as a run does: the text encoder is the resident group
    pixels = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    with DevCheck() as check:
        context = context_tokens(pipe.autoencoder, pixels, torch.float32, tile, 16 if tile else None)
        x, ids = context.extend(
            torch.zeros(2, 16, context.tokens.shape[-1], device=META), torch.zeros(2, 16, 3, device=META)
        )
    assert check.hits == []
    assert context.tokens.device == context.ids.device == x.device == ids.device == META


@pytest.mark.parametrize("tile", [None, 64])
def test_a_control_picture_encodes_on_the_device_whole_and_in_tiles(tile: int | None) -> None:
    pipe = _tiny()
    meta_offload(pipe)
    pipe.encode_text(["a red circle"])
    pixels = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    with DevCheck() as check:
        tokens = control_tokens(pipe.autoencoder, pixels, None, torch.float32, tile, 16 if tile else None)
    assert check.hits == [] and tokens.device == META


# -- ControlNets, in denoise windows too ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["model", "blocks"])
@pytest.mark.parametrize("window", [False, True])
def test_a_controlnets_conditioning_is_on_the_device(mode: str, window: bool, tmp_path: Path) -> None:
    """Its control tokens are made once a run, while the autoencoder is in: on the execution device, where
    a denoise window's index (made on the pipeline's device) picks from them. (The run is driven by hand:
    its schedule's values, which `ControlNetRun` reads, would be meta's no-values in a whole run.)"""
    pytest.importorskip("diffusers")
    from PIL import Image
    from test_controlnet_pipeline import _controlnet, _pipeline

    from pictor.controlnet_runs import ControlNetRun

    pipe = _pipeline(tmp_path / "text")
    pipe.add_controlnet(_controlnet(tmp_path, "instantx", 1))
    meta_offload(pipe, mode)
    control = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    r = pipe.resolve_request(
        GenerationRequest("a cat", seed=5, steps=2, width=64, height=64, controlnet_images=[control])
    )
    p = pipe.transformer.params
    pipe.encode_text(["a cat"])  # as a run does: the text encoder is the resident group
    with DevCheck() as check:
        run = ControlNetRun(pipe.controlnets, r, pipe.autoencoder, pipe.dtype, torch.linspace(1, 0, 3), p)
        n = run.conds[0].shape[1] // 2 if window else run.conds[0].shape[1]
        index = torch.arange(n, device=pipe.device) if window else None  # as plan_windows makes it
        length = pipe.text_encoder.max_length
        out = run(
            torch.zeros(2, n, p.in_channels, device=META),
            torch.tensor(1.0),  # a 0-dim time, as the sampler's: meta's would hold no value to read
            torch.zeros(2, n, 3, device=META),
            torch.zeros(2, length, p.context_in_dim, device=META),
            torch.zeros(2, length, 3, device=META),
            torch.zeros(2, p.vec_in_dim, device=META),
            3.0,
            index,
        )
    assert check.hits == []
    assert run.conds[0].device == META and out is not None
    assert pipe._offload is not None and pipe._offload.resident == "transformer"
