"""FLUX.1 ControlNets in pictor's pipeline: the same pictures as diffusers' `FluxControlNetPipeline` on tiny
random components (InstantX-like, Union, XLabs-like, two at once, a step window), and records, reproduction,
edits and refusals."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pictor import pipeline_sampling
from pictor.checkpoint import BundleConfig
from pictor.controlnet_runs import ControlNetError, kept_steps
from pictor.editing import EditRequest
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.control_residuals import ControlResiduals
from pictor.models.flux import FluxParams, pack_latents
from pictor.models.text import build_text_encoder
from pictor.notices import PictorWarning
from pictor.pipeline import GenerationRequest, Pipeline
from pictor.provenance import parameters_text, read_record
from pictor.reproduce import reproduce

from tiny_flux import random_flux, randomize_
from tiny_text_folders import T5_LEN, diffusers_components, flux_text_encoders

diffusers = pytest.importorskip("diffusers")
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402

PICTOR = shutil.which("pictor")


UNPACK = pipeline_sampling.unpack_latents  # before any test's spy stands in for it


def _ae(factor: int) -> AutoEncoderParams:
    return AutoEncoderParams(
        resolution=32,
        in_channels=3,
        ch=32,
        out_ch=3,
        ch_mult=[1, 2] if factor == 2 else [1, 1, 2, 2],  # 2: one downsampling; 8: three
        num_res_blocks=1,
        z_channels=4 if factor == 2 else 16,
        scale_factor=0.3611,
        shift_factor=0.1159,
    )


# Three blocks of each kind, so a two-block ControlNet's residuals are spread (0, 0, 1) or cycled (0, 1, 0).
MODEL = FluxParams(
    in_channels=16,
    out_channels=16,
    vec_in_dim=32,
    context_in_dim=32,
    hidden_size=32,
    mlp_ratio=4.0,
    num_heads=2,
    depth=3,
    depth_single_blocks=3,
    axes_dim=[4, 6, 6],
    guidance_embed=True,
)
DEFAULTS = {
    "width": 32,
    "height": 32,
    "steps": 3,
    "guidance": 4.0,
    "sampler": "euler",
    "schedule": "flux",
    "guidance_mode": "distilled",
}


def _pipeline(root: Path, factor: int = 2) -> Pipeline:
    text = flux_text_encoders(root)
    ae = _ae(factor)
    # XLabs' ControlNets read 16 latent channels per pixel of the latents (64 per token), as FLUX.1's.
    model = MODEL if factor == 2 else replace(MODEL, in_channels=64, out_channels=64)
    config = BundleConfig(
        name=f"tiny-f{factor}", model=model.to_dict(), autoencoder=ae.to_dict(), text_encoder=text,
        defaults=DEFAULTS,
    )  # fmt: skip
    flux = random_flux(model, seed=0)
    torch.manual_seed(0)
    return Pipeline(flux, AutoEncoder(ae).eval(), build_text_encoder(text), config, device="cpu")


def _controlnet(root: Path, name: str, seed: int, **config: Any) -> Path:
    """A diffusers ControlNet folder with every weight random (its zero-initialised layers too)."""
    kw: dict[str, Any] = {
        "patch_size": 1,
        "in_channels": 16,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": True,
        "axes_dims_rope": [4, 6, 6],
        **config,
    }
    net = diffusers.FluxControlNetModel(**kw).eval()
    with torch.no_grad():
        randomize_(net, seed)
    net.save_pretrained(root / name, safe_serialization=True)
    return root / name


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("controlnet")


@pytest.fixture(scope="module")
def pipe(root: Path) -> Pipeline:
    return _pipeline(root / "f2")


@pytest.fixture(scope="module")
def nets(root: Path) -> dict[str, Path]:
    return {
        "instantx": _controlnet(root, "instantx", 1),
        "union": _controlnet(root, "union", 2, num_mode=3),
        "other": _controlnet(root, "other", 3),
        "small": _controlnet(root, "small", 7, num_layers=1, num_single_layers=1),
    }


def _with(pipe: Pipeline, *paths: Path) -> Pipeline:
    pipe.controlnets = []
    for path in paths:
        pipe.add_controlnet(path)
    return pipe


def _picture(seed: int = 0, size: tuple[int, int] = (32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.NEAREST)


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _diffusers(
    pipe: Pipeline, root: Path, paths: list[Path], monkeypatch: pytest.MonkeyPatch, seed: int, **kw: Any
) -> np.ndarray:
    """diffusers' FluxControlNetPipeline on the pipeline's weights and these ControlNets -> uint8 pixels."""
    loaded = [diffusers.FluxControlNetModel.from_pretrained(p).eval() for p in paths]
    controlnet = loaded[0] if len(loaded) == 1 else diffusers.FluxMultiControlNetModel(loaded)
    text_root = Path(pipe.config.text_encoder["clip"]["path"]).parent
    theirs = diffusers.FluxControlNetPipeline(**diffusers_components(text_root, pipe), controlnet=controlnet)
    # diffusers draws the control picture's latents from the encoder's distribution, pictor takes its mean.
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    width, height = kw.pop("width"), kw.pop("height")
    f = pipe.autoencoder.params.downsample_factor
    noise = pipe.initial_noise([seed], height // f, width // f)
    out = theirs(
        height=height,
        width=width,
        latents=pack_latents(noise),
        max_sequence_length=T5_LEN,
        output_type="pt",
        **kw,
    ).images[0]
    return (out.permute(1, 2, 0).numpy() * 255).round().astype(int)


def _close(got: Image.Image, want: np.ndarray) -> None:
    diff = np.abs(_px(got).astype(int) - want).max()
    assert diff <= 1, f"max |pictor - diffusers| = {diff} levels"


@pytest.mark.parametrize(
    ("kind", "pictor_kw", "diffusers_kw"),
    [
        ("instantx", {"controlnet_scales": [0.7]}, {"controlnet_conditioning_scale": 0.7}),
        ("union", {"controlnet_modes": ["depth"]}, {"control_mode": 2}),
        (
            "instantx",
            {"controlnet_start": 0.34, "controlnet_end": 1.0},  # 3 steps: only the last keeps it
            {"control_guidance_start": 0.34, "control_guidance_end": 1.0},
        ),
    ],
)
def test_controlnet_pipeline_and_pictor_paint_the_same_picture(
    pipe: Pipeline,
    root: Path,
    nets: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    pictor_kw: dict[str, Any],
    diffusers_kw: dict[str, Any],
) -> None:
    width, height, seed, prompt = 32, 24, 7, "a red square"
    control = _picture(1, (40, 20))  # another size and aspect: both resize it with Lanczos
    _with(pipe, nets[kind])
    request = GenerationRequest(
        prompt, width=width, height=height, steps=3, seed=seed, controlnet_images=[control], **pictor_kw
    )
    (ours,) = pipe.generate(request)
    want = _diffusers(
        pipe, root, [nets[kind]], monkeypatch, seed, prompt=prompt, control_image=control, width=width,
        height=height, num_inference_steps=3, guidance_scale=4.0, **diffusers_kw,
    )  # fmt: skip
    _close(ours.image, want)
    # Not trivially equal: without the ControlNet the picture is another one.
    plain = _with(pipe).generate(GenerationRequest(prompt, width=width, height=height, steps=3, seed=seed))
    assert np.abs(_px(plain[0].image) - _px(ours.image)).mean() > 2


def test_two_controlnets_add_up_as_diffusers_multi_controlnet(
    pipe: Pipeline, root: Path, nets: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pictures = [_picture(3), _picture(4)]
    _with(pipe, nets["instantx"], nets["other"])
    (ours,) = pipe.generate(
        GenerationRequest(
            "two shapes", width=32, height=32, steps=3, seed=2, controlnet_images=pictures,
            controlnet_scales=[0.8, 0.5],
        )
    )  # fmt: skip
    want = _diffusers(
        pipe, root, [nets["instantx"], nets["other"]], monkeypatch, 2, prompt="two shapes",
        control_image=pictures, width=32, height=32, num_inference_steps=3, guidance_scale=4.0,
        controlnet_conditioning_scale=[0.8, 0.5],
    )  # fmt: skip
    _close(ours.image, want)


def test_an_xlabs_controlnet_reads_pixels_and_cycles_its_blocks(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = _pipeline(root / "f8", factor=8)
    net = _controlnet(
        root,
        "xlabs",
        4,
        patch_size=2,
        in_channels=64,
        conditioning_embedding_channels=16,
        num_single_layers=0,
    )
    _with(pipe, net)
    control = _picture(5, (64, 64))
    (ours,) = pipe.generate(
        GenerationRequest("a grey circle", width=64, height=64, steps=3, seed=3, controlnet_images=[control])
    )
    assert pipe.controlnets[0].info["kind"] == "xlabs"
    want = _diffusers(
        pipe, root, [net], monkeypatch, 3, prompt="a grey circle", control_image=control, width=64,
        height=64, num_inference_steps=3, guidance_scale=4.0,
    )  # fmt: skip
    _close(ours.image, want)


def test_the_step_window_follows_diffusers_keep_rule() -> None:
    assert kept_steps(4, 0.0, 1.0) == [True] * 4
    assert kept_steps(4, 0.25, 1.0) == [False, True, True, True]
    assert kept_steps(4, 0.0, 0.5) == [True, True, False, False]
    assert kept_steps(3, 0.34, 1.0) == [False, False, True]


def test_records_name_the_controlnets_and_reproduce_bit_exact(pipe: Pipeline, nets: dict[str, Path]) -> None:
    _with(pipe, nets["union"], nets["instantx"])
    pictures = [_picture(6, (48, 48)), _picture(7)]
    images = pipe.generate(
        GenerationRequest(
            "a blue square", seed=11, num_images=2, controlnet_images=pictures, controlnet_scales=[0.6],
            controlnet_modes=["canny", None], controlnet_end=0.7,
        )
    )  # fmt: skip
    record = images[1].record
    first, second = record["controlnets"]
    assert (first["kind"], first["mode"], first["scale"]) == ("union", 0, 0.6)
    assert (second["kind"], second["scale"]) == ("instantx", 0.6) and "mode" not in second
    assert record["controlnet_end"] == 0.7 and record["controlnet_start"] == 0.0
    assert "ControlNet" in parameters_text(record)
    again = reproduce(pipe, record, controlnet_images=pictures)
    assert np.array_equal(_px(again.image), _px(images[1].image))
    with pytest.raises(ControlNetError, match="pass the original picture"):
        reproduce(pipe, record, controlnet_images=pictures[::-1])
    with pytest.raises(ControlNetError, match="--controlnet-image"):
        reproduce(pipe, record)
    _with(pipe, nets["instantx"], nets["union"])
    with pytest.raises(ControlNetError, match="same files, in order"):
        reproduce(pipe, record, controlnet_images=pictures)


def test_an_edit_takes_the_controlnet_and_reproduces(
    pipe: Pipeline, nets: dict[str, Path], tmp_path: Path
) -> None:
    _with(pipe, nets["instantx"])
    source = _picture(8)
    (image,) = pipe.edit(
        EditRequest(source, "a green circle", strength=0.6, seed=4, controlnet_images=[_picture(9)])
    )
    assert image.record["controlnets"][0]["kind"] == "instantx"
    again = reproduce(pipe, image.record, source=source, controlnet_images=[_picture(9)])
    assert np.array_equal(_px(again.image), _px(image.image))


@pytest.mark.parametrize(
    ("loaded", "kw", "message"),
    [
        ([], {"controlnet_images": ["x.png"]}, "no ControlNet is loaded"),
        (["instantx"], {}, "--controlnet-image"),
        (["instantx"], {"controlnet_images": [0, 0]}, "2 control pictures for 1 ControlNets"),
        (["union"], {"controlnet_images": [0]}, "--controlnet-mode"),
        (["instantx"], {"controlnet_images": [0], "controlnet_modes": ["canny"]}, "takes no mode"),
        (["union"], {"controlnet_images": [0], "controlnet_modes": ["pose"]}, "modes 0 to 2"),
        (["union"], {"controlnet_images": [0], "controlnet_modes": ["sketch"]}, "is not one of"),
        (["instantx"], {"controlnet_images": [0], "controlnet_scales": [11]}, "from 0 to 10"),
        (["instantx"], {"controlnet_images": [0], "controlnet_scales": [float("nan")]}, "from 0 to 10"),
        (["instantx"], {"controlnet_images": [0], "controlnet_start": 0.5, "controlnet_end": 0.5}, "start <"),
        (["instantx"], {"controlnet_images": [0], "hires_scale": 2.0}, "hires"),
    ],
)
def test_misuse_is_refused_with_the_reason(
    pipe: Pipeline, nets: dict[str, Path], loaded: list[str], kw: dict[str, Any], message: str
) -> None:
    _with(pipe, *(nets[name] for name in loaded))
    if kw.get("controlnet_images"):
        kw["controlnet_images"] = [_picture(i) for i in range(len(kw["controlnet_images"]))]
    with pytest.raises(ControlNetError, match=message):
        pipe.generate(GenerationRequest("a shape", **kw))


def test_a_controlnet_for_another_model_is_refused(root: Path, pipe: Pipeline) -> None:
    wide = _controlnet(root, "wide", 5, num_attention_heads=3)  # width 48, not 32
    with pytest.raises(ControlNetError, match="width 48"):
        _with(pipe, wide)
    deep = _controlnet(root, "deep", 6, num_layers=4)
    with pytest.raises(ControlNetError, match="more than"):
        _with(pipe, deep)
    with pytest.raises(ControlNetError):
        _with(pipe, root / "nowhere")


@pytest.mark.skipif(PICTOR is None, reason="the pictor console script is not installed")
def test_cli_generate_with_a_controlnet_and_reproduce(
    pipe: Pipeline, nets: dict[str, Path], root: Path, tmp_path: Path
) -> None:
    from pictor.checkpoint import save_bundle

    bundle = tmp_path / "bundle"
    save_bundle(bundle, pipe.config, pipe.transformer.state_dict(), pipe.autoencoder.state_dict())
    control = tmp_path / "edges.png"
    _picture(10).save(control)
    run = [str(PICTOR), "generate", "a red circle", "--model", str(bundle), "--seed", "3", "--steps", "2"]
    net = ["--controlnet", str(nets["union"]), "--controlnet-image", str(control)]
    done = subprocess.run(
        [*run, *net, "--controlnet-mode", "canny", "--controlnet-scale", "0.5", "-o", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    made = Path(done.stdout.split()[0])
    assert read_record(made)["controlnets"][0]["mode"] == 0
    # Reproduced from the record's ControlNet path, with the picture passed again.
    again = subprocess.run(
        [str(PICTOR), "reproduce", str(made), "--model", str(bundle), "--controlnet-image", str(control),
         "-o", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "identical" in again.stderr, again.stderr
    missing = subprocess.run([*run, *net[:2], "-o", str(tmp_path / "c")], capture_output=True, text=True)
    assert missing.returncode != 0 and "--controlnet-image" in missing.stderr


def test_controlnets_of_different_sizes_add_block_by_block(pipe: Pipeline, nets: dict[str, Path]) -> None:
    """diffusers' multi-ControlNet zips the residual lists, dropping the longer one's tail; pictor spreads
    each ControlNet over the model's blocks first, so a one-block ControlNet beside a two-block one speaks
    in every block, as it does alone."""
    from pictor.models.control_residuals import ControlResiduals

    a, b = torch.ones(1, 2, 3), 2 * torch.ones(1, 2, 3)
    one = ControlResiduals([a], [a])
    two = ControlResiduals([b, 3 * b], [])
    total = one.spread(3, 3) + two.spread(3, 3)
    assert [float(r[0, 0, 0]) for r in total.double] == [3.0, 3.0, 7.0]  # two's residuals stretch 0, 0, 1
    assert [float(r[0, 0, 0]) for r in total.single] == [1.0, 1.0, 1.0]
    cycled = ControlResiduals([a, b], [], repeat=True).spread(3, 3)
    assert [float(r[0, 0, 0]) for r in cycled.double] == [1.0, 2.0, 1.0]
    pictures = [_picture(3), _picture(4)]
    _with(pipe, nets["small"], nets["instantx"])
    both = pipe.generate(GenerationRequest("x", seed=1, steps=2, controlnet_images=pictures))[0]
    _with(pipe, nets["instantx"])
    alone = pipe.generate(GenerationRequest("x", seed=1, steps=2, controlnet_images=pictures[1:]))[0]
    assert np.abs(_px(both.image) - _px(alone.image)).mean() > 1


def test_info_describes_a_controlnet_folder_and_file(nets: dict[str, Path], tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    from pictor.cli import main

    def info(target: Path) -> dict[str, Any]:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["info", str(target)]) == 0
        return json.loads(out.getvalue())

    shown = info(nets["union"])
    assert (shown["model"], shown["kind"], shown["modes"]) == ("FLUX.1 ControlNet", "union", 3)
    assert "--controlnet-mode" in shown["use"] and len(shown["sha256"]) == 64
    single = tmp_path / "instantx.safetensors"
    save_file(load_file(nets["instantx"] / "diffusion_pytorch_model.safetensors"), single)
    shown = info(single)  # a tiny head has no FLUX.1 RoPE split to infer: the summary says what is missing
    assert shown["model"] == "FLUX.1 ControlNet" and "axes_dim" in shown["error"]


def test_a_single_file_controlnet_takes_the_models_rope_split(
    pipe: Pipeline, nets: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    single = tmp_path / "instantx.safetensors"
    save_file(load_file(nets["instantx"] / "diffusion_pytorch_model.safetensors"), single)
    request = GenerationRequest("x", seed=4, steps=2, controlnet_images=[_picture(1)])
    folder = _with(pipe, nets["instantx"]).generate(request)[0]
    file = _with(pipe, single).generate(request)[0]
    assert np.array_equal(_px(folder.image), _px(file.image))


def test_under_true_cfg_the_negative_half_reuses_the_positive_residuals(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model with real classifier-free guidance: diffusers' true CFG (true_cfg_scale, a negative prompt)
    runs the ControlNet on the positive prompt only and adds its residuals to both passes; so does pictor."""
    text = flux_text_encoders(root / "cfg")
    ae = _ae(2)
    model = replace(MODEL, guidance_embed=False)
    config = BundleConfig(
        name="tiny-cfg", model=model.to_dict(), autoencoder=ae.to_dict(), text_encoder=text,
        defaults={**DEFAULTS, "guidance_mode": "cfg"},
    )  # fmt: skip
    torch.manual_seed(0)
    ae_model = AutoEncoder(ae).eval()
    pipe = Pipeline(random_flux(model, seed=0), ae_model, build_text_encoder(text), config, device="cpu")
    net = _controlnet(root, "cfg-net", 8, guidance_embeds=False)
    _with(pipe, net)
    control = _picture(2)
    (ours,) = pipe.generate(
        GenerationRequest(
            "a red square", negative_prompt="a blue blur", width=32, height=32, steps=3, seed=6, guidance=3.0,
            controlnet_images=[control], controlnet_scales=[0.9],
        )
    )  # fmt: skip
    want = _diffusers(
        pipe, root, [net], monkeypatch, 6, prompt="a red square", negative_prompt="a blue blur",
        true_cfg_scale=3.0, control_image=control, width=32, height=32, num_inference_steps=3,
        controlnet_conditioning_scale=0.9,
    )  # fmt: skip
    _close(ours.image, want)


