"""`--lora-init FILE`: a LoRA run starts from a LoRA file's update, in any layout pictor applies."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.checkpoint import load_bundle, write_safetensors
from pictor.lora_files import apply_lora
from pictor.lora_tools import lora_tensors, write_lora
from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids
from pictor.models.lora_layers import LoRAAdapter
from pictor.models.lora_updates import LoRAError, LoRAUpdate
from pictor.train.command import config_from_args
from pictor.train.command_flags import add_train_parser
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.data import make_dataset
from pictor.train.distributed import DistInfo
from pictor.train.loop import train
from pictor.train.lora import LoRAStage

SIZE = 16
CPU = DistInfo(0, 1, 0, torch.device("cpu"))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture {i}")
    return root


def _stage(base: Path, folder: Path, out: Path, **settings: object) -> LoRAStage:
    cfg = TrainConfig(
        stage="lora",
        out=str(out),
        base=str(base),
        data=str(folder),
        image_size=SIZE,
        **settings,  # type: ignore[arg-type]
    ).resolve()
    return LoRAStage(cfg, make_dataset(str(folder), SIZE, 0), CPU)


def _updates(stage: LoRAStage, count: int, rank: int, alpha: float) -> dict[str, LoRAUpdate]:
    """Random rank-`rank` updates of the run's first `count` adapted layers, the first a fused qkv."""
    paths = sorted(p for p, m in stage.module.named_modules() if isinstance(m, LoRAAdapter))
    chosen = sorted(p for p in paths if p.endswith(".qkv"))[:1] + [p for p in paths if not p.endswith(".qkv")]
    g = torch.Generator().manual_seed(5)
    out = {}
    for path in chosen[:count]:
        layer = stage.flux.get_submodule(path)
        A = torch.randn(rank, layer.in_features, generator=g)
        B = torch.randn(layer.out_features, rank, generator=g) * 0.1
        out[path] = LoRAUpdate(A, B, alpha, path)
    return out


def _outputs(flux: Flux) -> torch.Tensor:
    p: FluxParams = flux.params
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return flux(
            torch.randn(1, 16, p.in_channels, generator=g),
            make_img_ids(1, 8, 8),
            torch.randn(1, 5, p.context_in_dim, generator=g),
            make_txt_ids(1, 5),
            torch.tensor([0.4]),
            torch.randn(1, p.vec_in_dim, generator=g),
            guidance=torch.tensor([3.0]) if p.guidance_embed else None,
        )


