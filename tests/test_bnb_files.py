"""bitsandbytes 4-bit FLUX.1 files (Forge's all-in-one flux1-dev-bnb-nf4 layout, diffusers' 4-bit
FluxTransformer2DModel layout) imported by `pictor convert flux`: the blocks' linears stay NF4 / FP4 in
memory, and the model computes, and draws, exactly what the same model with the weights dequantized does.

The files are written here the way bitsandbytes' ``Linear4bit.state_dict`` lays them out (its quantizer's
bytes, tested against bitsandbytes in tests/models/test_bnb_quants.py), so bitsandbytes is not needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from pictor.bnb_files import read_bnb_flux
from pictor.bundle_storage import cast_bundle
from pictor.checkpoint import CheckpointError, load_bundle
from pictor.convert import convert_flux
from pictor.models.bnb_quants import read_quant_state
from pictor.models.flux import Flux
from pictor.models.weight_storage import FOUR_BIT_TYPE_IDS, STORED_PREFIXES, QuantizedLinear, storage_name
from pictor.notices import PictorWarning

from bnb_helpers import (
    FORGE,
    _ae,
    _flux,
    _load,
    _text_folders,
    bnb_entries,
    dequantized,
    make_forge,
    quantize_state_dict,
)
from tiny_flux import load_benchmark_module, make_inputs

# the notice that the embedders' 4-bit weights were widened (every file here has them)
pytestmark = pytest.mark.filterwarnings("ignore:.*dequantized to float32:pictor.notices.PictorWarning")


@pytest.fixture(scope="module")
def forge(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Flux, dict[str, Tensor]]:
    return make_forge(tmp_path_factory.mktemp("forge"))


def test_a_forge_file_converts_with_its_own_autoencoder_and_computes_the_dequantized_model(
    forge: tuple[Path, Flux, dict[str, Tensor]], tmp_path: Path
) -> None:
    path, _, q = forge
    t5, clip = _text_folders(tmp_path)
    with pytest.warns(PictorWarning, match=r"text encoders \(text_encoders.clip_l\).*--clip and --t5"):
        out = convert_flux(path, None, t5, clip, tmp_path / "bundle")
    bundle = load_bundle(out)
    assert "kept 4-bit, bitsandbytes FP4+NF4" in bundle.config.description
    # the file named once, with the autoencoder it holds
    assert bundle.config.description.startswith(f"converted from {path.name} (with its autoencoder)")
    sd = bundle.transformer
    ids = {k.removesuffix(".ggml_type"): int(v) for k, v in sd.items() if k.endswith(".ggml_type")}
    block_linears = [
        k
        for k, v in q.items()
        if k.startswith(STORED_PREFIXES) and v.dtype == torch.uint8 and k + ".absmax" in q
    ]
    assert sorted(ids) == sorted(k.removesuffix(".weight") for k in block_linears)
    assert set(ids.values()) == set(FOUR_BIT_TYPE_IDS.values())
    for key in block_linears:
        out_f, in_f = read_quant_state({k: v for k, v in q.items() if k.startswith(key)}, key).shape
        assert sd[key].dtype == torch.uint8 and sd[key].shape == (out_f, in_f // 64 * 36)
    wanted = dequantized(q)
    assert sd["img_in.weight"].dtype == torch.float32  # 4-bit outside the blocks: widened, exactly
    assert torch.equal(sd["img_in.weight"], wanted["img_in.weight"])
    assert sd["img_in.bias"].dtype == torch.bfloat16  # unquantized tensors as stored
    assert torch.equal(
        sd["double_blocks.0.img_attn.norm.query_norm.scale"],
        q["double_blocks.0.img_attn.norm.query_norm.scale"],
    )
    for key, t in _ae().state_dict().items():  # the file's own autoencoder
        assert torch.equal(bundle.autoencoder[key], t), key

    quantized, reference = _load(sd), _load(wanted)
    assert isinstance(quantized.double_blocks[0].img_attn.qkv, QuantizedLinear)
    assert storage_name(quantized) == "FP4+NF4"
    inputs = make_inputs(quantized.params)
    with torch.no_grad():
        assert torch.equal(quantized(**inputs), reference(**inputs))

    # `convert dtype` widens the rows again, exactly to the dequantized values
    wide = load_bundle(cast_bundle(out, tmp_path / "wide", "fp32")).transformer
    assert not any(k.endswith("ggml_type") for k in wide)
    for key in block_linears:
        assert torch.equal(wide[key], wanted[key]), key


def test_a_diffusers_file_imports_to_the_same_weights_as_forges(
    forge: tuple[Path, Flux, dict[str, Tensor]], tmp_path: Path
) -> None:
    path, model, _ = forge
    reference = load_benchmark_module("_flux_reference")
    diffusers_sd = reference.to_diffusers_state_dict(dict(model.state_dict()), model.params)
    # per-row blocks of 64: q, k and v quantized apart are the fused projection's blocks, byte for byte
    qd = quantize_state_dict(diffusers_sd)
    save_file(
        {k: v.contiguous() for k, v in qd.items()}, str(tmp_path / "diffusion_pytorch_model.safetensors")
    )
    from_diffusers = read_bnb_flux(tmp_path / "diffusion_pytorch_model.safetensors")
    from_forge = read_bnb_flux(path)
    assert from_diffusers.layout == "diffusers" and from_forge.layout == "forge"
    assert from_diffusers.vae_prefix is None and from_forge.vae_prefix == "vae."
    assert from_diffusers.kept == from_forge.kept and len(from_forge.kept) == 10 + 3  # every block linear
    assert sorted(from_diffusers.widened) != [] and len(from_diffusers.widened) == len(from_forge.widened)
    # the same tensors, key for key: q, k, v (and the single blocks' MLP input) joined as 4-bit rows, the
    # final modulation's halves back in FLUX.1's order (shift, scale)
    assert from_diffusers.tensors.keys() == from_forge.tensors.keys()
    for key, t in from_forge.tensors.items():
        assert torch.equal(from_diffusers.tensors[key], t), key
    assert from_diffusers.tensors["single_blocks.0.linear1.weight"].dtype == torch.uint8

    t5, clip = _text_folders(tmp_path)
    with pytest.raises(CheckpointError, match="holds no autoencoder; give --ae"):
        convert_flux(tmp_path / "diffusion_pytorch_model.safetensors", None, t5, clip, tmp_path / "b")
    save_file({k: v.contiguous() for k, v in _ae().state_dict().items()}, str(tmp_path / "ae.safetensors"))
    out = convert_flux(
        tmp_path / "diffusion_pytorch_model.safetensors",
        tmp_path / "ae.safetensors",
        t5,
        clip,
        tmp_path / "b",
    )
    assert "kept 4-bit" in load_bundle(out).config.description


def _forge_with(tmp_path: Path, change) -> Path:  # type: ignore[no-untyped-def]
    q = quantize_state_dict(_flux().state_dict())
    change(q)
    path = tmp_path / "changed.safetensors"
    save_file({FORGE + k: v.contiguous() for k, v in q.items()}, str(path))
    return path


QKV = "double_blocks.0.img_attn.qkv.weight"


def _retype(q: dict[str, Tensor]) -> None:
    (key,) = [k for k in q if k.startswith(QKV + ".quant_state.")]
    info = json.loads(bytes(q[key].tolist()))
    q.pop(key)
    info["quant_type"] = "af4"
    q[QKV + ".quant_state.bitsandbytes__af4"] = torch.tensor(
        list(json.dumps(info).encode()), dtype=torch.uint8
    )


def _reshape(q: dict[str, Tensor]) -> None:
    """The qkv weight replaced by a consistent 4-bit weight of another shape."""
    for k in [k for k in q if k.startswith(QKV)]:
        del q[k]
    q.update(bnb_entries(QKV, torch.randn(64, 64), "nf4", nested=False))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_retype, r"qkv.weight.quant_state.bitsandbytes__af4: quant_type 'af4'.*nf4 and fp4"),
        (lambda q: q.pop(QKV + ".absmax"), r"qkv.weight.absmax is missing"),
        (lambda q: q.pop(QKV + ".quant_map"), r"qkv.weight.quant_map is missing"),
        (
            lambda q: q.pop(next(k for k in list(q) if k.startswith(QKV + ".quant_state."))),
            r"qkv.weight.absmax has no .*quant state is missing",
        ),
        (_reshape, r"qkv.weight: file \(64, 64\) vs model \(384, 128\)"),
        (
            lambda q: q.update({"double_blocks.0.img_mlp.0.weight.SCB": torch.ones(3)}),
            r"weight.SCB is an LLM.int8.*8-bit files are not supported.*bf16",
        ),
    ],
)
def test_damaged_and_unsupported_files_are_refused_by_name(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    path = _forge_with(tmp_path, change)
    t5, clip = _text_folders(tmp_path)
    save_file({k: v.contiguous() for k, v in _ae().state_dict().items()}, str(tmp_path / "ae.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        convert_flux(path, tmp_path / "ae.safetensors", t5, clip, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_command_line_converts_a_forge_file_without_ae(
    forge: tuple[Path, Flux, dict[str, Tensor]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pictor.cli import main

    path, _, _ = forge
    t5, clip = _text_folders(tmp_path)
    args = ["convert", "flux", "--transformer", str(path), "--t5", str(t5), "--clip", str(clip)]
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "text encoders" in capsys.readouterr().err
    assert load_bundle(tmp_path / "b").config.hashes


def test_a_bare_file_in_flux_names_and_a_file_of_another_model(
    forge: tuple[Path, Flux, dict[str, Tensor]], tmp_path: Path
) -> None:
    path, _, q = forge
    save_file({k: v.contiguous() for k, v in q.items()}, str(tmp_path / "bare.safetensors"))
    bare, from_forge = read_bnb_flux(tmp_path / "bare.safetensors"), read_bnb_flux(path)
    assert bare.layout == "flux" and bare.tensors.keys() == from_forge.tensors.keys()
    assert all(torch.equal(bare.tensors[k], t) for k, t in from_forge.tensors.items())
    other = bnb_entries("model.layers.0.mlp.up_proj.weight", torch.randn(8, 64), "nf4", nested=False)
    save_file(other, str(tmp_path / "llm.safetensors"))
    with pytest.raises(CheckpointError, match=r"no FLUX\.1 transformer"):
        read_bnb_flux(tmp_path / "llm.safetensors")


def test_a_truncated_file_is_refused_by_name_without_a_traceback(
    forge: tuple[Path, Flux, dict[str, Tensor]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pictor.cli import main

    path, _, _ = forge
    raw = path.read_bytes()
    cut = tmp_path / "flux1-dev-bnb-nf4.safetensors"
    cut.write_bytes(raw[: len(raw) - 1000])  # a download cut short
    t5, clip = _text_folders(tmp_path)
    with pytest.raises(
        CheckpointError, match=r"flux1-dev-bnb-nf4.safetensors: not a readable safetensors.*trunc"
    ):
        convert_flux(cut, None, t5, clip, tmp_path / "out")
    args = ["convert", "flux", "--transformer", str(cut), "--t5", str(t5), "--clip", str(clip)]
    assert main([*args, "--out", str(tmp_path / "b")]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "truncated" in err


def test_info_on_a_bnb_file_summarises_it_from_the_header(
    forge: tuple[Path, Flux, dict[str, Tensor]], capsys: pytest.CaptureFixture[str]
) -> None:
    from pictor.cli import main

    path, _, _ = forge
    assert main(["info", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "forge" and info["quantized_weights"] == {"fp4": 2, "nf4": 19}
    assert info["blocksizes"] == [64] and info["nested"] == 3
    assert info["autoencoder"] == "vae." and info["text_encoders"] == ["text_encoders.clip_l"]
    assert "pictor convert flux --transformer" in info["convert"]
