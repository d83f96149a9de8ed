"""Bundles whose transformer blocks are bitsandbytes 4-bit (NF4 / FP4, imported from Forge's or diffusers'
files, or made by `pictor convert dtype --dtype nf4`) through everything else that touches stored layers:
generation, LoRA / DoRA (applied, trained, merging refused), `pictor info`, widening, merges, GGUF export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from pictor.bnb_files import read_bnb_flux
from pictor.bundle_storage import cast_bundle
from pictor.checkpoint import CheckpointError, load_bundle, save_bundle
from pictor.loading import load
from pictor.models.flux import Flux
from pictor.models.lora import LoRAError, add_lora, merge_lora
from pictor.models.weight_storage import FOUR_BIT_TYPE_IDS, QuantizedLinear
from pictor.pipeline import GenerationRequest

from bnb_helpers import (
    _ae,
    _bundle_config,
    _flux,
    _load,
    _params,
    dequantized,
    make_forge,
)
from tiny_flux import make_inputs

# the notice that the embedders' 4-bit weights were widened (every file here has them)
pytestmark = pytest.mark.filterwarnings("ignore:.*dequantized to float32:pictor.notices.PictorWarning")


@pytest.fixture(scope="module")
def forge(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Flux, dict[str, Tensor]]:
    return make_forge(tmp_path_factory.mktemp("forge"))


def test_an_nf4_bundle_draws_the_dequantized_models_pictures(
    forge: tuple[Path, Flux, dict[str, Tensor]], tmp_path: Path
) -> None:
    path, _, q = forge
    ae = _ae().state_dict()
    save_bundle(tmp_path / "nf4", _bundle_config(), read_bnb_flux(path).tensors, ae)
    save_bundle(tmp_path / "dense", _bundle_config(), dequantized(q), ae)
    request = GenerationRequest("a red circle", steps=2, seed=5, width=32, height=32)
    pipes = [load(tmp_path / name, device="cpu") for name in ("nf4", "dense")]
    results = [pipe.generate(request)[0] for pipe in pipes]
    assert results[0].record["weight_dtype"] == "FP4+NF4"
    assert np.array_equal(np.asarray(results[0].image), np.asarray(results[1].image))
    weights = dict(pipes[0].transformer.named_parameters())
    assert weights["double_blocks.0.img_mlp.0.weight"].dtype == torch.uint8  # still 4-bit in memory


def test_loras_and_doras_apply_unmerged_on_4bit_layers(forge: tuple[Path, Flux, dict[str, Tensor]]) -> None:
    from pictor.models.lycoris_train import add_lycoris

    path, _, q = forge
    wanted = dequantized(q)
    quantized, dense = _load(read_bnb_flux(path).tensors), _load(wanted)
    inputs = make_inputs(quantized.params)
    for m in (quantized, dense):
        torch.manual_seed(3)
        add_lora(m, "x", rank=2)
        for name, p in m.named_parameters():
            if ".lora_B." in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    with torch.no_grad():
        assert torch.equal(quantized(**inputs), dense(**inputs))
    with pytest.raises(LoRAError, match=r"NF4|FP4"):
        merge_lora(quantized)
    # LyCORIS' DoRA decomposes against the layer's weight: the 4-bit layer's dequantized rows
    target = "double_blocks.0.img_mlp.0"  # a nested NF4 layer
    outs = []
    for m in (_load(read_bnb_flux(path).tensors), _load(wanted)):
        torch.manual_seed(4)
        tree = add_lycoris(m, "d", target, "lora", 4, 4.0, dora=True)
        adapter = next(iter(tree.children()))
        want_norm = wanted[f"{target}.weight"].double().norm(dim=1).float()
        torch.testing.assert_close(adapter.dora_scale[:, 0], want_norm, rtol=1e-6, atol=0)
        with torch.no_grad():
            outs.append(m(**inputs))
    assert torch.equal(outs[0], outs[1])


def test_a_lora_wrapper_unwrapped_stays_4bit(forge: tuple[Path, Flux, dict[str, Tensor]]) -> None:
    from pictor.models.lora import remove_lora

    path, _, _ = forge
    model = _load(read_bnb_flux(path).tensors)
    inputs = make_inputs(model.params)
    with torch.no_grad():
        before = model(**inputs)
        add_lora(model, "x", rank=2)
        remove_lora(model)
        assert torch.equal(model(**inputs), before)
    assert isinstance(model.single_blocks[0].linear1, QuantizedLinear)


def test_info_lists_the_4bit_layers(
    forge: tuple[Path, Flux, dict[str, Tensor]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pictor.cli import main

    path, _, _ = forge
    save_bundle(tmp_path / "nf4", _bundle_config(), read_bnb_flux(path).tensors, _ae().state_dict())
    assert main(["info", str(tmp_path / "nf4")]) == 0
    assert json.loads(capsys.readouterr().out)["quantized_layers"] == {"FP4": 2, "NF4": 11}


def test_convert_dtype_nf4_quantizes_as_bitsandbytes_and_refuses_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pictor.cli import main
    from pictor.models.bnb_quants import quantize_rows

    model = _flux()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save_bundle(tmp_path / "wide", _bundle_config(), sd, _ae().state_dict())
    assert (
        main(["convert", "dtype", str(tmp_path / "wide"), "--dtype", "nf4", "--out", str(tmp_path / "q")])
        == 0
    )
    bundle = load_bundle(tmp_path / "q")
    ids = {k: int(v) for k, v in bundle.transformer.items() if k.endswith(".ggml_type")}
    assert len(ids) == 10 + 3 and set(ids.values()) == {FOUR_BIT_TYPE_IDS["NF4"]}
    for key in ids:
        weight = key.removesuffix("ggml_type") + "weight"
        # bitsandbytes' quantize_4bit bytes (tests/models/test_bnb_quants.py), in pictor's rows
        assert torch.equal(bundle.transformer[weight], quantize_rows(sd[weight], "NF4")), weight
    assert torch.equal(
        bundle.transformer["img_in.weight"], sd["img_in.weight"]
    )  # outside the blocks: as stored
    pictures = load(tmp_path / "q", device="cpu").generate(
        GenerationRequest("a red circle", steps=2, seed=1, width=32, height=32)
    )
    assert pictures[0].record["weight_dtype"] == "NF4"
    capsys.readouterr()
    code = main(["convert", "dtype", str(tmp_path / "q"), "--dtype", "fp4", "--out", str(tmp_path / "x")])
    assert code != 0 and "quantized already" in capsys.readouterr().err


def test_export_gguf_refuses_4bit_layers_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pictor.bundle_storage import export_gguf
    from pictor.cli import main

    save_bundle(tmp_path / "wide", _bundle_config(), _flux().state_dict(), _ae().state_dict())
    cast_bundle(tmp_path / "wide", tmp_path / "nf4", "nf4")
    message = (
        r"13 transformer layers are bitsandbytes 4-bit \(NF4\), e\.g\. double_blocks\.0\.img_attn\.proj, "
        r"which GGUF has no type for.*--dtype bf16"
    )
    for dtype in (None, "q4_0"):
        with pytest.raises(CheckpointError, match=message):
            export_gguf(tmp_path / "nf4", tmp_path / "x.gguf", dtype)
    assert not (tmp_path / "x.gguf").exists()
    capsys.readouterr()
    assert main(["convert", "gguf", str(tmp_path / "nf4"), "--out", str(tmp_path / "x.gguf")]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bitsandbytes 4-bit (NF4)" in err


def test_merges_and_requantizing_refuse_an_nf4_bundle_naming_nf4(
    forge: tuple[Path, Flux, dict[str, Tensor]], tmp_path: Path
) -> None:
    from pictor.lora_merge import merge_loras
    from pictor.model_merge import merge_models

    path, _, q = forge
    save_bundle(tmp_path / "nf4", _bundle_config(), read_bnb_flux(path).tensors, _ae().state_dict())
    save_bundle(tmp_path / "dense", _bundle_config(), dequantized(q), _ae().state_dict())
    from pictor.lora_files import save_lora

    with_lora = _flux()
    add_lora(with_lora, "x", rank=2)
    save_lora(with_lora, tmp_path / "x.safetensors", "x")
    for run in (
        lambda: merge_models(tmp_path / "nf4", tmp_path / "dense", tmp_path / "m", 0.5),
        lambda: merge_models(tmp_path / "dense", tmp_path / "nf4", tmp_path / "m", 0.5),
        lambda: merge_loras(tmp_path / "nf4", [(tmp_path / "x.safetensors", 1.0)], tmp_path / "m"),
        lambda: cast_bundle(tmp_path / "nf4", tmp_path / "m", "q8_0"),
    ):
        with pytest.raises(
            CheckpointError,
            match=r"13 (transformer )?layers are (quantized already \()?bitsandbytes 4-bit \(FP4\+NF4\)",
        ) as exc:
            run()
        assert "GGML" not in str(exc.value)
        assert "--dtype bf16" in str(exc.value) or "wide bundle" in str(exc.value)
        assert not (tmp_path / "m").exists()


def test_a_lora_trains_on_4bit_layers_with_the_dequantized_models_gradients(
    forge: tuple[Path, Flux, dict[str, Tensor]],
) -> None:
    path, _, q = forge
    models = [_load(read_bnb_flux(path).tensors), _load(dequantized(q))]
    inputs = make_inputs(models[0].params)
    grads = []
    for m in models:
        m.requires_grad_(False)  # the base frozen, as in training
        torch.manual_seed(3)
        add_lora(m, "x", rank=2)
        for name, p in m.named_parameters():
            if ".lora_B." in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        m(**inputs).square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".lora_A." in n for n in grads[0])
    for name, g in grads[0].items():  # the backward pass widens the 4-bit rows to the same weights
        assert torch.equal(g, grads[1][name]), name
    assert models[0].double_blocks[0].img_mlp[0].weight.dtype == torch.uint8


def test_training_an_nf4_transformer_in_full_is_refused_naming_its_formats(
    forge: tuple[Path, Flux, dict[str, Tensor]],
) -> None:
    from pictor.checkpoint import load_into

    path, _, _ = forge
    with torch.device("meta"):
        model = Flux(_params())
    with pytest.raises(
        CheckpointError, match=r"13 layers hold bitsandbytes 4-bit \(FP4\+NF4\) weights, which"
    ) as e:
        load_into(model, read_bnb_flux(path).tensors, "the transformer", torch.float32)
    assert "GGML" not in str(e.value) and "(FP4+NF4) (FP4+NF4)" not in str(e.value)
