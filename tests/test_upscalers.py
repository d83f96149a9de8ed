"""ESRGAN-family upscale models: `models.upscalers`, `upscaler_files` and `upscaling`.

The reference is spandrel 0.4.2 (tests/spandrel_reference.py), the loader ComfyUI runs these files through:
on the same random weights, read from the same .safetensors file, pictor's nets must give spandrel's output
in every key layout (the original ESRGAN's `model.N`, basicsr's, BSRGAN's), for Real-ESRGAN's pixel-unshuffled
x2/x1 nets on odd sizes and for the compact SRVGG nets. Weights are perturbed by normal(0, 0.1) so that no
layer is near its initialisation. Nets are tiny (8 features, 1-2 blocks; spandrel fixes ESRGAN's dense growth
at 32, so the parity nets use 32) and pictures a few dozen pixels.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pictor.checkpoint import CheckpointError
from pictor.models.upscalers import CompactNet, CompactParams, RRDBNet, RRDBParams
from pictor.upscaler_files import (
    UpscalerFile,
    identify,
    load_upscaler,
    upscaler_file_summary,
    upscaler_from_state_dict,
)
from pictor.upscaling import (
    passes_for,
    run_tiled,
    upscale_image,
    upscale_problem,
    upscale_record,
)

import spandrel_reference as ref

M = TypeVar("M", bound=nn.Module)


def perturb(net: M, seed: int) -> M:
    """Every parameter moved by normal(0, 0.1): weights nowhere near a layer's default initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return net.eval().requires_grad_(False)


def into_range(net: M, x: Tensor, std: float = 0.25) -> M:
    """Rescale the net's last convolution so its output on `x` is centred on 0.5 with `std`: random RRDBNets
    put most pixels far outside [0, 1], where clamping would hide any difference."""
    last = [m for m in net.modules() if isinstance(m, nn.Conv2d)][-1]
    out = net(x)
    mean, spread = out.mean((0, 2, 3)), out.std((0, 2, 3))
    with torch.no_grad():
        last.weight.mul_((std / spread)[:, None, None, None])
        last.bias.sub_(mean).mul_(std / spread).add_(0.5)
    return net


def save(sd: dict[str, Tensor], path: Path) -> Path:
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path))
    return path