def test_the_first_block_cache_autoencoder_tiles_and_denoise_tiles_take_the_controlnet(
    pipe: Pipeline, nets: dict[str, Path]
) -> None:
    _with(pipe, nets["instantx"])
    pictures = [_picture(5, (64, 64))]
    base = {"width": 64, "height": 64, "seed": 9, "steps": 4, "controlnet_images": pictures}
    tiles = {"denoise_tile": 32, "denoise_tile_overlap": 8}
    for extra in ({"cache_threshold": 0.3}, {"vae_tile": 32, "vae_tile_overlap": 8}, tiles):
        (image,) = pipe.generate(GenerationRequest("a square", **base, **extra))  # type: ignore[arg-type]
        again = reproduce(pipe, image.record, controlnet_images=pictures)
        assert np.array_equal(_px(again.image), _px(image.image))
        (plain,) = _with(pipe).generate(
            GenerationRequest("a square", **{**base, "controlnet_images": None}, **extra)
        )  # type: ignore[arg-type]
        assert np.abs(_px(plain.image) - _px(image.image)).mean() > 1
        _with(pipe, nets["instantx"])


def _cfg_pipeline(root: Path) -> Pipeline:
    """The tiny model with real classifier-free guidance (a negative half) instead of distilled guidance."""
    text = flux_text_encoders(root / "cfg")
    ae = _ae(2)
    model = replace(MODEL, guidance_embed=False)
    config = BundleConfig(
        name="tiny-cfg", model=model.to_dict(), autoencoder=ae.to_dict(), text_encoder=text,
        defaults={**DEFAULTS, "guidance_mode": "cfg"},
    )  # fmt: skip
    torch.manual_seed(0)
    return Pipeline(
        random_flux(model, seed=0), AutoEncoder(ae).eval(), build_text_encoder(text), config, "cpu"
    )


