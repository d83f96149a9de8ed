"""GGUF files of quantized FLUX.1 transformers (ComfyUI-GGUF's): read, converted to bundles whose layers
stay quantized in memory, and give the outputs of the weights dequantized by llama.cpp's reference code."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from torch import nn

from pictor.bundle_storage import cast_bundle, export_gguf
from pictor.checkpoint import CheckpointError, load_bundle, load_into
from pictor.convert import convert_flux
from pictor.flux_files import import_flux_gguf
from pictor.gguf_files import read_gguf, write_gguf
from pictor.loading import pipeline_from_bundle
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import Flux
from pictor.models.lora import LoRAError, add_lora, merge_lora
from pictor.models.weight_storage import QuantizedLinear, place, storage_name
from pictor.presets import get_preset

from gguf_writing import block_linear_keys, gguf_params, write_flux_gguf
from tiny_flux import make_inputs, random_flux

FORMATS = ("Q8_0", "Q4_K", "Q6_K", "Q4_0", "Q5_1", "Q4_1", "Q5_0")


def _mixed(model: Flux) -> dict[str, str]:
    """Every block linear in one of seven formats, as K-quant files mix formats by layer."""
    return {k: FORMATS[i % len(FORMATS)] for i, k in enumerate(block_linear_keys(model))}


def _dense(params: object, state: dict[str, torch.Tensor]) -> Flux:
    with torch.device("meta"):
        model = Flux(params)  # type: ignore[arg-type]
    return load_into(model, state, "reference").eval()


def _quantized(path: Path, params: object) -> Flux:
    with torch.device("meta"):
        model = Flux(params)  # type: ignore[arg-type]
    return load_into(model, import_flux_gguf(path), str(path)).eval()


def _tiny_bundle(folder: Path) -> tuple[Path, Flux]:
    """The tiny preset's seeded random weights saved as an fp32 bundle (what `convert dtype` quantizes)."""
    from pictor.checkpoint import save_bundle

    from tiny_bundle import tiny_models

    cfg, flux, ae = tiny_models()
    save_bundle(folder, cfg, flux.state_dict(), ae.state_dict())
    return folder, flux


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Flux, dict[str, torch.Tensor]]:
    params = gguf_params()
    model = random_flux(params)
    path = tmp_path_factory.mktemp("gguf") / "flux1-tiny-mixed.gguf"
    meant = write_flux_gguf(model, path, _mixed(model))
    return path, model, meant


def test_the_reader_agrees_with_llama_cpps_reader(gguf_model: tuple[Path, Flux, dict]) -> None:
    path = gguf_model[0]
    ours, ref = read_gguf(path), GGUFReader(str(path))
    assert ours.version == 3 and ours.metadata["general.architecture"] == "flux"
    assert ours.metadata["general.name"] == "tiny flux" and ours.metadata["test.count"] == 7
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.format == t.tensor_type.name
        assert mine.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert np.array_equal(mine.data.numpy(), np.asarray(t.data).reshape(-1).view(np.uint8))


