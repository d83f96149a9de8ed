"""Optimizer and learning-rate schedule (the EMA weights are `pictor.train.ema`).

The schedule is a pure function of the step (no stateful scheduler object to save and restore): linear
warm-up from 0 to the peak over `warmup_steps`, then constant, or a cosine decay to `min_lr_ratio * lr`
at `max_steps`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pictor.train.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (1-based: the first update uses lr_at(1))."""
    assert cfg.lr is not None
    warm = min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.lr_schedule == "constant":
        return cfg.lr * warm
    # Cosine over the steps after warm-up, so the peak is reached and then decays to the floor.
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    floor = cfg.min_lr_ratio
    return cfg.lr * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def schedule_state(step: int, cfg: TrainConfig) -> dict[str, float | int | str]:
    """What a scheduler object would save; the schedule itself is recomputed from the config."""
    return {
        "kind": cfg.lr_schedule,
        "base_lr": float(cfg.lr or 0.0),
        "warmup_steps": cfg.warmup_steps,
        "max_steps": cfg.max_steps,
        "min_lr_ratio": cfg.min_lr_ratio,
        "last_step": step,
        "last_lr": lr_at(step, cfg) if step > 0 else 0.0,
    }


# The names a LoRA's B ("up") matrices end with: pictor's own adapters, and kohya's / LyCORIS' layout
UP_MATRICES = ("lora_B.weight", "lora_up.weight")


def param_groups(model: nn.Module, weight_decay: float, up_ratio: float | None = None) -> list[dict]:
    """Decay matrices only: biases, norm gains and 1-D parameters keep their scale (nanoGPT's split).
    With `up_ratio` (LoRA+, Hayou et al. 2024; kohya's loraplus_lr_ratio) a LoRA's B matrices are a group
    of their own whose learning rate is the schedule's times the ratio ("lr_scale", which `set_lr` reads)."""
    decay, up, no_decay = [], [], []
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            no_decay.append(p)
        elif up_ratio is not None and name.endswith(UP_MATRICES):
            up.append(p)
        else:
            decay.append(p)
    groups: list[dict] = [{"params": decay, "weight_decay": weight_decay}]
    if up_ratio is not None:
        groups.append({"params": up, "weight_decay": weight_decay, "lr_scale": float(up_ratio)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (the default), Adafactor (factored second moments and no momentum: far less state, for full
    fine-tunes of large models; --lr is its step size) or Prodigy (D-Adaptation: it estimates the step
    size itself, `--lr` scales it, 1.0 by default; the usual LoRA choice in kohya's scripts). All take the
    same LR schedule and weight decay."""
    assert cfg.betas is not None and cfg.weight_decay is not None
    groups = param_groups(model, cfg.weight_decay, cfg.loraplus_lr_ratio)
    if cfg.optimizer == "adafactor":
        # transformers' Adafactor with absolute steps, as kohya runs it (scale_parameter, relative_step and
        # warmup_init off): --lr is the step size, as for AdamW. torch's own Adafactor always scales its
        # step by each parameter's RMS (at least 1e-3), so zero-initialised layers (LoRA's B, adaLN-Zero)
        # would barely move.
        from transformers.optimization import Adafactor

        return Adafactor(
            groups, lr=lr_at(1, cfg), scale_parameter=False, relative_step=False, warmup_init=False
        )
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as exc:
            raise ImportError(
                "--optimizer prodigy needs the prodigyopt package: pip install 'pictor[prodigy]' (or "
                "prodigyopt)"
            ) from exc
        # The Prodigy authors' advice for diffusion: decoupled decay, bias correction, and the safeguard
        # whenever a warm-up runs.
        return Prodigy(
            groups,
            lr=lr_at(1, cfg),
            betas=(float(cfg.betas[0]), float(cfg.betas[1])),
            eps=cfg.eps,
            decouple=True,
            use_bias_correction=True,
            safeguard_warmup=cfg.warmup_steps > 0,
        )
    # foreach is deterministic and fast on both CPU and CUDA; fused would differ between devices.
    return torch.optim.AdamW(
        groups,
        lr=lr_at(1, cfg),
        betas=(float(cfg.betas[0]), float(cfg.betas[1])),
        eps=cfg.eps,
        foreach=True,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # LoRA+'s B matrices: the schedule's times the ratio