def _token_wise(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch, shapes: list[tuple[int, ...]]) -> None:
    """Stand-ins whose outputs per token depend only on that token and what every window shares: each
    ControlNet's residual (double and single) on the token's control token, noise, position, the prompt and
    the Union mode; the transformer's velocity on the token's noise, the prompt row and its residuals. For
    them a run in denoise windows must equal the whole run: any token read from the wrong place, or the
    ControlNet fed the negative half, shows."""

    def net(
        img: torch.Tensor, img_ids: torch.Tensor, cond: torch.Tensor, txt: torch.Tensor, *_: Any, **kw: Any
    ) -> ControlResiduals:
        assert cond.shape[1] == img.shape[1]
        r = (
            torch.tanh(cond.float()).mean(-1, keepdim=True)
            + 0.1 * torch.sin(img_ids.float().sum(-1))[..., None]
            + 0.3 * torch.tanh(img.float()).mean(-1, keepdim=True)
            + 0.2 * txt.float().mean((1, 2))[:, None, None]
        )
        if kw.get("mode") is not None:
            r = r + 0.05 * kw["mode"].float()[:, None, None]
        r = r.expand(-1, -1, 4).to(img.dtype)
        return ControlResiduals([r], [0.5 * r])

    out = pipe.transformer.params.out_channels

    def flux(img: torch.Tensor, _ids: torch.Tensor, txt: torch.Tensor, *_: Any, **kw: Any) -> torch.Tensor:
        v = torch.tanh(img[..., :out]) * 0.7 + 0.1 * txt.float().mean((1, 2))[:, None, None]
        control = kw.get("controlnet")
        if control is not None:
            d, s = control.double[0], control.single[0]
            shapes.append((img.shape[0], img.shape[1], d.shape[0], d.shape[1], s.shape[1]))
            k = img.shape[0] // d.shape[0]  # under CFG the conditional half's residuals serve both halves
            v = v + (d.float().mean(-1, keepdim=True) + s.float().mean(-1, keepdim=True)).repeat(k, 1, 1)
        return v.to(img.dtype)

    for unit in pipe.controlnets:
        monkeypatch.setattr(unit.model, "forward", net)
    monkeypatch.setattr(pipe.transformer, "forward", flux)