def test_a_quantized_flux_computes_what_its_dequantized_weights_do(
    gguf_model: tuple[Path, Flux, dict],
) -> None:
    """Every block linear stays GGML blocks in memory; outputs equal the dense model holding gguf's own
    dequantization of the same bytes (the reference both for the values and, through it, for diffusers)."""
    path, model, meant = gguf_model
    params = model.params
    quantized = _quantized(path, params)
    layers = [m for m in quantized.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == len(block_linear_keys(model))
    assert {m.fmt for m in layers} == set(FORMATS)
    assert all(m.weight.dtype == torch.uint8 for m in layers)
    assert storage_name(quantized) == "+".join(sorted(FORMATS))
    inputs = make_inputs(params)
    with torch.no_grad():
        got = quantized(**inputs)
        want = _dense(params, meant)(**inputs)
        unquantized = model(**inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - unquantized).abs().max() > 1e-3  # the weights really are the quantized ones


@pytest.mark.parametrize("swap", [False, True])
def test_place_keeps_blocks_and_bf16_compute_follows(gguf_model: tuple[Path, Flux, dict], swap: bool) -> None:
    """Also under torch's swap-on-conversion setting, where a move swaps the Parameter's contents (and its
    attributes) with the moved tensor's: the layers' formats must be attached again."""
    path, model, meant = gguf_model
    quantized = _quantized(path, model.params)
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        quantized = place(quantized, "cpu", torch.bfloat16)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    layer = quantized.double_blocks[0].img_attn.qkv
    assert isinstance(layer, QuantizedLinear) and layer.weight.dtype == torch.uint8
    assert layer.bias is not None and layer.bias.dtype == torch.bfloat16
    inputs = {
        k: v.bfloat16() if v is not None and v.is_floating_point() else v
        for k, v in make_inputs(model.params).items()
    }
    dense = place(_dense(model.params, meant), "cpu", torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(quantized(**inputs), dense(**inputs), rtol=0.02, atol=0.02)


def test_a_lora_on_quantized_layers_is_exact_unmerged_and_refuses_to_merge(
    gguf_model: tuple[Path, Flux, dict],
) -> None:
    path, model, meant = gguf_model
    quantized, dense = _quantized(path, model.params), _dense(model.params, meant)
    for m in (quantized, dense):
        add_lora(m, "style", rank=4)
        torch.manual_seed(3)  # the same adapter weights on both
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "adapters" in name:
                    p.copy_(torch.randn(p.shape) * 0.05)
    inputs = make_inputs(model.params)
    with torch.no_grad():
        torch.testing.assert_close(quantized(**inputs), dense(**inputs), rtol=1e-5, atol=1e-5)
    with pytest.raises(LoRAError, match=r"cannot be merged into Q.*-stored weights"):
        merge_lora(quantized)


def test_gradients_reach_the_lora_through_quantized_layers(gguf_model: tuple[Path, Flux, dict]) -> None:
    """QLoRA-style: the base stays blocks, the input gradient goes through the dequantized weight."""
    path, model, meant = gguf_model
    grads = []
    for m in (_quantized(path, model.params), _dense(model.params, meant)):
        m.requires_grad_(False)
        add_lora(m, "learned", rank=4)
        torch.manual_seed(5)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "adapters" in name:
                    p.copy_(torch.randn(p.shape) * 0.05)
        out = m(**make_inputs(model.params))
        (out**2).mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def _flux_files(root: Path, model: Flux) -> dict[str, Path]:
    torch.manual_seed(0)
    ae = AutoEncoder(AutoEncoderParams.from_dict(get_preset("tiny")["autoencoder"]))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, root / "ae.safetensors")
    paths = {"ae": root / "ae.safetensors"}
    for name in ("t5", "clip"):
        (root / name).mkdir()
        (root / name / "config.json").write_text("{}")
        paths[name] = root / name
    return paths


def test_convert_keeps_the_blocks_and_dtype_widens_them(tmp_path: Path) -> None:
    params = gguf_params(in_channels=16)
    model = random_flux(params)
    gguf = tmp_path / "flux1-dev-mixed.gguf"
    meant = write_flux_gguf(model, gguf, _mixed(model), prefix="model.diffusion_model.", dense="F16")
    f = _flux_files(tmp_path, model)
    out = convert_flux(gguf, f["ae"], f["t5"], f["clip"], tmp_path / "bundle")
    bundle = load_bundle(out)
    assert bundle.config.model["hidden_size"] == 256 and bundle.config.preset == "flux-schnell"
    assert "layers kept in GGML" in bundle.config.description
    qkv = bundle.transformer["double_blocks.0.img_attn.qkv.weight"]
    assert (
        qkv.dtype == torch.uint8 and int(bundle.transformer["double_blocks.0.img_attn.qkv.ggml_type"]) == 12
    )
    assert bundle.transformer["img_in.weight"].dtype == torch.float16  # dense tensors as the file stored them
    blocks = sum(v.numel() for k, v in bundle.transformer.items() if v.dtype == torch.uint8)
    wide = sum(meant[k].numel() * 2 for k in block_linear_keys(model))
    assert blocks < 0.6 * wide  # 4.5 to 8.5 bits a weight against bf16's 16

    # Widening: exactly the reference dequantization, no ggml_type keys left, loads as a dense model.
    widened = cast_bundle(out, tmp_path / "wide", "fp32")
    wide_sd = load_bundle(widened).transformer
    assert not any(k.endswith("ggml_type") for k in wide_sd)
    for key in block_linear_keys(model):
        assert torch.equal(wide_sd[key], meant[key]), key
    with pytest.raises(CheckpointError, match="quantized already"):
        cast_bundle(out, tmp_path / "again", "q4_0")
    # Training (full) from quantized weights is refused with the way out.
    with torch.device("meta"):
        fresh = Flux(params)
    with pytest.raises(CheckpointError, match=r"cannot be trained.*convert dtype"):
        load_into(fresh, bundle.transformer, "init", dtype=torch.float32)


def test_pictor_quantizes_its_own_bundles(tmp_path: Path) -> None:
    """`pictor convert dtype --dtype q8_0|q4_0`: llama.cpp's bytes exactly; the bundle loads quantized and
    generates nearly what the fp32 bundle does (Q8_0 closer than Q4_0)."""
    from gguf.quants import quantize as ref_quantize

    from pictor.pipeline import GenerationRequest

    src, flux = _tiny_bundle(tmp_path / "fp32")
    req = GenerationRequest(prompt="a red circle", width=32, height=32, steps=3, seed=1, num_images=1)
    base = np.asarray(pipeline_from_bundle(load_bundle(src), "cpu").generate(req)[0].image, np.float32)
    errors = {}
    for fmt in ("q8_0", "q4_0"):
        out = cast_bundle(src, tmp_path / fmt, fmt)
        sd = load_bundle(out).transformer
        key = "single_blocks.0.linear1.weight"
        want = ref_quantize(flux.state_dict()[key].numpy(), GGMLQuantizationType[fmt.upper()])
        assert np.array_equal(sd[key].numpy(), want)
        pipe = pipeline_from_bundle(load_bundle(out), "cpu")
        assert pipe.weight_dtype == fmt.upper()
        image = pipe.generate(req)[0]
        assert image.record["weight_dtype"] == fmt.upper()
        errors[fmt] = float(np.abs(np.asarray(image.image, np.float32) - base).mean())
    assert errors["q8_0"] < errors["q4_0"]
    assert errors["q8_0"] < 2.0  # of 255: Q8_0 is nearly lossless


def test_damaged_files_are_refused_with_the_reason(
    tmp_path: Path, gguf_model: tuple[Path, Flux, dict]
) -> None:
    path = gguf_model[0]
    data = path.read_bytes()
    cases = {
        "magic.gguf": (b"GGML" + data[4:], "not a GGUF file"),
        "v1.gguf": (data[:4] + struct.pack("<I", 1) + data[8:], "version 1"),
        "short.gguf": (data[: len(data) // 2], "outside the file"),
        "header.gguf": (data[:40], "header ends early"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            read_gguf(tmp_path / name)
    with pytest.raises(CheckpointError, match="no such file"):
        read_gguf(tmp_path / "missing.gguf")


def test_an_unsupported_format_and_a_non_flux_file_are_named(tmp_path: Path) -> None:
    writer = GGUFWriter(str(tmp_path / "iq.gguf"), arch="llama")
    raw = np.zeros((2, 136), np.uint8)  # IQ4_XS: 136 bytes per 256 values
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=GGMLQuantizationType.IQ4_XS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_q\.weight.*IQ4_XS|23"):
        read_gguf(tmp_path / "iq.gguf")

    writer = GGUFWriter(str(tmp_path / "llama.gguf"), arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"architecture 'llama'.*not a FLUX\.1 transformer"):
        import_flux_gguf(tmp_path / "llama.gguf")


def test_a_lora_wrapper_unwrapped_stays_quantized(gguf_model: tuple[Path, Flux, dict]) -> None:
    from pictor.models.lora import remove_lora

    path, model, _ = gguf_model
    quantized = _quantized(path, model.params)
    inputs = make_inputs(model.params)
    with torch.no_grad():
        before = quantized(**inputs)
        add_lora(quantized, "x", rank=2)
        remove_lora(quantized)
        after = quantized(**inputs)
    assert torch.equal(before, after)
    layer = quantized.single_blocks[0].linear1
    assert isinstance(layer, QuantizedLinear) and isinstance(layer, nn.Linear)
    assert int(layer.ggml_type) in (2, 3, 6, 7, 8, 12, 14)


def test_the_command_line_quantizes_shows_generates_and_reproduces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from pictor.cli import main

    src, flux = _tiny_bundle(tmp_path / "src")
    assert main(["convert", "dtype", str(src), "--dtype", "q4_0", "--out", str(tmp_path / "q4")]) == 0
    assert "q4_0:" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "q4")]) == 0
    shown = json.loads(capsys.readouterr().out)
    n_blocks = len(block_linear_keys(flux))
    assert shown["quantized_layers"] == {"Q4_0": n_blocks}
    assert shown["storage"]["transformer.safetensors"]["U8"] == n_blocks
    args = ["--model", str(tmp_path / "q4"), "--steps", "2", "--size", "32x32", "--seed", "4"]
    assert main(["generate", "a red circle", *args, "-o", str(tmp_path / "gen")]) == 0
    (made,) = sorted((tmp_path / "gen").glob("*.png"))
    capsys.readouterr()
    assert main(["reproduce", str(made), "-o", str(tmp_path / "again")]) == 0
    assert "identical" in "".join(capsys.readouterr())
    code = main(["convert", "dtype", str(tmp_path / "q4"), "--dtype", "q8_0", "--out", str(tmp_path / "x")])
    assert code != 0 and "quantized already" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_merges_and_extraction_refuse_a_quantized_bundle_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pictor.cli import main
    from pictor.lora_files import save_lora

    src, flux = _tiny_bundle(tmp_path / "src")
    q8 = cast_bundle(src, tmp_path / "q8", "q8_0")
    add_lora(flux, "x", rank=2)
    save_lora(flux, tmp_path / "l.safetensors", "x")
    commands = {
        "lora merge": ["lora", "merge", "--model", str(q8), "--lora", str(tmp_path / "l.safetensors")],
        "merge": ["merge", str(src), str(q8), "--alpha", "0.5"],
        "lora extract": ["lora", "extract", "--base", str(src), "--tuned", str(q8), "--rank", "2"],
    }
    for what, args in commands.items():
        out = tmp_path / (what.replace(" ", "-") + (".safetensors" if what == "lora extract" else ""))
        assert main([*args, "--out", str(out)]) != 0, what
        err = capsys.readouterr().err
        assert "GGML-quantized" in err and "--dtype bf16" in err, (what, err)
        assert not out.exists()


def test_copies_loras_and_lycoris_dora_keep_quantized_layers_quantized(
    gguf_model: tuple[Path, Flux, dict],
) -> None:
    """A deepcopy (EMA, skeletons) drops a tensor's Python attributes: the layer tags its weight again. A
    LoRA-wrapped layer keeps `ggml_type` in the state dict. LyCORIS' DoRA reads the dequantized base."""
    import copy

    from pictor.models.lycoris_train import add_lycoris
    from pictor.models.weight_storage import quantized_formats

    path, model, meant = gguf_model
    quantized = _quantized(path, model.params)
    inputs = make_inputs(model.params)
    with torch.no_grad():
        want = quantized(**inputs)
        torch.testing.assert_close(copy.deepcopy(quantized)(**inputs), want, rtol=0, atol=0)
        wrapped = copy.deepcopy(quantized)
        add_lora(wrapped, "x", rank=2)
        state = wrapped.state_dict()
        assert quantized_formats(state) == quantized_formats(quantized.state_dict())
        torch.testing.assert_close(copy.deepcopy(wrapped)(**inputs), want, rtol=0, atol=0)
    target = "double_blocks.0.img_attn.qkv"  # a Q4_K layer: DoRA's magnitudes are its dequantized rows
    outs = []
    for m in (_quantized(path, model.params), _dense(model.params, meant)):
        tree = add_lycoris(m, "d", target, "lora", 4, 4.0, dora=True)
        adapter = next(iter(tree.children()))
        torch.testing.assert_close(
            adapter.dora_scale[:, 0],
            meant[f"{target}.weight"].double().norm(dim=1).float(),
            rtol=1e-6,
            atol=0,
        )
        with torch.no_grad():
            outs.append(m(**inputs))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("general.alignment", "abc", "general.alignment is abc"),
        ("general.alignment", 24, "power of two"),
        ("comfy.gguf.orig_shape.w", 4, "not a list of positive sizes"),
        ("comfy.gguf.orig_shape.w", [-2, -2, 4], "not a list of positive sizes"),
        ("comfy.gguf.orig_shape.w", [3, 4], "does not fit"),
    ],
)
def test_damaged_metadata_is_refused_by_name(tmp_path: Path, key: str, value: object, message: str) -> None:
    writer = GGUFWriter(str(tmp_path / "m.gguf"), arch="flux")
    if isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        writer.add_uint32(key, int(value))  # type: ignore[call-overload]
    writer.add_tensor("w", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=re.escape(message)):
        read_gguf(tmp_path / "m.gguf")


