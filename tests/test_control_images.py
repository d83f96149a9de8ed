"""FLUX.1 Canny / Depth [dev]: control pictures read beside the noise (`pictor.control_images`).

diffusers' `FluxControlPipeline` on the same tiny random components (CLIP + T5 folders, autoencoder, a
guidance-distilled transformer whose input is twice its output) paints the picture pictor paints: this pins
the control picture's resizing, encoding, packing and channel order at once. Then the pipeline's behaviour:
the control conditions, --canny draws OpenCV's edges, batches, edits, records reproduce bit-exactly, misuse
is refused with the reason, and `convert flux` knows a control model and its kind.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pictor.checkpoint import BundleConfig, CheckpointError, load_bundle, save_bundle
from pictor.control_images import ControlImageError, bfl_canny_input, fit_control, is_control_model
from pictor.convert import convert_flux
from pictor.editing import EditRequest
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import FluxParams, pack_latents
from pictor.models.text import build_text_encoder
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.presets import get_preset
from pictor.provenance import ProvenanceError, parameters_text, read_record
from pictor.reproduce import check_record, reproduce

from tiny_flux import random_flux
from tiny_text_folders import T5_LEN, diffusers_components, flux_text_encoders

diffusers = pytest.importorskip("diffusers")
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402

PICTOR = shutil.which("pictor")
AE = AutoEncoderParams(
    resolution=32,
    in_channels=3,
    ch=32,
    out_ch=3,
    ch_mult=[1, 2],  # factor 2
    num_res_blocks=1,
    z_channels=4,
    scale_factor=0.3611,  # not 1 and 0, so a wrong order of the two shows
    shift_factor=0.1159,
)
MODEL = FluxParams(
    in_channels=2 * 16,  # noise (4 x 4) and the control picture's latents (4 x 4)
    out_channels=16,
    vec_in_dim=32,
    context_in_dim=32,
    hidden_size=32,
    mlp_ratio=4.0,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=[4, 6, 6],
    guidance_embed=True,
)
DEFAULTS = {
    "width": 32,
    "height": 32,
    "steps": 3,
    "guidance": 10.0,
    "sampler": "euler",
    "schedule": "flux",
    "guidance_mode": "distilled",
}


def _pipeline(root: Path, kind: str | None = "canny") -> Pipeline:
    text = flux_text_encoders(root)
    config = BundleConfig(
        name=f"tiny-{kind}", model=MODEL.to_dict(), autoencoder=AE.to_dict(), text_encoder=text,
        defaults=DEFAULTS, control=kind,
    )  # fmt: skip
    flux = random_flux(MODEL, seed=0)
    torch.manual_seed(0)
    ae = AutoEncoder(AE).eval()
    return Pipeline(flux, ae, build_text_encoder(text), config, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    return _pipeline(tmp_path_factory.mktemp("control"))


def _picture(seed: int = 0, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """Smooth random colours with a few hard edges: something for both the autoencoder and Canny."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.NEAREST if seed % 2 else Image.BILINEAR)


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _request(**kw: object) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a blue circle", "seed": 5, "steps": 3, **kw})  # type: ignore[arg-type]


def test_a_control_model_is_known_by_its_input_width() -> None:
    assert is_control_model(MODEL)
    assert not is_control_model(replace(MODEL, in_channels=16))
    assert not is_control_model(replace(MODEL, in_channels=2 * 16 + 16))  # FLUX.1 Fill's (factor 2)
    for name, kind, guidance in (("flux-canny-dev", "canny", 30.0), ("flux-depth-dev", "depth", 10.0)):
        preset = get_preset(name)
        assert preset["control"] == kind and preset["defaults"]["guidance"] == guidance
        assert is_control_model(FluxParams.from_dict(preset["model"]))


