"""How an edit keeps its known region: on the latent noising path while sampling, byte for byte after.

The "blended latent" rule re-imposes x = m * x + (1 - m) * interpolate(z0, noise, t_next) after every step.
For a binary mask that is the same as replacing the velocity in the known region by the velocity of the
straight noising path, noise - z0 (`blend_velocity`): every deterministic sampler here (Euler, Heun,
DPM++ 2M, UniPC, DEIS, iPNDM, RES multistep, LMS...) maps a point on that straight line to the point at
t_next exactly (tests/test_editing.py runs each), so the known region stays on the path; and because the
replacement happens inside the velocity callable, Heun's and UniPC's correctors and the multistep
histories see consistent values too, which a post-step hook alone could not give. iPNDM_v's weights sum
to 1 only on even steps, so on a schedule's uneven ones it would leave the path (by about 1e-2): it also
re-imposes the path after each of its steps, through the `keep_known` attribute `blend_velocity` gives its
velocity (`pictor.sampling_steps.keep_known`), which puts it on the path exactly.

A stochastic sampler (euler_ancestral, dpmpp_2m_sde, lcm) puts fresh noise into every step, so the known
region cannot stay on the one path of the initial noise. There the known region gets the velocity
(x - z0) / t instead (`anchored_velocity`), whose data prediction x - t v is exactly z0: the sampler treats
it as perfectly denoised, and its steps keep it at z0 noised to the current t with noise of their own
(each maps (1 - t) z0 + t n, n standard normal, to (1 - t') z0 + t' n' when its data prediction is z0;
tests/test_sampling_sde.py checks all three). On the path both velocities are the same; the deterministic
samplers keep the first, with which their earlier images were made, so those stay bit-exact.

After decoding, the pixels are composited with the source so that everything outside the mask is
byte-identical to the input (feathered only *inside* the mask).

Layering: beside flow/sampling (numpy, torch, pictor.flow, pictor.models.flux); `pictor.pipeline` imports
it together with `pictor.editing`, which prepares the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from pictor.flow import interpolate
from pictor.models.flux import pack_latents
from pictor.sampling import VelocityFn
from pictor.sampling_steps import KEEP_KNOWN

__all__ = [
    "LatentInit",
    "anchored_velocity",
    "blend_velocity",
    "composite",
    "feather_weights",
    "latent_mask",
    "to_model_pixels",
]


# ------------------------------------------------------------------------------------------- latents


def to_model_pixels(pixels: np.ndarray, device: torch.device, dtype: torch.dtype) -> Tensor:
    """uint8 [H, W, 3] -> [1, 3, H, W] in [-1, 1], the autoencoder's input range."""
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    return x.to(device, dtype)


def latent_mask(mask: np.ndarray, factor: int, channels: int) -> Tensor:
    """Pixel mask bool [H, W] -> packed latent mask bool [1, (H/2f)(W/2f), 4C], laid out like the tokens.

    Max-pooling over each latent's f x f pixels repaints every latent that touches the mask: the decoder
    spreads each latent over its neighbours anyway, and the pixel composite restores what lies outside.
    """
    m = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]  # [1, 1, H, W]
    m = F.max_pool2d(m, kernel_size=factor, stride=factor)  # [1, 1, H/f, W/f]
    return pack_latents(m.expand(-1, channels, -1, -1).contiguous()) > 0.5


