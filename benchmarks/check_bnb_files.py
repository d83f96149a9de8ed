"""Check once that pictor imports FLUX.1 files that bitsandbytes itself wrote, exactly (no test runs it).

A tiny FLUX.1 (tests' `tiny` preset at width 128) in bf16 (or fp16) has every linear weight quantized by
``bnb.nn.Linear4bit`` and saved from its ``state_dict`` (what Forge's and diffusers' savers write): Forge's
v1 (nested) and v2 (float32 absmax) layouts under ``model.diffusion_model.`` with ``vae.`` and
``text_encoders.clip_l`` / ``t5xxl`` (fp8) beside, and diffusers' layout in NF4, nested FP4 and blocksize
128. `pictor.bnb_files.read_bnb_flux` must give, for every weight, bitsandbytes' own dequantization (its
reference kernel, the CUDA one's blocks), in float32 and in the quant state's dtype. Prints JSON.

    python benchmarks/check_bnb_files.py --bnb-python /tmp/bnbv/bin/python [--dtype fp16]

The bitsandbytes side runs in that Python (its own torch; bitsandbytes is never needed by pictor): this file
is given to it with ``--bnb-side``.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

CASES = [  # name, source layout, prefix, quant_type, nested, blocksize, with VAE / text encoders
    ("forge_v1", "flux", "model.diffusion_model.", "nf4", True, 64, True),
    ("forge_v2", "flux", "model.diffusion_model.", "nf4", False, 64, True),
    ("diffusers_nf4", "diffusers", "", "nf4", False, 64, False),
    ("diffusers_fp4_nested", "diffusers", "", "fp4", True, 64, False),
    ("diffusers_nf4_b128", "diffusers", "", "nf4", True, 128, False),
]
_DT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8}
_DT["F8_E4M3"] = torch.float8_e4m3fn


def _read(path: Path) -> dict[str, torch.Tensor]:  # safetensors by hand: the bitsandbytes venv lacks it
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    out = {}
    for k, v in json.loads(raw[8 : 8 + n]).items():
        if k != "__metadata__":
            a, b = v["data_offsets"]
            data = torch.frombuffer(bytearray(raw[8 + n + a : 8 + n + b]), dtype=torch.uint8)
            out[k] = data.view(_DT[v["dtype"]]).reshape(v["shape"]).clone()
    return out


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    names = {v: k for k, v in _DT.items()}
    header, blobs, offset = {}, [], 0
    for k, t in tensors.items():
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[k] = {
            "dtype": names[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def bnb_side(
    src: Path, out: Path, dq_out: Path, prefix: str, qt: str, nested: bool, bs: int, extra: str
) -> None:
    """In the bitsandbytes venv: every 2-D ``.weight`` through ``Linear4bit``; its dequantization beside."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    def reference(packed: torch.Tensor, state: bf.QuantState) -> torch.Tensor:
        absmax = state.absmax
        if state.nested:
            absmax = bf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        code = _get_4bit_code(state.quant_type, packed.device)
        return _dequantize_4bit_compute(
            packed.reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype
        )

    q, dq = {}, {}
    for k, t in _read(src).items():
        if not (k.endswith(".weight") and t.ndim == 2):
            q[prefix + k] = dq[k] = t
            continue
        layer = bnb.nn.Linear4bit(
            t.shape[1],
            t.shape[0],
            bias=False,
            compress_statistics=nested,
            quant_type=qt,
            compute_dtype=t.dtype,
        )
        layer.weight = bnb.nn.Params4bit(
            t, requires_grad=False, blocksize=bs, compress_statistics=nested, quant_type=qt
        )
        layer.weight = layer.weight._quantize("cpu")
        for name, v in layer.state_dict().items():  # Linear4bit._save_to_state_dict: weight + quant state
            q[prefix + k.removesuffix("weight") + name] = v
        state = layer.weight.quant_state
        dq[k + ".as_stored"] = reference(layer.weight.data, state)
        state.dtype = torch.float32
        dq[k] = reference(layer.weight.data, state)
    if extra:
        q.update(_read(Path(extra)))
    _write(out, q)
    _write(dq_out, dq)


