"""`pictor train controlnet`: a ControlNet grown from a frozen base teaches it to draw WHERE an edge map says;
a diffusers ControlNet folder that pictor's pipeline and diffusers load; identical weights after a resume;
the refusals.

The squares world (tests/train/square_world.py) with a base of FLUX.1's block shape (MLP ratio 4, which
the diffusers folder requires): the base draws its blue square on either side; the ControlNet, trained on
the Canny edges of each training image, must put it where the edges of another picture show a square.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pictor.checkpoint import CheckpointError, read_safetensors, read_safetensors_metadata
from pictor.cli_args import build_parser
from pictor.edge_maps import CONTROLNET_CANNY, canny_control_picture
from pictor.loading import load
from pictor.pipeline import GenerationRequest
from pictor.presets import get_preset
from pictor.train.command import config_from_args
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.logs import read_jsonl
from pictor.train.loop import train
from tests.train.square_world import COMMON, SIZE, blue_x, build_square_world
from tests.train.two_ranks import assert_ranks_follow_one_process, train_on_two_ranks

FLUX_SHAPED = {**get_preset("tiny")["model"], "mlp_ratio": 4.0}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_square_world(tmp_path_factory.mktemp("controlnet-world"), model=FLUX_SHAPED)


def _config(world: dict[str, Path], out: Path, **changes: object) -> TrainConfig:
    settings: dict = {
        "stage": "controlnet",
        "out": str(out),
        "base": str(world["base"]),
        "data": str(world["folder"]),
        "max_steps": 6,
        "batch_size": 4,
        "lr": 3e-3,
        "warmup_steps": 2,
        "save_every": 3,
        **COMMON,
    }
    return TrainConfig(**{**settings, **changes})  # type: ignore[arg-type]


def _edges(side: str) -> np.ndarray:
    """The Canny edges of a new picture of the square on `side`, as `pictor preprocess canny` draws them."""
    img = np.full((SIZE, SIZE, 3), (230, 230, 230), np.uint8)
    x0 = 1 if side == "left" else SIZE - 6
    img[5:10, x0 : x0 + 5] = (40, 80, 230)
    return canny_control_picture(img, *CONTROLNET_CANNY)


def _sides(pipe, edges: np.ndarray | None, n: int = 16) -> list[float | None]:  # type: ignore[no-untyped-def]
    request = GenerationRequest(
        "a blue square",
        seed=0,
        num_images=n,
        steps=12,
        controlnet_images=[edges] if edges is not None else None,
    )
    return [blue_x(np.asarray(g.image)) for g in pipe.generate(request)]


def test_a_controlnet_puts_things_where_the_edges_say(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "controlnet"
    result = train(_config(world, out, max_steps=200, batch_size=8, lr_schedule="cosine", save_every=100))
    folder = out / "controlnet"
    assert result.final == folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(p.name for p in (out / "final" / "controlnet").iterdir()) == sorted(
        p.name for p in folder.iterdir()
    )
    assert not (out / "checkpoints" / "step-000200" / "transformer.safetensors").exists()
    meta = read_safetensors_metadata(folder / "diffusion_pytorch_model.safetensors")
    training = json.loads(meta["pictor_training"])
    assert (
        training["step"] == 200 and training["controlnet_blocks"] == [1, 0] and training["control"] == "canny"
    )
    assert meta["base_model_hash"]
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "FluxControlNetModel" and config["num_layers"] == 1
    # Trained: the zero-initialised residual projection has moved
    weights = read_safetensors(folder / "diffusion_pytorch_model.safetensors")
    assert weights["controlnet_blocks.0.weight"].abs().max() > 1e-3

    pipe = load(str(world["base"]), device="cpu")
    free = [x for x in _sides(pipe, None) if x is not None]
    # The base draws its square on either side: without control, both sides show up.
    assert len(free) >= 12 and 0.15 < np.mean([x < 0.5 for x in free]) < 0.85, free
    pipe.add_controlnet(folder)
    left, right = _sides(pipe, _edges("left")), _sides(pipe, _edges("right"))
    hits = [x is not None and x < 0.5 for x in left] + [x is not None and x > 0.5 for x in right]
    assert np.mean(hits) >= 0.85, (left, right)

    # The benchmark's path (benchmarks/bench_controlnet_adherence.py): image j of spec i with its own edges
    from pictor.eval.shapes_run import generate_for_specs

    specs = [{"prompt": "a blue square"}]
    (row,) = generate_for_specs(pipe, specs, 2, 5, controls=[[_edges("left"), _edges("right")]])
    for j, side in enumerate(("left", "right")):
        (want,) = pipe.generate(
            GenerationRequest("a blue square", seed=5 + j, controlnet_images=[_edges(side)])
        )
        assert np.array_equal(row[j], np.asarray(want.image))

    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.FluxControlNetModel.from_pretrained(folder)
    assert sum(p.numel() for p in theirs.parameters()) == sum(w.numel() for w in weights.values())


def test_controlnet_runs_resume_bit_identically(world: dict[str, Path], tmp_path: Path) -> None:
    whole = train(_config(world, tmp_path / "whole"))
    train(_config(world, tmp_path / "split", max_steps=3))
    resumed = train(_config(world, tmp_path / "split"), resume=True)
    assert resumed.resumed_from == 3
    losses = [r["loss"] for r in read_jsonl(tmp_path / "whole" / "log.jsonl")]
    assert len(losses) == 6 and losses == [r["loss"] for r in read_jsonl(tmp_path / "split" / "log.jsonl")]
    name = "diffusion_pytorch_model.safetensors"
    a, b = read_safetensors(whole.final / name), read_safetensors(resumed.final / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="--controlnet-blocks"):
        train(_config(world, tmp_path / "split", max_steps=9, controlnet_blocks=[1, 1]), resume=True)


def test_torchrun_two_ranks_train_the_controlnet_as_one_process(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """DDP wraps the frozen model and the ControlNet together (with its default blocks, whose last text-stream
    output no single block reads, so those weights are frozen): 2 ranks x batch 2 follow the loss curve of 1
    process x batch 4 and end with identical weights."""
    single = train(_config(world, tmp_path / "one", save_every=0))
    out = tmp_path / "ddp"
    train_on_two_ranks("controlnet", world["base"], world["folder"], out, "--gradient-checkpointing")
    assert_ranks_follow_one_process(out, single.out)
    name = "diffusion_pytorch_model.safetensors"
    w_ddp, w_one = read_safetensors(out / "controlnet" / name), read_safetensors(single.final / name)
    # As the reference stage's: the zero-initialised projections get (near) zero gradients at first, where
    # Adam's normalised step turns float noise into +-lr; a few elements may differ by a few lr.
    for key in w_one:
        close = (w_ddp[key] - w_one[key]).abs() <= 1e-4
        assert close.float().mean() >= 0.97, (key, close.float().mean())
        assert (w_ddp[key] - w_one[key]).abs().mean() <= 1e-4, key


def test_shapes_previews_and_evals_draw_from_edges(world: dict[str, Path], tmp_path: Path) -> None:
    """The shapes world's sample grid (control pictures over the images) and eval run with the ControlNet."""
    out = tmp_path / "shapes"
    cfg = _config(
        world, out, data="shapes", max_steps=2, save_every=0, sample_every=2, eval_every=2, eval_prompts=6
    )
    train(cfg)
    grids = sorted((out / "samples").glob("*.png"))
    assert grids, list(out.iterdir())
    evals = read_jsonl(out / "eval.jsonl")
    assert evals and evals[-1]["step"] == 2 and 0.0 <= evals[-1]["overall"] <= 1.0