def test_export_writes_what_llama_cpps_reader_reads_and_round_trips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pictor convert gguf`: gguf's own reader sees FLUX.1's keys, the formats and the bytes pictor's
    quantizer made; converting the file back gives a bundle that draws the same pictures."""
    from gguf.quants import quantize as ref_quantize

    from pictor.cli import main

    src, flux = _tiny_bundle(tmp_path / "src")
    out = tmp_path / "tiny-Q8_0.gguf"
    assert main(["convert", "gguf", str(src), "--dtype", "q8_0", "--out", str(out)]) == 0
    assert "MiB" in capsys.readouterr().out
    ref = GGUFReader(str(out))
    assert ref.fields["general.architecture"].contents() == "flux"
    kinds = {t.name: t.tensor_type.name for t in ref.tensors}
    blocks = block_linear_keys(flux)
    assert kinds.keys() == flux.state_dict().keys()
    assert {kinds[k] for k in blocks} == {"Q8_0"} and {kinds[k] for k in kinds if k not in blocks} == {"F32"}
    for t in ref.tensors:
        want = flux.state_dict()[t.name].numpy()
        if t.name in blocks:
            want = ref_quantize(want, GGMLQuantizationType.Q8_0)
        assert np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8))

    # Back: the imported bundle equals `convert dtype q8_0` of the same bundle, tensor for tensor.
    back = convert_flux(out, src / "autoencoder.safetensors", *_text_folders(tmp_path), tmp_path / "back")
    q8 = load_bundle(cast_bundle(src, tmp_path / "q8", "q8_0")).transformer
    rebuilt = load_bundle(back)
    imported = rebuilt.transformer
    assert imported.keys() == q8.keys() and all(torch.equal(imported[k], q8[k]) for k in q8)
    original = load_bundle(src).config  # what the file recorded comes back, not a FLUX.1 preset's
    assert rebuilt.config.defaults == original.defaults and rebuilt.config.model == original.model
    for key in ("scale_factor", "shift_factor"):
        assert rebuilt.config.autoencoder[key] == original.autoencoder[key]
    # A quantized bundle exports its blocks as they are: the file holds the same bytes again.
    again = tmp_path / "again.gguf"
    assert main(["convert", "gguf", str(tmp_path / "q8"), "--out", str(again)]) == 0
    again_tensors = read_gguf(again).tensors
    for name, t in read_gguf(out).tensors.items():
        assert torch.equal(again_tensors[name].data, t.data) and again_tensors[name].format == t.format
    # Refusals: quantizing quantized weights, a name without .gguf; nothing written.
    assert main(
        ["convert", "gguf", str(tmp_path / "q8"), "--dtype", "q4_0", "--out", str(tmp_path / "x.gguf")]
    )
    assert "quantized already" in capsys.readouterr().err
    assert main(["convert", "gguf", str(src), "--out", str(tmp_path / "x.safetensors")])
    assert "ends in .gguf" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.safetensors").exists()


def test_a_gguf_import_exports_byte_for_byte(gguf_model: tuple[Path, Flux, dict], tmp_path: Path) -> None:
    """K-quant blocks a file brought in go out unchanged (pictor cannot write K-quants, but keeps them)."""
    path = gguf_model[0]
    from safetensors.torch import save_file

    ae = AutoEncoder(AutoEncoderParams.from_dict(get_preset("tiny")["autoencoder"]))
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, tmp_path / "ae.safetensors")
    bundle = convert_flux(path, tmp_path / "ae.safetensors", *_text_folders(tmp_path), tmp_path / "b")
    out = export_gguf(bundle, tmp_path / "out.gguf")
    original, exported = read_gguf(path).tensors, read_gguf(out).tensors
    assert original.keys() == exported.keys()
    for name, t in original.items():
        assert exported[name].format == t.format and exported[name].shape == t.shape
        assert torch.equal(exported[name].data, t.data), name


def _text_folders(root: Path) -> tuple[Path, Path]:
    """Stand-in T5 and CLIP folders: convert_flux only checks that they are model folders."""
    folders = []
    for name in ("t5", "clip"):
        (root / name).mkdir(exist_ok=True)
        (root / name / "config.json").write_text("{}")
        folders.append(root / name)
    return folders[0], folders[1]


def test_info_shows_a_gguf_files_header(
    gguf_model: tuple[Path, Flux, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from pictor.cli import main

    path, model, _ = gguf_model
    assert main(["info", str(path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["metadata"]["general.architecture"] == "flux" and shown["gguf_version"] == 3
    blocks = len(block_linear_keys(model))
    assert sum(shown["formats"].values()) == shown["tensors"] == len(model.state_dict())
    assert shown["formats"]["F32"] == len(model.state_dict()) - blocks
    assert shown["parameters"] == sum(p.numel() for p in model.parameters())
    assert shown["flux_transformer"].startswith("yes")
    other = tmp_path / "llama.gguf"
    writer = GGUFWriter(str(other), arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert main(["info", str(other)]) == 0
    assert json.loads(capsys.readouterr().out)["flux_transformer"].startswith("no: ")


@pytest.mark.parametrize(
    "record",
    ['{"model": {}}', '{"model": {"depth": "2"}}', "[1]", "not json", '{"model": null}'],
)
def test_a_damaged_pictor_record_is_refused_by_name(tmp_path: Path, record: str) -> None:
    from pictor.flux_files import gguf_pictor_record

    src, _ = _tiny_bundle(tmp_path / "src")
    out = export_gguf(src, tmp_path / "m.gguf")
    tensors = {name: (t.format, t.shape, t.data) for name, t in read_gguf(out).tensors.items()}
    write_gguf(tmp_path / "bad.gguf", tensors, {"general.architecture": "flux", "pictor.config": record})
    with pytest.raises(CheckpointError, match="not pictor's record"):
        gguf_pictor_record(tmp_path / "bad.gguf")


def test_write_gguf_refuses_what_gguf_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="0-d tensor"):
        write_gguf(tmp_path / "x.gguf", {"s": ("F32", (), torch.zeros(()))}, {})
    with pytest.raises(CheckpointError, match="at most 63"):
        write_gguf(tmp_path / "x.gguf", {"n" * 64: ("F32", (1,), torch.zeros(1))}, {})
    assert not list(tmp_path.iterdir())  # nothing written, not even a temp file
