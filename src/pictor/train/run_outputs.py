"""What a training run writes into its folder (`--out`): checkpoints (`pictor.train.state` lays them out),
sample grids, the final weights and the summary. Rank 0 writes; every rank takes part in the gathers
and barriers around the writing (`pictor.train.distributed`).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pictor.checkpoint import replace_dir, state_dict_hash, write_json
from pictor.train import distributed
from pictor.train.optim import schedule_state
from pictor.train.state import optimizer_to_flat, step_name, write_checkpoint

if TYPE_CHECKING:
    from pictor.train.loop import Trainer

__all__ = ["FINAL", "SUMMARY", "samples", "save", "write_final", "write_summary"]

FINAL = "final"
SUMMARY = "summary.json"


def save(trainer: Trainer) -> Path | None:
    """Checkpoint this step (rank 0 writes; every rank waits so none runs ahead of a half-written one)."""
    path = trainer.out / "checkpoints" / step_name(trainer.step)
    distributed.barrier(trainer.info)
    # Rank 0's answer for all: ranks on other machines may not see its folders.
    here = torch.tensor([float(path.is_dir())], device=trainer.device)
    exists = bool(distributed.broadcast(here, trainer.info).item())
    if not exists:  # every rank gathers (FSDP shards: collectives); rank 0 keeps and writes
        main = trainer.info.is_main
        weights = distributed.full_state(trainer.model, keep=main)
        optimizer_state = optimizer_to_flat(trainer.optimizer, trainer.model, keep=main)
        with trainer.ema.whole(keep=main) as ema:
            if ema is not None:
                _write_checkpoint(trainer, ema, weights, optimizer_state)
    distributed.barrier(trainer.info)
    return path if trainer.info.is_main else None


def _write_checkpoint(
    trainer: Trainer, ema: nn.Module, weights: dict[str, Any], optimizer_state: dict[str, Any]
) -> None:
    cfg = trainer.cfg
    state: dict[str, Any] = {
        "step": trainer.step,
        "data_position": trainer.position,
        "data": trainer.data_print,
        "world_size": trainer.info.world_size,
        "precision": trainer.stage.precision,
        "elapsed": trainer.elapsed,
        "config": cfg.to_dict(),
        "scheduler": schedule_state(trainer.step, cfg),
        "ema": {"decay": trainer.ema.decay, "warmup": trainer.ema.warmup},
        "stage": trainer.stage.state(),
    }
    write_checkpoint(
        trainer.out,
        trainer.step,
        lambda folder: trainer.stage.write_weights(folder, ema, trainer.step),
        weights,
        optimizer_state,
        state,
        cfg.keep,
    )


def samples(trainer: Trainer, ema: nn.Module) -> Path:
    folder = trainer.out / "samples"
    folder.mkdir(exist_ok=True)
    path = folder / f"{step_name(trainer.step)}.png"
    trainer.stage.sample_grid(ema).save(path)
    return path


def write_final(trainer: Trainer, ema: nn.Module | None) -> Path:
    final = trainer.out / FINAL
    distributed.barrier(trainer.info)
    if ema is not None:  # rank 0
        tmp = trainer.out / f".{FINAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.stage.write_weights(tmp, ema, trainer.step)
        replace_dir(tmp, final)
        # A stage may hand out one file instead of the folder (OUT/lora.safetensors, OUT/layout...).
        publish = getattr(trainer.stage, "publish", None)
        if publish is not None:
            final = publish(final)
    distributed.barrier(trainer.info)
    return final


def write_summary(trainer: Trainer, loss: float, stopped_by: str, ema: nn.Module | None) -> None:
    """Per-rank checksums of the raw weights: DDP ranks must hold identical models; FSDP ranks hold
    their own shards."""
    digest = state_dict_hash(distributed.local_state(trainer.model))
    local = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=trainer.device)
    sums = [bytes(t.cpu().tolist()).hex() for t in distributed.gather(local, trainer.info)]
    if ema is not None:  # rank 0
        write_json(
            {
                "step": trainer.step,
                "stage": trainer.cfg.stage,
                "loss": loss if math.isfinite(loss) else None,  # None: a resume with no steps left
                "world_size": trainer.info.world_size,
                "precision": trainer.stage.precision,
                "fsdp": trainer.cfg.fsdp,
                "global_batch": trainer.cfg.global_batch(trainer.info.world_size),
                "resumed_from": trainer.resumed_from,
                "stopped_by": stopped_by,  # max_steps, or max_minutes (then --resume continues)
                "final": FINAL,
                "weights_sha256_per_rank": sums,
                "ema_sha256": state_dict_hash(ema.state_dict()),
            },
            trainer.out / SUMMARY,
        )