def test_misuse_is_refused_with_the_reason(world: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"--controlnet-blocks 2,0: .* only 1 double and 1 single"):
        train(_config(world, tmp_path / "deep", controlnet_blocks=[2, 0]))
    with pytest.raises(ConfigError, match="--cache-latents"):
        train(_config(world, tmp_path / "cached", cache_latents=True))
    with pytest.raises(ConfigError, match="two whole numbers >= 0, not both 0"):
        train(_config(world, tmp_path / "none", controlnet_blocks=[0, 0]))
    with pytest.raises(ConfigError, match="--controlnet-blocks is for controlnet training"):
        train(_config(world, tmp_path / "lora", stage="lora", controlnet_blocks=[1, 0]))
    with pytest.raises(ConfigError, match=r"control .* must be one of canny"):
        train(_config(world, tmp_path / "depth", control="depth"))
    (tmp_path / "mlp2").mkdir()
    tiny_base = build_square_world(tmp_path / "mlp2")["base"]  # the tiny preset: MLP ratio 2
    with pytest.raises(CheckpointError, match=r"not FLUX\.1's"):
        train(_config(world, tmp_path / "mlp", base=str(tiny_base)))


def test_the_command_line_takes_the_blocks_and_the_control(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["train", "controlnet", "--out", str(tmp_path), "--controlnet-blocks", "2,1", "--control", "canny"]
    )
    cfg = config_from_args(args)
    assert cfg.controlnet_blocks == [2, 1] and cfg.control == "canny"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "controlnet", "--out", str(tmp_path), "--controlnet-blocks", "2"])


def test_gradient_checkpointing_recomputes_the_controlnet_blocks_with_the_same_gradients() -> None:
    from pictor.models.controlnet import controlnet_from_transformer
    from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids

    torch.manual_seed(0)
    flux = Flux(FluxParams(**FLUX_SHAPED)).init_weights()
    net = controlnet_from_transformer(flux, 1, 1)
    with torch.no_grad():  # not zero, so that every block's gradient is
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    img, cond = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    txt, y = torch.randn(2, 3, 384), torch.randn(2, 384)
    inputs = (img, make_img_ids(2, 4, 4)[:, :4], cond, txt, make_txt_ids(2, 3), torch.tensor([0.3, 0.7]), y)
    calls: list[str] = []
    # (a checkpointed module's own hooks run once; the layers inside it run again when it is recomputed)
    for name, layer in [
        ("double", net.double_blocks[0].img_attn.qkv),
        ("single", net.single_blocks[0].linear1),
    ]:
        layer.register_forward_hook(lambda _m, *_, name=name: calls.append(name))
    grads = []
    for on in (False, True):
        net.zero_grad()
        net.gradient_checkpointing = on
        residuals = net(*inputs)
        sum(r.square().sum() for r in [*residuals.double, *residuals.single]).backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    # 2 blocks once without checkpointing; with it, once more in the backward pass
    assert calls.count("double") == 3 and calls.count("single") == 3, calls
    assert len(grads[0]) == len(grads[1]) and all(torch.allclose(a, b) for a, b in zip(*grads, strict=True))
