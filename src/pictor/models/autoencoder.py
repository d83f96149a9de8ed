"""KL autoencoder in the LDM / FLUX.1 layout.

Module names follow black-forest-labs/flux `modules/autoencoder.py` (itself the CompVis LDM layout), so
FLUX.1's `ae.safetensors` and SD-style VAEs (with `quant_conv` / `post_quant_conv`) load key for key:
`encoder.down.N.block.M.conv1`, `encoder.mid.attn_1.q`, `decoder.up.N.upsample.conv`, ...

Latent convention: `encode` returns `scale_factor * (latent - shift_factor)`, the space the transformer is
trained in; `decode` undoes that first. `encode_moments` gives the raw Gaussian moments for training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# Every GroupNorm in the LDM autoencoder uses 32 groups; official weights depend on it.
NUM_GROUPS = 32
# LDM's DiagonalGaussianDistribution clamps log-variance to this range; diffusers does the same.
LOGVAR_RANGE = (-30.0, 20.0)


@dataclass
class AutoEncoderParams:
    resolution: int
    in_channels: int
    ch: int
    out_ch: int
    ch_mult: list[int]
    num_res_blocks: int
    z_channels: int
    scale_factor: float
    shift_factor: float
    use_quant_conv: bool = False

    def __post_init__(self) -> None:
        self.ch_mult = [int(m) for m in self.ch_mult]
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty list of positive ints, got {self.ch_mult}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % NUM_GROUPS]
        if bad:
            raise ValueError(
                f"every level width ch * ch_mult must be divisible by {NUM_GROUPS} (GroupNorm groups); "
                f"got ch={self.ch}, ch_mult={self.ch_mult} -> widths {bad} are not"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoEncoderParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown AutoEncoderParams keys: {unknown}; expected a subset of {sorted(known)}"
            )
        return cls(**d)


def flux1_ae_params() -> AutoEncoderParams:
    """FLUX.1 [dev]/[schnell] autoencoder (black-forest-labs `configs["flux-dev"].ae_params`)."""
    return AutoEncoderParams(
        resolution=256,
        in_channels=3,
        ch=128,
        out_ch=3,
        ch_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        z_channels=16,
        scale_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
    )


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=NUM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels. q/k/v/proj_out stay 1x1 convs so LDM weights load."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        hn = self.norm(x)
        # [B, C, H, W] -> [B, 1, H*W, C]: one head whose dim is the full channel width
        q, k, v = (rearrange(f(hn), "b c h w -> b 1 (h w) c").contiguous() for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(out)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # Only present when widths differ: the checkpoints have no identity shortcut weights.
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # LDM pads right/bottom only (asymmetric), which Conv2d's padding cannot express.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_block(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """[B, in_channels, H, W] -> [B, 2 * z_channels, H/f, W/f] (mean and logvar stacked on channels)."""

    def __init__(self, p: AutoEncoderParams) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = p.ch
        for level, mult in enumerate(p.ch_mult):
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(p.num_res_blocks):
                down.block.append(ResnetBlock(block_in, p.ch * mult))
                block_in = p.ch * mult
            if level != len(p.ch_mult) - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = _mid_block(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                h = block(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, z_channels, h, w] -> [B, out_ch, h*f, w*f]."""

    def __init__(self, p: AutoEncoderParams) -> None:
        super().__init__()
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _mid_block(block_in)
        # up[i] is the level at resolution i (up[0] is full size), built deepest first as in LDM;
        # forward therefore walks the list in reverse.
        ups: list[nn.Module] = []
        for level in reversed(range(len(p.ch_mult))):
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(p.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, p.ch * p.ch_mult[level]))
                block_in = p.ch * p.ch_mult[level]
            if level != 0:
                up.upsample = Upsample(block_in)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def kl_loss(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), summed over C, H, W and averaged over the batch (LDM's
    convention, which the usual kl_weight ~1e-6 is tuned for). Returns a scalar."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(dim=1).mean()


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams) -> None:
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        if params.use_quant_conv:
            z2 = 2 * params.z_channels
            self.quant_conv = nn.Conv2d(z2, z2, kernel_size=1)
            self.post_quant_conv = nn.Conv2d(params.z_channels, params.z_channels, kernel_size=1)
        else:
            self.quant_conv = None
            self.post_quant_conv = None

    @property
    def scale_factor(self) -> float:
        return self.params.scale_factor

    @property
    def shift_factor(self) -> float:
        return self.params.shift_factor

    def _check_image(self, x: Tensor) -> None:
        p, f = self.params, self.params.downsample_factor
        if x.ndim != 4 or x.shape[1] != p.in_channels:
            raise ValueError(f"expected an image batch [B, {p.in_channels}, H, W], got shape {list(x.shape)}")
        h, w = x.shape[-2:]
        if h % f or w % f:
            raise ValueError(
                f"image height and width must be multiples of {f} (the downsample factor), got {h}x{w}; "
                f"nearest sizes that work: {h // f * f or f}x{w // f * f or f} or "
                f"{-(-h // f) * f}x{-(-w // f) * f} (crop or pad)"
            )

    def _check_latent(self, z: Tensor) -> None:
        c = self.params.z_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise ValueError(f"expected a latent batch [B, {c}, h, w], got shape {list(z.shape)}")

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x in [-1, 1], [B, C, H, W] -> raw (mean, logvar), each [B, z_channels, H/f, W/f]."""
        self._check_image(x)
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    @staticmethod
    def _sample(mean: Tensor, logvar: Tensor, generator: torch.Generator | None) -> Tensor:
        # Draw on the generator's device in fp32, then move: the same seed gives the same latent on any
        # device and in any dtype.
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
        return mean + torch.exp(0.5 * logvar) * noise.to(device=mean.device, dtype=mean.dtype)

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """x in [-1, 1] -> scaled latent `scale_factor * (latent - shift_factor)`."""
        mean, logvar = self.encode_moments(x)
        return self.scale_latent(self._sample(mean, logvar, generator) if sample else mean)

    def scale_latent(self, latent: Tensor) -> Tensor:
        """A raw latent (as `encode_moments` gives, e.g. a cached posterior mean) -> the scaled latent
        `encode` returns."""
        return self.scale_factor * (latent - self.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent (as returned by `encode`) -> image, nominally in [-1, 1]."""
        self._check_latent(z)
        latent = z / self.scale_factor + self.shift_factor
        if self.post_quant_conv is not None:
            latent = self.post_quant_conv(latent)
        return self.decoder(latent)

    def forward(
        self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass: (reconstruction, mean, logvar); feed mean/logvar to `kl_loss`."""
        mean, logvar = self.encode_moments(x)
        latent = self._sample(mean, logvar, generator) if sample else mean
        # Skip the scale/shift round trip: it cancels, and the decoder sees the raw latent either way.
        if self.post_quant_conv is not None:
            latent = self.post_quant_conv(latent)
        return self.decoder(latent), mean, logvar

    # Let `AutoEncoder.kl_loss(mean, logvar)` and `ae.kl_loss(...)` work as well as the free function.
    kl_loss = staticmethod(kl_loss)
