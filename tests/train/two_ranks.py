"""The adapter stages' torchrun check: the same run on 2 CPU ranks (gloo) and on one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pictor.train.logs import read_jsonl


def train_on_two_ranks(stage: str, base: Path, data: Path, out: Path, *extra: str) -> None:
    """`pictor train STAGE` under torchrun, 2 ranks x batch 2, 6 steps at lr 3e-3 on 16x16 images (what the
    tests' one-process runs do with batch 4); fails the test with the ranks' stderr if it fails."""
    flags = ["--base", str(base), "--data", str(data), "--out", str(out)]
    flags += ["--image-size", "16", "--batch-size", "2", "--max-steps", "6", "--lr", "3e-3"]
    flags += ["--warmup-steps", "2", "--save-every", "0", "--sample-every", "0", "--eval-every", "0"]
    flags += ["--no-progress", "--device", "cpu", *extra]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [*torchrun, "-m", "pictor.cli", "train", stage, *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_ranks_follow_one_process(out: Path, single: Path) -> None:
    """2 ranks x batch 2 (run `out`) kept identical weights and followed the loss curve of 1 process x
    batch 4 (run `single`)."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4
    a, b = summary["weights_sha256_per_rank"]
    assert a == b  # the ranks' trained weights stayed identical
    ddp = [r["loss"] for r in read_jsonl(out / "log.jsonl")]
    assert ddp == pytest.approx([r["loss"] for r in read_jsonl(single / "log.jsonl")], rel=1e-3)
