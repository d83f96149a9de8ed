"""Training on a guidance-distilled base (FLUX.1-dev's kind: `guidance_embed`), and the shifted timestep
distributions of kohya's FLUX.1 recipes.

A distilled transformer refuses to run without a guidance value, so before `guidance_scale` existed every
`pictor train lora --base <FLUX.1-dev bundle>` failed at its first step. The base here is the tiny preset
with a guidance embedding, random weights, on a folder of eight 16x16 pictures.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pictor
from pictor.checkpoint import BundleConfig, save_bundle
from pictor.flow import resolution_mu, sample_t, time_shift
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import Flux, FluxParams
from pictor.pipeline import GenerationRequest
from pictor.presets import get_preset
from pictor.train import previews
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.data import SampleDraws, sample_generator
from pictor.train.distributed import DistInfo
from pictor.train.logs import read_jsonl
from pictor.train.loop import train
from pictor.train.lora import LoRAStage

SIZE = 16
COMMON = {"image_size": SIZE, "eval_every": 0, "progress": False, "batch_size": 2, "warmup_steps": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


def _bundle(path: Path, guidance_embed: bool) -> Path:
    p = get_preset("tiny")
    model = {**p["model"], "guidance_embed": guidance_embed}
    defaults = {**p["defaults"], "guidance": 3.5, "guidance_mode": "distilled" if guidance_embed else "cfg"}
    cfg = BundleConfig(
        name=path.name,
        preset="tiny",
        model=model,
        autoencoder=p["autoencoder"],
        text_encoder=p["text_encoder"],
        defaults=defaults,
        trained=True,
    )
    torch.manual_seed(0)
    flux = Flux(FluxParams.from_dict(model))
    ae = AutoEncoder(AutoEncoderParams.from_dict(p["autoencoder"]))
    save_bundle(path, cfg, flux.state_dict(), ae.state_dict())
    return path


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _bundle(tmp_path_factory.mktemp("dev") / "dev", guidance_embed=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text("a zorblax")
    return root


def _lora(base: Path, data: Path, out: Path, **settings: object) -> list[float]:
    cfg = TrainConfig(
        stage="lora", out=str(out), base=str(base), data=str(data), max_steps=2, **{**COMMON, **settings}
    )  # type: ignore[arg-type]
    train(cfg)
    return [row["loss"] for row in read_jsonl(out / "log.jsonl")]


def test_a_lora_trains_on_a_distilled_base_at_the_guidance_asked(
    distilled: Path, folder: Path, tmp_path: Path
) -> None:
    default = _lora(distilled, folder, tmp_path / "default", sample_every=2)
    one = _lora(distilled, folder, tmp_path / "one", guidance_scale=1.0, sample_every=0)
    other = _lora(distilled, folder, tmp_path / "other", guidance_scale=3.5, sample_every=0)
    assert all(math.isfinite(x) for x in default)
    assert default == one  # the default is kohya's 1.0
    # the value reaches the model: the first step is the frozen base's loss, at another guidance
    assert abs(other[0] - one[0]) > 1e-6
    assert (tmp_path / "default" / "samples" / "step-000002.png").is_file()
    assert (tmp_path / "default" / "lora.safetensors").is_file()


def test_guidance_scale_is_refused_for_a_model_without_a_guidance_embedding(tmp_path: Path) -> None:
    base = _bundle(tmp_path / "cfg-model", guidance_embed=False)
    cfg = TrainConfig(stage="lora", out=str(tmp_path / "run"), base=str(base), guidance_scale=3.5)
    with pytest.raises(ConfigError, match=r"--guidance-scale 3.5: this model has no guidance embedding"):
        cfg.resolve()


def test_sample_guidance_defaults_to_the_model_default(distilled: Path, tmp_path: Path) -> None:
    resolved = TrainConfig(stage="lora", out=str(tmp_path / "r"), base=str(distilled)).resolve()
    assert resolved.sample_guidance == 3.5  # the bundle's distilled guidance, not CFG's 4
    shapes = TrainConfig(stage="t2i", out=str(tmp_path / "s"), preset="tiny").resolve()
    assert shapes.sample_guidance == get_preset("tiny")["defaults"]["guidance"]


@pytest.mark.parametrize("kind", ["distilled", "no cfg"])
def test_previews_are_the_pipelines_images(distilled: Path, tmp_path: Path, kind: str) -> None:
    """Sample grids draw what `pictor generate` would: one pass per step, with the guidance embedded in a
    distilled model, and without CFG at guidance 1 in another (a model whose defaults say no CFG)."""
    model = distilled if kind == "distilled" else _bundle(tmp_path / "plain", guidance_embed=False)
    guidance = 2.0 if kind == "distilled" else 1.0
    pipe = pictor.load(str(model), device="cpu")
    prompts, seeds = ["a zorblax", "a red circle"], [3, 4]
    got = previews.generate(
        pipe.transformer,
        pipe.autoencoder,
        pipe.text_encoder,
        prompts,
        seeds,
        SIZE,
        steps=4,
        guidance=guidance,
        device=torch.device("cpu"),
        amp=False,
    )
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        request = GenerationRequest(prompt, seed=seed, steps=4, guidance=guidance, width=SIZE, height=SIZE)
        want = np.asarray(pipe.generate(request)[0].image).astype(np.int16)
        assert np.abs(got[i].astype(np.int16) - want).max() <= 1


def test_shifted_timesteps_follow_kohyas_formula() -> None:
    g = torch.Generator().manual_seed(5)
    base = sample_t(20_000, "logit_normal", torch.Generator().manual_seed(5))
    shifted = sample_t(20_000, "shift", g, shift=3.1582)
    torch.testing.assert_close(shifted, 3.1582 * base / (1 + 2.1582 * base))
    torch.testing.assert_close(shifted, time_shift(math.log(3.1582), 1.0, base))
    assert shifted.median() > 0.70 > base.median()  # pushed toward noise (t = 1)
    assert sample_t(10, "shift", torch.Generator().manual_seed(1), shift=1.0).equal(
        sample_t(10, "logit_normal", torch.Generator().manual_seed(1))
    )
    with pytest.raises(ValueError, match="shift must be > 0"):
        sample_t(1, "shift", shift=0.0)


def test_flux_shift_uses_the_sampling_schedules_shift_at_the_runs_token_count(
    distilled: Path, folder: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(
        stage="lora",
        out=str(tmp_path / "r"),
        base=str(distilled),
        data=str(folder),
        timestep_sampling="flux_shift",
        **COMMON,  # type: ignore[arg-type]
    ).resolve()
    stage = LoRAStage(cfg, _folder_dataset(folder), DistInfo(0, 1, 0, torch.device("cpu")))
    draws = stage.draws()
    factor = 2 ** (len(get_preset("tiny")["autoencoder"]["ch_mult"]) - 1)
    tokens = (SIZE // factor // 2) ** 2  # 2x2 latent patches
    assert draws.t_kind == "flux_shift"
    assert draws.t_shift == pytest.approx(math.exp(resolution_mu(tokens)))
    plain = dataclasses.replace(draws, t_kind="logit_normal", t_shift=1.0)
    t, t0 = draws(7)["t"], plain(7)["t"]
    torch.testing.assert_close(t, time_shift(resolution_mu(tokens), 1.0, t0))


def test_sample_draws_keep_their_old_numbers_without_a_shift() -> None:
    """Runs from before the shift settings resume on the same noise and timesteps: the draws are still
    dropout, sigmoid of one normal, then the noise, from the sample's own generator."""
    draws = SampleDraws(0, (4, 2, 2), timesteps=True, caption_dropout=0.1)
    for k in (0, 5):
        g = sample_generator(0, k)
        drop = torch.rand(1, generator=g) < 0.1
        t = torch.sigmoid(torch.randn(1, generator=g))
        noise = torch.randn((4, 2, 2), generator=g)
        got = draws(k)
        assert got["drop"].equal(drop) and got["t"].equal(t) and got["noise"].equal(noise)


