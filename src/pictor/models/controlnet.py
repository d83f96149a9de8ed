"""FLUX.1 ControlNets: InstantX's, Shakker-Labs' Union and XLabs' (diffusers' ``FluxControlNetModel``).

A ControlNet is a short FLUX.1 transformer of its own: it embeds the noisy latents plus a control input, runs
a few double (and, for InstantX / Union, single) blocks with the prompt, and maps the image stream after
each block through a zero-initialised linear into a residual for the main transformer
(:class:`~pictor.models.control_residuals.ControlResiduals`).

Three kinds share this module, told apart by their params:

- InstantX (``FLUX.1-dev-Controlnet-Canny``): the control input is a packed latent of the control picture,
  embedded by ``pos_embed_input`` and added to ``img_in(img)``.
- Union (Shakker-Labs ``ControlNet-Union-Pro``): as InstantX plus a learned token per control mode
  (canny, depth, ...), prepended to the text tokens.
- XLabs (``flux-canny-controlnet-v3``): the control input is the picture itself in pixels; a small conv net
  (``input_hint_block``) brings it down 8x to 16 channels, 2x2 patches make it a token per latent token.
  XLabs' residuals are cycled over the transformer's blocks (``repeat``), as they were trained.

Module names are XLabs' (which are BFL's FLUX.1 names) wherever XLabs has the part, so XLabs' original files
load key for key; ``controlnet_single_blocks`` and ``controlnet_mode_embedder`` are diffusers' names for the
parts only diffusers' model has. Time convention as :class:`~pictor.models.flux.Flux`: t in [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pictor.models.control_residuals import ControlResiduals
from pictor.models.flux import TIME_EMBED_DIM, Flux
from pictor.models.input_checks import batched_ids, batched_scalar, shape_of
from pictor.models.layers import (
    DoubleStreamBlock,
    EmbedND,
    MLPEmbedder,
    SingleStreamBlock,
    timestep_embedding,
)
from pictor.models.weight_storage import is_stored

__all__ = [
    "HINT_CHANNELS",
    "HINT_DOWNSCALE",
    "ControlNetParams",
    "FluxControlNet",
    "controlnet_from_transformer",
]

# XLabs' pixel encoder: 16 channels wide, three stride-2 convs (8x) and then 2x2 patches (16x in all), so
# one hint token covers the same 16x16 pixels as one packed FLUX.1 latent token.
HINT_CHANNELS = 16
HINT_DOWNSCALE = 16


@dataclass
class ControlNetParams:
    """Architecture of a FLUX.1 ControlNet (the FluxParams fields it shares, plus what is its own).

    ``depth``/``depth_single_blocks``: how many double / single blocks the ControlNet runs (each gives one
    residual). ``num_modes``: a Union ControlNet's number of control modes (None: no mode token).
    ``hint``: XLabs' pixel-space ``input_hint_block`` (the control input is a picture, not latents).
    """

    hidden_size: int
    num_heads: int
    in_channels: int
    vec_in_dim: int
    context_in_dim: int
    depth: int
    depth_single_blocks: int = 0
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    theta: int = 10_000
    guidance_embed: bool = False
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_modes: int | None = None
    hint: bool = False

    def __post_init__(self) -> None:
        self.axes_dim = [int(a) for a in self.axes_dim]
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ControlNetParams: hidden_size {self.hidden_size} is not divisible by num_heads "
                f"{self.num_heads}"
            )
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(
                f"ControlNetParams: sum(axes_dim)={sum(self.axes_dim)} (axes_dim={self.axes_dim}) must equal "
                f"the head dim hidden_size/num_heads={self.head_dim}"
            )
        if any(a % 2 for a in self.axes_dim):
            raise ValueError(
                f"ControlNetParams: every axes_dim entry must be even (RoPE pairs), got {self.axes_dim}"
            )
        if self.depth < 0 or self.depth_single_blocks < 0 or self.depth + self.depth_single_blocks == 0:
            raise ValueError(
                f"ControlNetParams: a ControlNet needs at least one block (depth={self.depth}, "
                f"depth_single_blocks={self.depth_single_blocks})"
            )
        if self.num_modes is not None and self.num_modes < 1:
            raise ValueError(f"ControlNetParams: num_modes must be None or >= 1, got {self.num_modes}")
        if self.hint and self.in_channels != 4 * HINT_CHANNELS:
            # The hint's 16 channels in 2x2 patches are what pos_embed_input reads, as img_in reads latents.
            raise ValueError(
                f"ControlNetParams: a hint (XLabs) ControlNet reads {HINT_CHANNELS} channels in 2x2 patches, "
                f"so in_channels must be {4 * HINT_CHANNELS}, got {self.in_channels}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kind(self) -> str:
        """``"xlabs"`` (pixel hint), ``"union"`` (mode token) or ``"instantx"`` (latent control input)."""
        if self.hint:
            return "xlabs"
        return "union" if self.num_modes is not None else "instantx"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (lists, ints, floats, bools, None only)."""
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ControlNetParams:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not fall back to a default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"ControlNetParams.from_dict: unknown keys {unknown}; known keys are {sorted(known)}"
            )
        return cls(**d)