def main(bnb_python: str, dtype: torch.dtype) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bnb_check_") as folder:
        return _check(Path(folder), bnb_python, dtype)


def _check(tmp: Path, bnb_python: str, dtype: torch.dtype) -> dict[str, object]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from safetensors.torch import load_file, save_file

    from pictor.bnb_files import _from_diffusers, read_bnb_flux
    from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
    from pictor.models.bnb_quants import dequantize_rows
    from pictor.models.flux import Flux, FluxParams
    from pictor.models.weight_storage import GGML_TYPE_KEY
    from pictor.presets import get_preset

    from tiny_flux import load_benchmark_module, randomize_

    params = FluxParams.from_dict(
        {**get_preset("tiny")["model"], "hidden_size": 128, "num_heads": 1, "axes_dim": [16, 56, 56]}
    )
    model = Flux(params)
    randomize_(model, 0)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    sources = {
        "flux": sd,
        "diffusers": load_benchmark_module("_flux_reference").to_diffusers_state_dict(sd, params),
    }
    for name, tensors in sources.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
    ae = AutoEncoder(AutoEncoderParams.from_dict(get_preset("tiny")["autoencoder"]))
    extra = {"vae." + k: v.to(torch.bfloat16).contiguous() for k, v in ae.state_dict().items()}
    extra["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(
        8, dtype=torch.float16
    )
    extra["text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight"] = torch.ones(8).to(
        torch.float8_e4m3fn
    )
    save_file(extra, str(tmp / "extra.safetensors"))
    results: dict[str, object] = {}
    for name, src, prefix, qt, nested, bs, with_extra in CASES:
        out, dq_out = tmp / f"{name}.safetensors", tmp / f"{name}_dq.safetensors"
        args = [str(tmp / f"{src}.safetensors"), str(out), str(dq_out), prefix, qt, str(int(nested)), str(bs)]
        args.append(str(tmp / "extra.safetensors") if with_extra else "")
        subprocess.run([bnb_python, __file__, "--bnb-side", *args], check=True, capture_output=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = read_bnb_flux(out)
        dq = load_file(str(dq_out))
        wide = {k: v for k, v in dq.items() if not k.endswith(".as_stored")}
        stored = {k.removesuffix(".as_stored"): v for k, v in dq.items() if k.endswith(".as_stored")}
        if src == "diffusers":
            wide, stored = _from_diffusers(dict(wide), name), _from_diffusers(stored, name)
        differ = sorted(set(wide) ^ {k for k in got.tensors if not k.endswith(GGML_TYPE_KEY)})
        for key, want in wide.items():
            t, layer = got.tensors.get(key), key.removesuffix(".weight")
            if t is None:
                continue
            if layer in got.kept:
                shape = (want.shape[0], want.shape[1])
                same = torch.equal(dequantize_rows(t, got.kept[layer], shape, torch.float32), want)
                same = same and torch.equal(
                    dequantize_rows(t, got.kept[layer], shape, stored[key].dtype), stored[key]
                )
            else:
                same = torch.equal(t, want)
            if not same:
                differ.append(key)
        results[name] = {
            "layout": got.layout,
            "kept_4bit": len(got.kept),
            "formats": sorted(set(got.kept.values())),
            "widened_on_import": len(got.widened),
            "autoencoder": got.vae_prefix,
            "text_encoders": got.text_prefixes,
            "exact": not differ,
            "differ": differ[:8],
        }
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--bnb-side":
        a = sys.argv[2:]
        bnb_side(Path(a[0]), Path(a[1]), Path(a[2]), a[3], a[4], a[5] == "1", int(a[6]), a[7])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bnb-python", required=True, help="a Python that has bitsandbytes")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ns = parser.parse_args()
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[ns.dtype]
    print(
        json.dumps(
            {"bitsandbytes_python": ns.bnb_python, "dtype": ns.dtype, "cases": main(ns.bnb_python, dt)},
            indent=1,
        )
    )