@pytest.mark.parametrize("layout", ["pictor", "kohya", "diffusers"])
def test_step_zero_is_the_base_with_the_file_applied(
    base: Path, folder: Path, tmp_path: Path, layout: str
) -> None:
    probe = _stage(base, folder, tmp_path / "probe", lora_rank=8)
    updates = _updates(probe, 3, rank=2, alpha=3.0)
    file = tmp_path / f"{layout}.safetensors"
    write_lora(updates, file, layout)
    stage = _stage(base, folder, tmp_path / "run", lora_rank=8, lora_alpha=4.0, lora_init=str(file))
    adapters = {p: m for p, m in stage.module.named_modules() if isinstance(m, LoRAAdapter)}
    for path, adapter in adapters.items():
        want = updates[path].delta() if path in updates else torch.zeros_like(adapter.delta_weight())
        torch.testing.assert_close(adapter.delta_weight(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_outputs(stage.flux), _outputs(_applied(base, file)), atol=1e-5, rtol=1e-5)
    # the extra ranks train from the usual start: B zero in them, A drawn
    first = adapters[next(iter(updates))]
    assert torch.count_nonzero(first.lora_B.weight[:, 2:]) == 0
    assert torch.count_nonzero(first.lora_A.weight[2:]) > 0


def _applied(base: Path, file: Path) -> Flux:
    """The base bundle's transformer with the LoRA file applied as generation applies it."""
    reference = load_bundle(base)
    with torch.device("meta"):
        flux = Flux(FluxParams.from_dict(dict(reference.config.model)))
    flux.load_state_dict(reference.transformer, assign=True)
    apply_lora(flux.float(), file)
    return flux


def test_a_diffusers_file_with_q_k_and_v_apart_fuses_to_their_summed_rank(
    base: Path, folder: Path, tmp_path: Path
) -> None:
    """diffusers' trainers give q, k and v an A each: on FLUX.1's fused qkv that is a rank-3r update."""
    probe = _stage(base, folder, tmp_path / "probe", lora_rank=8)
    updates = _updates(probe, 1, rank=2, alpha=2.0)
    tensors, meta = lora_tensors(updates, "diffusers")
    key = next(k for k in tensors if k.endswith("to_k.lora_A.weight"))
    tensors[key] = tensors[key] + 0.5  # no longer the A that q and v have
    file = tmp_path / "apart.safetensors"
    write_safetensors(tensors, file, meta)
    with pytest.raises(
        LoRAError, match=r"rank at .*qkv is 6, above this run's --rank 4; train with --rank 6"
    ):
        _stage(base, folder, tmp_path / "a", lora_rank=4, lora_init=str(file))
    stage = _stage(base, folder, tmp_path / "b", lora_rank=8, lora_init=str(file))
    torch.testing.assert_close(_outputs(stage.flux), _outputs(_applied(base, file)), atol=1e-5, rtol=1e-5)


def test_a_file_that_does_not_fit_the_run_is_refused_with_what_to_change(
    base: Path, folder: Path, tmp_path: Path
) -> None:
    probe = _stage(base, folder, tmp_path / "probe", lora_rank=8)
    updates = _updates(probe, 2, rank=12, alpha=4.0)
    file = tmp_path / "wide.safetensors"
    write_lora(updates, file, "pictor")
    with pytest.raises(
        LoRAError, match=r"rank at \S+ is 12, above this run's --rank 8; train with --rank 12"
    ):
        _stage(base, folder, tmp_path / "a", lora_rank=8, lora_init=str(file))
    updates = _updates(probe, 2, rank=4, alpha=4.0)
    write_lora(updates, file, "pictor")
    qkv = next(iter(updates))
    others = ",".join(p for p in updates if p != qkv)
    with pytest.raises(LoRAError, match=rf"the file adapts {qkv}, which this run's --targets leave out"):
        _stage(base, folder, tmp_path / "b", lora_rank=8, lora_init=str(file), lora_targets=others)
    with pytest.raises(LoRAError, match="no such file"):
        _stage(base, folder, tmp_path / "c", lora_init=str(tmp_path / "missing.safetensors"))
    for settings, words in (
        ({"lora_algo": "lokr"}, r"--lora-init starts a plain LoRA run .* \(lokr\)"),
        ({"lora_dora": True}, r"\(lora \+ DoRA\)"),
    ):
        with pytest.raises(ConfigError, match=words):
            _stage(base, folder, tmp_path / "d", lora_init=str(file), **settings)


def test_a_run_records_its_start_and_a_resume_does_not_need_the_file(
    base: Path,
    folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe = _stage(base, folder, tmp_path / "probe", lora_rank=4)
    file = tmp_path / "start.safetensors"
    write_lora(_updates(probe, 2, rank=4, alpha=4.0), file, "kohya")
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "run"
    argv = ["train", "lora", "--base", str(base), "--data", str(folder), "--out", str(out), "--rank", "4"]
    common = ["--image-size", str(SIZE), "--batch-size", "2", "--sample-every", "0", "--no-progress"]
    monkeypatch.chdir(tmp_path)  # a relative path is kept absolute, as the run records where it started
    cfg = config_from_args(parser.parse_args([*argv, *common, "--max-steps", "2", "--lora-init", file.name]))
    assert cfg.lora_init == str(file.resolve())
    train(cfg)
    assert "--lora-init: 2 layer(s) start from" in capsys.readouterr().err
    file.unlink()
    resumed = config_from_args(parser.parse_args([*argv, "--resume", "--max-steps", "3"]))
    assert resumed.lora_init == str(file.resolve())
    train(resumed, resume=True)
    assert (out / "checkpoints" / "step-000003").is_dir()
