"""Upscale-model files (.safetensors): ESRGAN-family RRDBNets in basicsr's, BSRGAN's or the original ESRGAN's
key layout, and Real-ESRGAN's compact SRVGGNets (the files OpenModelDB and A1111/ComfyUI users share as
"4x-UltraSharp", "RealESRGAN_x4plus", "realesr-general-x4v3", ...).

The architecture and its sizes are read from the keys and tensor shapes (as spandrel does); the weights then
load strictly into `models.upscalers`. Other architectures (SwinIR, HAT, DAT, ...) and pickles are refused
with the reason.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from pictor.checkpoint import CheckpointError, load_into, read_safetensors, sha256_file, strip_prefixes
from pictor.models.upscalers import CompactNet, CompactParams, RRDBNet, RRDBParams, Upscaler

RGB = 3


@dataclass(frozen=True)
class UpscalerFile:
    """An upscale model ready to run, and what a record needs to find it again."""

    net: Upscaler
    path: Path
    sha256: str
    architecture: str  # "ESRGAN" or "Compact"

    @property
    def name(self) -> str:
        return self.path.stem  # what A1111 writes as "Postprocess upscaler"

    @property
    def scale(self) -> int:
        return self.net.scale

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "scale": self.scale,
            "params": vars(self.net.params),
        }


def _count(sd: Mapping[str, Tensor], pattern: str) -> int:
    """How many distinct indices the first group of `pattern` takes among the keys."""
    return len({m[1] for k in sd if (m := re.fullmatch(pattern, k))})


_BSRGAN_NAMES = (
    (r"RRDB_trunk\.(\d+)\.RDB(\d)\.", r"body.\1.rdb\2."),
    (r"trunk_conv\.", "conv_body."),
    (r"upconv(\d)\.", r"conv_up\1."),
    (r"HRconv\.", "conv_hr."),
)


def _from_bsrgan(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        for old, new in _BSRGAN_NAMES:
            key = re.sub(f"^{old}", new, key)
        out[key] = value
    return out


def _from_old_esrgan(sd: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """The original ESRGAN repository's `model.N` sequential: conv, shortcut(RRDBs + conv), per upsample
    [nearest, conv, lrelu], conv, lrelu, conv. So the up convs sit at 3, 6, ..., the last two convs after."""
    blocks = _count(sd, r"model\.1\.sub\.(\d+)\.RDB1\.conv1\.0\.weight")
    last = max(int(m[1]) for k in sd if (m := re.fullmatch(r"model\.(\d+)\.weight", k)))
    upsamples = (last - 4) // 3
    if last != 3 * upsamples + 4 or upsamples < 0:
        raise CheckpointError(
            f"{where}: an ESRGAN file whose layers do not follow ESRGAN's order (last conv model.{last}); "
            "only nearest-neighbour upsampling nets (scale 1, 2, 4, 8, ...) are supported"
        )
    names = {"model.0.": "conv_first.", f"model.1.sub.{blocks}.": "conv_body."}
    names |= {f"model.{3 * i}.": f"conv_up{i}." for i in range(1, upsamples + 1)}
    names |= {f"model.{3 * upsamples + 2}.": "conv_hr.", f"model.{3 * upsamples + 4}.": "conv_last."}
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key)
        if m:
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
            continue
        prefix = next((p for p in names if key.startswith(p)), None)
        # keys of no known place stay as they are: the strict load names them
        out[names[prefix] + key[len(prefix) :] if prefix else key] = value
    return out


def _rrdb_params(sd: Mapping[str, Tensor], where: str) -> RRDBParams:
    in_channels = sd["conv_first.weight"].shape[1]
    out_channels = sd["conv_last.weight"].shape[0]
    unshuffle = {out_channels: 1, out_channels * 4: 2, out_channels * 16: 4}.get(in_channels)
    if unshuffle is None or out_channels != RGB:
        raise CheckpointError(
            f"{where}: an ESRGAN net with {in_channels} input and {out_channels} output channels; pictor "
            "upscales RGB pictures (3 channels, or 12/48 for Real-ESRGAN's pixel-unshuffled x2/x1 nets)"
        )
    return RRDBParams(
        in_channels=in_channels,
        out_channels=out_channels,
        features=sd["conv_first.weight"].shape[0],
        growth=sd["body.0.rdb1.conv1.weight"].shape[0],
        blocks=_count(sd, r"body\.(\d+)\.rdb1\.conv1\.weight"),
        upsamples=_count(sd, r"conv_up(\d+)\.weight"),
        unshuffle=unshuffle,
    )


def _compact_params(sd: Mapping[str, Tensor], where: str) -> CompactParams:
    last = max(int(m[1]) for k in sd if (m := re.fullmatch(r"body\.(\d+)\.weight", k)))
    in_channels, features = sd["body.0.weight"].shape[1], sd["body.0.weight"].shape[0]
    shuffled = sd[f"body.{last}.weight"].shape[0]
    scale = round((shuffled / RGB) ** 0.5)
    if in_channels != RGB or scale * scale * RGB != shuffled or last % 2:
        raise CheckpointError(
            f"{where}: a compact (SRVGG) net with {in_channels} input channels and {shuffled} before its "
            "pixel shuffle; pictor upscales RGB pictures with RGB nets"
        )
    return CompactParams(features=features, convs=(last - 2) // 2, scale=scale)


def identify(sd: Mapping[str, Tensor], where: str) -> tuple[str, dict[str, Tensor]]:
    """The architecture of an upscaler state dict and its weights in `models.upscalers`' names."""
    sd = strip_prefixes(sd, ("module.", "params_ema.", "params."))
    if "model.1.sub.0.RDB1.conv1x1.weight" in sd:
        raise CheckpointError(f"{where}: an ESRGAN+ ('plus') net, which pictor does not support")
    if "model.0.weight" in sd and "model.1.sub.0.RDB1.conv1.0.weight" in sd:
        return "ESRGAN", _from_old_esrgan(sd, where)
    if "conv_first.weight" in sd and "RRDB_trunk.0.RDB1.conv1.weight" in sd:
        return "ESRGAN", _from_bsrgan(sd)
    if "conv_first.weight" in sd and "body.0.rdb1.conv1.weight" in sd:
        return "ESRGAN", dict(sd)
    if "body.0.weight" in sd and "body.1.weight" in sd and sd["body.1.weight"].dim() == 1:
        return "Compact", dict(sd)
    shown = ", ".join(sorted(sd)[:5])
    raise CheckpointError(
        f"{where}: not an upscale model pictor knows (keys {shown}, ...); it reads ESRGAN-family RRDBNets "
        "(ESRGAN, BSRGAN, Real-ESRGAN, 4x-UltraSharp and the like) and Real-ESRGAN's compact SRVGGNets"
    )


