"""What `--resume` may change and what it may not: the settings fixed by a run's checkpoint (its
optimizer state, a LoRA run's adapter shapes, a ControlNet's blocks), the message that refuses a change of
them, and the settings whose change is allowed but alters the loss curve (TRAJECTORY_KEYS).

Separate from `pictor.train.config` because these are rules between two configs, a saved one and a new
one, rather than the settings of one run; `pictor.train.command` applies them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pictor.train.config import TrainConfig

# What fixes a LoRA run's adapters (their kinds and shapes): `--resume` refuses to change these
# (pictor.train.lora), rather than warn that the loss curve will differ. A LyCORIS run (LoKr, LoHa, DoRA)
# stores its alpha in its weights too, so its alpha is fixed as well.
LORA_SHAPE_KEYS = ("lora_algo", "lora_dora", "lokr_factor", "lora_rank", "lora_targets")


def fixed_on_resume(cfg: TrainConfig) -> tuple[str, ...]:
    """The settings of run `cfg` that `--resume` may not change: its optimizer (whose state the checkpoint
    holds), a LoRA run's adapter kinds and shapes, and a ControlNet run's blocks and control kind."""
    if cfg.stage == "controlnet":
        return ("optimizer", "controlnet_blocks", "control")
    if cfg.stage != "lora":
        return ("optimizer",)
    lycoris = cfg.lora_algo != "lora" or cfg.lora_dora
    # LoRA+ splits the optimizer's groups, whose state the checkpoint holds
    return ("optimizer", "loraplus_lr_ratio", *LORA_SHAPE_KEYS, *(("lora_alpha",) if lycoris else ()))


def resume_refusal(saved: TrainConfig, new: dict[str, Any], where: str) -> str | None:
    """Why run `saved` cannot resume with the settings `new` (those given; others are kept), or None."""
    refused = [k for k in fixed_on_resume(saved) if k in new and new[k] != getattr(saved, k)]
    if "optimizer" in refused:
        return (
            f"{where}: this run's optimizer state is {saved.optimizer}'s; resume with --optimizer "
            f"{saved.optimizer}, or start a new --out (--init from a bundle to go on with other settings)"
        )
    if not refused:
        return None
    changes = ", ".join(f"{k} {getattr(saved, k)!r} -> {new[k]!r}" for k in refused)
    if saved.stage == "controlnet":
        return (
            f"{where}: this run's ControlNet was built with other settings ({changes}); resume with the "
            "run's own --controlnet-blocks and --control, or start a new --out"
        )
    return (
        f"{where}: this run's adapters were built with other settings ({changes}); resume with "
        "the run's own --lora-algo, --dora, --lokr-factor, --rank, --targets, --loraplus-lr-ratio (and a "
        "LoKr, LoHa or DoRA run's --alpha), or start a new --out"
    )


# Settings that change the loss curve; changing them on --resume is allowed but warned about.
TRAJECTORY_KEYS = (
    "data",
    "folder_repeats",
    "alpha_mask",
    "mask_dir",
    "optimizer",
    "seed",
    "batch_size",
    "grad_accum",
    "lr",
    "weight_decay",
    "betas",
    "warmup_steps",
    "lr_schedule",
    "grad_clip",
    "ema_decay",
    "caption_dropout",
    "recon_loss",
    "loss_type",
    "huber_c",
    "huber_schedule",
    "huber_scale",
    "kl_weight",
    "image_size",
    "base",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "lora_dropout",
    "rank_dropout",
    "module_dropout",
    "scale_weight_norms",
    "lora_algo",
    "lora_dora",
    "lokr_factor",
    "timestep_sampling",
    "timestep_mean",
    "timestep_std",
    "timestep_shift",
    "guidance_scale",
    "flip_aug",
    "caption_shuffle",
    "keep_tokens",
    "caption_tag_dropout",
    "caption_ext",
    "buckets",
    "cache_latents",
    "validation_split",
    "control_dir",
)
