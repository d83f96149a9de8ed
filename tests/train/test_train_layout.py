"""`pictor train layout`: an adapter teaches a frozen base model WHERE to draw; adapter-only outputs;
identical losses after a resume; data without boxes refused.

The world (16x16 images, tiny preset): "a blue square", on the left half in some images and on the right
half in others, the caption the same. The base model learns to draw a blue square, on either side; the
layout adapter, trained from the boxes in metadata.jsonl, must put it in the box that a layout names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.checkpoint import CheckpointError, read_safetensors, read_safetensors_metadata
from pictor.loading import load
from pictor.pipeline import GenerationRequest
from pictor.train.config import TrainConfig
from pictor.train.data import make_dataset
from pictor.train.distributed import DistInfo
from pictor.train.layout import LayoutStage
from pictor.train.logs import read_jsonl
from pictor.train.loop import train
from tests.train.square_world import COMMON, blue_x, build_square_world, square
from tests.train.two_ranks import assert_ranks_follow_one_process, train_on_two_ranks

LEFT, RIGHT = [0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_square_world(tmp_path_factory.mktemp("layout-world"))


def _sides(pipe, box: list[float] | None, n: int = 16) -> list[float | None]:  # type: ignore[no-untyped-def]
    layout = [{"box": box, "phrase": "a blue square"}] if box else None
    request = GenerationRequest("a blue square", seed=0, num_images=n, steps=12, layout=layout)
    return [blue_x(np.asarray(g.image)) for g in pipe.generate(request)]


def test_a_layout_adapter_puts_things_where_the_boxes_say(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "layout"
    result = train(
        TrainConfig(
            stage="layout",
            out=str(out),
            base=str(world["base"]),
            data=str(world["folder"]),
            max_steps=200,
            batch_size=8,
            lr=3e-3,
            warmup_steps=5,
            lr_schedule="cosine",
            save_every=100,
            **COMMON,
        )
    )
    adapter = out / "layout.safetensors"
    assert result.final == adapter
    assert sorted(p.name for p in (out / "final").iterdir()) == ["layout.safetensors"]
    assert not (out / "checkpoints" / "step-000200" / "transformer.safetensors").exists()
    meta = read_safetensors_metadata(adapter)
    assert meta["format"] == "pictor-layout" and json.loads(meta["pictor_training"])["step"] == 200
    assert set(read_safetensors(adapter)) >= {
        "phrase_in.0.weight",
        "block_out.0.weight",
        "block_out.1.weight",
    }

    pipe = load(str(world["base"]), device="cpu")
    free = [x for x in _sides(pipe, None) if x is not None]
    # The base draws its square on either side: without a layout, both sides show up.
    assert len(free) >= 12 and 0.15 < np.mean([x < 0.5 for x in free]) < 0.85, free
    pipe.set_layout_adapter(adapter)
    left, right = _sides(pipe, LEFT), _sides(pipe, RIGHT)
    hits = [x is not None and x < 0.5 for x in left] + [x is not None and x > 0.5 for x in right]
    assert np.mean(hits) >= 0.85, (left, right)


def _layout_config(world: dict[str, Path], out: Path, **changes: object) -> TrainConfig:
    settings: dict = {
        "stage": "layout",
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


def test_layout_runs_resume_bit_identically(world: dict[str, Path], tmp_path: Path) -> None:
    whole = train(_layout_config(world, tmp_path / "whole"))
    train(_layout_config(world, tmp_path / "split", max_steps=3))
    resumed = train(_layout_config(world, tmp_path / "split"), resume=True)
    assert resumed.resumed_from == 3
    losses = [r["loss"] for r in read_jsonl(tmp_path / "whole" / "log.jsonl")]
    assert len(losses) == 6 and losses == [r["loss"] for r in read_jsonl(tmp_path / "split" / "log.jsonl")]
    a, b = read_safetensors(whole.final), read_safetensors(resumed.final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_ranks_train_the_adapter_as_one_process(world: dict[str, Path], tmp_path: Path) -> None:
    """DDP wraps the frozen model and the adapter together, so the ranks' adapter gradients are averaged:
    2 ranks x batch 2 follow the loss curve of 1 process x batch 4 and end with identical weights."""
    single = train(_layout_config(world, tmp_path / "one", save_every=0))
    out = tmp_path / "ddp"
    train_on_two_ranks("layout", world["base"], world["folder"], out)
    assert_ranks_follow_one_process(out, single.out)
    w_ddp, w_one = read_safetensors(out / "layout.safetensors"), read_safetensors(single.final)
    for key in w_one:
        assert torch.allclose(w_ddp[key], w_one[key], atol=1e-4), key


def test_data_without_boxes_is_refused(world: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(square(np.random.default_rng(i))[0]).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a blue square")
    with pytest.raises(CheckpointError, match=r"2 of 2 images .* have no layout"):
        train(
            TrainConfig(
                stage="layout",
                out=str(tmp_path / "x"),
                base=str(world["base"]),
                data=str(folder),
                max_steps=1,
                **COMMON,
            )
        )
    with pytest.raises(Exception, match="needs a base model"):
        train(TrainConfig(stage="layout", out=str(tmp_path / "y"), data="shapes", max_steps=1, **COMMON))


def test_previews_of_a_bucketed_folder_take_the_boxes_of_a_square_crop(base: Path, tmp_path: Path) -> None:
    """Previews are square: a wide picture's box is moved to where a square crop of it has the thing,
    not left at its place in the wide bucket's crop."""
    folder = tmp_path / "wide"
    folder.mkdir()
    lines = []
    for i, (w, h) in enumerate([(64, 32), (32, 32), (32, 64), (64, 32)]):
        Image.new("RGB", (w, h), (200, 40, 40)).save(folder / f"{i}.png")
        layout = [{"box": [0.3, 0.0, 0.7, 1.0], "phrase": "a red thing"}]
        lines.append({"file_name": f"{i}.png", "text": f"picture {i}", "layout": layout})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    settings = {**COMMON, "image_size": 32, "buckets": True, "num_samples": 4}
    cfg = TrainConfig(stage="layout", out=str(tmp_path / "r"), base=str(base), data=str(folder), **settings)
    stage = LayoutStage(cfg.resolve(), make_dataset(str(folder), 32, 0, buckets=True, multiple=8), DistInfo())
    seen: list = []

    def generate(ema: object, prompts: list[str], layouts: list, seeds: list[int]) -> np.ndarray:
        seen.extend(zip(prompts, layouts, strict=True))
        return np.zeros((len(prompts), 32, 32, 3), np.uint8)

    stage._generate_with_layouts = generate  # type: ignore[method-assign]
    stage.sample_grid(stage.module)
    assert [prompt for prompt, _ in seen] == [f"picture {i}" for i in range(4)]
    boxes = [[item["box"] for item in layout] for _, layout in seen]
    # 64x32 -> the middle 32x32: x 0.3..0.7 of the width (19.2..44.8 px) is 0.1..0.9 of the crop
    assert boxes[0] == [pytest.approx([0.1, 0.0, 0.9, 1.0])] == boxes[3]
    assert boxes[1] == [pytest.approx([0.3, 0.0, 0.7, 1.0])]
    assert boxes[2] == [pytest.approx([0.3, 0.0, 0.7, 1.0])]  # 32x64 -> the middle 32x32: x unchanged
    assert stage.ds[0][2]["layout"][0]["box"] != boxes[0][0]  # the wide bucket's own crop keeps more
