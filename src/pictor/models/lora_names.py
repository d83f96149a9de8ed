"""Module names in the LoRA layouts pictor reads and writes, against FLUX.1's: the prefixes that mark
each layout (native, kohya, LyCORIS' flattened names), diffusers' module names for FLUX.1's (with the
part of a fused layer each one is), and the sizes of those parts. Shared by reading
(:mod:`.lora_formats`) and writing (:mod:`.lora_export`), so both agree on one table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

NATIVE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
FLUX_ROOTS = frozenset(
    {
        "double_blocks",
        "single_blocks",
        "img_in",
        "txt_in",
        "time_in",
        "vector_in",
        "guidance_in",
        "final_layer",
    }
)
DIFFUSERS_ROOTS = frozenset(
    {
        "transformer_blocks",
        "single_transformer_blocks",
        "x_embedder",
        "context_embedder",
        "time_text_embed",
        "norm_out",
        "proj_out",
    }
)
KOHYA_PREFIX = "lora_unet_"
FLAT_PREFIXES = ("lycoris_", "lora_transformer_")  # LyCORIS / SimpleTuner, OneTrainer
KOHYA_TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")

# diffusers module (inside a block) -> (FLUX module inside the block, part index of a fused layer or None)
DIFFUSERS_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
}
DIFFUSERS_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
DIFFUSERS_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
}
SWAP_HALVES = frozenset({"final_layer.adaLN_modulation.1"})  # diffusers (scale, shift) vs FLUX (shift, scale)
BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def strip_prefix(name: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def diffusers_target(module: str) -> tuple[str, int | None] | None:
    name = strip_prefix(module, ("transformer.",))
    if name in DIFFUSERS_TOP:
        return DIFFUSERS_TOP[name], None
    m = BLOCK.match(name)
    if m is None:
        return None
    kind, index, rest = m.groups()
    table, ours = (
        (DIFFUSERS_DOUBLE, "double_blocks")
        if kind == "transformer_blocks"
        else (DIFFUSERS_SINGLE, "single_blocks")
    )
    if rest not in table:
        return None
    inner, part = table[rest]
    return f"{ours}.{index}.{inner}", part


def fused_split_sizes(path: str, shape: tuple[int, int]) -> list[int]:
    in_f, out_f = shape
    if path.endswith(".linear1"):  # [q | k | v | mlp_in], q/k/v as wide as the hidden size (= in)
        return [in_f, in_f, in_f, out_f - 3 * in_f]
    return [out_f // 3] * 3  # qkv


def flat_names(linears: Mapping[str, tuple[int, int]]) -> dict[str, tuple[str, str]]:
    """LyCORIS' flattened module names -> ("native", FLUX path) or ("diffusers", diffusers name), for every
    layer of the model under both namings (dots as underscores, as LyCORIS writes them)."""
    table = {path.replace(".", "_"): ("native", path) for path in linears}
    names = list(DIFFUSERS_TOP)
    for path in linears:
        kind, index = path.split(".")[:2] if "." in path else (path, "")
        if kind in ("double_blocks", "single_blocks"):
            inner = DIFFUSERS_DOUBLE if kind == "double_blocks" else DIFFUSERS_SINGLE
            block = "transformer_blocks" if kind == "double_blocks" else "single_transformer_blocks"
            names += [f"{block}.{index}.{name}" for name in inner]
    for name in names:
        table.setdefault(name.replace(".", "_"), ("diffusers", name))
    return table
