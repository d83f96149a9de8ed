"""The FLUX.1 rectified-flow transformer (black-forest-labs/flux ``src/flux/model.py``): FluxParams + Flux.

Module names match FLUX.1 so official weights load key for key. Time convention: ``timesteps`` in [0, 1]
with t=1 pure noise; the 1000x scaling lives only inside :func:`~pictor.models.layers.timestep_embedding`.
The model returns the velocity for the packed latent tokens.
The blocks live in `pictor.models.layers`, the checks of the forward's arguments in
`pictor.models.flux_inputs`, and latent packing (`pack_latents`, `make_img_ids`, ...) in
`pictor.models.latent_packing`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pictor.models.block_bias import BlendedBias, BlockBias
from pictor.models.block_cache import FirstBlockCache
from pictor.models.control_residuals import ControlResiduals
from pictor.models.flux_inputs import FluxInputChecks
from pictor.models.ip_adapter import IPAttention

# Re-exported: the packing functions lived here and some fifty modules, tests and benchmarks import them
# from `pictor.models.flux` beside Flux; their home is `pictor.models.latent_packing`.
from pictor.models.latent_packing import make_img_ids, make_txt_ids, pack_latents, unpack_latents
from pictor.models.layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    timestep_embedding,
)

__all__ = [
    "Flux",
    "FluxParams",
    "make_img_ids",
    "make_txt_ids",
    "pack_latents",
    "unpack_latents",
]

TIME_EMBED_DIM = 256  # width of the sinusoidal time/guidance features fed to time_in / guidance_in


@dataclass
class FluxParams:
    in_channels: int
    out_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = False

    def __post_init__(self) -> None:
        self.axes_dim = [int(a) for a in self.axes_dim]
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"FluxParams: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(
                f"FluxParams: sum(axes_dim)={sum(self.axes_dim)} (axes_dim={self.axes_dim}) must equal "
                f"the head dim hidden_size/num_heads={head_dim}"
            )
        if any(a % 2 for a in self.axes_dim):
            raise ValueError(
                f"FluxParams: every axes_dim entry must be even (RoPE pairs), got {self.axes_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (lists, ints, floats, bools only)."""
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FluxParams:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not fall back to a default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"FluxParams.from_dict: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


