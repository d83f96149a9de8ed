"""CPU offload (`pictor.models.offload`, `Pipeline.set_offload`): scheduling and pixels.

On this CPU-only machine the execution and offload devices are both the CPU, so no memory can be seen to
move. The scheduling is tested through a recording mover instead: it does the real (no-op) move and keeps,
for every module, whether offload last put it on the execution device. Hooks registered after offload's
then fail a forward that runs on a module offload left out, and every move checks that at most one group
(and, in blocks mode, at most one swapped block beyond the kept ones) is in.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import pictor
from pictor.checkpoint import BundleConfig
from pictor.editing import EditRequest
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import Flux, FluxParams
from pictor.models.offload import Offload, move_module
from pictor.models.weight_storage import StoredLinear, store_fp8
from pictor.notices import PictorWarning
from pictor.pipeline import GenerationRequest, Pipeline
from pictor.pipeline_offload import offload_groups
from pictor.presets import get_preset
from pictor.provenance import read_record, save_png
from pictor.reproduce import reproduce

from tiny_bundle import tiny_models

MODES = [("model", 0), ("blocks", 0), ("blocks", 1)]
REQUEST: dict[str, Any] = {"width": 32, "height": 32, "steps": 3, "seed": 4}


def _load(offload: str | None = None, blocks_on_device: int = 0) -> Pipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UNTRAINED, and offload on a CPU run
        return pictor.load("tiny", device="cpu", offload=offload, blocks_on_device=blocks_on_device)


def _blocks(flux: nn.Module) -> list[nn.Module]:
    return [*flux.double_blocks, *flux.single_blocks]


class Recorder:
    """A mover that moves (CPU to CPU here) and records where offload means each module to be, checking
    after each move that no two groups, and no more blocks than allowed, are in at once."""

    def __init__(self, pipe: Pipeline, kept: int = 0) -> None:
        self.pipe, self.kept = pipe, kept
        self.inside: dict[int, bool] = {}  # id(module) -> on the execution device?
        self.moves: list[tuple[nn.Module, bool]] = []
        self.most_groups = self.most_blocks = 0

    def __call__(self, module: nn.Module, device: torch.device, inward: bool) -> None:
        move_module(module, device, inward)
        for sub in module.modules():
            self.inside[id(sub)] = inward
        self.moves.append((module, inward))
        groups = [
            name for name, mods in offload_groups(self.pipe).items() if any(self.is_in(m) for m in mods)
        ]
        blocks = sum(self.is_in(b) for b in _blocks(self.pipe.transformer))
        self.most_groups = max(self.most_groups, len(groups))
        self.most_blocks = max(self.most_blocks, blocks)
        assert len(groups) <= 1, f"two groups on the device at once: {groups}"
        if self.pipe.offload == "blocks":
            assert blocks <= self.kept + 1, f"{blocks} blocks in; at most {self.kept} kept + 1"

    def is_in(self, module: nn.Module) -> bool:
        """Any part of `module` on the execution device."""
        return any(self.inside.get(id(sub), False) for sub in module.modules())

    def nothing_in(self) -> bool:
        return not any(self.is_in(m) for mods in offload_groups(self.pipe).values() for m in mods)

    def ins(self, module: nn.Module) -> int:
        """How many times `module` itself was moved onto the execution device."""
        return sum(1 for m, inward in self.moves if m is module and inward)


def watch(pipe: Pipeline, mode: str, kept: int = 0) -> Recorder:
    """Offload `pipe` with a recorder, and make any forward of a module holding tensors fail while offload
    has it out (these hooks run after offload's, which bring modules in)."""
    rec = Recorder(pipe, kept)
    with pytest.warns(PictorWarning, match="does nothing on a CPU run"):
        pipe.set_offload(mode, kept, mover=rec)
    check_forwards(pipe, rec)
    return rec


def check_forwards(pipe: Pipeline, rec: Recorder) -> None:
    """Fail a forward of any module holding tensors that runs while `rec` has it out. Call after anything
    that re-installs offload's hooks (an adapter loaded), so these run after them."""
    for mods in offload_groups(pipe).values():
        for module in mods:
            for sub in module.modules():
                if next(sub.parameters(recurse=False), None) is None:
                    continue

                def check(m: nn.Module, args: Any) -> None:
                    assert rec.inside.get(id(m)), f"{type(m).__name__} ran while offload had it out"

                sub.register_forward_pre_hook(check)


def _px(images: list[Any]) -> list[np.ndarray]:
    return [np.asarray(g.image) for g in images]


@pytest.fixture(scope="module")
def plain() -> Pipeline:
    return _load()


def _edit_inputs() -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, 16:] = 255
    return picture, Image.fromarray(mask)