def test_flux_control_pipeline_and_pictor_paint_the_same_picture(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    width, height, seed, prompt = 32, 24, 7, "a red square"
    control = _picture(1, (40, 20))  # another size and aspect: both resize it to the image's with Lanczos
    (ours,) = pipe.generate(
        GenerationRequest(prompt, width=width, height=height, steps=3, seed=seed, control_image=control)
    )
    root = Path(pipe.config.text_encoder["clip"]["path"]).parent  # the text folders pictor reads
    theirs_pipe = diffusers.FluxControlPipeline(**diffusers_components(root, pipe))
    # diffusers draws the control picture's latents from the encoder's distribution, pictor takes its mean.
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    noise = pipe.initial_noise([seed], height // 2, width // 2)
    theirs = theirs_pipe(
        prompt=prompt,
        control_image=control,
        height=height,
        width=width,
        num_inference_steps=3,
        guidance_scale=10.0,
        latents=pack_latents(noise),
        max_sequence_length=T5_LEN,
        output_type="pt",
    ).images[0]
    want = (theirs.permute(1, 2, 0).numpy() * 255).round().astype(int)
    got = _px(ours.image).astype(int)
    assert np.abs(got - want).max() <= 1, f"max |pictor - diffusers| = {np.abs(got - want).max()} levels"
    # Not trivially equal: another control picture paints another picture.
    (other,) = pipe.generate(
        GenerationRequest(prompt, width=width, height=height, steps=3, seed=seed, control_image=_picture(2))
    )
    assert np.abs(_px(other.image) - got).mean() > 2


def test_bfl_canny_input_is_bfls_float_round_trip() -> None:
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    x = torch.clamp(torch.from_numpy(pixels).float() / 127.5 - 1.0, -1.0, 1.0)  # prepare_control + encoder
    want = ((x + 1.0) * 127.5).numpy().astype(np.uint8)
    np.testing.assert_array_equal(bfl_canny_input(pixels), want)
    lowered = np.flatnonzero(bfl_canny_input(pixels)[..., 0].ravel() != np.arange(256))
    assert lowered.tolist() == list(range(1, 64))  # what makes its edges differ from the plain picture's


def test_canny_draws_bfls_opencv_edges_of_the_fitted_picture(pipe: Pipeline) -> None:
    cv2 = pytest.importorskip("cv2")
    photo = _picture(3, (48, 40))
    (drawn,) = pipe.generate(_request(control_image=photo, control_canny=(50, 200)))
    fitted = np.asarray(photo.resize((32, 32), Image.Resampling.LANCZOS))
    edges = cv2.Canny(bfl_canny_input(fitted), 50, 200)
    assert 0 < (edges > 0).mean() < 0.5  # the picture has edges, and not everywhere
    (given,) = pipe.generate(_request(control_image=np.repeat(edges[..., None], 3, axis=2)))
    np.testing.assert_array_equal(_px(drawn.image), _px(given.image))
    assert drawn.record["control_canny"] == [50.0, 200.0]
    # The record names the picture given (fitted), not its edges: reproduce draws them again.
    assert drawn.record["control_image"]["sha256"] != given.record["control_image"]["sha256"]
    assert "Control canny: 50/200" in parameters_text(drawn.record)


def test_the_control_conditions_every_image_of_a_batch(pipe: Pipeline) -> None:
    batched = pipe.generate(_request(control_image=_picture(4), num_images=3))
    for i, g in enumerate(batched):
        (single,) = pipe.generate(_request(seed=5 + i, control_image=_picture(4)))
        assert np.abs(_px(g.image) - _px(single.image)).max() <= 1  # float rounding across batch shapes
    (other,) = pipe.generate(_request(control_image=_picture(5)))
    assert np.abs(_px(other.image) - _px(batched[0].image)).mean() > 2


def test_reproduce_is_bit_exact_and_needs_the_same_control(pipe: Pipeline, tmp_path: Path) -> None:
    src, other = tmp_path / "src.png", tmp_path / "other.png"
    _picture(6, (64, 48)).save(src)
    _picture(7, (64, 48)).save(other)
    images = pipe.generate(_request(control_image=src, control_canny=(40, 120), num_images=2))
    record = images[1].record
    assert record["control_image"]["width"] == 32 and record["control_image"]["height"] == 32
    again = reproduce(pipe, record, control=src)
    np.testing.assert_array_equal(_px(again.image), _px(images[1].image))
    with pytest.raises(GenerationError, match="control picture is not the one this image was made from"):
        reproduce(pipe, record, control=other)
    with pytest.raises(GenerationError, match="pass it with --control IMAGE"):
        reproduce(pipe, record)
    with pytest.raises(ProvenanceError, match="'control_canny' is \\[1\\], not two numbers"):
        check_record({**record, "control_canny": [1]})
    with pytest.raises(ProvenanceError, match="'control_image' is 'x', not an object"):
        check_record({**record, "control_image": "x"})
    with pytest.raises(ProvenanceError, match="Canny thresholds but no control picture"):
        check_record({k: v for k, v in record.items() if k != "control_image"})


def test_edits_of_a_control_model_take_the_control_and_reproduce(pipe: Pipeline, tmp_path: Path) -> None:
    src, ctl = tmp_path / "src.png", tmp_path / "ctl.png"
    _picture(8).save(src)
    _picture(9, (16, 16)).save(ctl)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    edit = EditRequest(image=src, prompt="blue", mask=Image.fromarray(mask), feather=0, seed=1, steps=3)
    (painted,) = pipe.edit(replace(edit, control_image=ctl))
    got = _px(painted.image)
    assert np.array_equal(got[mask == 0], _px(Image.open(src))[mask == 0])  # kept pixels, exactly
    again = reproduce(pipe, painted.record, source=src, mask=Image.fromarray(mask), control=ctl)
    np.testing.assert_array_equal(_px(again.image), got)
    with pytest.raises(ControlImageError, match="give an edge map, or a photo with --canny"):
        pipe.edit(edit)


def test_misuse_is_refused_with_the_reason(pipe: Pipeline, tmp_path: Path) -> None:
    with pytest.raises(
        ControlImageError, match=r"FLUX\.1 Canny model: it draws what a control picture shows"
    ):
        pipe.generate(_request())
    depth = _pipeline(tmp_path / "depth", "depth")
    with pytest.raises(ControlImageError, match=r"give a depth map \(near = bright\)"):
        depth.generate(_request())
    with pytest.raises(ControlImageError, match="reads depth maps, not the edge maps --canny makes"):
        depth.generate(_request(control_image=_picture(), control_canny=(50, 200)))
    for bad in ((50,), (float("nan"), 3), (-1, 5), ("a", "b")):
        with pytest.raises(ControlImageError, match="canny thresholds must be"):
            pipe.generate(_request(control_image=_picture(), control_canny=bad))
    with pytest.raises(ControlImageError, match=r"hires fix is not offered for FLUX\.1 Canny"):
        pipe.generate(_request(control_image=_picture(), hires_scale=2.0))
    with pytest.raises(GenerationError, match=r"not a FLUX\.1 Kontext model"):
        pipe.generate(_request(control_image=_picture(), context_image=_picture()))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    with pytest.raises(GenerationError, match="not a readable image"):
        pipe.generate(_request(control_image=broken))
    with pytest.raises(ControlImageError, match=r"uint8 \[H, W, 3\]"):
        fit_control(np.zeros((8, 8), np.float32), 8, 8)
    with pytest.raises(ControlImageError, match="it is empty"):
        fit_control(Image.new("RGB", (0, 0)), 8, 8)
    with pytest.raises(ControlImageError, match="floating-point values"):
        fit_control(Image.new("F", (8, 8), 0.5), 8, 8)
    # numpy numbers are numbers
    (ok,) = pipe.generate(_request(control_image=_picture(), control_canny=(np.float32(50), np.int64(200))))
    assert ok.record["control_canny"] == [50.0, 200.0]


def test_a_plain_model_refuses_a_control_picture(tmp_path: Path) -> None:
    p = get_preset("tiny")
    config = BundleConfig(
        name="plain", model=p["model"], autoencoder=p["autoencoder"], text_encoder=p["text_encoder"],
        defaults=p["defaults"],
    )  # fmt: skip
    flux = random_flux(FluxParams.from_dict(p["model"]))
    ae = AutoEncoder(AutoEncoderParams.from_dict(p["autoencoder"]))
    plain = Pipeline(flux, ae, build_text_encoder(p["text_encoder"]), config, device="cpu")
    with pytest.raises(ControlImageError, match=r"not a FLUX\.1 Canny or Depth model"):
        plain.generate(_request(control_image=_picture(), steps=1))


def test_the_kind_round_trips_and_is_checked() -> None:
    config = BundleConfig(
        name="c", model=MODEL.to_dict(), autoencoder=AE.to_dict(), text_encoder={}, control="depth"
    )
    assert BundleConfig.from_dict(config.to_dict()).control == "depth"
    plain = replace(config, control=None).to_dict()
    assert "control" not in plain  # other bundles' config.json stay as they were
    with pytest.raises(CheckpointError, match="'control' is 'edges'; it must be \"canny\" or \"depth\""):
        BundleConfig.from_dict({**plain, "control": "edges"})
    wide = {**plain, "model": {**plain["model"], "in_channels": 16}, "control": "canny"}
    with pytest.raises(CheckpointError, match="reads twice what it writes"):
        BundleConfig.from_dict(wide)


def _flux_files(root: Path, name: str, in_channels: int) -> list[Path]:
    # Head size 32 split 1:7:7 as FLUX.1 does, so the single file's shapes read back as these params
    params = {**get_preset("tiny")["model"], "hidden_size": 64, "axes_dim": [4, 14, 14]}
    flux = random_flux(FluxParams.from_dict({**params, "guidance_embed": True, "in_channels": in_channels}))
    ae = AutoEncoder(AutoEncoderParams.from_dict(get_preset("tiny")["autoencoder"]))
    root.mkdir(parents=True, exist_ok=True)
    sd = {f"model.diffusion_model.{k}": v.contiguous() for k, v in flux.state_dict().items()}
    save_file(sd, root / name)
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, root / "ae.safetensors")
    for folder in ("t5", "clip"):
        (root / folder).mkdir(exist_ok=True)
        (root / folder / "config.json").write_text("{}")
    return [root / name, root / "ae.safetensors", root / "t5", root / "clip"]


def test_convert_flux_knows_a_control_model_and_its_kind(tmp_path: Path) -> None:
    out_channels = get_preset("tiny")["model"]["out_channels"]
    canny = _flux_files(tmp_path / "a", "flux1-canny-dev.safetensors", 2 * out_channels)
    config = load_bundle(convert_flux(*canny, tmp_path / "canny")).config
    assert config.control == "canny" and config.preset == "flux-canny-dev"
    assert config.defaults["guidance"] == 30.0
    depth = load_bundle(convert_flux(*canny, tmp_path / "depth", control="depth")).config
    assert depth.control == "depth" and depth.defaults["guidance"] == 10.0
    unnamed = _flux_files(tmp_path / "b", "model.safetensors", 2 * out_channels)
    with pytest.raises(CheckpointError, match="add --control canny or --control depth"):
        convert_flux(*unnamed, tmp_path / "bad")
    plain = _flux_files(tmp_path / "c", "flux1-depth-dev.safetensors", out_channels)
    with pytest.raises(CheckpointError, match="--control depth, but the transformer reads no control"):
        convert_flux(*plain, tmp_path / "bad", control="depth")
    with pytest.raises(CheckpointError, match="is no Kontext model"):
        convert_flux(*canny, tmp_path / "bad", kontext=True)
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(PICTOR is None, reason="the pictor console script is not installed")
def test_cli_generate_with_control_and_reproduce(pipe: Pipeline, tmp_path: Path) -> None:
    bundle = tmp_path / "tiny-canny"
    save_bundle(bundle, pipe.config, pipe.transformer.state_dict(), pipe.autoencoder.state_dict())
    src, other = tmp_path / "src.png", tmp_path / "other.png"
    _picture(10, (48, 48)).save(src)
    _picture(11, (48, 48)).save(other)
    base = [str(PICTOR), "generate", "a cat", "--model", str(bundle), "--device", "cpu", "--steps", "2"]
    run = subprocess.run(
        [*base, "--control", str(src), "--canny", "--seed", "3", "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    made = Path(run.stdout.split()[0])
    assert read_record(made)["control_canny"] == [50.0, 200.0]
    rep = [str(PICTOR), "reproduce", str(made), "--model", str(bundle), "--device", "cpu"]
    ok = subprocess.run(
        [*rep, "--control", str(src), "-o", str(tmp_path / "r")], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "identical" in ok.stderr
    wrong = subprocess.run([*rep, "--control", str(other)], capture_output=True, text=True)
    assert wrong.returncode != 0 and "not the one this image was made from" in wrong.stderr
    missing = subprocess.run(base, capture_output=True, text=True)
    assert missing.returncode != 0 and "give an edge map, or a photo with --canny" in missing.stderr
    bad = subprocess.run(
        [*base, "--control", str(src), "--canny-thresholds", "50"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "expected LOW,HIGH" in bad.stderr
    # --canny is a flag: a prompt after it stays the prompt; --canny-thresholds sets them (and implies it)
    after = [str(PICTOR), "generate", "--model", str(bundle), "--device", "cpu", "--steps", "1"]
    run = subprocess.run(
        [*after, "--control", str(src), "--canny-thresholds", "30,90", "-o", str(tmp_path / "t"), "a cat"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert read_record(Path(run.stdout.split()[0]))["control_canny"] == [30.0, 90.0]


def test_the_control_is_encoded_in_tiles_when_the_run_is(pipe: Pipeline) -> None:
    """--vae-tile bounds the autoencoder's memory: the control picture's encode is tiled too."""
    shapes: list[tuple[int, ...]] = []
    hook = pipe.autoencoder.encoder.register_forward_pre_hook(lambda _m, a: shapes.append(tuple(a[0].shape)))
    try:
        request = _request(width=64, height=48, steps=1, control_image=_picture(12))
        pipe.generate(request)
        whole = list(shapes)
        shapes.clear()
        (tiled,) = pipe.generate(replace(request, vae_tile=16, vae_tile_overlap=8))
    finally:
        hook.remove()
    assert len(whole) == 1 and len(shapes) > 1, (whole, shapes)
    assert max(h * w for *_, h, w in shapes) < whole[0][2] * whole[0][3]
    assert tiled.record["vae_tile"] == 16 and tiled.record["control_image"]["width"] == 64
