"""LyCORIS LoKr and LoHa files on a FLUX.1-width transformer: pictor's adapters vs the LyCORIS library on
diffusers' FluxTransformer2DModel, at identical weights and with the same file.

Prints one JSON object. Model: FLUX.1's width (hidden 3072, 24 heads, MLP 4x, context 4096, vec 768, guidance
embedding), 1 double + 1 single block, random fp32 weights; batch 1, 256 image + 64 text tokens, CPU.
Files: what LyCORIS itself makes for every linear layer of diffusers' model (SimpleTuner's layout), with
random factors: LoKr factor 16 in "full matrix" mode (a common FLUX.1 LoKr recipe), LoKr factor 16 with
rank-16 factors, LoHa rank 16, and a rank-16 LoRA with DoRA (magnitudes moved 5% at random).

For each file: the adapter memory pictor holds (the factors) against the dense update the same layers would
take; seconds per forward (median), each base model alone and with the file,
pictor unmerged (adapters run beside the weights), pictor merged, diffusers + LyCORIS in its default mode
(each forward rebuilds the layer's whole weight) and in its bypass mode (the update runs beside the weight);
max |pictor - diffusers + LyCORIS| of the outputs.

    python benchmarks/bench_lycoris.py [--rounds 7] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _flux_reference import build_reference, reference_forward
from bench_flux_cpu import randomize_, time_interleaved

from pictor.lora_files import apply_lora
from pictor.models.dora_adapter import DoRAAdapter
from pictor.models.factored_adapter import FactoredAdapter
from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids
from pictor.models.lora import merge_lora, remove_lora
from pictor.models.lora_layers import LoRAAdapter, LoRALinear
from pictor.presets import get_preset

WIDE = FluxParams.from_dict({**get_preset("flux-dev")["model"], "depth": 1, "depth_single_blocks": 1})
FILES: dict[str, tuple[str, dict[str, Any]]] = {
    "lokr factor 16, full matrix": ("lokr", {"linear_dim": 10_000, "linear_alpha": 1.0, "factor": 16}),
    "lokr factor 16, rank 16": ("lokr", {"linear_dim": 16, "linear_alpha": 16.0, "factor": 16}),
    "loha rank 16": ("loha", {"linear_dim": 16, "linear_alpha": 16.0}),
    # at strength 1: LyCORIS scales a DoRA's multiplier otherwise than ComfyUI (and pictor), and its own
    # two modes disagree at other strengths
    "lora rank 16 + DoRA": ("lora", {"linear_dim": 16, "linear_alpha": 16.0, "dora_wd": True}),
}


def lycoris_file(
    reference: torch.nn.Module, algo: str, options: dict[str, Any], multiplier: float, bypass: bool
) -> Any:
    from lycoris import create_lycoris

    net = create_lycoris(reference, multiplier, algo=algo, bypass_mode=bypass, **options)
    net.apply_to()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("dora_scale"):  # DoRA's magnitudes start at the weights' norms: move them
                p.mul_(1 + 0.05 * noise)
            else:
                p.copy_(0.05 * noise)  # an update a few percent of the weights
    return net


def adapter_bytes(model: torch.nn.Module) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, LoRALinear):
            for a in m.adapters.values():
                assert isinstance(a, (FactoredAdapter, LoRAAdapter, DoRAAdapter))
                total += sum(t.numel() * t.element_size() for t in [*a.parameters(), *a.buffers()])
    return total


def dense_bytes(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, LoRALinear))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--files", help="only the files whose label contains this (others kept from --out)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)

    base = Flux(WIDE).eval().requires_grad_(False)
    randomize_(base)
    gen = torch.Generator().manual_seed(1)
    lat_h = lat_w = 32
    n_txt = 64
    inputs = (
        torch.randn(1, (lat_h // 2) * (lat_w // 2), WIDE.in_channels, generator=gen),
        make_img_ids(1, lat_h, lat_w),
        torch.randn(1, n_txt, WIDE.context_in_dim, generator=gen),
        make_txt_ids(1, n_txt),
        torch.tensor([0.6]),
        torch.randn(1, WIDE.vec_in_dim, generator=gen),
        torch.tensor([3.5]),
    )
    result: dict[str, Any] = {
        "config": {
            **WIDE.to_dict(),
            "img_tokens": inputs[0].shape[1],
            "txt_tokens": n_txt,
            "dtype": "float32",
            "threads": args.threads,
            "rounds": args.rounds,
        },
        "torch": torch.__version__,
        "files": {},
    }
    with torch.inference_mode():
        base_s = statistics.median(time_interleaved({"base": lambda: base(*inputs)}, args.rounds)["base"])
    result["pictor_base_s"] = base_s
    plain_ref = build_reference(WIDE, {k: v.clone() for k, v in base.state_dict().items()})
    with torch.inference_mode():
        ref_times = time_interleaved({"ref": lambda r=plain_ref: reference_forward(r, *inputs)}, args.rounds)
    result["diffusers_base_s"] = statistics.median(ref_times["ref"])
    del plain_ref
    if args.files and args.out and args.out.exists():  # a rerun of some files: keep the others' entries
        result["files"] = json.loads(args.out.read_text())["files"]
        for entry in result["files"].values():
            entry.setdefault("scale", 0.8)  # runs before the scale was recorded used 0.8 for every file
    for label, (algo, options) in FILES.items():
        if args.files and args.files not in label:
            continue
        scale = 1.0 if options.get("dora_wd") else 0.8
        reference = build_reference(WIDE, {k: v.clone() for k, v in base.state_dict().items()})
        net = lycoris_file(reference, algo, options, scale, bypass=False)
        bypassed = build_reference(WIDE, {k: v.clone() for k, v in base.state_dict().items()})
        lycoris_file(bypassed, algo, options, scale, bypass=True)  # the same seed: the same factors
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "file.safetensors"
            save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))
            file_mb = path.stat().st_size / 1e6
            model = copy.deepcopy(base)
            apply_lora(model, path, scale=scale)
        merged = copy.deepcopy(model)
        merge_lora(merged)
        with torch.inference_mode():
            want = reference_forward(reference, *inputs)
            want_bypassed = reference_forward(bypassed, *inputs)
            plain, got, got_merged = base(*inputs), model(*inputs), merged(*inputs)
            times = time_interleaved(
                {
                    "pictor_unmerged": lambda m=model: m(*inputs),
                    "pictor_merged": lambda m=merged: m(*inputs),
                    "diffusers_lycoris": lambda r=reference: reference_forward(r, *inputs),
                    "diffusers_lycoris_bypass": lambda r=bypassed: reference_forward(r, *inputs),
                },
                args.rounds,
            )
        entry = {
            "scale": scale,
            "file_mb": round(file_mb, 1),
            "pictor_adapter_mb": round(adapter_bytes(model) / 1e6, 1),
            "dense_update_mb": round(dense_bytes(model) / 1e6, 1),
            "effect_max_abs": float((want - plain).abs().max()),
            "max_abs_err_unmerged": float((got - want).abs().max()),
            "max_abs_err_merged": float((got_merged - want).abs().max()),
            "lycoris_bypass_vs_rebuild_max_abs": float((want_bypassed - want).abs().max()),
            **{f"{k}_s": statistics.median(v) for k, v in times.items()},
        }
        result["files"][label] = entry
        print(label, json.dumps(entry), file=sys.stderr)
        remove_lora(model)
        del reference, bypassed, net, model, merged
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