def picture(h: int, w: int, seed: int = 0) -> Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def tight(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def rrdb(seed: int = 0, **kw: Any) -> RRDBNet:
    settings: dict[str, Any] = {"features": 8, "growth": 32, "blocks": 2, "upsamples": 2} | kw
    return perturb(RRDBNet(RRDBParams(**settings)), seed)


def compact(seed: int = 0, **kw: Any) -> CompactNet:
    settings: dict[str, Any] = {"features": 8, "convs": 2, "scale": 4} | kw
    return perturb(CompactNet(CompactParams(**settings)), seed)


def spandrel_esrgan(scale: int, seed: int = 0, **kw: Any) -> nn.Module:
    settings: dict[str, Any] = {"in_nc": 3, "out_nc": 3, "num_filters": 8, "num_blocks": 2} | kw
    return perturb(ref.ESRGAN(scale=scale, **settings), seed)


def bsrgan_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """basicsr's names -> BSRGAN's (RealSR's): RRDB_trunk.N.RDBj, trunk_conv, upconvN, HRconv."""
    out = {}
    for key, value in sd.items():
        if key.startswith("body."):
            _, n, rdb, rest = key.split(".", 3)
            key = f"RRDB_trunk.{n}.RDB{rdb[-1]}.{rest}"
        key = key.replace("conv_body.", "trunk_conv.").replace("conv_hr.", "HRconv.")
        key = key.replace("conv_up", "upconv")
        out[key] = value
    return out


def to_uint8(x: Tensor) -> np.ndarray:
    """As upscale_image turns its float result into pixels."""
    return (x.detach().clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def random_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    bands = len(mode)
    array = np.random.default_rng(seed).integers(0, 256, (h, w, bands), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if bands == 1 else array, mode)


def image_tensor(image: Image.Image) -> Tensor:
    """As upscale_image reads a picture: RGB in [0, 1], [1, 3, H, W]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def counted(net: nn.Module) -> list[int]:
    """A list that grows by one entry each time `net` runs."""
    calls: list[int] = []
    net.register_forward_hook(lambda *_: calls.append(1))
    return calls


# --- parity with spandrel, through real files ---------------------------------------------------------


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_old_esrgan_layout_matches_spandrel(tmp_path: Path, scale: int) -> None:
    theirs = spandrel_esrgan(scale, seed=scale)
    path = save(theirs.state_dict(), tmp_path / f"{scale}x-old.safetensors")
    assert next(iter(load_file(str(path)))).startswith("model.")
    mine = load_upscaler(path)
    assert (mine.architecture, mine.scale) == ("ESRGAN", scale)
    assert mine.net.params == RRDBParams(features=8, growth=32, blocks=2, upsamples=int(math.log2(scale)))
    x = picture(11, 14, seed=scale)
    out = mine.net(x)
    assert out.shape == (1, 3, 11 * scale, 14 * scale)
    tight(out, theirs(x))
    # spandrel's own loader of the same file agrees as well
    tight(out, ref.load_esrgan(load_file(str(path))).model(x))


@pytest.mark.parametrize("prefix", ["", "params_ema.", "module."])
def test_basicsr_layout_matches_spandrel(tmp_path: Path, prefix: str) -> None:
    net = rrdb(seed=1)
    path = save({prefix + k: v for k, v in net.state_dict().items()}, tmp_path / "4x-new.safetensors")
    mine = load_upscaler(path)
    theirs = ref.load_esrgan({k.removeprefix(prefix): v for k, v in load_file(str(path)).items()})
    assert theirs.scale == mine.scale == 4
    x = picture(13, 10, seed=1)
    tight(mine.net(x), theirs.model(x))
    tight(mine.net(x), net(x))


def test_bsrgan_layout_matches_spandrel(tmp_path: Path) -> None:
    sd = bsrgan_names(rrdb(seed=2, upsamples=1).state_dict())
    assert {"RRDB_trunk.1.RDB3.conv5.bias", "trunk_conv.weight", "upconv1.weight", "HRconv.bias"} <= set(sd)
    path = save(sd, tmp_path / "BSRGANx2.safetensors")
    mine = load_upscaler(path)
    theirs = ref.load_esrgan(load_file(str(path)))
    assert mine.scale == theirs.scale == 2
    x = picture(9, 12, seed=2)
    tight(mine.net(x), theirs.model(x))


@pytest.mark.parametrize(("in_channels", "unshuffle", "scale"), [(12, 2, 2), (48, 4, 1)])
@pytest.mark.parametrize("size", [(17, 23), (15, 21)])
def test_real_esrgan_unshuffle_nets_match_spandrel(
    tmp_path: Path, in_channels: int, unshuffle: int, scale: int, size: tuple[int, int]
) -> None:
    """RealESRGAN_x2plus (pixel unshuffle 2, 12 channels in) and the x1 nets (unshuffle 4, 48 in) on sizes
    that are no multiple of the unshuffle: both reflect-pad and cut the padding off the output."""
    net = rrdb(seed=3, blocks=1, in_channels=in_channels, unshuffle=unshuffle)
    path = save(net.state_dict(), tmp_path / f"RealESRGAN_x{scale}.safetensors")
    mine = load_upscaler(path)
    assert mine.net.params.unshuffle == unshuffle and mine.scale == scale
    theirs = ref.load_esrgan(load_file(str(path)))
    assert theirs.scale == scale
    x = picture(*size, seed=3)
    out = mine.net(x)
    assert out.shape == (1, 3, size[0] * scale, size[1] * scale)
    # The arch's own forward, which pads to the unshuffle as Real-ESRGAN does (spandrel's descriptor call
    # pads to a multiple of 4 first, which moves the border pixels of x2 nets).
    tight(out, theirs.model(x))


@pytest.mark.parametrize("scale", [4, 2])
def test_compact_matches_spandrel(tmp_path: Path, scale: int) -> None:
    theirs = perturb(ref.Compact(num_feat=8, num_conv=2, upscale=scale), seed=4)
    path = save(theirs.state_dict(), tmp_path / f"realesr-general-x{scale}v3.safetensors")
    mine = load_upscaler(path)
    assert mine.architecture == "Compact"
    assert mine.net.params == CompactParams(features=8, convs=2, scale=scale)
    x = picture(10, 13, seed=4)
    tight(mine.net(x), theirs(x))
    tight(mine.net(x), ref.load_compact(load_file(str(path))).model(x))


def _old_esrgan_file(tmp_path: Path) -> tuple[Path, Callable[[Tensor], Tensor]]:
    theirs = into_range(spandrel_esrgan(4, seed=5), picture(13, 19))
    path = save(theirs.state_dict(), tmp_path / "4x-old.safetensors")
    return path, ref.load_esrgan(load_file(str(path)))


def _compact_file(tmp_path: Path) -> tuple[Path, Callable[[Tensor], Tensor]]:
    theirs = perturb(ref.Compact(num_feat=8, num_conv=2, upscale=2), seed=6)
    path = save(theirs.state_dict(), tmp_path / "2x-compact.safetensors")
    return path, ref.load_compact(load_file(str(path)))


def _x2plus_file(tmp_path: Path) -> tuple[Path, Callable[[Tensor], Tensor]]:
    net = into_range(rrdb(seed=7, blocks=1, in_channels=12, unshuffle=2), picture(13, 19))
    path = save(net.state_dict(), tmp_path / "x2p.safetensors")
    model = ref.load_esrgan(load_file(str(path))).model  # Real-ESRGAN's padding, as above
    return path, lambda x: model(x).clamp(0, 1)


@pytest.mark.parametrize("make", [_old_esrgan_file, _compact_file, _x2plus_file])
def test_upscale_image_matches_spandrel_pixels(tmp_path: Path, make: Callable[..., Any]) -> None:
    path, theirs = make(tmp_path)
    image = random_image(19, 13, seed=8)
    upscaler = load_upscaler(path)
    out = upscale_image(upscaler, image)
    expected = to_uint8(theirs(image_tensor(image)))
    assert out.mode == "RGB" and out.size == (19 * upscaler.scale, 13 * upscaler.scale)
    # the comparison means something only if most pixels are not clamped to 0 or 255
    assert ((expected > 0) & (expected < 255)).mean() > 0.3
    assert np.abs(np.asarray(out).astype(int) - expected).max() <= 1


# --- refusals ---------------------------------------------------------------------------------------


class _Trap:
    """A pickle that leaves a mark on disk if anything ever unpickles it."""

    def __init__(self, mark: Path) -> None:
        self.mark = mark

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.makedirs, (str(self.mark),))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".ckpt"])
def test_pickles_are_refused_unopened(tmp_path: Path, suffix: str) -> None:
    mark = tmp_path / "unpickled"
    path = tmp_path / f"4x-UltraSharp{suffix}"
    path.write_bytes(pickle.dumps(_Trap(mark)))
    with pytest.raises(CheckpointError, match="pickle") as err:
        load_upscaler(path)
    assert str(path) in str(err.value) and "safetensors" in str(err.value)
    assert not mark.exists()
    # refused by its name, before any look at the file: a missing one is refused the same way
    with pytest.raises(CheckpointError, match="pickle"):
        load_upscaler(tmp_path / f"absent{suffix}")


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    swinir = {
        "conv_first.weight": torch.zeros(8, 3, 3, 3),
        "patch_embed.norm.weight": torch.zeros(8),
        "layers.0.residual_group.blocks.0.attn.qkv.weight": torch.zeros(24, 8),
        "layers.0.residual_group.blocks.0.attn.relative_position_bias_table": torch.zeros(9, 2),
        "conv_after_body.weight": torch.zeros(8, 8, 3, 3),
    }
    path = save(swinir, tmp_path / "001_classicalSR_SwinIR_x4.safetensors")
    with pytest.raises(CheckpointError, match="not an upscale model pictor knows") as err:
        load_upscaler(path)
    assert str(path) in str(err.value) and "conv_after_body.weight" in str(err.value)


def test_esrgan_plus_is_refused() -> None:
    sd = spandrel_esrgan(4, plus=True).state_dict()
    assert "model.1.sub.0.RDB1.conv1x1.weight" in sd
    with pytest.raises(CheckpointError, match=r"ESRGAN\+"):
        upscaler_from_state_dict(sd, "4x-plus.safetensors")


def test_grayscale_esrgan_is_refused() -> None:
    sd = spandrel_esrgan(4, in_nc=1, out_nc=1).state_dict()
    with pytest.raises(CheckpointError, match="1 input and 1 output channels") as err:
        upscaler_from_state_dict(sd, "1x-gray.safetensors")
    assert "1x-gray.safetensors" in str(err.value) and "RGB" in str(err.value)


def test_compact_with_four_input_channels_is_refused() -> None:
    sd = ref.Compact(num_in_ch=4, num_out_ch=4, num_feat=8, num_conv=2, upscale=2).state_dict()
    with pytest.raises(CheckpointError, match="4 input channels") as err:
        upscaler_from_state_dict(sd, "rgba.safetensors")
    assert "compact" in str(err.value)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = save(rrdb().state_dict(), tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as err:
        load_upscaler(path)
    assert str(path) in str(err.value)


def test_missing_and_extra_keys_are_named(tmp_path: Path) -> None:
    sd = rrdb().state_dict()
    del sd["body.1.rdb2.conv3.bias"]
    sd["conv_extra.weight"] = torch.zeros(3)
    path = save(sd, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_upscaler(path)
    message = str(err.value)
    assert "body.1.rdb2.conv3.bias" in message and "conv_extra.weight" in message
    assert "missing" in message and "unexpected" in message and str(path) in message


def test_identify_names_layouts() -> None:
    old = spandrel_esrgan(2).state_dict()
    new = rrdb(upsamples=1).state_dict()
    for sd in (old, new, bsrgan_names(new)):
        architecture, weights = identify(sd, "x")
        assert architecture == "ESRGAN" and set(weights) == set(new)
    architecture, weights = identify(compact().state_dict(), "x")
    assert architecture == "Compact" and set(weights) == set(compact().state_dict())


def test_file_summary_reads_the_header(tmp_path: Path) -> None:
    net = rrdb(blocks=1, in_channels=12, unshuffle=2)
    path = save(bsrgan_names(net.state_dict()), tmp_path / "RealESRGAN_x2plus.safetensors")
    summary = upscaler_file_summary(path)
    assert summary is not None and summary["kind"] == "upscale model (ESRGAN)" and summary["scale"] == 2
    assert summary["params"] == vars(net.params)
    assert summary["parameters"] == sum(p.numel() for p in net.parameters())
    assert summary["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert upscaler_file_summary(save({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")) is None


# --- precision ---------------------------------------------------------------------------------------


def test_fp16_file_runs_in_float32_as_the_cast_weights(tmp_path: Path) -> None:
    sd = rrdb(seed=9).state_dict()
    half = save({k: v.half() for k, v in sd.items()}, tmp_path / "fp16.safetensors")
    loaded = load_upscaler(half)
    for name, p in loaded.net.state_dict().items():
        assert p.dtype == torch.float32
        assert torch.equal(p, sd[name].half().float()), name
    cast = RRDBNet(RRDBParams(features=8, growth=32, blocks=2, upsamples=2))
    cast.load_state_dict({k: v.half().float() for k, v in sd.items()})
    x = picture(8, 9, seed=9)
    torch.testing.assert_close(loaded.net(x), cast.eval()(x), atol=0, rtol=0)


# --- tiling ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: compact(convs=2, scale=4), lambda: compact(convs=2, scale=2)])
def test_tiles_with_enough_overlap_equal_one_run(make: Callable[[], nn.Module]) -> None:
    net = make()  # 4 convolutions: each output pixel sees 4 input pixels on each side; overlap 8 covers it
    x = picture(45, 70, seed=10)
    calls = counted(net)
    tiled = run_tiled(net, x, tile=32, overlap=8)
    assert len(calls) == 6  # 2 rows x 3 columns of tiles
    torch.testing.assert_close(tiled, net(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(45, 71), (50, 66)])
def test_tiles_of_an_unshuffle_net_equal_one_run(size: tuple[int, int]) -> None:
    """Tile edges fall on the pixel-unshuffle grid, so only the picture's own edge is reflect-padded."""
    # 17 convolutions on the unshuffled grid (x2) then 3 at higher resolutions: within 38 input pixels
    net = rrdb(seed=11, growth=8, blocks=1, in_channels=12, unshuffle=2)
    x = picture(*size, seed=11)
    calls = counted(net)
    tiled = run_tiled(net, x, tile=33, overlap=39)  # both rounded up to the grid: 34 and 40
    assert len(calls) == math.ceil(size[0] / 34) * math.ceil(size[1] / 34)
    torch.testing.assert_close(tiled, net(x), atol=1e-6, rtol=0)


def test_tiles_without_overlap_differ_only_at_the_seams() -> None:
    net = compact(seed=12, convs=8, scale=2)  # 10 convolutions: each output pixel sees 10 input pixels around
    reach, s, tile = 10, 2, 32
    x = picture(45, 70, seed=12)
    diff = (run_tiled(net, x, tile=tile, overlap=0) - net(x)).abs()[0].amax(0)  # [H*s, W*s]
    assert diff.max() > 1e-2  # cut without context, the tiles' borders come out wrong

    def far(n: int) -> Tensor:
        """Output rows (or columns) whose input pixel is further than the reach from every inner tile edge
        (the picture's own edges are zero-padded alike in both runs)."""
        i = torch.arange(n * s) // s
        near = torch.zeros(n * s, dtype=torch.bool)
        for edge in range(tile, n, tile):
            near |= (i >= edge - reach) & (i < edge + reach)
        return ~near

    rows, cols = far(45), far(70)
    assert diff[rows][:, cols].max() <= 1e-6
    assert diff[~rows].max() > 1e-2 and diff[:, ~cols].max() > 1e-2


# --- upscale_image -----------------------------------------------------------------------------------


@pytest.fixture
def x4(tmp_path: Path) -> UpscalerFile:
    return load_upscaler(_old_esrgan_file(tmp_path)[0])


@pytest.fixture
def x2(tmp_path: Path) -> UpscalerFile:
    return load_upscaler(_compact_file(tmp_path)[0])


def test_scale_none_is_the_models_factor(x4: UpscalerFile) -> None:
    assert upscale_image(x4, random_image(15, 11)).size == (60, 44)


def test_smaller_scale_is_lanczos_from_the_models_output(x4: UpscalerFile) -> None:
    image = random_image(15, 11)
    out = upscale_image(x4, image, scale=2)
    assert out.size == (30, 22)
    full = upscale_image(x4, image)
    assert np.array_equal(np.asarray(out), np.asarray(full.resize((30, 22), Image.LANCZOS)))


def test_larger_scale_runs_the_model_again(x2: UpscalerFile) -> None:
    assert [passes_for(s, 2) for s in (1.5, 2, 3, 4, 8, 16)] == [1, 1, 2, 2, 3, 4]
    assert passes_for(2, 4) == 1 and passes_for(8, 4) == 2 and passes_for(4, 1) == 1
    assert passes_for(125, 5) == 3  # log(125) / log(5) is 3.0000000000000004 in floats
    image = random_image(7, 5, seed=13)
    calls = counted(x2.net)
    out = upscale_image(x2, image, scale=8)
    assert out.size == (56, 40) and len(calls) == 3
    x = image_tensor(image)
    with torch.no_grad():
        for _ in range(3):
            x = x2.net(x).clamp(0, 1)
    assert np.abs(np.asarray(out).astype(int) - to_uint8(x)).max() <= 1


def test_odd_scale_runs_past_it_and_comes_down(x2: UpscalerFile) -> None:
    image = random_image(7, 5, seed=14)
    calls = counted(x2.net)
    out = upscale_image(x2, image, scale=3)
    assert out.size == (21, 15) and len(calls) == 2


def test_alpha_is_kept(x4: UpscalerFile) -> None:
    image = random_image(9, 6, seed=15, mode="RGBA")
    out = upscale_image(x4, image, scale=2)
    assert out.mode == "RGBA" and out.size == (18, 12)
    alpha = image.getchannel("A").resize((18, 12), Image.LANCZOS)
    assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(alpha))
    rgb = upscale_image(x4, image.convert("RGB"), scale=2)
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(rgb))


