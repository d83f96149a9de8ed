"""Shared by tests/test_bnb_files.py and tests/test_bnb_bundles.py: a tiny FLUX.1 written the way
bitsandbytes' ``Linear4bit.state_dict`` lays out its weights (its quantizer's bytes, tested against
bitsandbytes in tests/models/test_bnb_quants.py), as Forge's all-in-one files and diffusers' files hold
them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from pictor.checkpoint import BundleConfig, load_into
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.bnb_quants import CODES, dequantize_4bit, quantize_4bit, read_quant_state
from pictor.models.flux import Flux, FluxParams
from pictor.models.weight_storage import place
from pictor.presets import get_preset

from tiny_flux import randomize_

FORGE = "model.diffusion_model."
WIDE = {"hidden_size": 128, "num_heads": 1, "axes_dim": [16, 56, 56]}
GOLDEN = Path(__file__).resolve().parent / "bnb_golden.safetensors"


def _params() -> FluxParams:
    """The tiny preset at width 128, one head of FLUX.1's 128 (its RoPE split, which `convert flux` infers):
    every block linear's rows are whole 64-value blocks, as FLUX.1's are."""
    return FluxParams.from_dict({**get_preset("tiny")["model"], **WIDE})


def _flux(seed: int = 0) -> Flux:
    model = Flux(_params()).eval()
    randomize_(model, seed)
    return model


def _nested_map() -> Tensor:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN))["nf4_b64_nested.weight.nested_quant_map"]


def bnb_entries(name: str, w: Tensor, quant_type: str, nested: bool) -> dict[str, Tensor]:
    """``Linear4bit.state_dict()``'s tensors for one weight (blocksize 64): packed nibbles, absmax (with
    compress_statistics quantized again to uint8 in blocks of 256 around their mean), the code table and the
    JSON quant state."""
    packed, absmax = quantize_4bit(w, quant_type, 64)
    info: dict[str, object] = {
        "quant_type": quant_type,
        "blocksize": 64,
        "dtype": "bfloat16",
        "shape": list(w.shape),
    }
    out = {name: packed, f"{name}.quant_map": CODES[quant_type].clone()}
    if nested:
        code = _nested_map()
        offset = absmax.mean()
        centred = absmax - offset
        pad = -centred.numel() % 256
        blocks = torch.nn.functional.pad(centred, (0, pad)).reshape(-1, 256)
        scale = blocks.abs().max(dim=1)[0].clamp(min=1e-12)
        q = ((blocks / scale[:, None]).reshape(-1, 1) - code[None, :]).abs().argmin(dim=1)
        out[f"{name}.absmax"] = q[: centred.numel()].to(torch.uint8)
        out[f"{name}.nested_absmax"] = scale
        out[f"{name}.nested_quant_map"] = code.clone()
        info.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(offset))
    else:
        out[f"{name}.absmax"] = absmax
    out[f"{name}.quant_state.bitsandbytes__{quant_type}"] = torch.tensor(
        list(json.dumps(info).encode()), dtype=torch.uint8
    )
    return out


# The same layers by their FLUX.1 and diffusers names: the MLP outputs FP4, the MLP inputs and the single
# blocks' output nested (double quantization); everything else plain NF4. (Nesting groups 256 blocks, so
# a projection that diffusers splits into q, k and v would nest differently there: those stay unnested.)
FP4_LAYERS = (".img_mlp.2.weight", ".txt_mlp.2.weight", ".ff.net.2.weight", ".ff_context.net.2.weight")
NESTED_LAYERS = (
    ".img_mlp.0.weight",
    ".txt_mlp.0.weight",
    ".ff.net.0.proj.weight",
    ".ff_context.net.0.proj.weight",
    "single_blocks.0.linear2.weight",
    "single_transformer_blocks.0.proj_out.weight",
)


def quantize_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every linear weight 4-bit (as Forge's and diffusers' files hold them), other tensors in bf16."""
    out: dict[str, Tensor] = {}
    for key, t in sorted(sd.items()):
        if key.endswith(".weight") and t.ndim == 2:
            out.update(
                bnb_entries(key, t, "fp4" if key.endswith(FP4_LAYERS) else "nf4", key.endswith(NESTED_LAYERS))
            )
        else:
            out[key] = t.to(torch.bfloat16)
    return out


def dequantized(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same file's weights as plain tensors: 4-bit ones dequantized to float32, the rest as stored."""
    out = {}
    for key, t in sd.items():
        if ".quant_state." in key or key.endswith(
            (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
        ):
            continue
        if f"{key}.absmax" in sd:
            state = read_quant_state({k: v for k, v in sd.items() if k.startswith(key)}, key)
            out[key] = dequantize_4bit(t, state, torch.float32)
        else:
            out[key] = t
    return out


def _ae() -> AutoEncoder:
    torch.manual_seed(0)
    return AutoEncoder(AutoEncoderParams.from_dict(get_preset("tiny")["autoencoder"]))


def _text_folders(root: Path) -> tuple[Path, Path]:
    """Stand-in T5 and CLIP folders: convert_flux only checks that they are model folders."""
    folders = []
    for name in ("t5", "clip"):
        (root / name).mkdir(exist_ok=True)
        (root / name / "config.json").write_text("{}")
        folders.append(root / name)
    return folders[0], folders[1]


def write_forge_file(path: Path, model: Flux, ae: AutoEncoder | None = None) -> dict[str, Tensor]:
    """An all-in-one file as Forge's flux1-dev-bnb-nf4: transformer, autoencoder, a text encoder tensor."""
    q = quantize_state_dict(model.state_dict())
    sd = {FORGE + k: v for k, v in q.items()}
    if ae is not None:
        sd.update({"vae." + k: v for k, v in ae.state_dict().items()})
    sd["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return q


def _load(sd: dict[str, Tensor]) -> Flux:
    with torch.device("meta"):
        model = Flux(_params())
    # mixed storage dtypes (bf16 biases, float32 widened weights) computed in float32, as the pipeline does
    return place(load_into(model, sd, "test"), "cpu", torch.float32).eval()


def _bundle_config() -> BundleConfig:
    p = get_preset("tiny")
    return BundleConfig(
        name="tiny-nf4",
        preset="tiny",
        model={**p["model"], **WIDE},
        autoencoder=p["autoencoder"],
        text_encoder=p["text_encoder"],
        defaults=p["defaults"],
    )


def make_forge(root: Path) -> tuple[Path, Flux, dict[str, Tensor]]:
    """The module fixture of both test files: a Forge file of a random tiny FLUX.1, with its autoencoder."""
    model = _flux()
    q = write_forge_file(root / "flux1-tiny-bnb-nf4.safetensors", model, _ae())
    return root / "flux1-tiny-bnb-nf4.safetensors", model, q