def _final_latents(monkeypatch: pytest.MonkeyPatch, run: Any) -> torch.Tensor:
    seen: list[torch.Tensor] = []

    def spy(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        seen.append(x.clone())
        return UNPACK(x, h, w)

    monkeypatch.setattr(pipeline_sampling, "unpack_latents", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PictorWarning)  # a pass from noise in windows is warned about
        run()
    assert len(seen) == 1
    return seen[0]


WINDOWS = {"denoise_tile": 32, "denoise_tile_overlap": 8}


@pytest.mark.parametrize("num_images", [1, 2])
def test_denoise_windows_under_true_cfg_give_the_controlnet_its_window_of_the_conditional_half(
    root: Path, monkeypatch: pytest.MonkeyPatch, num_images: int
) -> None:
    pipe = _cfg_pipeline(root)
    _with(pipe, _controlnet(root, "cfg-net-windows", 8, guidance_embeds=False))
    shapes: list[tuple[int, ...]] = []
    _token_wise(pipe, monkeypatch, shapes)
    base = {
        "negative_prompt": "a blue blur", "width": 64, "height": 48, "steps": 3, "seed": 2, "guidance": 3.0,
        "num_images": num_images, "controlnet_images": [_picture(5, (64, 48))],
    }  # fmt: skip
    tiled = _final_latents(
        monkeypatch, lambda: pipe.generate(GenerationRequest("a red square", **WINDOWS, **base))
    )
    windowed = list(shapes)
    whole = _final_latents(monkeypatch, lambda: pipe.generate(GenerationRequest("a red square", **base)))
    # windows of the image's tokens, both CFG halves in the transformer, the conditional half's residuals
    assert {w[0] for w in windowed} == {2 * num_images} and {w[2] for w in windowed} == {num_images}
    assert max(w[1] for w in windowed) < shapes[-1][1] and all(w[1] == w[3] == w[4] for w in windowed)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_denoise_windows_take_union_modes_mixed_sizes_and_a_step_window(
    pipe: Pipeline, nets: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _with(pipe, nets["union"], nets["small"], nets["union"])
    _token_wise(pipe, monkeypatch, [])
    pictures = [_picture(i, (64, 48)) for i in (5, 6, 7)]
    base = {
        "width": 64, "height": 48, "steps": 4, "seed": 2, "num_images": 2, "controlnet_images": pictures,
        "controlnet_modes": ["canny", None, "depth"], "controlnet_scales": [0.5, 0.7, 0.3],
        "controlnet_start": 0.25, "controlnet_end": 0.75,
    }  # fmt: skip
    tiled = _final_latents(monkeypatch, lambda: pipe.generate(GenerationRequest("x", **WINDOWS, **base)))
    whole = _final_latents(monkeypatch, lambda: pipe.generate(GenerationRequest("x", **base)))
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_denoise_windows_take_a_controlnet_in_an_edit(
    pipe: Pipeline, nets: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _with(pipe, nets["instantx"])
    _token_wise(pipe, monkeypatch, [])
    _picture(8, (64, 48)).save(tmp_path / "source.png")
    for settings in (
        {"strength": 0.6, "controlnet_images": [_picture(9, (64, 48))]},
        {"expand": (0, 0, 16, 0), "controlnet_images": [_picture(9, (80, 48))]},  # outpainting: a mask
    ):
        request = {"image": tmp_path / "source.png", "prompt": "a", "seed": 4, **settings}
        tiled = _final_latents(monkeypatch, lambda r=request: pipe.edit(EditRequest(**r, **WINDOWS)))
        whole = _final_latents(monkeypatch, lambda r=request: pipe.edit(EditRequest(**r)))
        torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_denoise_windows_take_an_xlabs_controlnets_hint_tokens(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """XLabs' hint net reads the control picture's pixels; its tokens are made once per run, so each window
    reads its own. A real run in windows reproduces; with the token-wise stand-ins it equals the whole run."""
    pipe = _pipeline(root / "f8-windows", factor=8)
    net = _controlnet(
        root,
        "xlabs-w",
        4,
        patch_size=2,
        in_channels=64,
        conditioning_embedding_channels=16,
        num_single_layers=0,
    )
    _with(pipe, net)
    base = {"width": 128, "height": 96, "steps": 3, "seed": 5, "controlnet_images": [_picture(5, (128, 96))]}
    hints: list[int] = []
    hint = pipe.controlnets[0].model.input_hint_block
    assert hint is not None
    hint.register_forward_hook(lambda *_: hints.append(1))
    with pytest.warns(PictorWarning, match="starts from noise"):
        (tiled,) = pipe.generate(GenerationRequest("a grey circle", denoise_tile=64, **base))
    assert len(hints) == 1  # once per run, not once per model call
    assert tiled.record["denoise_tile"] == 64 and tiled.record["controlnets"][0]["kind"] == "xlabs"
    again = reproduce(pipe, tiled.record, controlnet_images=base["controlnet_images"])
    assert np.array_equal(_px(again.image), _px(tiled.image))
    (whole,) = pipe.generate(GenerationRequest("a grey circle", **base))
    assert not np.array_equal(_px(whole.image), _px(tiled.image))

    _token_wise(pipe, monkeypatch, [])
    tiled_latents = _final_latents(
        monkeypatch,
        lambda: pipe.generate(GenerationRequest("x", denoise_tile=64, denoise_tile_overlap=16, **base)),
    )
    torch.testing.assert_close(
        tiled_latents,
        _final_latents(monkeypatch, lambda: pipe.generate(GenerationRequest("x", **base))),
        atol=1e-5,
        rtol=0,
    )


def test_grid_axes_for_the_controlnet_scale_and_end(pipe: Pipeline, nets: dict[str, Path]) -> None:
    from pictor.grid_axes import GridError, parse_axis, plan_grid
    from pictor.grid_runs import run_plan

    _with(pipe, nets["instantx"])
    base = GenerationRequest("a square", seed=3, steps=2, controlnet_images=[_picture(2)])
    plan = plan_grid(base, "controlnet-scale=0,0.5", "controlnet_end=0.5,1")
    cells = run_plan(pipe, plan).cells
    assert len(cells) == 4
    for cell in cells:
        assert cell.request.controlnet_scales == [cell.settings["controlnet-scale"]]
        assert cell.image is not None
        (alone,) = pipe.generate(cell.request)
        assert np.array_equal(_px(alone.image), _px(cell.image.image))
    assert cells[0].image is not None and cells[0].image.record["controlnets"][0]["scale"] == 0.0
    with pytest.raises(GridError, match="from 0 to 10"):
        parse_axis("controlnet-scale=0.5,12")
    with pytest.raises(GridError, match="from 0 to 1"):
        parse_axis("controlnet-end=0.5,1.5")
    _with(pipe)
    with pytest.raises(GridError, match="no ControlNet is loaded"):
        run_plan(pipe, plan_grid(GenerationRequest("a square", seed=3, steps=2), "controlnet-scale=0,1"))


def test_review_fixes_modes_window_sharing_hashes_and_early_refusals(
    pipe: Pipeline, nets: dict[str, Path], root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import pictor.controlnet_files as files

    # One mode beside a non-Union ControlNet is the Union one's; a list says 'none' for the other.
    _with(pipe, nets["union"], nets["instantx"])
    pictures = [_picture(1), _picture(2)]
    one = pipe.generate(
        GenerationRequest("x", seed=2, steps=2, controlnet_images=pictures, controlnet_modes=["depth"])
    )
    listed = pipe.generate(
        GenerationRequest(
            "x", seed=2, steps=2, controlnet_images=pictures, controlnet_modes=["depth", "none"]
        )
    )
    assert [e.get("mode") for e in one[0].record["controlnets"]] == [2, None]
    assert np.array_equal(_px(one[0].image), _px(listed[0].image))
    # A window that holds no step is refused, not recorded as used.
    _with(pipe, nets["instantx"])
    with pytest.raises(ControlNetError, match="holds none of this run's 2 steps"):
        pipe.generate(
            GenerationRequest(
                "x", steps=2, controlnet_images=[_picture(1)], controlnet_start=0.9, controlnet_end=0.95
            )
        )
    # The same ControlNet twice (a Union one for two pictures) is loaded once.
    _with(pipe, nets["union"], nets["union"])
    assert pipe.controlnets[0].model is pipe.controlnets[1].model
    # A folder's hash covers config.json and its weights, no other file.
    folder = tmp_path / "net"
    shutil.copytree(nets["instantx"], folder)
    first = _with(pipe, folder).controlnets[0].info["sha256"]
    (folder / "notes.safetensors").write_bytes(b"not weights")
    assert _with(pipe, folder).controlnets[0].info["sha256"] == first
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "comment": "changed"}))
    assert _with(pipe, folder).controlnets[0].info["sha256"] != first
    # A transformer given as a ControlNet is refused before its weights are read.
    monkeypatch.setattr(files, "read_safetensors", lambda *a, **k: pytest.fail("weights read before refusal"))
    monkeypatch.setattr(files, "_read_shards", lambda *a, **k: pytest.fail("weights read before refusal"))
    wrong = tmp_path / "transformer"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    (wrong / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 64)
    with pytest.raises(ControlNetError, match="FluxTransformer2DModel"):
        _with(pipe, wrong)
    single = tmp_path / "flux.safetensors"
    from safetensors.torch import save_file

    save_file({"final_layer.linear.weight": torch.zeros(2, 2), "img_in.weight": torch.zeros(2, 2)}, single)
    with pytest.raises(ControlNetError, match=r"FLUX\.1 transformer"):
        _with(pipe, single)


def test_regions_and_and_passes_each_run_the_controlnet(root: Path, nets: dict[str, Path]) -> None:
    """With regions or AND, the ControlNet runs on every prompt's pass with that pass's text (the velocity is
    the blend of passes of each prompt alone with the ControlNet) and, under CFG, the negative prompt's pass
    reuses the first pass's (the whole prompt's) residuals, as the negative half does without regions."""
    from pictor.controlnet_runs import ControlNetRun
    from pictor.guided_velocity import guided_velocity
    from pictor.regional_prompts import parse_regions, region_weights

    control = [_picture(4)]
    ts = torch.linspace(1.0, 0.0, 4)
    torch.manual_seed(0)
    x = torch.randn(2, 64, MODEL.in_channels)  # a 32x32 image: 16x16 latents, 8x8 tokens

    def velocity(pipe: Pipeline, prompt: str, **kw: Any) -> torch.Tensor:
        request = GenerationRequest(prompt, width=32, height=32, steps=3, controlnet_images=control, **kw)
        r = pipe.resolve_request(request)
        run = ControlNetRun(pipe.controlnets, r, pipe.autoencoder, pipe.dtype, ts, pipe.transformer.params)
        with torch.inference_mode():
            return guided_velocity(pipe, r, 2, 16, 16, controlnets=run, ts=ts)(x, ts[1].expand(2))

    regions = parse_regions([{"box": [0.5, 0, 1, 1], "prompt": "a blue blur", "strength": 2}])
    w = region_weights(regions, 8, 8)[:, None, :, None]
    pipe = _with(_pipeline(root / "passes"), nets["instantx"])
    alone = [velocity(pipe, p) for p in ("a red square", "a blue blur")]
    want = (w * torch.stack(alone)).sum(0)
    assert torch.allclose(velocity(pipe, "a red square", regions=regions), want, atol=1e-5)
    anded = velocity(pipe, "a red square AND a blue blur:0.5", composable=True)
    assert torch.allclose(anded, (alone[0] + 0.5 * alone[1]) / 1.5, atol=1e-5)

    cfg = _with(_cfg_pipeline(root), _controlnet(root, "cfg-passes", 8, guidance_embeds=False))
    g, negative = 3.0, {"negative_prompt": "a blur"}
    alone = [velocity(cfg, p, guidance=1.0) for p in ("a red square", "a blue blur")]
    plain = velocity(cfg, "a red square", guidance=g, **negative)
    u = (g * alone[0] - plain) / (g - 1)  # the negative half's pass, with the prompt's residuals
    want = u + g * ((w * torch.stack(alone)).sum(0) - u)
    got = velocity(cfg, "a red square", guidance=g, regions=regions, **negative)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
