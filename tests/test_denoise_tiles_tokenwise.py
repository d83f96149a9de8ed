"""Denoise tiles against a token-wise transformer: a stand-in whose output for each noisy token depends only
on that token's own inputs (its noise, the tokens beside it, its position, its layout residual row) and on
what every window shares (text, time, guidance, a Kontext context's mean). For it, running in windows must
give the whole run's latents: so any token sliced from the wrong place (ids, Fill or control tokens, layout
rows, CFG halves, the context's outputs not dropped) shows as a difference. The real transformer's
attention makes windows differ by design; tests/test_denoise_tiles.py covers that side."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import pictor
from pictor import pipeline_sampling
from pictor.editing import EditRequest
from pictor.loading import pipeline_from_preset
from pictor.pipeline import GenerationRequest, Pipeline
from tests import test_control_images, test_fill_pipeline_parity, test_kontext, test_layout_generation

CONTEXT_OUTPUT = 1e6  # what the stand-in says for a Kontext context token: it must never reach the latents
UNPACK = pipeline_sampling.unpack_latents


def _tokenwise(pipe: Pipeline, calls: list[int]) -> None:
    out = pipe.transformer.params.out_channels

    def forward(
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
        img_residuals: list[torch.Tensor] | None = None,
        **_: Any,
    ) -> torch.Tensor:
        calls.append(img.shape[1])
        ids = img_ids.float()
        context = img_ids[..., 0] != 0  # Kontext's tokens: their first id is 1
        v = (
            torch.tanh(img[..., :out]) * 0.7
            + 0.05 * torch.sin(ids @ torch.tensor([0.3, 0.7, 1.3]))[..., None]
        )
        if img.shape[-1] > out:  # Fill's or a control picture's tokens beside the noise
            v = v + 0.3 * torch.tanh(img[..., out:]).mean(-1, keepdim=True)
        for r in img_residuals or []:
            v = v + 0.2 * r.float().mean(-1, keepdim=True)
        v = v + 0.1 * txt.float().mean((1, 2))[:, None, None] + 0.1 * y.float().mean(-1)[:, None, None]
        v = v + 0.05 * timesteps.float().reshape(-1, 1, 1)
        if guidance is not None:
            v = v + 0.01 * guidance.float()[:, None, None]
        if context.any():
            mean = (img * context[..., None]).sum(1, keepdim=True) / context.sum(1)[:, None, None]
            v = torch.where(context[..., None], torch.full_like(v, CONTEXT_OUTPUT), v + 0.3 * mean[..., :out])
        return v.to(img.dtype)

    pipe.transformer.forward = forward  # type: ignore[method-assign]


def _latents(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Any]) -> list[torch.Tensor]:
    """The final latents of every sampler run that `run` makes."""
    seen: list[torch.Tensor] = []

    def spy(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        seen.append(x.clone())
        return UNPACK(x, h, w)

    monkeypatch.setattr(pipeline_sampling, "unpack_latents", spy)
    run()
    return seen


def _picture(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(
        size, Image.Resampling.BILINEAR
    )


def _same_as_whole(
    monkeypatch: pytest.MonkeyPatch,
    pipe: Pipeline,
    make: Callable[[dict[str, Any]], Any],
    tile: int,
    overlap: int,
) -> list[int]:
    calls: list[int] = []
    _tokenwise(pipe, calls)
    tiled = _latents(monkeypatch, lambda: make({"denoise_tile": tile, "denoise_tile_overlap": overlap}))
    windowed = list(calls)
    whole = _latents(monkeypatch, lambda: make({}))
    assert len(tiled) == len(whole) >= 1
    for a, b in zip(tiled, whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    return windowed


def test_cfg_batches_and_samplers(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = pictor.load("default", device="cpu")
    for sampler in ("euler", "euler_ancestral", "dpmpp_2m"):
        calls = _same_as_whole(
            monkeypatch,
            pipe,
            lambda k, s=sampler: pipe.generate(
                GenerationRequest(
                    "a cat", seed=3, steps=3, width=128, height=96, num_images=2, sampler=s, **k
                )
            ),
            64,
            16,
        )
        assert set(calls) == {64}  # windows only, of 8 x 8 tokens


def test_a_masked_edit_and_a_hires_second_pass(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pipe = pictor.load("default", device="cpu")
    _picture(4, (160, 128)).save(tmp_path / "source.png")
    mask = np.zeros((128, 160), np.uint8)
    mask[20:90, 30:120] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    _same_as_whole(
        monkeypatch,
        pipe,
        lambda k: pipe.edit(
            EditRequest(
                tmp_path / "source.png",
                "a cat",
                mask=tmp_path / "mask.png",
                strength=0.7,
                seed=2,
                steps=3,
                **k,
            )
        ),
        64,
        32,
    )
    calls = _same_as_whole(
        monkeypatch,
        pipe,
        lambda k: pipe.generate(
            GenerationRequest("a cat", seed=1, steps=2, hires_scale=2.0, hires_steps=2, **k)
        ),
        64,
        16,
    )
    assert (
        calls == [64] * 2 + [64] * 2 * 9
    )  # the first pass whole (8 x 8 tokens), the second in 3 x 3 windows


def test_layout_residuals_follow_their_tokens(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pipe = pipeline_from_preset("tiny", device="cpu")
    adapter = test_layout_generation._adapter(pipe)
    pipe.set_layout_adapter(test_layout_generation._save(adapter, tmp_path / "layout.safetensors", pipe.hash))
    layout = test_layout_generation.LAYOUT
    _same_as_whole(
        monkeypatch,
        pipe,
        lambda k: pipe.generate(
            GenerationRequest("a cat", seed=2, steps=3, width=48, height=40, layout=layout, num_images=2, **k)
        ),
        16,
        4,
    )


def test_fill_and_control_tokens_follow_their_tokens(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fill = test_fill_pipeline_parity._pipeline(tmp_path / "fill")
    _picture(4, (48, 40)).save(tmp_path / "s.png")
    mask = np.zeros((40, 48), np.uint8)
    mask[8:30, 10:40] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    _same_as_whole(
        monkeypatch,
        fill,
        lambda k: fill.edit(
            EditRequest(tmp_path / "s.png", "a cat", mask=tmp_path / "m.png", seed=2, steps=3, **k)
        ),
        16,
        4,
    )
    canny = test_control_images._pipeline(tmp_path / "canny")
    _same_as_whole(
        monkeypatch,
        canny,
        lambda k: canny.generate(
            GenerationRequest(
                "a cat", seed=2, steps=3, control_image=_picture(2, (48, 40)), width=48, height=40, **k
            )
        ),
        16,
        4,
    )


def test_a_kontext_context_goes_with_every_window_and_its_outputs_are_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipe = test_kontext._pipe()
    context = _picture(1, (48, 40))
    _same_as_whole(
        monkeypatch,
        pipe,
        lambda k: pipe.generate(
            GenerationRequest("a cat", seed=2, steps=3, context_image=context, width=64, height=48, **k)
        ),
        16,
        4,
    )
