"""diffusers' FluxTransformer2DModel as a reference for pictor's Flux (used by tests and benchmarks only).

diffusers is a test-only dependency, so this lives outside ``src/``. ``diffusers.loaders.single_file_utils.
convert_flux_transformer_checkpoint_to_diffusers`` hard-codes hidden size 3072 when it splits the single
blocks' ``linear1``, so it cannot convert small models; :func:`to_diffusers_state_dict` is a small converter
that splits with the real sizes and checks that every key is used.

Calling conventions (diffusers ``pipeline_flux.py``): the pipeline passes ``timestep / 1000`` (i.e. our t in
[0, 1]) and the raw guidance scale; the diffusers transformer multiplies both by 1000 before its sinusoidal
embedding, which is what FLUX's ``timestep_embedding(time_factor=1000)`` does. So the reference is called with
``timestep=t`` and ``guidance=g`` exactly as pictor's Flux is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pictor.models.flux import FluxParams


def diffusers_config(params: FluxParams) -> dict[str, Any]:
    """FluxTransformer2DModel kwargs for ``params`` (diffusers fixes mlp_ratio 4, theta 10000, qkv bias)."""
    if params.mlp_ratio != 4.0 or params.theta != 10_000 or not params.qkv_bias:
        raise ValueError("diffusers' Flux supports only mlp_ratio=4.0, theta=10000 and qkv_bias=True")
    return {
        "patch_size": 1,
        "in_channels": params.in_channels,
        "out_channels": params.out_channels,
        "num_layers": params.depth,
        "num_single_layers": params.depth_single_blocks,
        "attention_head_dim": params.head_dim,
        "num_attention_heads": params.num_heads,
        "joint_attention_dim": params.context_in_dim,
        "pooled_projection_dim": params.vec_in_dim,
        "guidance_embeds": params.guidance_embed,
        "axes_dims_rope": tuple(params.axes_dim),
    }


def to_diffusers_state_dict(sd: dict[str, Tensor], params: FluxParams) -> dict[str, Tensor]:
    """FLUX.1-layout state dict -> diffusers FluxTransformer2DModel layout. Raises if a key is left over."""
    src = dict(sd)
    out: dict[str, Tensor] = {}
    h = params.hidden_size
    mlp = int(h * params.mlp_ratio)

    def take(dst: str, key: str) -> None:
        for suffix in ("weight", "bias"):
            out[f"{dst}.{suffix}"] = src.pop(f"{key}.{suffix}")

    def take_split(dsts: list[str], key: str, sizes: list[int]) -> None:
        for suffix in ("weight", "bias"):
            parts = torch.split(src.pop(f"{key}.{suffix}"), sizes, dim=0)
            for dst, part in zip(dsts, parts, strict=True):
                out[f"{dst}.{suffix}"] = part.contiguous()

    take("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    take("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    take("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    take("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    if params.guidance_embed:
        take("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
        take("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    take("context_embedder", "txt_in")
    take("x_embedder", "img_in")

    for i in range(params.depth):
        s, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        take(f"{d}norm1.linear", f"{s}img_mod.lin")
        take(f"{d}norm1_context.linear", f"{s}txt_mod.lin")
        take_split([f"{d}attn.to_q", f"{d}attn.to_k", f"{d}attn.to_v"], f"{s}img_attn.qkv", [h, h, h])
        take_split(
            [f"{d}attn.add_q_proj", f"{d}attn.add_k_proj", f"{d}attn.add_v_proj"],
            f"{s}txt_attn.qkv",
            [h, h, h],
        )
        out[f"{d}attn.norm_q.weight"] = src.pop(f"{s}img_attn.norm.query_norm.scale")
        out[f"{d}attn.norm_k.weight"] = src.pop(f"{s}img_attn.norm.key_norm.scale")
        out[f"{d}attn.norm_added_q.weight"] = src.pop(f"{s}txt_attn.norm.query_norm.scale")
        out[f"{d}attn.norm_added_k.weight"] = src.pop(f"{s}txt_attn.norm.key_norm.scale")
        take(f"{d}attn.to_out.0", f"{s}img_attn.proj")
        take(f"{d}attn.to_add_out", f"{s}txt_attn.proj")
        take(f"{d}ff.net.0.proj", f"{s}img_mlp.0")
        take(f"{d}ff.net.2", f"{s}img_mlp.2")
        take(f"{d}ff_context.net.0.proj", f"{s}txt_mlp.0")
        take(f"{d}ff_context.net.2", f"{s}txt_mlp.2")

    for i in range(params.depth_single_blocks):
        s, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        take(f"{d}norm.linear", f"{s}modulation.lin")
        take_split(
            [f"{d}attn.to_q", f"{d}attn.to_k", f"{d}attn.to_v", f"{d}proj_mlp"], f"{s}linear1", [h, h, h, mlp]
        )
        out[f"{d}attn.norm_q.weight"] = src.pop(f"{s}norm.query_norm.scale")
        out[f"{d}attn.norm_k.weight"] = src.pop(f"{s}norm.key_norm.scale")
        take(f"{d}proj_out", f"{s}linear2")

    take("proj_out", "final_layer.linear")
    # FLUX's final adaLN emits (shift, scale); diffusers' AdaLayerNormContinuous wants (scale, shift).
    for suffix in ("weight", "bias"):
        shift, scale = src.pop(f"final_layer.adaLN_modulation.1.{suffix}").chunk(2, dim=0)
        out[f"norm_out.linear.{suffix}"] = torch.cat([scale, shift], dim=0)

    if src:
        raise KeyError(f"to_diffusers_state_dict: keys not converted: {sorted(src)}")
    return out


def build_reference(params: FluxParams, sd: dict[str, Tensor]) -> torch.nn.Module:
    """A diffusers FluxTransformer2DModel holding the weights of FLUX-layout ``sd`` (device/dtype of ``sd``).

    Built on the meta device and loaded strict with ``assign=True``, so no second random init is
    materialised (this matters at FLUX.1-dev size on a GPU).
    """
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        ref = FluxTransformer2DModel(**diffusers_config(params))
    ref.load_state_dict(to_diffusers_state_dict(sd, params), strict=True, assign=True)
    return ref.eval()


def reference_forward(
    ref: torch.nn.Module,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    timesteps: Tensor,
    y: Tensor,
    guidance: Tensor | None = None,
) -> Tensor:
    """Call the diffusers model with pictor's arguments (ids 2-D as diffusers wants them, t in [0, 1])."""
    img_ids2 = img_ids[0] if img_ids.ndim == 3 else img_ids
    txt_ids2 = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
    return ref(
        hidden_states=img,
        encoder_hidden_states=txt,
        pooled_projections=y,
        timestep=timesteps,
        img_ids=img_ids2,
        txt_ids=txt_ids2,
        guidance=guidance,
        return_dict=False,
    )[0]