def test_timestep_flags_reach_the_config(tmp_path: Path) -> None:
    import argparse

    from pictor.train.command import config_from_args
    from pictor.train.command_flags import add_train_parser

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    flags = ["--timestep-sampling", "shift", "--timestep-shift", "3.1582", "--guidance-scale", "3.5"]
    args = parser.parse_args(["train", "lora", "--out", str(tmp_path), *flags])
    cfg = config_from_args(args)
    assert (cfg.timestep_sampling, cfg.timestep_shift, cfg.guidance_scale) == ("shift", 3.1582, 3.5)
    for bad, words in [
        ({"timestep_shift": 0.0}, "timestep_shift .--timestep-shift. must be > 0"),
        ({"timestep_sampling": "cosmic"}, "timestep_sampling .--timestep-sampling. must be one of"),
    ]:
        with pytest.raises(ConfigError, match=words):
            TrainConfig(stage="t2i", out=str(tmp_path), preset="tiny", **bad).resolve()  # type: ignore[arg-type]


def _folder_dataset(folder: Path):  # type: ignore[no-untyped-def]
    from pictor.train.data import make_dataset

    return make_dataset(str(folder), SIZE, 0)


def test_settings_that_would_be_ignored_or_wrong_are_refused(distilled: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "r")
    for settings, words in (
        ({"timestep_shift": 5.0}, "--timestep-shift applies to --timestep-sampling shift, not logit_normal"),
        (
            {"timestep_sampling": "flux_shift", "timestep_shift": 5.0},
            "flux_shift takes its shift from the image size",
        ),
        ({"caption_ext": ".png"}, "that is an image extension"),
        ({"caption_ext": ".a/b"}, "must be a file extension"),
        ({"preset": "flux-dev"}, "guidance-distilled architecture .* is made by distilling"),
    ):
        config = {"preset": "tiny", **settings}
        with pytest.raises(ConfigError, match=words):
            TrainConfig(stage="t2i", out=out, **config).resolve()  # type: ignore[arg-type]
    # fine-tuning a distilled bundle whole is allowed, and shift takes its default
    resolved = TrainConfig(stage="t2i", out=out, init=str(distilled), timestep_sampling="shift").resolve()
    assert resolved.timestep_shift is None and resolved.sample_guidance == 3.5


def test_a_stored_config_with_the_old_default_shift_still_resumes(tmp_path: Path) -> None:
    """Configs stored while timestep_shift defaulted to 3.0 hold it whatever their sampling: no request."""
    old = {"stage": "t2i", "out": str(tmp_path), "preset": "tiny", "timestep_shift": 3.0}
    assert TrainConfig.from_dict(old).resolve().timestep_shift is None
    shifted = TrainConfig.from_dict({**old, "timestep_sampling": "shift"}).resolve()
    assert shifted.timestep_shift == 3.0
    with pytest.raises(ConfigError, match="--timestep-shift applies to --timestep-sampling shift"):
        TrainConfig.from_dict({**old, "timestep_shift": 4.0}).resolve()
