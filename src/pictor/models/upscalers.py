"""Image upscaler networks: ESRGAN's RRDBNet and Real-ESRGAN's compact SRVGGNet, the two families behind most
"4x-..." upscale models that A1111's and ComfyUI's users put after (or between) sampler runs.

Both map RGB in [0, 1] ([B, 3, H, W]) to RGB at `scale` times the size. Module names are basicsr's (the
"new" ESRGAN layout: `conv_first`, `body.N.rdb1.conv1`, `conv_up1`, ...; SRVGG's `body.N`), so such files load
1:1; `upscaler_files` maps the older layouts onto them. No file I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class RRDBParams:
    in_channels: int = 3  # times unshuffle**2 where the net starts with a pixel unshuffle (Real-ESRGAN x2)
    out_channels: int = 3
    features: int = 64
    growth: int = 32  # channels each dense conv adds
    blocks: int = 23
    upsamples: int = 2  # nearest x2 + conv each: the net's own factor is 2**upsamples
    unshuffle: int = 1  # 1, 2 or 4: the picture is pixel-unshuffled first, so the net's factor drops by it

    @property
    def scale(self) -> int:
        return 2**self.upsamples // self.unshuffle


class ResidualDenseBlock(nn.Module):
    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, growth, 3, 1, 1)
        self.conv2 = nn.Conv2d(features + growth, growth, 3, 1, 1)
        self.conv3 = nn.Conv2d(features + 2 * growth, growth, 3, 1, 1)
        self.conv4 = nn.Conv2d(features + 3 * growth, growth, 3, 1, 1)
        self.conv5 = nn.Conv2d(features + 4 * growth, features, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2, inplace=True))
        # residual scaling 0.2, as ESRGAN trains it; in place, as the activations above: memory, not speed
        return self.conv5(torch.cat(feats, 1)).mul_(0.2).add_(x)


class RRDB(nn.Module):
    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(features, growth)
        self.rdb2 = ResidualDenseBlock(features, growth)
        self.rdb3 = ResidualDenseBlock(features, growth)

    def forward(self, x: Tensor) -> Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))).mul_(0.2).add_(x)


class RRDBNet(nn.Module):
    """ESRGAN's generator (Wang et al. 2018), with Real-ESRGAN's pixel-unshuffle front for its x2/x1 nets."""

    def __init__(self, params: RRDBParams) -> None:
        super().__init__()
        self.params = params
        p = params
        self.conv_first = nn.Conv2d(p.in_channels, p.features, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(p.features, p.growth) for _ in range(p.blocks)))
        self.conv_body = nn.Conv2d(p.features, p.features, 3, 1, 1)
        for i in range(1, p.upsamples + 1):
            self.add_module(f"conv_up{i}", nn.Conv2d(p.features, p.features, 3, 1, 1))
        self.conv_hr = nn.Conv2d(p.features, p.features, 3, 1, 1)
        self.conv_last = nn.Conv2d(p.features, p.out_channels, 3, 1, 1)

    @property
    def scale(self) -> int:
        return self.params.scale

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        k = self.params.unshuffle
        if k > 1:  # reflect-pad to a multiple of k, cut the padding off the output (Real-ESRGAN's inference)
            ph, pw = -h % k, -w % k
            rh, rw = (
                min(ph, h - 1),
                min(pw, w - 1),
            )  # reflection reaches size - 1 at most; then the edge repeats
            x = F.pad(F.pad(x, (0, rw, 0, rh), mode="reflect"), (0, pw - rw, 0, ph - rh), mode="replicate")
            x = F.pixel_unshuffle(x, k)
        feat = self.conv_first(x)
        feat = self.conv_body(self.body(feat)).add_(feat)
        for i in range(1, self.params.upsamples + 1):
            conv = getattr(self, f"conv_up{i}")
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2, inplace=True)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2, inplace=True))
        return out[..., : h * self.scale, : w * self.scale]


@dataclass(frozen=True)
class CompactParams:
    in_channels: int = 3
    out_channels: int = 3
    features: int = 64
    convs: int = 16  # body convolutions between the first and the last
    scale: int = 4


class CompactNet(nn.Module):
    """Real-ESRGAN's SRVGGNetCompact: convs with PReLU at the input size, one pixel shuffle at the end, added
    to the input enlarged by nearest neighbour (so the net learns only the residual)."""

    def __init__(self, params: CompactParams) -> None:
        super().__init__()
        self.params = params
        p = params
        layers: list[nn.Module] = [nn.Conv2d(p.in_channels, p.features, 3, 1, 1), nn.PReLU(p.features)]
        for _ in range(p.convs):
            layers += [nn.Conv2d(p.features, p.features, 3, 1, 1), nn.PReLU(p.features)]
        layers.append(nn.Conv2d(p.features, p.out_channels * p.scale**2, 3, 1, 1))
        self.body = nn.ModuleList(layers)

    @property
    def scale(self) -> int:
        return self.params.scale

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        base = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return F.pixel_shuffle(out, self.scale).add_(base)


Upscaler = RRDBNet | CompactNet
