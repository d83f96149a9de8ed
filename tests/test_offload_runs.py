"""CPU offload around the runs: a move that fails half way leaves nothing on the device, a model switched
in directly (a grid's hires-upscaler axis) is managed, and runs outside the sampler (the server's upscale,
the shapes eval's autoencoder round trip) release what they brought in. The meta device stands in for
CUDA where a device must be told apart (`offload_meta`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from test_offload import Recorder
from torch import nn

import pictor
from pictor.models.offload import Offload
from pictor.pipeline import GenerationRequest, Pipeline

from offload_meta import META, MetaMover, meta_tensors
from test_hires_upscaler import make_upscaler


def _load() -> Pipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UNTRAINED
        return pictor.load("tiny", device="cpu")


def _offload(pipe: Pipeline, mover: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # offload on a CPU run saves nothing
        pipe.set_offload("model", mover=mover)


# -- a move that fails half way ----------------------------------------------------------------------------


def test_a_group_that_fails_half_way_in_is_moved_back_out() -> None:
    """Out of device memory in the middle of bringing a group in: `release` (every run's `finally`) must
    move back what did come in, or it stays on the device for good."""
    a, b = nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    mover = MetaMover(fail_at=3)  # a's weight and bias, b[0]'s weight, then the fourth tensor fails
    off = Offload("model", META, mover=mover)
    off.attach({"a": [a], "b": [b]})
    a(torch.ones(1, 4))  # a in
    with pytest.raises(RuntimeError, match="out of memory"):
        b(torch.ones(1, 4))
    assert meta_tensors(b) == ["0.weight"]  # half way in
    off.release()
    assert meta_tensors(a, b) == []


def test_a_swapped_block_that_fails_half_way_in_is_moved_back_out() -> None:
    """The same for a block of `offload="blocks"`, moved in by its own hook."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.top = nn.Linear(4, 4)
            self.double_blocks = nn.ModuleList(
                [nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))]
            )
            self.single_blocks = nn.ModuleList()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.top(x)
            for block in self.double_blocks:
                x = block(x)
            return x

    model = Model()
    # top (2 tensors) in with the group, block 0 (2) in and out again, then block 1: its third tensor fails
    mover = MetaMover(fail_at=6)
    off = Offload("blocks", META, mover=mover)
    off.attach({"transformer": [model]}, model)
    with pytest.raises(RuntimeError, match="out of memory"):
        model(torch.ones(1, 4))
    assert meta_tensors(model.double_blocks[1]) == ["0.weight", "0.bias"]
    off.release()
    assert meta_tensors(model) == []


# -- a grid's hires-upscaler axis --------------------------------------------------------------------------


def test_an_upscaler_set_directly_is_managed_by_offload(tmp_path: Path) -> None:
    """`grid_runs` switches `pipe.upscaler` between loaded files: each must be offload's upscaler group,
    moved in for its run and out after (else it would run where it waits, or stay on the device)."""
    from pictor.grid_runs import run_grid

    a = make_upscaler(tmp_path / "4x-a.safetensors", seed=0)
    b = make_upscaler(tmp_path / "2x-b.safetensors", seed=5, scale=2)
    pipe = _load()
    rec = Recorder(pipe)
    _offload(pipe, rec)
    request = GenerationRequest("a red circle", width=32, height=32, steps=2, seed=4, hires_scale=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_grid(pipe, request, f"hires-upscaler={a},{b}")
    assert len(result.cells) == 2
    nets = [m for m, inward in rec.moves if inward and type(m).__name__ == "CompactNet"]
    assert len({id(n) for n in nets}) == 2, "each cell's upscale model came in for its own cell"
    assert rec.nothing_in()
    assert pipe._offload is not None
    assert pipe._offload.groups.get("upscaler") == ([pipe.upscaler.net] if pipe.upscaler else None)


# -- runs outside the sampler -----------------------------------------------------------------------------


def test_the_servers_upscale_releases_the_upscale_model(tmp_path: Path) -> None:
    from pictor.serve.upscale_runs import run_upscale

    pipe = _load()
    pipe.set_upscaler(make_upscaler(tmp_path / "2x.safetensors", scale=2))
    rec = Recorder(pipe)
    _offload(pipe, rec)
    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(picture)

    class Store:
        def upload_path(self, name: str) -> Path:
            return tmp_path / name

    params = {"image": "picture.png", "tile": 32, "overlap": 4, "scale": None}
    (image,) = run_upscale(pipe, params, Store(), lambda *_: None)  # type: ignore[arg-type]
    assert image.image.size == (96, 96)
    assert pipe.upscaler is not None and rec.ins(pipe.upscaler.net) == 1
    assert rec.nothing_in() and pipe._offload is not None and pipe._offload.resident is None


def test_the_shapes_evals_autoencoder_round_trip_releases_the_autoencoder() -> None:
    from pictor.eval.shapes_run import autoencoder_roundtrip

    pipe = _load()
    rec = Recorder(pipe)
    _offload(pipe, rec)
    images = [[np.zeros((32, 32, 3), dtype=np.uint8)]]
    (row,) = autoencoder_roundtrip(pipe, images)
    assert row[0].shape == (32, 32, 3)
    assert rec.ins(pipe.autoencoder) == 1
    assert rec.nothing_in() and pipe._offload is not None and pipe._offload.resident is None


# -- moving out points back at the CPU weights -------------------------------------------------------------


def test_moving_out_points_back_at_the_cpu_weights_fp8_and_gguf_too() -> None:
    """The default mover keeps each weight's CPU tensor while its copy is in, and moving out points back at
    it: no device-to-host copy, no new CPU memory (the same data_ptr as before moving in), the same values,
    FP8 weights still FP8 and GGML weights still tagged with their format. (With the meta device a copy out
    is impossible: a mover that copied would fail here.)"""
    from pictor.models.weight_storage import QuantizedLinear, StoredLinear, ggml_format, store_fp8

    from tiny_bundle import tiny_models

    _cfg, flux, _ae = tiny_models("tiny-fp8", trained=True)
    assert store_fp8(flux, torch.float8_e4m3fn) > 0
    quantized = QuantizedLinear(64, 4, True, "Q8_0")
    tensors = [*flux.parameters(), *flux.buffers(), *quantized.parameters(), *quantized.buffers()]
    ptrs = [t.data_ptr() for t in tensors]
    values = [
        t.detach().clone().view(torch.uint8) if t.element_size() == 1 else t.detach().clone() for t in tensors
    ]
    off = Offload("model", META)  # the default mover
    off.attach({"transformer": [flux], "quantized": [quantized]})
    off.activate("transformer")
    fp8 = [m for m in flux.modules() if isinstance(m, StoredLinear)]
    assert meta_tensors(flux) and all(m.weight.is_meta and m.weight.dtype == torch.float8_e4m3fn for m in fp8)
    off.activate("quantized")  # the transformer out, pointed back
    assert meta_tensors(flux) == [] and meta_tensors(quantized)
    off.release()
    assert meta_tensors(flux, quantized) == []
    after = [*flux.parameters(), *flux.buffers(), *quantized.parameters(), *quantized.buffers()]
    assert [t.data_ptr() for t in after] == ptrs
    for t, v in zip(after, values, strict=True):
        assert torch.equal(t.detach().view(torch.uint8) if t.element_size() == 1 else t.detach(), v)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in fp8)
    assert ggml_format(quantized.weight) is not None and quantized.weight.dtype == torch.uint8