@pytest.mark.parametrize(("mode", "kept"), MODES)
def test_generate_is_bit_identical_and_each_model_is_in_only_while_it_runs(
    plain: Pipeline, mode: str, kept: int
) -> None:
    request = GenerationRequest("a red circle", guidance=4.0, num_images=2, **REQUEST)
    want = _px(plain.generate(request))
    pipe = _load()
    rec = watch(pipe, mode, kept)
    got = pipe.generate(request)
    for a, b in zip(want, _px(got), strict=True):
        np.testing.assert_array_equal(a, b)
    assert rec.nothing_in(), "a model was left on the execution device after generate"
    assert rec.most_groups == 1
    # One sampler run: each model comes in once (CFG's two prompts share the text encoder's turn).
    assert rec.ins(pipe.text_encoder) == rec.ins(pipe.autoencoder) == 1
    swapped = _blocks(pipe.transformer)[kept:]
    if mode == "model":
        assert rec.ins(pipe.transformer) == 1 and rec.most_blocks == len(_blocks(pipe.transformer))
    else:
        assert rec.ins(pipe.transformer) == 0, "blocks mode moved the whole transformer"
        assert rec.ins(pipe.transformer.img_in) == 1
        # euler: one batched transformer call a step, each swapped block in once a call
        assert all(rec.ins(b) == REQUEST["steps"] for b in swapped)
        assert all(rec.ins(b) == 1 for b in _blocks(pipe.transformer)[:kept])  # with the top layers
        assert rec.most_blocks == kept + 1
    # Offload changes no value, so it is not recorded: the records are the same.
    assert [g.record for g in got] == [g.record for g in plain.generate(request)]


@pytest.mark.parametrize(("mode", "kept"), MODES)
def test_edits_hires_and_reproduce_are_bit_identical_and_leave_nothing_in(
    plain: Pipeline, mode: str, kept: int, tmp_path: Path
) -> None:
    picture, mask = _edit_inputs()
    edits = [
        EditRequest(image=picture, prompt="a blue square", strength=0.6, seed=1, steps=3),  # img2img
        EditRequest(image=picture, prompt="a blue square", mask=mask, seed=1, steps=3),  # inpaint
    ]
    hires = GenerationRequest("a red star", seed=0, steps=2, hires_scale=1.5, hires_steps=2)
    pipe = _load()
    rec = watch(pipe, mode, kept)
    for edit in edits:
        before = rec.ins(pipe.autoencoder)
        np.testing.assert_array_equal(_px(plain.edit(edit)), _px(pipe.edit(edit)))
        assert rec.nothing_in()
        assert rec.ins(pipe.autoencoder) - before == 2  # encode the picture, (transformer), decode
    (first,) = pipe.generate(hires)
    np.testing.assert_array_equal(_px(plain.generate(hires))[0], np.asarray(first.image))
    assert rec.nothing_in()
    path = save_png(first.image, first.record, tmp_path / "x.png")
    again = reproduce(pipe, read_record(path))
    np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(again.image))
    assert rec.nothing_in()


def test_a_failed_run_leaves_nothing_in(plain: Pipeline) -> None:
    pipe = _load()
    rec = watch(pipe, "blocks")

    def boom(module: nn.Module, args: Any) -> None:
        raise RuntimeError("boom")

    handle = pipe.transformer.single_blocks[0].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        pipe.generate(GenerationRequest("x", **REQUEST))
    handle.remove()
    assert rec.nothing_in()  # the double block in, the top layers: all moved out again


