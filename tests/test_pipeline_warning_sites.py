"""The warnings a Pipeline method raises for its caller name the caller's line (stacklevel counts frames).

`resolve_edit`, `set_layout_adapter` and `set_reference_adapter` live in modules of their own and are bound
onto `Pipeline` as they are (`pictor.pipeline`): a wrapper method would add a frame, and these warnings
would name the wrapper's line in pictor instead of the code that called it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pictor.editing import EditRequest
from pictor.loading import pipeline_from_preset
from pictor.notices import PictorWarning
from pictor.pipeline import GenerationRequest, Pipeline
from tests import test_layout_generation, test_reference_generation

pytestmark = pytest.mark.filterwarnings("ignore:model 'tiny:UserWarning")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return pipeline_from_preset("tiny", device="cpu")


def _long(pipe: Pipeline) -> str:
    return " ".join(["a red circle"] * pipe.text_encoder.max_length) + " and a green star"


def _sites(caught: pytest.WarningsRecorder, match: str) -> list[str]:
    return [w.filename for w in caught if match in str(w.message)]


def test_an_adapter_from_another_model_is_warned_about_at_the_callers_line(
    pipe: Pipeline, tmp_path: Path
) -> None:
    for tests, load in (
        (test_layout_generation, pipe.set_layout_adapter),
        (test_reference_generation, pipe.set_reference_adapter),
    ):
        path = tests._save(tests._adapter(pipe), tmp_path / f"{tests.__name__}.safetensors", "0" * 64)
        with pytest.warns(UserWarning, match="not on this one") as caught:
            load(path)
        assert _sites(caught, "not on this one") == [__file__]


def test_a_long_prompt_is_warned_about_at_the_line_that_resolves_it(pipe: Pipeline) -> None:
    picture = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    with pytest.warns(PictorWarning, match="longer than") as caught:
        pipe.resolve_edit(EditRequest(picture, _long(pipe), seed=1, steps=1, strength=0.5))
    assert _sites(caught, "longer than") == [__file__]
    with pytest.warns(PictorWarning, match="longer than") as caught:
        pipe.generate(GenerationRequest(_long(pipe), seed=1, steps=1, width=32, height=32))
    assert _sites(caught, "longer than") == [__file__]
