"""`--offload` and `--blocks-on-device` on the command line: they reach `pictor.load`, change no pixel,
and a block count without block offload is an error naming both flags (tests/test_offload.py: offload)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import pictor.loading
from pictor.cli import main


def test_offload_flags_reach_the_loader_and_give_the_same_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[dict[str, Any]] = []
    real = pictor.loading.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pictor.loading, "load", spy)
    base = ["generate", "a red circle", "--seed", "3", "--steps", "3", "-n", "2", "--device", "cpu"]
    assert main([*base, "-o", str(tmp_path / "plain")]) == 0
    assert (
        main([*base, "-o", str(tmp_path / "blocks"), "--offload", "blocks", "--blocks-on-device", "1"]) == 0
    )
    assert "does nothing on a CPU run" in capsys.readouterr().err  # said, not silent
    assert main(["edit", str(tmp_path / "plain" / "00000-3.png"), "a blue circle", "--steps", "3",
                 "--device", "cpu", "--offload", "model", "-o", str(tmp_path / "edit")]) == 0  # fmt: skip
    assert [(c.get("offload"), c.get("blocks_on_device")) for c in calls] == [
        (None, 0),
        ("blocks", 1),
        ("model", 0),
    ]
    for name in ("00000-3.png", "00001-4.png"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "blocks" / name).read_bytes()


def test_a_block_count_without_block_offload_is_refused_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model must not load")

    monkeypatch.setattr(pictor.loading, "load", never)
    out = str(tmp_path / "o")
    assert main(["generate", "x", "--offload", "model", "--blocks-on-device", "2", "-o", out]) == 2
    assert "--blocks-on-device 2 keeps blocks of --offload blocks" in capsys.readouterr().err
    for flags, said in (
        (["--blocks-on-device", "-1"], "expected a whole number >= 0, got '-1'"),
        (["--offload", "disk"], "invalid choice: 'disk'"),
    ):
        with pytest.raises(SystemExit) as stop:  # argparse's own usage error
            main(["generate", "x", *flags, "-o", out])
        assert stop.value.code == 2 and said in capsys.readouterr().err
