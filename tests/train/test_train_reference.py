"""`pictor train reference`: an adapter teaches a frozen base model to take WHAT to draw from a picture;
the shapes world's reference pairs; adapter-only outputs; identical losses after a resume; torchrun.

The world (16x16 images, tiny preset): "a red square" or "a blue square" at a random place. The base
model learns to draw either when its caption says which. The reference adapter is trained with every
caption dropped (the images as their own references), so from an empty prompt it must give the square
the colour of the reference picture; without one, an empty prompt cannot say which colour is wanted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.checkpoint import read_safetensors, read_safetensors_metadata
from pictor.data.reference_pairs import ReferencePairs
from pictor.data.shapes import ShapesDataset
from pictor.eval.shapes import score_images
from pictor.loading import load
from pictor.pipeline import GenerationRequest
from pictor.train.config import TrainConfig
from pictor.train.logs import read_jsonl
from pictor.train.loop import train
from tests.train.two_ranks import assert_ranks_follow_one_process, train_on_two_ranks

SIZE = 16
COMMON = {"preset": "tiny", "image_size": SIZE, "sample_every": 0, "eval_every": 0, "progress": False}
RED, BLUE = (220, 40, 40), (40, 80, 230)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _square(rng: np.random.Generator, color: tuple[int, int, int]) -> np.ndarray:
    img = np.full((SIZE, SIZE, 3), (230, 230, 230), np.uint8)
    side = 8
    x0, y0 = (int(v) for v in rng.integers(1, SIZE - side - 1, size=2))
    img[y0 : y0 + side, x0 : x0 + side] = color
    return img


def redness(img: np.ndarray) -> float | None:
    """The share of red among the clearly red or blue pixels; None when there are too few of either."""
    a = img.astype(int)
    red = ((a[..., 0] - a[..., 2] > 80) & (a[..., 0] - a[..., 1] > 80)).sum()
    blue = ((a[..., 2] - a[..., 0] > 80) & (a[..., 2] - a[..., 1] > 60)).sum()
    return None if red + blue < 4 else float(red / (red + blue))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reference-world")
    folder = root / "squares"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(32):
        colour = "red" if i % 2 else "blue"
        Image.fromarray(_square(rng, RED if i % 2 else BLUE)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a {colour} square")
    ae = train(
        TrainConfig(
            stage="autoencoder",
            out=str(root / "ae"),
            data=str(folder),
            max_steps=300,
            batch_size=4,
            lr=4e-3,
            warmup_steps=5,
            save_every=0,
            **COMMON,
        )
    )
    base = train(
        TrainConfig(
            stage="t2i",
            out=str(root / "base"),
            data=str(folder),
            autoencoder_path=str(ae.out),
            max_steps=150,
            batch_size=8,
            lr=2e-3,
            warmup_steps=5,
            latent_stats_images=16,
            save_every=0,
            **COMMON,
        )
    )
    return {"folder": folder, "base": base.final, "root": root}


def _colours(pipe, prompt: str, reference: np.ndarray | None = None, n: int = 16) -> list[float | None]:  # type: ignore[no-untyped-def]
    request = GenerationRequest(prompt, seed=0, num_images=n, steps=12, reference=reference)
    return [redness(np.asarray(g.image)) for g in pipe.generate(request)]


def test_a_reference_adapter_carries_the_pictures_colour(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "reference"
    result = train(
        TrainConfig(
            stage="reference",
            out=str(out),
            base=str(world["base"]),
            data=str(world["folder"]),
            max_steps=200,
            batch_size=8,
            lr=3e-3,
            warmup_steps=5,
            lr_schedule="cosine",
            caption_dropout=1.0,
            save_every=100,
            **COMMON,
        )
    )
    adapter = out / "reference.safetensors"
    assert result.final == adapter
    assert sorted(p.name for p in (out / "final").iterdir()) == ["reference.safetensors"]
    assert not (out / "checkpoints" / "step-000200" / "transformer.safetensors").exists()
    meta = read_safetensors_metadata(adapter)
    assert meta["format"] == "pictor-reference" and json.loads(meta["pictor_training"])["step"] == 200
    assert {"img_in.weight", "out.weight", "blocks.0.qkv.weight"} <= set(read_safetensors(adapter))

    pipe = load(str(world["base"]), device="cpu")
    # The base draws either colour when the prompt names it.
    assert np.mean([r is not None and r > 0.5 for r in _colours(pipe, "a red square")]) >= 0.85
    assert np.mean([r is not None and r < 0.5 for r in _colours(pipe, "a blue square")]) >= 0.85
    pipe.set_reference_adapter(adapter)
    rng = np.random.default_rng(99)  # pictures the adapter never saw: other places
    reds = _colours(pipe, "", _square(rng, RED))
    blues = _colours(pipe, "", _square(rng, BLUE))
    hits = [r is not None and r > 0.5 for r in reds] + [r is not None and r < 0.5 for r in blues]
    assert np.mean(hits) >= 0.85, (reds, blues)


def test_shapes_pairs_show_the_same_spec_anew_with_one_caption_per_spec() -> None:
    ds = ShapesDataset(seed=3, size=64)
    pairs = ReferencePairs(ds)
    for i in range(6):
        image, caption, info = pairs[i]
        plain_image, plain_caption, _ = ds[i]
        np.testing.assert_array_equal(image, plain_image)
        assert caption == plain_caption
        reference, words = info["reference"]
        assert reference.shape == image.shape and not np.array_equal(reference, image)
        np.testing.assert_array_equal(reference, pairs[i][2]["reference"][0])  # a function of (seed, i)
        for obj in info["objects"]:  # the picture's caption names what it shows
            assert obj["color"] in words and obj["shape"] in words, (words, info["objects"])
        report = score_images([info], [[reference]])  # the reference shows exactly the spec
        assert report["overall"] == 1.0, (info["prompt"], report)
    # one wording per content: two items of the same spec (other places, other captions) share it
    seen: dict[str, int] = {}
    for j in range(3000):
        spec = ds[j][2]
        key = json.dumps([spec["objects"], spec.get("relation"), spec["background"]])
        if key in seen:
            break
        seen[key] = j
    first, second = pairs[seen[key]][2], pairs[j][2]
    assert first["reference"][1] == second["reference"][1]
    with pytest.raises(TypeError):
        len(pairs)  # the world is infinite, as the dataset itself


def _config(world: dict[str, Path], out: Path, **changes: object) -> TrainConfig:
    settings: dict = {
        "stage": "reference",
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


def test_reference_runs_resume_bit_identically(world: dict[str, Path], tmp_path: Path) -> None:
    whole = train(_config(world, tmp_path / "whole"))
    train(_config(world, tmp_path / "split", max_steps=3))
    resumed = train(_config(world, tmp_path / "split"), resume=True)
    assert resumed.resumed_from == 3
    losses = [r["loss"] for r in read_jsonl(tmp_path / "whole" / "log.jsonl")]
    assert len(losses) == 6 and losses == [r["loss"] for r in read_jsonl(tmp_path / "split" / "log.jsonl")]
    a, b = read_safetensors(whole.final), read_safetensors(resumed.final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_ranks_train_the_adapter_as_one_process(world: dict[str, Path], tmp_path: Path) -> None:
    """DDP wraps the frozen model and the adapter together, so the ranks' adapter gradients are averaged:
    2 ranks x batch 2 follow the loss curve of 1 process x batch 4 and end with identical weights."""
    single = train(_config(world, tmp_path / "one", save_every=0))
    out = tmp_path / "ddp"
    train_on_two_ranks("reference", world["base"], world["folder"], out)
    assert_ranks_follow_one_process(out, single.out)
    w_ddp, w_one = read_safetensors(out / "reference.safetensors"), read_safetensors(single.final)
    # The output maps start at zero, so the layers behind them get (near) zero gradients in the first steps,
    # where Adam's normalised step turns float noise into +-lr: a few elements (measured: under 1.5% of any
    # tensor) differ by a few lr, the rest agree. Both runs' losses agree above.
    for key in w_one:
        close = (w_ddp[key] - w_one[key]).abs() <= 1e-4
        assert close.float().mean() >= 0.97, (key, close.float().mean())
        assert (w_ddp[key] - w_one[key]).abs().mean() <= 1e-4, key


def test_a_base_is_required(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="needs a base model"):
        train(TrainConfig(stage="reference", out=str(tmp_path / "y"), data="shapes", max_steps=1, **COMMON))