def _hint_block() -> nn.Sequential:
    """XLabs' ``input_hint_block``: ``[B, 3, H, W]`` pixels -> ``[B, 16, H/8, W/8]``.

    The Sequential's indices are the file's keys (convs at 0, 2, ..., 14; SiLUs between); diffusers'
    ``ControlNetConditioningEmbedding(16, block_out_channels=(16, 16, 16, 16))`` is the same network under
    the names conv_in (0), blocks.k (2 + 2k) and conv_out (14).
    """
    c = HINT_CHANNELS
    layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), nn.SiLU()]
    for _ in range(3):
        layers += [
            nn.Conv2d(c, c, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1, stride=2),
            nn.SiLU(),
        ]
    layers.append(nn.Conv2d(c, c, 3, padding=1))
    return nn.Sequential(*layers)


class FluxControlNet(nn.Module):
    """A FLUX.1 ControlNet: ``depth`` double then ``depth_single_blocks`` single blocks, one residual each."""

    def __init__(self, params: ControlNetParams) -> None:
        super().__init__()
        self.params = params
        p = params
        self.pe_embedder = EmbedND(dim=p.head_dim, theta=p.theta, axes_dim=p.axes_dim)
        self.img_in = nn.Linear(p.in_channels, p.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=TIME_EMBED_DIM, hidden_dim=p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size)
        self.guidance_in: nn.Module = (
            MLPEmbedder(in_dim=TIME_EMBED_DIM, hidden_dim=p.hidden_size)
            if p.guidance_embed
            else nn.Identity()
        )
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size)
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias) for _ in range(p.depth)]
        )
        self.single_blocks = nn.ModuleList(
            [
                SingleStreamBlock(p.hidden_size, p.num_heads, mlp_ratio=p.mlp_ratio)
                for _ in range(p.depth_single_blocks)
            ]
        )
        self.controlnet_blocks = nn.ModuleList(
            [nn.Linear(p.hidden_size, p.hidden_size) for _ in range(p.depth)]
        )
        self.controlnet_single_blocks = nn.ModuleList(
            [nn.Linear(p.hidden_size, p.hidden_size) for _ in range(p.depth_single_blocks)]
        )
        # The control input's embedding, added to img_in(img): XLabs' name (diffusers: controlnet_x_embedder).
        self.pos_embed_input = nn.Linear(p.in_channels, p.hidden_size, bias=True)
        # Parts only some kinds have are None otherwise (no keys), as in diffusers.
        self.controlnet_mode_embedder: nn.Embedding | None = (
            nn.Embedding(p.num_modes, p.hidden_size) if p.num_modes is not None else None
        )
        self.input_hint_block: nn.Sequential | None = _hint_block() if p.hint else None
        # Training only (`pictor train controlnet --gradient-checkpointing`): each block's activations are
        # recomputed in the backward pass instead of kept, as `Flux.gradient_checkpointing`.
        self.gradient_checkpointing = False

    @property
    def takes_pixels(self) -> bool:
        """True: ``cond`` is a picture ``[B, 3, 16h, 16w]`` in [-1, 1] (XLabs); False: packed latents."""
        return self.params.hint

    # ------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        cond: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        mode: Tensor | None = None,
        *,
        hint_tokens: bool = False,
    ) -> ControlResiduals:
        """Unscaled residuals for the transformer's image stream (scale them with ``.scaled``).

        img ``[B, N, in_channels]`` packed noisy latents; img_ids ``[B, N, 3]`` or ``[N, 3]``; cond: packed
        control latents ``[B|1, N, in_channels]``, or for a hint (XLabs) ControlNet the control picture
        ``[B|1, 3, 16h, 16w]`` in [-1, 1] with ``h * w = N`` (or with ``hint_tokens`` its ``cond_tokens``);
        txt ``[B, L, context_in_dim]``; txt_ids ``[B, L, 3]`` or ``[L, 3]``; timesteps ``[B]`` in [0, 1]; y
        ``[B, vec_in_dim]``; guidance ``[B]``, required iff ``params.guidance_embed``; mode ``[B]`` integer
        mode ids, required iff a Union model.
        """
        p = self.params
        img_ids, txt_ids, timesteps, guidance, mode = self._check_inputs(
            img, img_ids, cond, txt, txt_ids, timesteps, y, guidance, mode, hint_tokens
        )
        vec = self.time_in(timestep_embedding(timesteps.float(), TIME_EMBED_DIM).to(img.dtype))
        if p.guidance_embed:
            assert guidance is not None  # _check_inputs demands it
            vec = vec + self.guidance_in(timestep_embedding(guidance.float(), TIME_EMBED_DIM).to(img.dtype))
        vec = vec + self.vector_in(y)
        tokens = cond.to(img.dtype) if hint_tokens else self.cond_tokens(cond.to(img.dtype))
        img = self.img_in(img) + self.pos_embed_input(tokens)
        txt = self.txt_in(txt)
        if mode is not None and self.controlnet_mode_embedder is not None:  # _check_inputs pairs them
            # Union: the mode's token goes in front of the text, at the first text token's position (zeros
            # for FLUX.1), as diffusers does with ``txt_ids[:1]``.
            txt = torch.cat((self.controlnet_mode_embedder(mode)[:, None].to(txt.dtype), txt), dim=1)
            txt_ids = torch.cat((txt_ids[:, :1], txt_ids), dim=1)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        double: list[Tensor] = []
        for block, out in zip(self.double_blocks, self.controlnet_blocks, strict=True):
            img, txt = self._run(block, img=img, txt=txt, vec=vec, pe=pe)
            double.append(out(img))
        single: list[Tensor] = []
        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for block, out in zip(self.single_blocks, self.controlnet_single_blocks, strict=True):
            x = self._run(block, x, vec=vec, pe=pe)
            single.append(out(x[:, n_txt:]))
        # XLabs' few residuals were trained cycled over the transformer's blocks (diffusers' pipeline sets
        # controlnet_blocks_repeat exactly for models with an input_hint_block).
        return ControlResiduals(double, single, repeat=p.hint)

    def _run(self, block: nn.Module, *args: Tensor, **kwargs: Tensor) -> Any:
        """A block, under activation checkpointing when training with it on (as `Flux._run`)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def cond_tokens(self, cond: Tensor) -> Tensor:
        """The control input as ``[B|1, N, in_channels]`` tokens (pixels via the hint net, 2x2 patches). A
        hint net's depend on the picture alone, so a sampler run makes them once and passes them as ``cond``
        with ``hint_tokens`` (which also lets a denoise window take its own)."""
        if self.input_hint_block is None:
            return cond
        hint = self.input_hint_block(cond)  # [B, 16, 2h, 2w]
        return rearrange(hint, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)

    def _check_inputs(
        self,
        img: Tensor,
        img_ids: Tensor,
        cond: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None,
        mode: Tensor | None,
        hint_tokens: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """Validate shapes (errors name the argument) and bring ids / t / guidance / mode to batched form."""
        p = self.params
        if not isinstance(img, Tensor) or img.ndim != 3 or img.shape[-1] != p.in_channels:
            raise ValueError(
                f"FluxControlNet: img must be [B, N, {p.in_channels}] (packed latents), got {shape_of(img)}"
            )
        batch, n_img = img.shape[:2]
        if (
            not isinstance(txt, Tensor)
            or txt.ndim != 3
            or txt.shape[0] != batch
            or txt.shape[-1] != p.context_in_dim
        ):
            raise ValueError(
                f"FluxControlNet: txt must be [{batch}, L, {p.context_in_dim}], got {shape_of(txt)}"
            )
        self._check_cond(cond, batch, n_img, hint_tokens)
        img_ids = batched_ids("FluxControlNet", "img_ids", img_ids, batch, n_img)
        txt_ids = batched_ids("FluxControlNet", "txt_ids", txt_ids, batch, txt.shape[1])
        if img_ids.shape[0] != txt_ids.shape[0]:  # one shared, one per-sample: broadcast the shared one
            img_ids = img_ids.expand(batch, -1, -1)
            txt_ids = txt_ids.expand(batch, -1, -1)
        if not isinstance(y, Tensor) or y.ndim != 2 or y.shape[0] != batch or y.shape[1] != p.vec_in_dim:
            raise ValueError(
                f"FluxControlNet: y must be [{batch}, {p.vec_in_dim}] (pooled text vector), got {shape_of(y)}"
            )
        timesteps = batched_scalar("FluxControlNet", "timesteps", timesteps, batch)
        if p.guidance_embed:
            if guidance is None:
                raise ValueError(
                    "FluxControlNet: this ControlNet has guidance_embed=True (made for FLUX.1-dev); pass "
                    "guidance=[B] tensor of guidance scales, the same as the transformer gets"
                )
            guidance = batched_scalar("FluxControlNet", "guidance", guidance, batch)
        return img_ids, txt_ids, timesteps, guidance, self._check_mode(mode, batch)

    def _check_cond(self, cond: Tensor, batch: int, n_img: int, hint_tokens: bool = False) -> None:
        p = self.params
        if not isinstance(cond, Tensor):
            raise ValueError(f"FluxControlNet: cond must be a tensor, got {shape_of(cond)}")
        if not p.hint or hint_tokens:  # control latents, or a hint net's tokens made beforehand
            if (
                cond.ndim != 3
                or cond.shape[0] not in (1, batch)
                or tuple(cond.shape[1:]) != (n_img, p.in_channels)
            ):
                raise ValueError(
                    f"FluxControlNet: cond must be the packed control latents [{batch}, {n_img}, "
                    f"{p.in_channels}] (like img), got {shape_of(cond)}"
                )
            return
        f = HINT_DOWNSCALE
        if (
            cond.ndim != 4
            or cond.shape[0] not in (1, batch)
            or cond.shape[1] != 3
            or cond.shape[2] % f
            or cond.shape[3] % f
            or (cond.shape[2] // f) * (cond.shape[3] // f) != n_img
        ):
            raise ValueError(
                f"FluxControlNet: this XLabs ControlNet reads the control picture itself: cond must be "
                f"[{batch}, 3, {f}*h, {f}*w] pixels in [-1, 1] with h*w = {n_img} (the number of latent "
                f"tokens), got {shape_of(cond)}"
            )
        if cond.numel() and float(cond.detach().abs().amax()) > 1.0 + 1e-3:
            # Pictures in 0..255 (or 0..1 from some loaders) are the usual slip; 0..255 at least is caught.
            raise ValueError(
                "FluxControlNet: cond (the control picture) must hold values in [-1, 1] (2 * x / 255 - 1), "
                f"got values up to {float(cond.detach().abs().amax()):.3g}"
            )

    def _check_mode(self, mode: Tensor | None, batch: int) -> Tensor | None:
        n = self.params.num_modes
        if n is None:
            if mode is not None:
                raise ValueError(
                    "FluxControlNet: mode was given, but this ControlNet has no control modes (only Union "
                    "ControlNets do); leave mode=None"
                )
            return None
        if mode is None:
            raise ValueError(
                f"FluxControlNet: this is a Union ControlNet with {n} control modes; pass mode=[B] tensor of "
                f"mode ids in 0..{n - 1} (which kind of control picture: canny, depth, ...)"
            )
        if not isinstance(mode, Tensor) or mode.is_floating_point() or mode.is_complex():
            raise ValueError(
                f"FluxControlNet: mode must be an integer tensor [{batch}] of mode ids, got {mode!r}"
            )
        mode = batched_scalar("FluxControlNet", "mode", mode, batch)
        if mode.numel() and (int(mode.min()) < 0 or int(mode.max()) >= n):
            raise ValueError(
                f"FluxControlNet: mode ids must lie in 0..{n - 1} (this Union ControlNet has {n} modes), "
                f"got {mode.tolist()}"
            )
        return mode.long()


# ------------------------------------------------------------------------------------- a fresh ControlNet

# The parts a fresh ControlNet starts at zero (diffusers' ``zero_module``): the control input's embedding and
# every residual projection, so that it adds nothing until training has taught it something.
_ZERO_INIT = ("pos_embed_input.", "controlnet_blocks.", "controlnet_single_blocks.")
_FROM_TRANSFORMER = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")


@torch.no_grad()
def controlnet_from_transformer(
    flux: Flux, depth: int, depth_single: int, num_modes: int | None = None
) -> FluxControlNet:
    """A fresh latent ControlNet (InstantX's kind; Union's with ``num_modes``) grown from ``flux`` to train.

    As diffusers' ``FluxControlNetModel.from_transformer(transformer, num_layers=depth,
    num_single_layers=depth_single, load_weights_from_transformer=True)``: the embedders and the first
    ``depth`` double / ``depth_single`` single blocks are copies of the transformer's (its own, detached:
    training the ControlNet leaves the transformer alone); ``pos_embed_input`` (diffusers'
    ``controlnet_x_embedder``) and every ``controlnet_blocks`` / ``controlnet_single_blocks`` projection are
    zero, so its residuals are zero and the transformer's output is unchanged until it is trained. The Union
    mode embedding is ``nn.Embedding``'s N(0, 1), as diffusers' constructor leaves it. Shapes, RoPE axes,
    theta, MLP ratio, q/k/v bias and guidance embedding are the transformer's; the control input is as wide
    as ``img`` (``flux.params.in_channels``).

    The ControlNet is float32 on the transformer's device (trainable master weights, whatever the
    transformer is stored in); cast it with ``.to(dtype)`` for inference.
    """
    fp = flux.params
    if depth > fp.depth or depth_single > fp.depth_single_blocks:
        # diffusers would leave the blocks the transformer lacks at random init, which no one means to train.
        raise ValueError(
            f"controlnet_from_transformer: the ControlNet's {depth} double / {depth_single} single blocks "
            f"are copied from the transformer's first ones, but it has only {fp.depth} / "
            f"{fp.depth_single_blocks}"
        )
    params = ControlNetParams(
        hidden_size=fp.hidden_size,
        num_heads=fp.num_heads,
        in_channels=fp.in_channels,
        vec_in_dim=fp.vec_in_dim,
        context_in_dim=fp.context_in_dim,
        depth=depth,
        depth_single_blocks=depth_single,
        axes_dim=list(fp.axes_dim),
        theta=fp.theta,
        guidance_embed=fp.guidance_embed,
        mlp_ratio=fp.mlp_ratio,
        qkv_bias=fp.qkv_bias,
        num_modes=num_modes,
    )
    copied: dict[str, Tensor] = {}
    parts = [(name, getattr(flux, name)) for name in _FROM_TRANSFORMER]
    parts += [(f"double_blocks.{i}", flux.double_blocks[i]) for i in range(depth)]
    parts += [(f"single_blocks.{i}", flux.single_blocks[i]) for i in range(depth_single)]
    for prefix, module in parts:
        copied.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    narrow = sorted(k for k, v in copied.items() if is_stored(v) or not v.is_floating_point())
    if narrow:
        raise ValueError(
            f"controlnet_from_transformer: the transformer's {narrow[0]} (and {len(narrow) - 1} more) is "
            "stored quantized or in FP8, which a ControlNet cannot start training from; load the transformer "
            "in bf16 or float32"
        )
    device = flux.img_in.weight.device
    # copy=True: a ControlNet sharing storage with the frozen transformer would train it too.
    sd = {k: v.detach().to(device=device, dtype=torch.float32, copy=True) for k, v in copied.items()}
    # Built on the meta device: every tensor comes from `sd`, so no random init is computed and thrown away.
    with torch.device("meta"):
        net = FluxControlNet(params)
    for key, meta in net.state_dict().items():
        if key in sd:
            continue
        if key.startswith(_ZERO_INIT):
            sd[key] = torch.zeros(meta.shape, device=device)
        elif key.startswith("controlnet_mode_embedder."):
            sd[key] = torch.randn(meta.shape, device=device)  # nn.Embedding.reset_parameters: N(0, 1)
        else:  # a part added to FluxControlNet later must be given its init here, not left on meta
            raise AssertionError(f"controlnet_from_transformer: no initialisation for {key}")
    net.load_state_dict(sd, strict=True, assign=True)
    return net