@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_flux_layout_text_encoders(mode: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from pictor.models.text import build_text_encoder

    from tiny_text_folders import flux_text_encoders

    text = flux_text_encoders(tmp_path)  # CLIP pools 32 wide, T5 gives 32-wide tokens
    preset = get_preset("tiny")
    model = {**preset["model"], "vec_in_dim": 32, "context_in_dim": 32}
    config = BundleConfig(
        name="tiny-flux-text",
        model=model,
        autoencoder=preset["autoencoder"],
        text_encoder=text,
        defaults=preset["defaults"],
        trained=True,
    )

    def make() -> Pipeline:
        torch.manual_seed(0)
        flux, ae = (
            Flux(FluxParams.from_dict(model)),
            AutoEncoder(AutoEncoderParams.from_dict(config.autoencoder)),
        )
        return Pipeline(flux, ae, build_text_encoder(text), config, device="cpu", dtype=torch.float32)

    request = GenerationRequest("blue circle", guidance=3.0, **REQUEST)
    want = _px(make().generate(request))
    pipe = make()
    rec = watch(pipe, mode)
    np.testing.assert_array_equal(want, _px(pipe.generate(request)))
    assert rec.ins(pipe.text_encoder) == 1 and rec.nothing_in()


def test_fp8_weights_stay_fp8_through_block_swaps() -> None:
    def make(offload: str | None) -> Pipeline:
        cfg, flux, ae = tiny_models("tiny-fp8", trained=True)
        assert store_fp8(flux, torch.float8_e4m3fn) > 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Pipeline(flux, ae, _load().text_encoder, cfg, device="cpu", offload=offload)

    request = GenerationRequest("a red circle", **REQUEST)
    want = _px(make(None).generate(request))
    pipe = make("blocks")
    np.testing.assert_array_equal(want, _px(pipe.generate(request)))
    stored = [m for m in pipe.transformer.modules() if isinstance(m, StoredLinear)]
    assert stored and all(m.weight.dtype == torch.float8_e4m3fn for m in stored)
    assert pipe.weight_dtype == "float8_e4m3fn"


def test_turning_offload_off_removes_its_hooks(plain: Pipeline) -> None:
    pipe = _load()
    rec = Recorder(pipe)
    with pytest.warns(PictorWarning):
        pipe.set_offload("blocks", mover=rec)
    pipe.set_offload(None)
    moves = len(rec.moves)
    request = GenerationRequest("a red circle", **REQUEST)
    np.testing.assert_array_equal(_px(plain.generate(request)), _px(pipe.generate(request)))
    assert len(rec.moves) == moves and pipe.offload is None


def test_a_lora_added_under_offload_is_moved_with_its_block(plain: Pipeline, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    rank, hidden = 2, plain.transformer.hidden_size
    torch.manual_seed(3)
    path = tmp_path / "l.safetensors"
    save_file(
        {
            "double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(rank, hidden),
            "double_blocks.0.img_attn.proj.lora_B.weight": torch.randn(hidden, rank),
        },
        path,
    )
    request = GenerationRequest("a red circle", **REQUEST)
    base = _load()
    base.add_lora(path)
    pipe = _load()
    rec = watch(pipe, "blocks")
    pipe.add_lora(path)
    # hooks on the LoRA's own layers were added after the checking hooks: check by the record instead
    np.testing.assert_array_equal(_px(base.generate(request)), _px(pipe.generate(request)))
    assert rec.ins(pipe.transformer.double_blocks[0]) == REQUEST["steps"] and rec.nothing_in()


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="offload must be one of 'model', 'blocks' or None, got 'gpu'"):
        pictor.load("tiny", device="cpu", offload="gpu")
    with pytest.raises(ValueError, match="blocks_on_device keeps blocks of offload='blocks'"):
        pictor.load("tiny", device="cpu", offload="model", blocks_on_device=2)
    with pytest.raises(ValueError, match="whole number >= 0"):
        Offload("blocks", "cpu", blocks_on_device=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = _load()
    with pytest.raises(ValueError, match="offload must be one of"):
        pipe.set_offload("sequential")
    assert pipe.offload is None and pipe._offload is None
    with pytest.warns(PictorWarning, match="does nothing on a CPU run"):
        pipe.set_offload("model")


def test_offload_scheduling_without_a_pipeline() -> None:
    """The scheduler alone on two toy groups: activation order, argument moves, release."""
    log: list[tuple[str, bool]] = []
    names: dict[int, str] = {}

    def mover(module: nn.Module, device: torch.device, inward: bool) -> None:
        log.append((names[id(module)], inward))

    a, b = nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    names.update({id(a): "a", id(b): "b"})
    off = Offload("model", "cpu", mover=mover)
    off.attach({"a": [a], "b": [b], "empty": []})
    assert log == [("a", False), ("b", False)] and "empty" not in off.groups
    log.clear()
    x = torch.ones(1, 2)
    b(a(x))
    a(x)
    assert log == [("a", True), ("a", False), ("b", True), ("b", False), ("a", True)]
    off.release()
    assert log[-1] == ("a", False) and off.resident is None
    off.detach()
    log.clear()
    a(x)
    assert log == []
    with pytest.raises(ValueError, match="groups 'a' and 'b'"):
        off.attach({"a": [b], "b": [b[0]]})


def test_entry_modules_move_their_arguments_in() -> None:
    """Callers that place inputs on a model's parameter device (read while it was out) still reach the
    execution device: the group's root and its children move tensor arguments in; deeper modules do not
    (their inputs come from inside the model). "meta" stands in for a second device."""
    seen: dict[str, torch.device] = {}

    class Probe(nn.Module):
        def __init__(self, name: str, inner: nn.Module | None = None) -> None:
            super().__init__()
            self.name, self.inner = name, inner

        def forward(self, x: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
            seen[self.name] = y.device
            return self.inner(x, y=torch.ones(1)) if self.inner is not None else x

    root = Probe("root", Probe("child", Probe("grandchild")))
    off = Offload("model", "meta", mover=lambda module, device, inward: None)
    off.attach({"g": [root]})
    out = root(torch.ones(1), y=torch.ones(1))
    assert out.device.type == "meta" and seen["root"].type == "meta" and seen["child"].type == "meta"
    assert seen["grandchild"].type == "cpu"


def copying_mover(module: nn.Module, device: torch.device, inward: bool) -> None:
    """What a real move between devices does and a CPU-to-CPU `.to` does not: new tensors every time."""
    module._apply(lambda t: t.clone())


@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_moves_that_copy_give_the_same_pixels_and_ordinary_weights(plain: Pipeline, mode: str) -> None:
    """Every move makes new tensors, as on a GPU: no one may hold on to an old one, and weights moved during
    the sampler's inference mode must not become inference tensors (a later in-place change would fail)."""
    request = GenerationRequest("a red circle", guidance=4.0, **REQUEST)
    pipe = _load()
    with pytest.warns(PictorWarning):
        pipe.set_offload(mode, mover=copying_mover)
    np.testing.assert_array_equal(_px(plain.generate(request)), _px(pipe.generate(request)))
    for group in offload_groups(pipe).values():
        for module in group:
            assert not any(t.is_inference() for t in [*module.parameters(), *module.buffers()])
    with torch.no_grad():
        pipe.transformer.double_blocks[0].img_attn.proj.weight.mul_(1.0)  # fails on an inference tensor


def test_gguf_weights_keep_their_format_through_a_move() -> None:
    """A move may put new Parameters in place (torch's overwrite-on-conversion setting, on by default for
    some tensor kinds): the default mover goes through `place`, which tags GGML weights again."""
    from pictor.models.weight_storage import QuantizedLinear, is_quantized

    layer = QuantizedLinear(64, 4, True, "Q8_0")
    before = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        move_module(layer, torch.device("cpu"), True)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(before)
    assert is_quantized(layer.weight) and layer.weight.dtype == torch.uint8
