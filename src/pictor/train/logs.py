"""Run logs: one JSON line per optimizer step (log.jsonl), evals (eval.jsonl), TensorBoard scalars (tb/)
and a tqdm bar. Only rank 0 writes.

On resume the JSONL files are cut back to the checkpoint's step, so the log always reads as one run: the
steps a killed run did after its last checkpoint are done again and logged once.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from pictor.train.state import write_text_atomic


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the records with step <= max_step; drop any torn last line a SIGKILL left."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= max_step:
            kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; write them as strings so the file stays valid JSON for every reader.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoard:
    """torch.utils.tensorboard when the `tensorboard` package is installed; one warning and no-ops if not."""

    def __init__(self, folder: Path) -> None:
        self._writer: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            # stderr, not warnings.warn: the CLI silences UserWarnings, and this one should be seen.
            print(
                "pictor train: warning: tensorboard is not installed, so no TensorBoard scalars "
                "(log.jsonl has every number); `pip install tensorboard` to get them",
                file=sys.stderr,
            )
            return
        self._writer = SummaryWriter(log_dir=str(folder))

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        if self._writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and key not in ("step", "time"):
                self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


class Progress:
    """tqdm bar over optimizer steps with the loss; tqdm itself shows it/s and the ETA."""

    def __init__(self, start: int, total: int, enabled: bool, desc: str) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=start, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True
            )

    def update(self, loss: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class RunLog:
    """Everything rank 0 writes while training, in one place."""

    def __init__(self, out: Path, start_step: int, total: int, progress: bool, desc: str) -> None:
        out.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(out / "log.jsonl", start_step)
        truncate_jsonl(out / "eval.jsonl", start_step)
        self.steps = JsonlWriter(out / "log.jsonl")
        self.evals = JsonlWriter(out / "eval.jsonl")
        self.tb = TensorBoard(out / "tb")
        self.bar = Progress(start_step, total, progress, desc)

    def step(self, record: dict[str, Any]) -> None:
        self.steps.write(record)
        self.tb.scalars(int(record["step"]), record)
        self.bar.update(float(record["loss"]))

    def eval(self, record: dict[str, Any]) -> None:
        self.evals.write(record)
        flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        flat.update({f"tag_{k}": v for k, v in record.get("per_tag", {}).items()})
        self.tb.scalars(int(record["step"]), flat, prefix="eval")

    def close(self) -> None:
        self.bar.close()
        self.steps.close()
        self.evals.close()
        self.tb.close()
