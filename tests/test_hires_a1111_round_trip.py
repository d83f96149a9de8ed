"""A hires image's A1111 text alone brings back its pixels: pictor writes its hires strength (the noise level
its second pass starts at) as "Denoising strength" and reads it back as that, with the hires scale and steps.

(A1111 and Forge read "Denoising strength" d otherwise: their hires pass runs the last N of int(N / d) steps,
so on a shifted flow schedule it starts above d; pictor's text is pictor's own meaning.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pictor.cli import main
from pictor.provenance import read_record, read_text_chunks
from tests.test_settings_import import _only_parameters, _pixels


def test_a_hires_image_is_made_again_from_its_a1111_text_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", "a red circle", "--model", "tiny", "--steps", "2", "--seed", "3", "--size", "32x32"]
    args += ["--hires", "2", "--hires-strength", "0.55", "--hires-steps", "3"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    first = Path(capsys.readouterr().out.split()[0])
    text = read_text_chunks(first)["parameters"]
    assert "Hires upscale: 2, Hires steps: 3, Hires upscaler: Lanczos, Denoising strength: 0.55" in text
    foreign = _only_parameters(first, tmp_path / "foreign.png")
    settings = ["generate", "--settings-from", str(foreign), "--model", "tiny", "-o", str(tmp_path / "b")]
    assert main(settings) == 0
    again = Path(capsys.readouterr().out.split()[0])
    hires = read_record(again)["hires"]
    assert (hires["scale"], hires["strength"], hires["steps"]) == (2.0, 0.55, 3)
    np.testing.assert_array_equal(_pixels(again), _pixels(first))
