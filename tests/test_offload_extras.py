"""CPU offload with the extras a pipeline holds: a ControlNet shares the transformer's turn (it runs on
every step beside it), FLUX.1's CLIP + T5 text encoders come in as one group. Same pixels as without
offload; scheduling checked with `test_offload.Recorder`."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_controlnet_pipeline import _controlnet, _pipeline
from test_offload import Recorder, check_forwards

from pictor.notices import PictorWarning
from pictor.pipeline import GenerationRequest, Pipeline

pytest.importorskip("diffusers")


@pytest.mark.parametrize(("mode", "kept"), [("model", 0), ("blocks", 2)])
def test_a_controlnet_comes_in_with_the_transformer_and_pixels_stay_the_same(
    mode: str, kept: int, tmp_path: Path
) -> None:
    net = _controlnet(tmp_path, "instantx", 1)
    rng = np.random.default_rng(0)
    control = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    request = GenerationRequest(
        "a red circle", width=32, height=32, steps=3, seed=2, controlnet_images=[control]
    )
    plain = _pipeline(tmp_path / "text")
    plain.add_controlnet(net)
    want = np.asarray(plain.generate(request)[0].image)

    pipe = _pipeline(tmp_path / "text")
    rec = Recorder(pipe, kept)
    with pytest.warns(PictorWarning, match="does nothing on a CPU run"):
        pipe.set_offload(mode, kept, mover=rec)
    pipe.add_controlnet(net)  # loaded under offload: into CPU memory, hooked by the resync
    assert not rec.is_in(pipe.controlnets[0].model)
    check_forwards(pipe, rec)
    got = np.asarray(pipe.generate(request)[0].image)
    np.testing.assert_array_equal(want, got)
    model = pipe.controlnets[0].model
    assert rec.ins(model) == 1, "the ControlNet was moved in more than once a run: it left with a step"
    assert rec.ins(pipe.text_encoder) == 1  # CLIP and T5 as one group
    if mode == "model":
        assert rec.ins(pipe.transformer) == 1
    assert rec.nothing_in()


@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_a_reference_adapter_is_a_group_of_its_own(mode: str, tmp_path: Path) -> None:
    """The reference adapter runs once before sampling, on latents the autoencoder encodes: each comes in
    once, and the pixels are the same as without offload."""
    from test_reference_generation import _adapter, _picture, _save

    from pictor.loading import pipeline_from_preset

    def make() -> Pipeline:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pipeline_from_preset("tiny", device="cpu")

    plain = make()
    path = _save(_adapter(plain), tmp_path / "reference.safetensors", plain.hash)
    plain.set_reference_adapter(path)
    request = GenerationRequest("a red circle", seed=5, steps=3, width=32, height=32, reference=_picture())
    want = np.asarray(plain.generate(request)[0].image)
    pipe = make()
    rec = Recorder(pipe)
    with pytest.warns(PictorWarning):
        pipe.set_offload(mode, mover=rec)
    pipe.set_reference_adapter(path)
    check_forwards(pipe, rec)
    np.testing.assert_array_equal(want, np.asarray(pipe.generate(request)[0].image))
    assert pipe.reference_adapter is not None and rec.ins(pipe.reference_adapter) == 1
    assert rec.ins(pipe.autoencoder) == 2 and rec.nothing_in()