def test_tiled_upscale_image_equals_one_run(tmp_path: Path) -> None:
    path = save(compact(seed=16, convs=2, scale=2).state_dict(), tmp_path / "c.safetensors")
    upscaler = load_upscaler(path)
    image = random_image(70, 45, seed=16)
    tiled = upscale_image(upscaler, image, tile=32, overlap=8)
    whole = upscale_image(upscaler, image, tile=512)
    assert np.abs(np.asarray(tiled).astype(int) - np.asarray(whole).astype(int)).max() <= 1


def test_the_largest_scale_runs_a_x2_model_four_times(x2: UpscalerFile) -> None:
    calls = counted(x2.net)
    assert upscale_image(x2, random_image(3, 2), scale=16).size == (48, 32) and len(calls) == 4


@pytest.mark.parametrize(
    ("scale", "tile", "overlap", "words"),
    [
        (0, 512, 32, "upscale factor"),
        (-2, 512, 32, "upscale factor"),
        (float("nan"), 512, 32, "upscale factor"),
        (float("inf"), 512, 32, "upscale factor"),
        (17, 512, 32, "at most 16"),
        (2, 16, 4, "tile size must be at least 32"),
        (2, 0, 0, "tile size"),
        (2, 64, -1, "overlap"),
        (2, 64, 32, "under half the tile (32)"),
    ],
)
def test_upscale_problems_are_named(
    x2: UpscalerFile, scale: float, tile: int, overlap: int, words: str
) -> None:
    problem = upscale_problem(scale, tile, overlap)
    assert problem is not None and words in problem
    with pytest.raises(ValueError, match="must be"):
        upscale_image(x2, random_image(5, 5), scale=scale, tile=tile, overlap=overlap)