def _params(architecture: str, weights: Mapping[str, Tensor], where: str) -> RRDBParams | CompactParams:
    try:
        params = _rrdb_params(weights, where) if architecture == "ESRGAN" else _compact_params(weights, where)
    except CheckpointError:
        raise
    except (KeyError, IndexError, ValueError) as exc:  # a layer the keys promised is missing or mis-shaped
        raise CheckpointError(
            f"{where}: the keys of an {architecture} upscaler, but not its layers ({type(exc).__name__}: "
            f"{exc}); the file is incomplete or of another architecture"
        ) from exc
    if params.scale < 1:
        raise CheckpointError(f"{where}: an {architecture} net whose factor works out below 1; not supported")
    return params


def upscaler_file_summary(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What `pictor info` says of an upscale-model file, or None for any other safetensors file. Only the
    header is read before the file's hash."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in names}
        architecture, weights = identify(shapes, str(path))
        params = _params(architecture, weights, str(path))
    except (SafetensorError, OSError, CheckpointError, KeyError, ValueError):
        return None
    return {
        "kind": f"upscale model ({architecture})",
        "scale": params.scale,
        "params": vars(params),
        "use": "pictor upscale PICTURE --upscaler THIS_FILE (or generate --hires-upscaler THIS_FILE)",
        "parameters": sum(int(t.numel()) for t in weights.values()),
        "sha256": sha256_file(path),
    }


def upscaler_from_state_dict(
    sd: Mapping[str, Tensor], where: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[str, Upscaler]:
    architecture, weights = identify(sd, where)
    params = _params(architecture, weights, where)
    with torch.device("meta"):
        net: Upscaler = RRDBNet(params) if isinstance(params, RRDBParams) else CompactNet(params)
    load_into(net, weights, f"{where} ({architecture})", dtype=dtype)
    return architecture, net.to(device).eval().requires_grad_(False)


def load_upscaler(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> UpscalerFile:
    """Read, identify and load an upscale model; errors name the file and what to do."""
    path = Path(path).resolve()  # records name it from any folder, as they do LoRAs and ControlNets
    sd = read_safetensors(path)
    architecture, net = upscaler_from_state_dict(sd, str(path), device, dtype)  # an fp16 file runs in `dtype`
    return UpscalerFile(net, path, sha256_file(path), architecture)