@dataclass
class LatentInit:
    """Where an edit's sampler run starts: packed clean latents, their mask and the start time."""

    z0: Tensor  # packed source latents [1, N, 4C]
    strength: float  # the start time t, in (0, 1]
    mask: Tensor | None  # packed bool [1, N, 4C], True = repaint; None = repaint everything (img2img)
    # FLUX.1 Fill: the masked picture and mask it reads beside the noise [1, N, 4C + 4f^2]
    # (`pictor.fill_images`); it paints the region itself, so its run has no mask to blend with.
    fill: Tensor | None = None

    def start(self, noise: Tensor) -> Tensor:
        """The sampler's first x: the source noised to t = strength (exactly the noise at strength 1)."""
        return interpolate(self.z0.expand_as(noise), noise, self.strength)

    def velocity(self, fn: VelocityFn, noise: Tensor, anchored: bool = False) -> VelocityFn:
        """`fn` with the known region kept (`blend_velocity`); `anchored` for a stochastic sampler."""
        if self.mask is None:
            return fn
        if anchored:
            return anchored_velocity(fn, self.z0, self.mask)
        return blend_velocity(fn, self.z0, noise, self.mask)

    def finish(self, x: Tensor) -> Tensor:
        """Put the known region exactly at z0 (t = 0), undoing float drift along the path."""
        if self.mask is None:
            return x
        return torch.where(self.mask, x, self.z0.to(x.dtype))


def blend_velocity(fn: VelocityFn, z0: Tensor, noise: Tensor, mask: Tensor) -> VelocityFn:
    """Keep the region where mask is False on its noising path interpolate(z0, noise, t).

    The straight path's velocity is noise - z0 at every t; any of our samplers started on the path and fed
    that velocity lands on the path at t_next, which is the blended-latent re-imposition without a hook.
    """
    path_v = (noise - z0.to(noise.dtype)).to(noise.dtype)

    def blended(x: Tensor, t: Tensor) -> Tensor:
        v = fn(x, t)
        return torch.where(mask, v, path_v.to(v.dtype))

    def keep(x: Tensor, t: float) -> Tensor:  # for a sampler that does not keep the path (`keep_known`)
        return torch.where(mask, x, interpolate(z0.to(x.dtype), noise.to(x.dtype), t))

    setattr(blended, KEEP_KNOWN, keep)
    return blended


def anchored_velocity(fn: VelocityFn, z0: Tensor, mask: Tensor) -> VelocityFn:
    """Where mask is False, the velocity (x - z0) / t, whose data prediction is z0 whatever x is: the
    known region for samplers that renoise (module docstring). The model is never called at t = 0."""

    def anchored(x: Tensor, t: Tensor) -> Tensor:
        v = fn(x, t)
        tb = t.reshape(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, ...], in t's (at least fp32) dtype
        known_v = ((x - z0.to(x.dtype)) / tb).to(v.dtype)
        return torch.where(mask, v, known_v)

    return anchored


# ------------------------------------------------------------------------------------------- pixels


def feather_weights(mask: np.ndarray, feather: int) -> np.ndarray:
    """float32 [H, W] blend weights of the generated pixels: 0 outside the mask, ramping up inside it.

    A pixel at chessboard distance d (1 = touching a kept pixel) from the kept region gets
    min(d / (feather + 1), 1); the image border does not count as kept, so a full mask stays all ones.
    """
    weights = mask.astype(np.float32)
    if feather <= 0 or not mask.any():
        return weights
    depth = mask.astype(np.int32)
    inside = mask.copy()
    h, w = mask.shape
    for _ in range(feather):
        if not inside.any():  # eroded away: more rounds add nothing (and a huge feather would take hours)
            break
        padded = np.pad(inside, 1, constant_values=True)
        eroded = np.ones_like(inside)
        for dy in range(3):
            for dx in range(3):
                eroded &= padded[dy : dy + h, dx : dx + w]
        inside = eroded
        depth += inside
    return np.minimum(depth / (feather + 1), 1.0).astype(np.float32)


def composite(generated: np.ndarray, source: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Blend uint8 [H, W, 3] images; where a weight is 0 the source pixel is kept byte for byte."""
    w = weights[..., None]
    blended = np.rint(w * generated.astype(np.float32) + (1 - w) * source.astype(np.float32))
    return np.where(w > 0, blended.clip(0, 255).astype(np.uint8), source)


def to_pil(pixels: Tensor) -> list[Image.Image]:
    """[-1, 1] float images [B, 3, H, W] -> 8-bit PIL images (the inverse of `to_model_pixels`)."""
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]