def test_good_settings_are_no_problem() -> None:
    assert upscale_problem(None, 512, 32) is None
    assert upscale_problem(16, 32, 15) is None
    assert upscale_problem(0.5, 64, 0) is None


def test_record_names_the_file(tmp_path: Path) -> None:
    path = save(compact(scale=2).state_dict(), tmp_path / "2x-Anime.safetensors")
    upscaler = load_upscaler(path)
    record = upscale_record(upscaler, None, 256, 16)
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == upscaler.sha256
    assert record["upscaler"] == "2x-Anime" == upscaler.name
    assert record | {"sha256": None} == {
        "upscaler": "2x-Anime",
        "architecture": "Compact",
        "file": str(path),
        "sha256": None,
        "model_scale": 2,
        "scale": 2.0,
        "tile": 256,
        "overlap": 16,
    }
    assert upscale_record(upscaler, 3.0, 256, 16)["scale"] == 3.0


def test_reference_missing_fails_loudly() -> None:
    """Without spandrel the parity tests must fail (never skip), saying how to install it."""
    hide = (
        "import importlib.util as u; find = u.find_spec; "
        "u.find_spec = lambda name, *a: None if name == 'spandrel' else find(name, *a); "
        "import spandrel_reference"
    )
    tests = Path(__file__).parent
    run = subprocess.run([sys.executable, "-c", hide], cwd=tests, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "ImportError" in run.stderr and "pip install --no-deps spandrel==0.4.2" in run.stderr
