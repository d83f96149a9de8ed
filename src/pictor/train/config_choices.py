"""The vocabulary of a TrainConfig: the stages, the values each setting chooses among, the defaults that
differ by stage, and ConfigError, the error a setting that cannot work raises.

Separate from `pictor.train.config` so that the dataclass (fields, JSON, resolving) and its checks
(`pictor.train.config_checks`) read the same names from one place below both, without importing each other.
"""

from __future__ import annotations

from typing import Any

STAGES = ("autoencoder", "t2i", "lora", "layout", "reference", "controlnet")
# Stages that train something beside a frozen base bundle (--base).
ADAPTER_STAGES = ("lora", "layout", "reference", "controlnet")
# What a ControlNet run's control pictures are: canny, drawn from each training image as it is cropped;
# folder, read from --control-dir beside each image (depth maps, poses, ...: what the ControlNet follows);
# metadata, the picture each image's metadata.jsonl line names (Hugging Face's ControlNet dataset layout).
CONTROL_KINDS = ("canny", "folder", "metadata")
# The kinds whose pictures come with the data (read, not drawn from the training images).
CONTROLS_FROM_DATA = ("folder", "metadata")
LR_SCHEDULES = ("constant", "cosine")
RECON_LOSSES = ("l1", "l2", "l1+l2")
MIXED_PRECISION = ("auto", "bf16", "no")
# What a guidance-distilled model's guidance embedding gets while training when --guidance-scale is not
# given: kohya's FLUX.1 LoRA recipe (--guidance_scale 1.0); diffusers' training scripts default to 3.5.
DISTILLED_TRAIN_GUIDANCE = 1.0
DEFAULT_TIMESTEP_SHIFT = 3.0  # kohya's --discrete_flow_shift default
# Files a caption cannot be in: pictor.data.folder reads images with these extensions (and a few more).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
OPTIMIZERS = ("adamw", "adafactor", "prodigy")
TIMESTEP_SAMPLINGS = ("logit_normal", "uniform", "shift", "flux_shift")  # pictor.flow.sample_t
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")  # pictor.flow.LOSS_TYPES (not imported: no torch here)
HUBER_SCHEDULES = ("constant", "exponential")  # pictor.flow.HUBER_SCHEDULES
LORA_ALGOS = ("lora", "lokr", "loha")  # pictor.models.lycoris_train.ALGOS (not imported: no torch here)

# Stage defaults for what differs between the two stages; everything else is shared.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "autoencoder": {"lr": 2e-4, "weight_decay": 0.0, "betas": [0.9, 0.99], "ema_decay": 0.999},
    "t2i": {"lr": 3e-4, "weight_decay": 0.0, "betas": [0.9, 0.99], "ema_decay": 0.999},
    # As kohya's and diffusers' FLUX LoRA scripts: lr 1e-4, no EMA (decay 0: the "EMA" is the weights).
    "lora": {"lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "ema_decay": 0.0},
    # A small adapter from zero on a frozen base (as GLIGEN's gated layers): a t2i-like lr, with EMA.
    "layout": {"lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "ema_decay": 0.999},
    # Likewise a small image encoder from scratch beside a frozen base (as FLUX.1 Redux's).
    "reference": {"lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "ema_decay": 0.999},
    # A ControlNet grown from the base's first blocks (diffusers' train_controlnet_flux.py: lr 5e-6 at FLUX.1
    # size; a small model from the shapes world takes a t2i-like one), with EMA.
    "controlnet": {"lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "ema_decay": 0.999},
}


def default_controlnet_blocks(depth: int) -> list[int]:
    """A ControlNet's double and single blocks when not given: 2 double (fewer where the base has fewer)
    and no single ones, as XLabs' FLUX.1 ControlNets (diffusers' training script defaults to 4 and 4)."""
    return [min(2, depth), 0]


class ConfigError(ValueError):
    """A training setting that cannot work; the message names the setting and what to change."""
