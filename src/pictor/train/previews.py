"""What a run shows while it trains: sample grids drawn with the EMA weights, and shapes scores.

Generation here goes through `pictor.sampling` directly (not through a Pipeline, which would move the
live EMA module to another dtype in place). It follows the pipeline's conventions: noise per image from a
CPU generator seeded with the image's seed, fixed-length text, CFG against the empty prompt (what caption
dropout trains for), Euler on FLUX's shifted schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from torch import nn

from pictor.image_grid import tile
from pictor.models.autoencoder import AutoEncoder
from pictor.models.control_residuals import ControlResiduals
from pictor.models.flux import Flux, make_img_ids, make_txt_ids, pack_latents, unpack_latents
from pictor.models.reference import ReferenceConditioning, apply_reference, conditional_only
from pictor.models.text import TextEncoder
from pictor.sampling import cfg, get_sampler, get_schedule


def autocast(device: torch.device, enabled: bool):  # type: ignore[no-untyped-def]
    """bf16 autocast when enabled, on whatever device (on the CPU only when `--mixed-precision bf16` asks
    for it: CPUs with AMX or AVX-512 BF16 run the matmuls faster; torch's CPU policy also leaves norms and
    softmax in bf16, where CUDA's runs them in float32); float32 when disabled."""
    if enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [B, 3, H, W] -> uint8 [B, H, W, 3]."""
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray | Sequence[np.ndarray], columns: int) -> Image.Image:
    """Tile uint8 [H, W, 3] images into rows of `columns` with a 2-pixel white gutter; images of several
    sizes each take the top left of a cell of the largest height and width (`pictor.image_grid.tile`)."""
    return tile(list(images), columns)


@torch.no_grad()
def generate(
    transformer: Flux,
    autoencoder: AutoEncoder,
    text_encoder: TextEncoder,
    prompts: Sequence[str],
    seeds: Sequence[int],
    size: int | tuple[int, int],
    steps: int,
    guidance: float,
    device: torch.device,
    amp: bool,
    batch_size: int = 32,
    residual_fn: Callable[[slice], list[torch.Tensor]] | None = None,
    context_fn: Callable[[slice], ReferenceConditioning] | None = None,
    negatives: Sequence[str] | None = None,
    control_fn: Callable[[slice], tuple[nn.Module, torch.Tensor]] | None = None,
) -> np.ndarray:
    """Text-to-image for prompt i with seed i: uint8 [N, height, width, 3] (`size`: a side, or (width,
    height)), with CFG against `negatives[i]` (else the empty prompt).

    ``residual_fn(slice of prompts)`` gives an adapter's per-block image residuals for those prompts (a
    layout adapter's); both CFG halves get them, as in the pipeline. ``context_fn(slice)`` gives what a
    reference adapter adds to those prompts (to their tokens and pooled vectors); as in the pipeline, the
    conditional half only. ``control_fn(slice)`` gives a ControlNet and those prompts' packed control
    latents [n, N, C]: at each call it runs on the conditional half and both halves get its residuals, as in
    the pipeline (`pictor.controlnet_runs`). A guidance-distilled transformer (FLUX.1-dev) gets `guidance` in
    its guidance embedding and one pass per step, as the pipeline runs it; any other gets CFG at `guidance`.
    """
    distilled = bool(getattr(getattr(transformer, "params", None), "guidance_embed", False))
    was_training = transformer.training
    transformer.eval()
    f = autoencoder.params.downsample_factor
    width, height = (size, size) if isinstance(size, int) else size
    lat_h, lat_w = height // f, width // f
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            chunk_seeds = list(seeds[start : start + batch_size])
            n = len(chunk)
            noise = torch.cat(
                [
                    torch.randn(
                        1,
                        autoencoder.params.z_channels,
                        lat_h,
                        lat_w,
                        generator=torch.Generator().manual_seed(s),
                    )
                    for s in chunk_seeds
                ]
            ).to(device)
            x = pack_latents(noise)
            cond = text_encoder.encode(chunk)
            # CFG runs the prompts and the empty prompt in one batch; at guidance 1 (a model whose defaults
            # say no CFG, as FLUX.1-schnell) it is the conditional velocity alone, one pass as the pipeline
            one_pass = distilled or guidance == 1.0
            passes = 1 if one_pass else 2
            uncond = text_encoder.encode(list(negatives[start : start + n]) if negatives else [""] * n)
            txt = torch.cat([cond.tokens, uncond.tokens][:passes]).to(device)
            vec = torch.cat([cond.pooled, uncond.pooled][:passes]).to(device)
            img_ids = make_img_ids(passes * n, lat_h, lat_w, device=device)
            txt_ids = make_txt_ids(passes * n, txt.shape[1], device=device)
            if context_fn is not None:
                ctx = context_fn(slice(start, start + n))  # [n, ...]: one picture per prompt
                txt, vec = apply_reference(txt, vec, ctx if one_pass else conditional_only(ctx, n))
            res = None
            if residual_fn is not None:
                res = [torch.cat([r] * passes) for r in residual_fn(slice(start, start + n))]
            scale = torch.full((passes * n,), float(guidance), device=device) if distilled else None
            control = control_fn(slice(start, start + n)) if control_fn is not None else None

            def velocity(x2: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
                with autocast(device, amp):
                    inputs = (x2, img_ids, txt, txt_ids, t2, vec)  # noqa: B023 (this chunk's, used in it)
                    ctrl = _control_residuals(control, *inputs, scale) if control is not None else None  # noqa: B023
                    v = transformer(*inputs, img_residuals=res, guidance=scale, controlnet=ctrl)  # noqa: B023
                return v.float()

            ts = get_schedule("flux", steps, image_seq_len=x.shape[1]).to(device)
            x = get_sampler("euler")(velocity if one_pass else cfg(velocity, guidance), x, ts, None)
            with autocast(device, amp):
                pixels = autoencoder.decode(unpack_latents(x, lat_h, lat_w))
            out.append(to_uint8(pixels))
    finally:
        transformer.train(was_training)
    return np.concatenate(out)


def _control_residuals(
    control: tuple[nn.Module, torch.Tensor],
    x: torch.Tensor,
    img_ids: torch.Tensor,
    txt: torch.Tensor,
    txt_ids: torch.Tensor,
    t: torch.Tensor,
    vec: torch.Tensor,
    guidance: torch.Tensor | None,
) -> ControlResiduals:
    """The ControlNet's residuals for one call: run on the conditional half (the first k rows, k the
    control latents' batch); the transformer broadcasts them over a CFG batch's other half."""
    net, latents = control
    k = latents.shape[0]
    g = guidance[:k] if guidance is not None else None
    return net(x[:k], img_ids[:k], latents, txt[:k], txt_ids[:k], t[:k] if t.ndim else t, vec[:k], g)


@torch.no_grad()
def reconstruct(
    autoencoder: AutoEncoder, images: torch.Tensor, device: torch.device, amp: bool, batch_size: int = 64
) -> np.ndarray:
    """uint8 [B, 3, H, W] -> their encode/decode round trip (posterior mean), uint8 [B, H, W, 3]."""
    was_training = autoencoder.training
    autoencoder.eval()
    out = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device).float() / 127.5 - 1.0
            with autocast(device, amp):
                pixels = autoencoder.decode(autoencoder.encode(x))
            out.append(to_uint8(pixels))
    finally:
        autoencoder.train(was_training)
    return np.concatenate(out)


def eval_specs(n: int) -> list[dict]:
    """n dev prompts spread evenly over the six tags (the first of each tag, then the second, ...)."""
    from pictor.eval.shapes import TAGS, load_prompts

    by_tag: dict[str, list[dict]] = {tag: [] for tag in TAGS}
    for spec in load_prompts():
        by_tag.setdefault(spec["tag"], []).append(spec)
    picked: list[dict] = []
    rank = 0
    while len(picked) < n and any(rank < len(v) for v in by_tag.values()):
        for tag in TAGS:
            if rank < len(by_tag[tag]) and len(picked) < n:
                picked.append(by_tag[tag][rank])
        rank += 1
    return picked


def score(specs: list[dict], images: np.ndarray, per_spec: int) -> dict:
    """Shapes scores of images laid out spec by spec (`per_spec` consecutive images each)."""
    from pictor.eval.shapes import score_images

    grouped = [list(images[i * per_spec : (i + 1) * per_spec]) for i in range(len(specs))]
    report = score_images(specs, grouped)
    keep = ("overall", "per_tag", "n_images", "scorer_revision")  # the revision says which shape test
    return {key: report[key] for key in keep}
