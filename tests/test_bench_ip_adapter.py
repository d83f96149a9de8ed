"""benchmarks/bench_ip_adapter.py: pictor's and diffusers' IP-Adapter steps at a tiny size, as JSON.

Only the report's shape and the two sides' agreement are asserted; wall-clock numbers never are (2 shared
CPU cores), only that each is a positive number."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ip_adapter.py"
SIDES, VARIANTS = ("pictor", "diffusers"), ("plain", "ip_adapter")


def _run(tmp_path: Path, *extra: str) -> tuple[dict, dict]:
    """The script at --size tiny: (the JSON it printed, the JSON it wrote with --out)."""
    out = tmp_path / "ip.json"
    args = ["--size", "tiny", "--rounds", "1", "--threads", "1", "--out", str(out), *extra]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), json.loads(out.read_text())


def test_every_field_and_the_two_sides_agree(tmp_path: Path) -> None:
    printed, written = _run(tmp_path, "--batch", "2", "--scale", "0.7")
    assert printed == written
    config = printed["config"]
    assert config["batch"] == 2 and config["size"] == "tiny" and config["rounds"] == 1
    assert config["ip_adapter"] | {"weights_gib": None} == {
        "image_dim": 12,
        "context_dim": 32,
        "hidden_size": 32,
        "num_tokens": 4,
        "double_blocks": 2,
        "weights_gib": None,
        "scale": 0.7,
    }
    assert config["tokens"] == {"image": 16, "text": 8, "picture": 4}  # 64 px -> 8x8 latent -> 4x4 tokens
    for side in SIDES:
        assert set(printed["seconds_per_step"][side]) == set(VARIANTS)
        assert all(t > 0 for t in printed["seconds_per_step"][side].values())
        assert set(printed["ip_overhead"][side]) == {"seconds", "ratio"}
        assert printed["ip_overhead"][side]["ratio"] > 0
    assert printed["ip_attention_seconds"] > 0
    assert set(printed["pictor_vs_diffusers_step_ratio"]) == set(VARIANTS)
    assert "memory" not in printed  # peak memory is a CUDA-only number
    assert printed["device"] == "cpu" and printed["torch"] and printed["diffusers"]
    # same weights, same inputs, float32: the two sides compute the same velocities, with and without picture
    assert printed["finite"]
    assert printed["max_abs_diff"]["plain"] < 1e-4
    assert printed["max_abs_diff"]["ip_adapter"] < 1e-4
    # ...and the picture moves the velocity far more than the two sides differ
    assert printed["ip_effect"] > 0.05 * printed["velocity_max_abs"]
    assert printed["ip_effect"] > 1e3 * printed["max_abs_diff"]["ip_adapter"]


def test_scale_zero_leaves_the_velocity_alone(tmp_path: Path) -> None:
    """ip_effect measures the adapter: with its scale at 0 the picture adds exactly nothing."""
    printed, _ = _run(tmp_path, "--scale", "0")
    assert printed["ip_effect"] == 0
    assert printed["max_abs_diff"]["ip_adapter"] < 1e-4