class Flux(FluxInputChecks, nn.Module):
    """FLUX.1 transformer: ``depth`` double-stream then ``depth_single_blocks`` single-stream blocks."""

    def __init__(self, params: FluxParams) -> None:
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=params.head_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, params.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=TIME_EMBED_DIM, hidden_dim=params.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, params.hidden_size)
        self.guidance_in: nn.Module = (
            MLPEmbedder(in_dim=TIME_EMBED_DIM, hidden_dim=params.hidden_size)
            if params.guidance_embed
            else nn.Identity()
        )
        self.txt_in = nn.Linear(params.context_in_dim, params.hidden_size)
        self.double_blocks = nn.ModuleList(
            [
                DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, params.qkv_bias)
                for _ in range(params.depth)
            ]
        )
        self.single_blocks = nn.ModuleList(
            [
                SingleStreamBlock(params.hidden_size, params.num_heads, mlp_ratio=params.mlp_ratio)
                for _ in range(params.depth_single_blocks)
            ]
        )
        self.final_layer = LastLayer(params.hidden_size, 1, params.out_channels)
        # Training only: keep each block's input, not its activations, and run the block again during the
        # backward pass (less memory for one more forward's time). Off: FLUX.1's forward as it is.
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        img_residuals: Sequence[Tensor] | None = None,
        block_cache: FirstBlockCache | None = None,
        controlnet: ControlResiduals | None = None,
        ip_adapter: IPAttention | None = None,
        attn_mask: Tensor | BlockBias | None = None,
    ) -> Tensor:
        """Velocity ``[B, N, out_channels]`` for packed latent tokens ``img [B, N, in_channels]``.

        img_ids ``[B, N, 3]`` or ``[N, 3]``; txt ``[B, L, context_in_dim]``; txt_ids ``[B, L, 3]`` or
        ``[L, 3]``; timesteps ``[B]`` in [0, 1] (t=1 noise); y ``[B, vec_in_dim]`` pooled text vector;
        guidance ``[B]`` distilled-guidance scale, required iff ``params.guidance_embed``.
        img_residuals: one ``[B, N, hidden_size]`` tensor per block (double blocks, then single blocks),
        added to the image stream before that block: how adapters such as `LayoutAdapter` condition a
        frozen model. None (FLUX.1's forward) adds nothing.
        block_cache: a sampler run's `FirstBlockCache`; rows whose first block changed little since their
        last full pass skip the remaining blocks (see `pictor.models.block_cache`). None: every block runs.
        controlnet: a ControlNet's residuals, added to the image stream *after* the blocks they are spread
        over (diffusers' ``controlnet_block_samples``; see `pictor.models.control_residuals`). Their batch
        may divide the image's: classifier-free guidance's halves then share them, broadcast, not copied.
        ip_adapter: an IP-Adapter's keys and values for the picture (`pictor.models.ip_adapter`), one
        entry per double block, read by each double block's image queries.
        attn_mask: a float bias ``[B or 1, 1, L + N, L + N]`` added to every block's attention logits over
        the joint ``[txt, img]`` tokens (-inf: not seen; `pictor.regional_attention`). None: every token
        sees every other, as FLUX.1. A `pictor.models.block_bias.BlockBias`: a bias per block (a masked one
        in every k-th block, blended with the unmasked one by a base ratio).
        """
        img_ids, txt_ids, timesteps, guidance = self._check_inputs(
            img, img_ids, txt, txt_ids, timesteps, y, guidance
        )

        # The sinusoids are computed in float32 whatever the dtype of t, then cast to the activations' dtype.
        vec = self.time_in(timestep_embedding(timesteps.float(), TIME_EMBED_DIM).to(img.dtype))
        if self.params.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance.float(), TIME_EMBED_DIM).to(img.dtype))
        img = self.img_in(img)
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)

        # RoPE angles once per forward, shared by every block; batch 1 when the ids are shared by the batch.
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        res = self._check_residuals(img_residuals, img)
        ctrl = self._check_control(controlnet, img)
        ipa = self._check_ip_adapter(ip_adapter, img)
        mask = self._check_mask(attn_mask, img, txt)
        if block_cache is None:
            img = self._blocks(img, txt, vec, pe, res, ctrl, ipa, mask, first=0)
        else:
            img = self._cached_blocks(block_cache, img, txt, vec, pe, res, ctrl, ipa, mask)
        return self.final_layer(img, vec)  # [B, N, out_channels]

    def _blocks(
        self,
        img: Tensor,
        txt: Tensor,
        vec: Tensor,
        pe: Tensor,
        res: Sequence[Tensor] | None,
        ctrl: ControlResiduals | None,
        ipa: IPAttention | None,
        mask: Tensor | BlockBias | None,
        first: int,
    ) -> Tensor:
        """The blocks from double block `first` on (then every single block) -> the image stream."""
        depth, depth_single = len(self.double_blocks), len(self.single_blocks)
        for i in range(first, depth):
            if res is not None:
                img = img + res[i]
            ip = ipa.block(i) if ipa is not None else None
            img, txt = self._run(
                self.double_blocks[i], img=img, txt=txt, vec=vec, pe=pe, ip=ip, mask=_double(mask, i)
            )
            after = ctrl.after_double(i, depth) if ctrl is not None else None
            if after is not None:
                img = _plus(img, after)
        x = torch.cat((txt, img), dim=1)
        n_txt = txt.shape[1]
        for j, block in enumerate(self.single_blocks):
            if res is not None:
                x = torch.cat((x[:, :n_txt], x[:, n_txt:] + res[depth + j]), dim=1)
            x = self._run(block, x, vec=vec, pe=pe, mask=_single(mask, j))
            after = ctrl.after_single(j, depth_single) if ctrl is not None else None
            if after is not None:
                x = torch.cat((x[:, :n_txt], _plus(x[:, n_txt:], after)), dim=1)
        return x[:, n_txt:, ...]

    def _cached_blocks(
        self,
        cache: FirstBlockCache,
        img: Tensor,
        txt: Tensor,
        vec: Tensor,
        pe: Tensor,
        res: Sequence[Tensor] | None,
        ctrl: ControlResiduals | None,
        ipa: IPAttention | None,
        mask: Tensor | BlockBias | None,
    ) -> Tensor:
        """:meth:`_blocks` under a first-block cache: double block 0 always runs; the rest run only for the
        rows whose block-0 residual moved more than the cache's threshold, the others reuse theirs."""
        if not self.double_blocks:
            raise ValueError("Flux: the first-block cache needs a model with at least one double block")
        if res is not None:
            img = img + res[0]
        if ctrl is not None and ctrl.double and ctrl.double[0].shape[0] != img.shape[0]:
            ctrl = ctrl.tiled(img.shape[0] // ctrl.double[0].shape[0])  # rows are picked below: one each
        head_in = img
        ip = ipa.block(0) if ipa is not None else None
        img, txt = self._run(
            self.double_blocks[0], img=img, txt=txt, vec=vec, pe=pe, ip=ip, mask=_double(mask, 0)
        )
        # A ControlNet's residual after block 0 counts as part of the head: the cache then compares what
        # the rest of the model is given.
        after = ctrl.after_double(0, len(self.double_blocks)) if ctrl is not None else None
        if after is not None:
            img = _plus(img, after)
        head_residual = img - head_in
        full = cache.needs_full(head_residual)
        if bool(full.all()):
            out = self._blocks(img, txt, vec, pe, res, ctrl, ipa, mask, first=1)
        else:
            assert cache.tail_residual is not None  # a row is only skipped after a full pass
            out = img + cache.tail_residual
            if bool(full.any()):
                rows = full.nonzero().squeeze(1).to(img.device)
                sub_pe = pe[rows] if pe.shape[0] > 1 else pe  # RoPE angles shared by the batch: [1, ...]
                sub_res = [r[rows] for r in res] if res is not None else None
                sub_ctrl = ctrl.rows(rows) if ctrl is not None else None
                sub_ipa = ipa.rows(rows, img.shape[0]) if ipa is not None else None
                sub_mask = mask
                if isinstance(mask, BlockBias):
                    sub_mask = mask.rows(rows)
                elif mask is not None and mask.shape[0] > 1:
                    sub_mask = mask[rows]
                out[rows] = self._blocks(
                    img[rows], txt[rows], vec[rows], sub_pe, sub_res, sub_ctrl, sub_ipa, sub_mask, first=1
                )
        cache.update(full, head_residual, out - img if bool(full.any()) else None)
        return out

    def _run(self, block: nn.Module, *args: Tensor, **kwargs: Any) -> Any:
        """A block, under activation checkpointing when it is on and gradients are being recorded.

        Non-reentrant checkpointing (use_reentrant=False): gradients reach parameters inside the block
        (LoRA adapters on a frozen base) even when no input requires grad, and keyword arguments pass.
        """
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    # -------------------------------------------------------------------------------------------- init

    @torch.no_grad()
    def init_weights(self) -> Flux:
        """Training init: xavier linears, N(0, 0.02) embedder MLPs, adaLN-Zero, zero final layer.

        With every modulation zero, each block starts as the identity (gates are 0) and the zeroed final
        layer makes a fresh model output exactly 0 (facebookresearch/DiT ``initialize_weights``).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embedder in (self.time_in, self.vector_in, self.guidance_in):
            if isinstance(embedder, MLPEmbedder):
                nn.init.normal_(embedder.in_layer.weight, std=0.02)
                nn.init.normal_(embedder.out_layer.weight, std=0.02)
        for name, param in self.named_parameters():
            if name.endswith(".scale"):  # QK RMSNorm gains
                nn.init.ones_(param)
        zero: list[nn.Linear] = [self.final_layer.linear, self.final_layer.adaLN_modulation[1]]
        for double in self.double_blocks:
            zero += [double.img_mod.lin, double.txt_mod.lin]
        for single in self.single_blocks:
            zero.append(single.modulation.lin)
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        return self

    # ----------------------------------------------------------------------------------------- compile

    def compile(self, **kwargs: Any) -> Flux:  # type: ignore[override]
        """Opt-in ``torch.compile`` of each block in place (regional compilation).

        Blocks of one kind share a compiled graph, so compile time is about two blocks' worth instead of
        the whole model's, and the elementwise work between matmuls (norms, modulation, RoPE, gating, GELU)
        is fused. ``kwargs`` go to ``torch.compile`` (e.g. ``mode="max-autotune-no-cudagraphs"``).
        The first call with a new input shape pays the compile time.
        """
        for block in [*self.double_blocks, *self.single_blocks]:
            block.compile(**kwargs)
        return self


# --------------------------------------------------------------------------------------------- helpers


def _double(mask: Tensor | BlockBias | None, i: int) -> Tensor | BlendedBias | None:
    """Double block i's attention bias."""
    return mask.double(i) if isinstance(mask, BlockBias) else mask


def _single(mask: Tensor | BlockBias | None, j: int) -> Tensor | BlendedBias | None:
    """Single block j's attention bias."""
    return mask.single(j) if isinstance(mask, BlockBias) else mask


def _plus(x: Tensor, r: Tensor) -> Tensor:
    """x + r, where r [b, N, D] may be the residuals of a batch that x [k b, N, D] repeats k times
    (classifier-free guidance's halves): broadcast over the repeats instead of copied."""
    if r.shape[0] == x.shape[0]:
        return x + r
    return (x.reshape(x.shape[0] // r.shape[0], *r.shape) + r).reshape(x.shape)
