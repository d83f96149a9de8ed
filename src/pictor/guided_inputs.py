"""What the guided velocity (`pictor.guided_velocity`) is given, and conditioning it prepares once per run.

`Conditioned` and `Models` say what of a request and of a pipeline the velocity reads. The helpers build
the run's conditioning that depends on neither x nor t: the prompts that run as passes of their own and
their weights per image token, texts stacked as one batch, the IP-Adapter's keys and values, the
regional-attention controls; and the CFG++ check on the request.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from pictor.composable_prompts import split_and, uses_and
from pictor.guidance_methods import GuidanceMethod, cfg_pp_problem
from pictor.ip_adapter_files import IPAdapterModel, blank_pixels, clip_image_embeds
from pictor.models.autoencoder import AutoEncoder
from pictor.models.flux import Flux
from pictor.models.ip_adapter import IPAttention
from pictor.models.layout import LayoutAdapter
from pictor.models.reference import ReferenceAdapter
from pictor.models.text import TextEmbeddings, TextEncoder
from pictor.redux_images import ReduxModel
from pictor.regional_attention import RegionalOptions
from pictor.regional_prompts import region_weights

__all__ = ["Conditioned", "Models", "ip_attention", "regional_options"]


class Conditioned(Protocol):
    """What of a request the velocity reads (a resolved `GenerationRequest`)."""

    prompt: str
    negative_prompt: str
    width: int | None
    height: int | None
    guidance: float | None
    sampler: str | None
    guidance_method: GuidanceMethod | None
    layout: list[dict[str, Any]] | None
    reference: Any
    context_image: Any
    redux_image: Any
    redux_strength: float | None
    ip_adapter_image: Any
    ip_adapter_scale: float | None
    cache_threshold: float | None
    prompt_weights: bool
    prompt_editing: bool
    regions: list[dict[str, Any]] | None
    regional_attention: bool
    regional_steps: float | None
    regional_double_interval: int | None
    regional_single_interval: int | None
    regional_base_ratio: float | None
    composable: bool


class Models(Protocol):
    """What of a pipeline the velocity calls (`pictor.pipeline.Pipeline`)."""

    device: torch.device
    dtype: torch.dtype
    guidance_mode: str
    transformer: Flux
    autoencoder: AutoEncoder
    text_encoder: TextEncoder
    layout_adapter: LayoutAdapter | None
    reference_adapter: ReferenceAdapter | None
    redux: ReduxModel | None
    ip_adapter: IPAdapterModel | None

    def encode_text(self, prompts: list[str], weighted: bool = False) -> TextEmbeddings: ...


def _check_cfg_pp(m: Models, r: Conditioned) -> None:
    """A ValueError where a CFG++ sampler would find no unconditional prediction (`cfg_pp_problem`; request
    resolution refuses the same requests first, with the same words)."""
    problem = cfg_pp_problem(r.sampler, m.guidance_mode, r.guidance_method)
    if problem:
        raise ValueError(problem)


def regional_options(r: Conditioned) -> RegionalOptions:
    """A request's Regional-Prompting-FLUX controls of regional attention (None fields: the defaults)."""
    return RegionalOptions(
        steps=getattr(r, "regional_steps", None),
        double_interval=getattr(r, "regional_double_interval", None) or 1,
        single_interval=getattr(r, "regional_single_interval", None) or 1,
        base_ratio=float(getattr(r, "regional_base_ratio", None) or 0.0),
    )


def _parts(r: Conditioned, grid_h: int, grid_w: int) -> tuple[list[str], torch.Tensor]:
    """The prompts that run as passes of their own and each one's weight per image token ([P, N]): the
    whole prompt and each region's (`pictor.regional_prompts`), an A1111 prompt's parts joined by AND
    (`pictor.composable_prompts`), or the prompt alone with weight 1 (classifier-free guidance then)."""
    if r.regions:
        texts = [r.prompt] + [region["prompt"] for region in r.regions]
        return texts, region_weights(r.regions, grid_h, grid_w)
    if r.composable and uses_and(r.prompt):
        parts = split_and(r.prompt)
        weights = torch.tensor([w for _, w in parts], dtype=torch.float32)
        return [text for text, _ in parts], weights[:, None].expand(-1, grid_h * grid_w)
    return [r.prompt], torch.ones(1, grid_h * grid_w)


def _stacked(rows: list[TextEmbeddings], batch: int) -> TextEmbeddings:
    """Texts of one row each as one batch, each text repeated for the `batch` images, in order."""
    return TextEmbeddings(
        tokens=torch.cat([e.tokens.expand(batch, -1, -1) for e in rows]),
        mask=torch.cat([e.mask.expand(batch, -1) for e in rows]),
        pooled=torch.cat([e.pooled.expand(batch, -1) for e in rows]),
    )


def ip_attention(m: Models, r: Conditioned, use_cfg: bool) -> IPAttention:
    """The IP-Adapter's keys and values for one run: the picture's for every image, or under classifier-free
    guidance the picture's for the conditional half and a black picture's for the other (rows are
    [conditional images, unconditional images], so b = 2 serves both halves)."""
    assert m.ip_adapter is not None and isinstance(r.ip_adapter_image, np.ndarray)
    embeds = clip_image_embeds(m.ip_adapter, r.ip_adapter_image)
    if use_cfg:
        assert r.width and r.height
        embeds = torch.cat([embeds, clip_image_embeds(m.ip_adapter, blank_pixels(r.height, r.width))])
    adapter = m.ip_adapter.adapter
    with torch.inference_mode():
        return adapter.attention(
            embeds.to(m.dtype), float(r.ip_adapter_scale or 0.0), m.transformer.num_heads
        )
