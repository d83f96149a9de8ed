"""`pictor train autoencoder|t2i|lora|layout|reference|controlnet ...`: arguments -> TrainConfig -> `train()`.

Precedence: command-line flags > --config FILE > --preset and the stage defaults. With --resume the
config stored in the newest checkpoint takes the place of --config, so `pictor train t2i --out DIR
--resume` needs nothing else; flags given with it still win (e.g. a larger --max-steps).

The flags themselves (the argparse subparser and its help): :mod:`pictor.train.command_flags`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from pictor.train.config import (
    TRAJECTORY_KEYS,
    ConfigError,
    TrainConfig,
    data_path,
    resume_refusal,
)

# flag dest -> TrainConfig field (flags whose value is None were not given)
_FIELDS = {
    "data": "data",
    "preset": "preset",
    "autoencoder": "autoencoder_path",
    "init": "init",
    "image_size": "image_size",
    "seed": "seed",
    "max_steps": "max_steps",
    "batch_size": "batch_size",
    "grad_accum": "grad_accum",
    "lr": "lr",
    "optimizer": "optimizer",
    "lr_schedule": "lr_schedule",
    "warmup_steps": "warmup_steps",
    "grad_clip": "grad_clip",
    "ema_decay": "ema_decay",
    "caption_dropout": "caption_dropout",
    "kl_weight": "kl_weight",
    "save_every": "save_every",
    "keep": "keep",
    "sample_every": "sample_every",
    "sample_steps": "sample_steps",
    "sample_guidance": "sample_guidance",
    "eval_every": "eval_every",
    "eval_prompts": "eval_prompts",
    "eval_images": "eval_images_per_prompt",
    "device": "device",
    "max_minutes": "max_minutes",
    "num_workers": "num_workers",
    "mixed_precision": "mixed_precision",
    "base": "base",
    "rank": "lora_rank",
    "alpha": "lora_alpha",
    "targets": "lora_targets",
    "lora_dropout": "lora_dropout",
    "rank_dropout": "rank_dropout",
    "module_dropout": "module_dropout",
    "scale_weight_norms": "scale_weight_norms",
    "lora_init": "lora_init",
    "loraplus_lr_ratio": "loraplus_lr_ratio",
    "lora_algo": "lora_algo",
    "lokr_factor": "lokr_factor",
    "controlnet_blocks": "controlnet_blocks",
    "control": "control",
    "control_dir": "control_dir",
    "timestep_sampling": "timestep_sampling",
    "loss_type": "loss_type",
    "huber_c": "huber_c",
    "huber_schedule": "huber_schedule",
    "huber_scale": "huber_scale",
    "timestep_shift": "timestep_shift",
    "guidance_scale": "guidance_scale",
    "keep_tokens": "keep_tokens",
    "caption_tag_dropout": "caption_tag_dropout",
    "caption_ext": "caption_ext",
    "validation_split": "validation_split",
    "latent_cache": "latent_cache_dir",
    "max_epochs": "max_epochs",
    "save_every_epochs": "save_every_epochs",
}
# on/off flag dest -> TrainConfig field it turns on
_SWITCHES = {
    "compile": "compile",
    "gradient_checkpointing": "gradient_checkpointing",
    "fp8_base": "fp8_base",
    "dora": "lora_dora",
    "fsdp": "fsdp",
    "flip_aug": "flip_aug",
    "shuffle_caption": "caption_shuffle",
    "buckets": "buckets",
    "folder_repeats": "folder_repeats",
    "alpha_mask": "alpha_mask",
    "cache_latents": "cache_latents",
}


def _note(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pictor train: {message}", file=sys.stderr)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides: dict[str, Any] = {
        field: getattr(args, dest) for dest, field in _FIELDS.items() if getattr(args, dest) is not None
    }
    if "data" in overrides:
        overrides["data"] = data_path(overrides["data"])  # as the run stores it, to compare on resume
    if args.sample_prompts is not None:  # absolute, so that a resume from elsewhere finds it
        overrides["sample_prompts"] = str(Path(args.sample_prompts).resolve())
    if args.mask_dir is not None:  # absolute too; its masks are data
        overrides["mask_dir"] = str(Path(args.mask_dir).resolve())
    if args.lora_init is not None:  # absolute too, as the run records where it started from
        overrides["lora_init"] = str(Path(args.lora_init).resolve())
    if args.control_dir is not None:  # absolute too; and its pictures are what the ControlNet follows
        overrides["control_dir"] = str(Path(args.control_dir).resolve())
        overrides.setdefault("control", "folder")
    overrides.update({field: True for dest, field in _SWITCHES.items() if getattr(args, dest)})
    for steps, epochs in (("max_steps", "max_epochs"), ("save_every", "save_every_epochs")):
        if steps in overrides and epochs in overrides:
            raise ConfigError(
                f"--{steps.replace('_', '-')} or --{epochs.replace('_', '-')}: give one of them"
            )
        if steps in overrides:  # a count in steps replaces one in epochs (a resumed run's too)
            overrides[epochs] = None
    if args.no_progress:
        overrides["progress"] = False
    from pictor.train.state import STATE_FILE, find_latest  # torch-importing; the CLI loads this lazily

    latest = find_latest(Path(args.out)) if args.resume else None
    if latest is not None:
        try:
            state = json.loads((latest / STATE_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{latest / STATE_FILE}: not valid JSON ({exc.msg}); the checkpoint is damaged: move it "
                "away to resume from the one before"
            ) from None
        saved = TrainConfig.from_dict(state["config"], str(latest))
        if saved.stage != args.stage:
            raise ConfigError(f"{args.out} holds a '{saved.stage}' run; cannot resume it as '{args.stage}'")
        # A run from before --data was stored whole holds it as typed: compare the folders named.
        saved = dataclasses.replace(saved, data=data_path(saved.data))
        # What fixes a LoRA run's adapters cannot change (pictor.train.lora checks it too, for the API).
        refusal = resume_refusal(saved, overrides, str(latest))
        if refusal:
            raise ConfigError(refusal)
        changed = [k for k in TRAJECTORY_KEYS if k in overrides and overrides[k] != getattr(saved, k)]
        if changed:
            _note(
                f"warning: resuming with changed {changed}: the loss curve will differ from the original run"
            )
        # A time budget belongs to one invocation: a resumed run does not inherit the last one's.
        # Nor sharding: a checkpoint is whole, so it resumes with or without --fsdp.
        cfg = dataclasses.replace(saved, out=args.out, **{"max_minutes": None, "fsdp": False, **overrides})
        _note(f"resuming from {latest}")
        if cfg.max_epochs is None and int(state.get("step", 0)) >= cfg.max_steps:
            _note(
                f"{args.out} is already at step {state.get('step')} of --max-steps {cfg.max_steps}: nothing "
                "to train (raise --max-steps to go on); final/ is written from the last checkpoint"
            )
        return cfg
    if args.resume:
        _note(f"--resume: no checkpoint in {args.out} yet, starting a new run")
    if args.config:
        return TrainConfig.from_json(args.config, stage=args.stage, out=args.out, **overrides)
    return TrainConfig(stage=args.stage, out=args.out, **overrides)


def run_train(args: argparse.Namespace) -> int:
    from pictor.train.loop import train

    cfg = config_from_args(args)
    result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.final)
    return 0
