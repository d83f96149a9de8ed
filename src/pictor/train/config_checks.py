"""The checks of a TrainConfig: every setting in range, and every combination of settings that cannot
work refused with a message that names the flag and what to change (`TrainConfig.validate`).

Separate from `pictor.train.config` because the checks are most of a config's lines and change on their
own as options are added, while the dataclass and its JSON stay as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pictor.train.config_choices import (
    CONTROL_KINDS,
    HUBER_SCHEDULES,
    IMAGE_EXTENSIONS,
    LORA_ALGOS,
    LOSS_TYPES,
    LR_SCHEDULES,
    MIXED_PRECISION,
    OPTIMIZERS,
    RECON_LOSSES,
    TIMESTEP_SAMPLINGS,
    ConfigError,
)
from pictor.train.sample_prompts import SamplePromptError, read_sample_prompts

if TYPE_CHECKING:
    from pictor.train.config import TrainConfig


def check_config(cfg: TrainConfig) -> None:
    """Raise ConfigError on the first setting of `cfg` that cannot work (`TrainConfig.validate`)."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(cfg.max_steps >= 1, f"max_steps must be >= 1, got {cfg.max_steps}")
    for name in ("max_epochs", "save_every_epochs"):
        value = getattr(cfg, name)
        flag = "--" + name.replace("_", "-")
        need(value is None or value >= 1, f"{name} ({flag}) must be >= 1, got {value}")
        need(
            value is None or cfg.data != "shapes",
            f"{flag}: the shapes world is endless and has no epochs; give --max-steps and --save-every "
            "instead",
        )
    need(
        cfg.max_minutes is None or cfg.max_minutes > 0,
        f"max_minutes must be > 0 (or unset), got {cfg.max_minutes}",
    )
    need(
        not cfg.fsdp or cfg.stage == "t2i",
        f"--fsdp shards the text-to-image transformer: it applies to 't2i' training, not to "
        f"'{cfg.stage}' (drop --fsdp; under torchrun that stage trains with DDP)",
    )
    need(not (cfg.fsdp and cfg.compile), "--fsdp and --compile together are not supported yet")
    need(not cfg.fp8_base or cfg.stage == "lora", "--fp8-base is for lora training (a frozen base)")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    need(cfg.grad_accum >= 1, f"grad_accum must be >= 1, got {cfg.grad_accum}")
    need(cfg.lr is not None and cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(
        cfg.optimizer in OPTIMIZERS,
        f"optimizer (--optimizer) must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}",
    )
    need(
        not cfg.fsdp or cfg.optimizer == "adamw",
        f"--fsdp trains with AdamW only: {cfg.optimizer} keeps statistics over whole tensors (Prodigy "
        "over the whole model), which sharding would split; drop --fsdp or --optimizer",
    )
    need(cfg.warmup_steps >= 0, f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    need(cfg.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}")
    need(0.0 <= cfg.min_lr_ratio <= 1.0, "min_lr_ratio must lie in [0, 1]")
    need(cfg.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {cfg.grad_clip}")
    need(
        cfg.ema_decay is not None and 0.0 <= cfg.ema_decay < 1.0,
        f"ema_decay must lie in [0, 1), got {cfg.ema_decay}",
    )
    need(cfg.betas is not None and len(cfg.betas) == 2, "betas must be two numbers")
    need(cfg.mixed_precision in MIXED_PRECISION, f"mixed_precision must be one of {MIXED_PRECISION}")
    need(cfg.recon_loss in RECON_LOSSES, f"recon_loss must be one of {RECON_LOSSES}")
    need(
        cfg.loss_type in LOSS_TYPES,
        f"loss_type (--loss-type) must be one of {', '.join(LOSS_TYPES)}, got {cfg.loss_type!r}",
    )
    need(
        cfg.loss_type == "l2" or cfg.stage != "autoencoder",
        f"--loss-type {cfg.loss_type}: the flow loss's error, for the stages that train on it; the "
        "autoencoder stage's is --recon-loss",
    )
    need(
        cfg.huber_schedule in HUBER_SCHEDULES,
        f"huber_schedule (--huber-schedule) must be one of {', '.join(HUBER_SCHEDULES)}, got "
        f"{cfg.huber_schedule!r} (kohya's 'snr' needs a DDPM scheduler and refuses FLUX.1 too)",
    )
    need(
        0 < cfg.huber_c <= 1 and cfg.huber_scale > 0,
        f"huber_c (--huber-c) must lie in (0, 1] and huber_scale (--huber-scale) above 0, got "
        f"{cfg.huber_c} and {cfg.huber_scale}",
    )
    need(cfg.kl_weight >= 0, f"kl_weight must be >= 0, got {cfg.kl_weight}")
    need(
        0.0 <= cfg.caption_dropout <= 1.0,
        f"caption_dropout must lie in [0, 1], got {cfg.caption_dropout}",
    )
    need(
        cfg.timestep_sampling in TIMESTEP_SAMPLINGS,
        f"timestep_sampling (--timestep-sampling) must be one of {', '.join(TIMESTEP_SAMPLINGS)}, "
        f"got {cfg.timestep_sampling!r}",
    )
    need(cfg.timestep_std > 0, f"timestep_std must be > 0, got {cfg.timestep_std}")
    need(
        cfg.timestep_shift is None or cfg.timestep_shift > 0,
        f"timestep_shift (--timestep-shift) must be > 0, got {cfg.timestep_shift}",
    )
    need(
        cfg.timestep_shift is None or cfg.timestep_sampling == "shift",
        f"--timestep-shift applies to --timestep-sampling shift, not {cfg.timestep_sampling} "
        "(flux_shift takes its shift from the image size): add --timestep-sampling shift or drop "
        "--timestep-shift",
    )
    need(
        cfg.guidance_scale is None or cfg.guidance_scale >= 0,
        f"guidance_scale (--guidance-scale) must be >= 0, got {cfg.guidance_scale}",
    )
    need(
        cfg.guidance_scale is None or cfg.model is None or guidance_distilled(cfg.model),
        f"--guidance-scale {cfg.guidance_scale}: this model has no guidance embedding (it is not "
        "guidance-distilled as FLUX.1-dev is), so there is nothing to feed it; drop --guidance-scale "
        "(classifier-free guidance is trained by --caption-dropout)",
    )
    need(
        cfg.sample_guidance is None or cfg.sample_guidance >= 0,
        f"sample_guidance must be >= 0, got {cfg.sample_guidance}",
    )
    need(
        not cfg.buckets or cfg.stage != "autoencoder",
        "--buckets: the autoencoder stage trains on square crops; drop --buckets there",
    )
    need(
        not cfg.buckets or cfg.data != "shapes",
        "--buckets: the shapes world is drawn square; aspect-ratio buckets are for image folders "
        "(--data FOLDER)",
    )
    for given, flag in ((cfg.alpha_mask, "--alpha-mask"), (cfg.mask_dir is not None, "--mask-dir")):
        need(
            not given or (cfg.data != "shapes" and cfg.stage in ("t2i", "lora")),
            f"{flag}: loss masks are for image folders (--data FOLDER) in the t2i and lora stages; drop it",
        )
    need(
        not (cfg.alpha_mask and cfg.mask_dir is not None),
        "--alpha-mask and --mask-dir: the loss mask comes from the pictures' alpha channel or from a "
        "mask folder, not both; drop one",
    )
    need(
        not cfg.folder_repeats or cfg.data != "shapes",
        "--folder-repeats: kohya's <repeats>_<class tokens> subfolders are for image folders (--data "
        "FOLDER); the shapes world is drawn endlessly, each scene once; drop it",
    )
    need(
        not cfg.cache_latents or (cfg.stage != "autoencoder" and cfg.data != "shapes"),
        "--cache-latents: for image folders in the t2i, lora, layout and reference stages (the shapes "
        "world is endless, and the autoencoder stage trains the encoder itself); drop it",
    )
    need(
        cfg.latent_cache_dir is None or cfg.cache_latents,
        "latent_cache_dir is set but cache_latents is off: pass --cache-latents too",
    )
    need(
        0.0 <= cfg.validation_split < 1.0,
        f"validation_split (--validation-split) must lie in [0, 1), got {cfg.validation_split}",
    )
    need(
        cfg.validation_split == 0 or (cfg.data != "shapes" and cfg.stage != "autoencoder"),
        "--validation-split: for image folders in the t2i, lora, layout, reference and controlnet "
        "stages (the shapes world is scored by its evals instead, and an autoencoder by its PSNR); "
        "drop it",
    )
    need(
        cfg.sample_prompts is None or cfg.stage in ("t2i", "lora"),
        f"--sample-prompts: for the t2i and lora stages (the {cfg.stage} stage's grids show its own "
        "layouts or pictures); drop it",
    )
    if cfg.sample_prompts is not None:
        try:  # a missing, empty or malformed file is an error now, not at the first grid
            read_sample_prompts(cfg.sample_prompts)
        except SamplePromptError as exc:
            raise ConfigError(str(exc)) from None
    need(cfg.sample_steps >= 1, f"sample_steps (--sample-steps) must be >= 1, got {cfg.sample_steps}")
    need(cfg.keep_tokens >= 0, f"keep_tokens (--keep-tokens) must be >= 0, got {cfg.keep_tokens}")
    need(
        0.0 <= cfg.caption_tag_dropout < 1.0,
        f"caption_tag_dropout (--caption-tag-dropout) must lie in [0, 1), got {cfg.caption_tag_dropout}",
    )
    need(
        cfg.caption_ext.startswith(".")
        and len(cfg.caption_ext) > 1
        and not any(c in cfg.caption_ext for c in "/\\")
        and cfg.caption_ext.count(".") == 1,
        f"caption_ext (--caption-ext) must be a file extension such as '.txt', got {cfg.caption_ext!r}",
    )
    need(
        cfg.caption_ext.lower() not in IMAGE_EXTENSIONS,
        f"--caption-ext {cfg.caption_ext}: that is an image extension, so each picture would be read as "
        "its own caption; give the captions' extension (.txt, .caption)",
    )
    need(
        not (cfg.stage == "t2i" and cfg.init is None and guidance_distilled(cfg.model)),
        "a guidance-distilled architecture (guidance_embed, as FLUX.1-dev) is made by distilling a model "
        "trained with classifier-free guidance, which pictor does not do: train from scratch on a "
        "preset without guidance_embed, or fine-tune a distilled bundle with --init",
    )
    need(cfg.keep >= 1, f"keep must be >= 1, got {cfg.keep}")
    need(cfg.seed >= 0, f"seed must be >= 0, got {cfg.seed}")
    for name in ("save_every", "sample_every", "eval_every"):
        need(getattr(cfg, name) >= 0, f"{name} must be >= 0 (0 disables), got {getattr(cfg, name)}")
    need(cfg.latent_stats_images >= 1, "latent_stats_images must be >= 1")
    need(
        cfg.eval_prompts >= 1,
        f"eval_prompts must be >= 1 (--eval-every 0 turns evals off), got {cfg.eval_prompts}",
    )
    need(
        cfg.eval_images_per_prompt >= 1,
        f"eval_images_per_prompt must be >= 1, got {cfg.eval_images_per_prompt}",
    )
    need(cfg.lora_rank >= 1, f"lora_rank must be >= 1, got {cfg.lora_rank}")
    need(
        cfg.control in CONTROL_KINDS,
        f"control (--control) must be one of {', '.join(CONTROL_KINDS)}, got {cfg.control!r}",
    )
    need(
        cfg.controlnet_blocks is None
        or (
            isinstance(cfg.controlnet_blocks, list)
            and len(cfg.controlnet_blocks) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in cfg.controlnet_blocks)
            and min(cfg.controlnet_blocks) >= 0
            and sum(cfg.controlnet_blocks) >= 1
        ),
        "controlnet_blocks (--controlnet-blocks D,S) must be two whole numbers >= 0, not both 0 (the "
        f"ControlNet's double and single blocks), got {cfg.controlnet_blocks!r}",
    )
    need(
        cfg.controlnet_blocks is None or cfg.stage == "controlnet",
        "--controlnet-blocks is for controlnet training; drop it",
    )
    need(
        cfg.control_dir is None or (cfg.stage == "controlnet" and cfg.data != "shapes"),
        "--control-dir is for controlnet training on an image folder (its control pictures, paired with "
        "--data's images by relative path); drop it",
    )
    need(
        (cfg.control == "folder") == (cfg.control_dir is not None),
        "--control folder reads its pictures from --control-dir DIR, and --control-dir needs --control "
        "folder (the default with it); give both or neither",
    )
    need(
        cfg.control != "metadata" or (cfg.stage == "controlnet" and cfg.data != "shapes"),
        "--control metadata is for controlnet training on an image folder whose metadata.jsonl names "
        "each image's control picture (conditioning_image_file_name or conditioning_image); drop it",
    )
    need(
        not cfg.cache_latents or cfg.stage != "controlnet",
        "--cache-latents: controlnet training crops each control picture with its training image (or "
        "draws it from the image), so it needs the images, not their latents; drop --cache-latents",
    )
    need(cfg.lora_alpha is None or cfg.lora_alpha > 0, f"lora_alpha must be > 0, got {cfg.lora_alpha}")
    need(0.0 <= cfg.lora_dropout < 1.0, f"lora_dropout must lie in [0, 1), got {cfg.lora_dropout}")
    need(
        cfg.lora_algo in LORA_ALGOS,
        f"lora_algo (--lora-algo) must be one of {', '.join(LORA_ALGOS)}, got {cfg.lora_algo!r}",
    )
    need(
        cfg.lokr_factor == -1 or cfg.lokr_factor >= 1,
        f"lokr_factor (--lokr-factor) must be -1 (as balanced as possible) or >= 1, got {cfg.lokr_factor}",
    )
    need(
        cfg.lokr_factor == -1 or cfg.lora_algo == "lokr",
        f"--lokr-factor applies to --lora-algo lokr, not {cfg.lora_algo}; drop it or choose lokr",
    )
    need(
        cfg.lora_init is None or (cfg.stage == "lora" and cfg.lora_algo == "lora" and not cfg.lora_dora),
        "--lora-init starts a plain LoRA run (stage lora, --lora-algo lora, no --dora) from a LoRA file; "
        f"drop it for this {cfg.stage} run"
        + ("" if cfg.stage != "lora" else f" ({cfg.lora_algo}{' + DoRA' if cfg.lora_dora else ''})"),
    )
    need(
        cfg.loraplus_lr_ratio is None or (cfg.stage == "lora" and cfg.lora_algo == "lora"),
        "--loraplus-lr-ratio: LoRA+ speeds up a LoRA's B matrices, for --lora-algo lora runs (with or "
        f"without --dora); drop it for this {cfg.stage} run"
        + (f" ({cfg.lora_algo})" if cfg.stage == "lora" else ""),
    )
    need(
        cfg.loraplus_lr_ratio is None or cfg.optimizer != "prodigy",
        "--loraplus-lr-ratio with --optimizer prodigy: Prodigy estimates one step size for all its "
        "parameter groups and refuses groups with their own learning rates; use adamw or adafactor, or "
        "drop the ratio",
    )
    need(
        cfg.loraplus_lr_ratio is None or cfg.loraplus_lr_ratio > 0,
        f"--loraplus-lr-ratio must be above 0 (16 is LoRA+'s suggestion), got {cfg.loraplus_lr_ratio}",
    )
    need(
        cfg.lora_dropout == 0 or (cfg.lora_algo == "lora" and not cfg.lora_dora),
        "--lora-dropout applies to a plain LoRA (LyCORIS' LoKr and LoHa have no input dropout, and DoRA "
        "here has none either); drop --lora-dropout or train --lora-algo lora without --dora",
    )
    for name, flag in (("rank_dropout", "--rank-dropout"), ("module_dropout", "--module-dropout")):
        value = getattr(cfg, name)
        need(0.0 <= value < 1.0, f"{name} ({flag}) must lie in [0, 1), got {value}")
    need(
        cfg.scale_weight_norms is None or cfg.scale_weight_norms > 0,
        f"scale_weight_norms (--scale-weight-norms) must be above 0 (kohya suggests 1 to start), got "
        f"{cfg.scale_weight_norms}",
    )
    for given, flag in (
        (cfg.rank_dropout > 0, "--rank-dropout"),
        (cfg.module_dropout > 0, "--module-dropout"),
        (cfg.scale_weight_norms is not None, "--scale-weight-norms"),
    ):
        need(
            not given or cfg.stage == "lora",
            f"{flag}: kohya's LoRA regulariser, for lora training; drop it for this {cfg.stage} run",
        )
        need(
            not given or (cfg.lora_algo == "lora" and not cfg.lora_dora),
            f"{flag} applies to a plain LoRA's down and up matrices (as kohya's networks.lora_flux does), "
            f"not to {cfg.lora_algo}{' with DoRA' if cfg.lora_dora else ''}: drop {flag} or train "
            "--lora-algo lora without --dora",
        )
    if cfg.autoencoder is not None and cfg.image_size is not None:
        factor = 2 ** (len(cfg.autoencoder["ch_mult"]) - 1)
        # t2i and lora pack 2x2 latent patches; the AE stage only needs the AE's own factor.
        packed = cfg.stage != "autoencoder"
        multiple = factor * (2 if packed else 1)
        need(
            cfg.image_size % multiple == 0,
            f"image_size {cfg.image_size} must be a multiple of {multiple} "
            f"(autoencoder factor {factor}{' x 2x2 latent patches' if packed else ''})",
        )


def guidance_distilled(model: dict[str, Any] | None) -> bool:
    """Whether a transformer config has a guidance embedding (guidance-distilled, as FLUX.1-dev)."""
    return bool((model or {}).get("guidance_embed", False))
