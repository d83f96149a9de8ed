"""TrainConfig: every setting of a training run, JSON-able, stored in each checkpoint.

A run is fully described by its TrainConfig: the stage, the data, the model architecture (from a preset,
optionally overridden), the optimizer and schedule, and the cadence of logs, samples, evals and
checkpoints. `--resume` reads the config back from the checkpoint, so a resumed run needs no flags again.

Batch convention (as in diffusers' and kohya's scripts): ``batch_size`` is the micro-batch of ONE process;
one optimizer step sees ``batch_size * grad_accum * world_size`` images (`global_batch`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pictor.presets import get_preset
from pictor.train.sample_prompts import SamplePromptError, read_sample_prompts

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


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type (int for float too; bool for neither number)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        origin = typing.get_origin(option) or option
        if (option is type(None) and value is None) or option is Any:
            return True
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if origin in (str, bool, list, dict) and isinstance(value, origin):
            return True
    return False


def _describe(hint: Any) -> str:
    names = {float: "a number", int: "an integer", str: "a string", bool: "true or false", list: "a list",
             dict: "an object", type(None): "null"}  # fmt: skip
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return " or ".join(names.get(typing.get_origin(o) or o, str(o)) for o in options)


def data_path(data: str) -> str:
    """`--data` as stored: "shapes", or the folder's absolute path, so that a run resumed from another
    working directory reads the same folder (or says it is gone) rather than whatever the relative path
    names there."""
    return data if data == "shapes" else str(Path(data).resolve())


@dataclass
class TrainConfig:
    stage: str
    out: str
    data: str = "shapes"
    preset: str = "shapes-small"
    # Architecture overrides (None: take the preset's); filled in by `resolve()`.
    model: dict[str, Any] | None = None
    autoencoder: dict[str, Any] | None = None
    text_encoder: dict[str, Any] | None = None
    defaults: dict[str, Any] | None = None
    # t2i: where the trained autoencoder comes from (a bundle, an AE checkpoint, or an AE training run).
    autoencoder_path: str | None = None
    # t2i: start the transformer (and its EMA) from a trained bundle's weights instead of at random, with a
    # fresh optimizer and schedule; architecture, autoencoder and text encoder are the bundle's.
    init: str | None = None
    image_size: int | None = None  # None: the preset's default width
    seed: int = 0
    # Optimization.
    max_steps: int = 1000
    # In epochs of an image folder's training stream instead (kohya's --max_train_epochs): max_steps is
    # worked out from the folder at the start of the run (pictor.train.epochs)
    max_epochs: int | None = None
    batch_size: int = 32
    grad_accum: int = 1
    optimizer: str = "adamw"  # adamw, adafactor or prodigy (pictor.train.optim.build_optimizer)
    lr: float | None = None  # None: STAGE_DEFAULTS (1.0 for prodigy, whose estimate it scales)
    weight_decay: float | None = None
    betas: list[float] | None = None
    eps: float = 1e-8
    warmup_steps: int = 100
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    ema_decay: float | None = None
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step)): early EMA tracks the weights
    mixed_precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; bf16: autocast on any device
    compile: bool = False  # torch.compile the transformer blocks (CUDA runs)
    # Recompute each transformer block in the backward pass instead of keeping its activations: the same
    # gradients, less memory, about one more forward pass of time (t2i, lora, layout, reference).
    gradient_checkpointing: bool = False
    # lora: keep the base's block weights in FP8 (cast per layer, also in the backward pass): half of a
    # bf16 base's memory, for its rounding (an FP8 bundle as base is kept FP8 without it).
    fp8_base: bool = False
    # FSDP2 under torchrun: shard the transformer's weights, gradients and AdamW state over the ranks (t2i).
    # Like the device, it belongs to one invocation: a resumed run shards only when asked again.
    fsdp: bool = False
    # Autoencoder stage.
    recon_loss: str = "l1"
    # The flow loss's error (kohya's --loss_type): l2 (the flow loss), l1, or kohya's pseudo-Huber "huber" /
    # "smooth_l1" with threshold huber_c, constant or decaying toward pure noise (pictor.flow.huber_threshold)
    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "constant"
    huber_scale: float = 1.0
    kl_weight: float = 1e-6  # LDM's weight: KL summed over the latent, recon summed over the pixels
    # t2i stage.
    caption_dropout: float = 0.1  # caption -> "" with this probability, for classifier-free guidance
    # "logit_normal" (SD3/FLUX), "uniform", "shift" (the logit-normal draw pushed toward noise by
    # timestep_shift, as kohya's --timestep_sampling shift --discrete_flow_shift) or "flux_shift" (shifted by
    # the image's token count, as FLUX.1's sampling schedule is; kohya's flux_shift).
    timestep_sampling: str = "logit_normal"
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    timestep_shift: float | None = None  # timestep_sampling "shift" only; None: DEFAULT_TIMESTEP_SHIFT
    # The value a guidance-distilled model (guidance_embed, as FLUX.1-dev) gets in its guidance embedding
    # while it trains; None: DISTILLED_TRAIN_GUIDANCE there. Refused for a model without one.
    guidance_scale: float | None = None
    # Folder data augmentation, drawn per sample from (seed, sample index) so resumes and ranks agree.
    flip_aug: bool = False  # mirror about half of the images left to right
    caption_shuffle: bool = False  # shuffle a caption's comma-separated tags (kohya --shuffle_caption)
    keep_tokens: int = 0  # the first N tags are neither shuffled nor dropped (kohya --keep_tokens)
    caption_tag_dropout: float = 0.0  # drop each tag past keep_tokens with this probability
    caption_ext: str = ".txt"  # the caption file beside each image
    # Aspect-ratio buckets (kohya's --enable_bucket): each image goes to the bucket of about image_size**2
    # pixels nearest its aspect ratio (at most 2:1) instead of a square centre crop; every global
    # micro-batch holds one bucket (pictor.train.bucket_stream).
    buckets: bool = False
    # kohya's repeat folders: subfolders named <repeats>_<class tokens> ("10_sks dog") weight the stream by
    # their repeats and caption their uncaptioned images with the class tokens (pictor.data.repeat_folders)
    folder_repeats: bool = False
    # Loss masks (kohya's --alpha_mask, --masked_loss): the flow loss weighted by each image's alpha channel,
    # or by a mask picture beside it in mask_dir (same relative folder and stem); pictor.data.loss_masks
    alpha_mask: bool = False
    mask_dir: str | None = None
    # Encode every image once before training and train from the stored latents (kohya's --cache_latents
    # with --cache_latents_to_disk): safetensors shards under latent_cache_dir (None: OUT/latent-cache),
    # keyed by the autoencoder's weights, so later runs and resumes on the same images encode nothing.
    cache_latents: bool = False
    latent_cache_dir: str | None = None
    # Hold this fraction of a folder's images out of training and report the flow loss on them at every
    # eval (pictor.train.validation): a measure of fit for real data, where no shapes score exists.
    validation_split: float = 0.0
    latent_stats_images: int = 256  # images encoded at the start of t2i to set scale/shift factors
    # LoRA stage: adapters on a frozen base bundle (architecture, autoencoder, text encoder: the base's).
    base: str | None = None
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: = rank (scale 1)
    lora_targets: str = "blocks"  # groups / globs / re:regex over FLUX module names, comma-separated
    lora_dropout: float = 0.0
    # A LoRA file the adapters start from instead of B = 0 (kohya's --network_weights; pictor.train.lora_init)
    lora_init: str | None = None
    # LoRA+ (kohya's loraplus_lr_ratio): the B ("up") matrices learn this many times faster than the A ones
    loraplus_lr_ratio: float | None = None
    # LyCORIS' algorithms "lora", "lokr" or "loha", DoRA (weight-decomposed) on any of them, LoKr's split
    # (-1: balanced); kohya: --network_module lycoris.kohya --network_args algo=.. factor=.. dora_wd=True.
    lora_algo: str = "lora"
    lora_dora: bool = False
    lokr_factor: int = -1
    # ControlNet stage: its double and single blocks, copied from the base's first ones (None: 2 and 0,
    # fewer where the base has fewer), and what its control pictures are (CONTROL_KINDS).
    controlnet_blocks: list[int] | None = None
    control: str = "canny"
    # control "folder": the pictures, paired with --data's by relative path ("metadata" names them per line)
    control_dir: str | None = None
    # Cadence (0 disables); checkpoints also at the end of the run.
    save_every: int = 500
    save_every_epochs: int | None = None  # kohya's --save_every_n_epochs: sets save_every likewise
    keep: int = 3
    sample_every: int = 500
    eval_every: int = 1000
    num_samples: int = 8  # images in a sample grid
    # A text file of prompts for the sample grids, one per line (kohya's --sample_prompts; blank lines and
    # lines starting with # are skipped), image i with seed i; None: the data's own (t2i, lora).
    sample_prompts: str | None = None
    sample_steps: int = 20
    # Sample grids and evals: None = the model's default guidance (its distilled guidance on FLUX.1-dev;
    # 1, no CFG, where its defaults say guidance_mode 'none').
    sample_guidance: float | None = None
    eval_prompts: int = 24  # dev prompts scored (spread over the six tags)
    eval_images_per_prompt: int = 2
    # Runtime (not part of the trajectory).
    device: str | None = None
    # Wall-clock budget of this invocation (None: none): at the first step past it the run stops as if
    # max_steps were reached (checkpoint + final), so a time-limited job never loses its work.
    max_minutes: float | None = None
    num_workers: int | None = None  # data loader processes; None: 0 on CPU, up to 8 on CUDA
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    # -- derived ------------------------------------------------------------------------------------

    def global_batch(self, world_size: int = 1) -> int:
        return self.batch_size * self.grad_accum * world_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "training config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {unknown}; known settings: {sorted(known)}")
        missing = [k for k in ("stage", "out") if k not in d]
        if missing:
            raise ConfigError(f"{where}: missing {missing}")
        if d.get("timestep_shift") == 3.0 and d.get("timestep_sampling", "logit_normal") != "shift":
            # Stored by a version whose timestep_shift defaulted to 3.0 whatever the sampling: that was no
            # request, and keeping it would now be refused as a shift given without shift sampling.
            d = {**d, "timestep_shift": None}
        hints = typing.get_type_hints(cls)
        for key, value in d.items():
            if not _fits(value, hints[key]):
                raise ConfigError(f"{where}: {key} is {value!r}, not {_describe(hints[key])}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        if not Path(path).is_file():
            raise ConfigError(f"--config {path}: no such file; give a JSON file of settings")
        try:
            raw = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a training config is a JSON object of settings")
        return cls.from_dict({**raw, **overrides}, where=str(path))

    def resolve(self) -> TrainConfig:
        """Fill every None from the preset and the stage defaults, and validate. Returns a new config."""
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.image_size is not None and self.image_size <= 0:  # before 0 could mean "the preset's"
            raise ConfigError(f"image_size must be > 0 (omit it for the preset's), got {self.image_size}")
        try:
            preset = get_preset(self.preset)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from exc
        stage = STAGE_DEFAULTS[self.stage]
        if self.init is not None and self.stage != "t2i":
            raise ConfigError(f"--init applies to t2i training only, not to '{self.stage}'")
        if self.stage in ADAPTER_STAGES:
            preset = self._base_preset()
        elif self.init is not None and self.model is None:
            # (a resumed run's stored config is already resolved: its bundle may be gone by now)
            preset = self._init_preset()
        c = dataclasses.replace(
            self,
            data=data_path(self.data),
            model=self.model if self.model is not None else preset["model"],
            autoencoder=self.autoencoder if self.autoencoder is not None else preset["autoencoder"],
            text_encoder=self.text_encoder if self.text_encoder is not None else preset["text_encoder"],
            defaults=self.defaults if self.defaults is not None else preset["defaults"],
            image_size=self.image_size or int(preset["defaults"]["width"]),
            lr=self.lr if self.lr is not None else (1.0 if self.optimizer == "prodigy" else stage["lr"]),
            weight_decay=self.weight_decay if self.weight_decay is not None else stage["weight_decay"],
            betas=list(self.betas) if self.betas is not None else list(stage["betas"]),
            ema_decay=self.ema_decay if self.ema_decay is not None else stage["ema_decay"],
        )
        if c.sample_guidance is None:
            c = dataclasses.replace(c, sample_guidance=_default_guidance(c.defaults or {}))
        if c.stage == "controlnet" and c.controlnet_blocks is None and c.model:
            # Spelled out now, so that the run's config (and a resume's comparison) holds what was built.
            c = dataclasses.replace(c, controlnet_blocks=default_controlnet_blocks(int(c.model["depth"])))
        c.validate()
        return c

    def _base_preset(self) -> dict[str, Any]:
        """An adapter stage's architecture (lora, layout, reference): the base bundle's, as a preset."""
        if not self.base:
            raise ConfigError(
                f"{self.stage} training needs a base model: pass --base BUNDLE (a trained model bundle)"
            )
        why = f"{self.stage} training needs a trained model bundle to adapt"
        return _bundle_preset(self.base, "--base", why)

    def _init_preset(self) -> dict[str, Any]:
        """A warm-started t2i run's architecture: the --init bundle's, whatever --preset says."""
        assert self.init is not None
        if self.autoencoder_path:
            raise ConfigError(
                "--init takes the autoencoder (and its latent scale) from the bundle it starts from; "
                "drop --autoencoder"
            )
        return _bundle_preset(self.init, "--init", "a warm start needs a trained model bundle's weights")

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("max_epochs", "save_every_epochs"):
            value = getattr(self, name)
            flag = "--" + name.replace("_", "-")
            need(value is None or value >= 1, f"{name} ({flag}) must be >= 1, got {value}")
            need(
                value is None or self.data != "shapes",
                f"{flag}: the shapes world is endless and has no epochs; give --max-steps and --save-every "
                "instead",
            )
        need(
            self.max_minutes is None or self.max_minutes > 0,
            f"max_minutes must be > 0 (or unset), got {self.max_minutes}",
        )
        need(
            not self.fsdp or self.stage == "t2i",
            f"--fsdp shards the text-to-image transformer: it applies to 't2i' training, not to "
            f"'{self.stage}' (drop --fsdp; under torchrun that stage trains with DDP)",
        )
        need(not (self.fsdp and self.compile), "--fsdp and --compile together are not supported yet")
        need(not self.fp8_base or self.stage == "lora", "--fp8-base is for lora training (a frozen base)")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.lr is not None and self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(
            self.optimizer in OPTIMIZERS,
            f"optimizer (--optimizer) must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}",
        )
        need(
            not self.fsdp or self.optimizer == "adamw",
            f"--fsdp trains with AdamW only: {self.optimizer} keeps statistics over whole tensors (Prodigy "
            "over the whole model), which sharding would split; drop --fsdp or --optimizer",
        )
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}")
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must lie in [0, 1]")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        need(
            self.ema_decay is not None and 0.0 <= self.ema_decay < 1.0,
            f"ema_decay must lie in [0, 1), got {self.ema_decay}",
        )
        need(self.betas is not None and len(self.betas) == 2, "betas must be two numbers")
        need(self.mixed_precision in MIXED_PRECISION, f"mixed_precision must be one of {MIXED_PRECISION}")
        need(self.recon_loss in RECON_LOSSES, f"recon_loss must be one of {RECON_LOSSES}")
        need(
            self.loss_type in LOSS_TYPES,
            f"loss_type (--loss-type) must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}",
        )
        need(
            self.loss_type == "l2" or self.stage != "autoencoder",
            f"--loss-type {self.loss_type}: the flow loss's error, for the stages that train on it; the "
            "autoencoder stage's is --recon-loss",
        )
        need(
            self.huber_schedule in HUBER_SCHEDULES,
            f"huber_schedule (--huber-schedule) must be one of {', '.join(HUBER_SCHEDULES)}, got "
            f"{self.huber_schedule!r} (kohya's 'snr' needs a DDPM scheduler and refuses FLUX.1 too)",
        )
        need(
            0 < self.huber_c <= 1 and self.huber_scale > 0,
            f"huber_c (--huber-c) must lie in (0, 1] and huber_scale (--huber-scale) above 0, got "
            f"{self.huber_c} and {self.huber_scale}",
        )
        need(self.kl_weight >= 0, f"kl_weight must be >= 0, got {self.kl_weight}")
        need(
            0.0 <= self.caption_dropout <= 1.0,
            f"caption_dropout must lie in [0, 1], got {self.caption_dropout}",
        )
        need(
            self.timestep_sampling in TIMESTEP_SAMPLINGS,
            f"timestep_sampling (--timestep-sampling) must be one of {', '.join(TIMESTEP_SAMPLINGS)}, "
            f"got {self.timestep_sampling!r}",
        )
        need(self.timestep_std > 0, f"timestep_std must be > 0, got {self.timestep_std}")
        need(
            self.timestep_shift is None or self.timestep_shift > 0,
            f"timestep_shift (--timestep-shift) must be > 0, got {self.timestep_shift}",
        )
        need(
            self.timestep_shift is None or self.timestep_sampling == "shift",
            f"--timestep-shift applies to --timestep-sampling shift, not {self.timestep_sampling} "
            "(flux_shift takes its shift from the image size): add --timestep-sampling shift or drop "
            "--timestep-shift",
        )
        need(
            self.guidance_scale is None or self.guidance_scale >= 0,
            f"guidance_scale (--guidance-scale) must be >= 0, got {self.guidance_scale}",
        )
        need(
            self.guidance_scale is None or self.model is None or guidance_distilled(self.model),
            f"--guidance-scale {self.guidance_scale}: this model has no guidance embedding (it is not "
            "guidance-distilled as FLUX.1-dev is), so there is nothing to feed it; drop --guidance-scale "
            "(classifier-free guidance is trained by --caption-dropout)",
        )
        need(
            self.sample_guidance is None or self.sample_guidance >= 0,
            f"sample_guidance must be >= 0, got {self.sample_guidance}",
        )
        need(
            not self.buckets or self.stage != "autoencoder",
            "--buckets: the autoencoder stage trains on square crops; drop --buckets there",
        )
        need(
            not self.buckets or self.data != "shapes",
            "--buckets: the shapes world is drawn square; aspect-ratio buckets are for image folders "
            "(--data FOLDER)",
        )
        for given, flag in ((self.alpha_mask, "--alpha-mask"), (self.mask_dir is not None, "--mask-dir")):
            need(
                not given or (self.data != "shapes" and self.stage in ("t2i", "lora")),
                f"{flag}: loss masks are for image folders (--data FOLDER) in the t2i and lora stages; drop "
                "it",
            )
        need(
            not (self.alpha_mask and self.mask_dir is not None),
            "--alpha-mask and --mask-dir: the loss mask comes from the pictures' alpha channel or from a "
            "mask folder, not both; drop one",
        )
        need(
            not self.folder_repeats or self.data != "shapes",
            "--folder-repeats: kohya's <repeats>_<class tokens> subfolders are for image folders (--data "
            "FOLDER); the shapes world is drawn endlessly, each scene once; drop it",
        )
        need(
            not self.cache_latents or (self.stage != "autoencoder" and self.data != "shapes"),
            "--cache-latents: for image folders in the t2i, lora, layout and reference stages (the shapes "
            "world is endless, and the autoencoder stage trains the encoder itself); drop it",
        )
        need(
            self.latent_cache_dir is None or self.cache_latents,
            "latent_cache_dir is set but cache_latents is off: pass --cache-latents too",
        )
        need(
            0.0 <= self.validation_split < 1.0,
            f"validation_split (--validation-split) must lie in [0, 1), got {self.validation_split}",
        )
        need(
            self.validation_split == 0 or (self.data != "shapes" and self.stage != "autoencoder"),
            "--validation-split: for image folders in the t2i, lora, layout, reference and controlnet "
            "stages (the shapes world is scored by its evals instead, and an autoencoder by its PSNR); "
            "drop it",
        )
        need(
            self.sample_prompts is None or self.stage in ("t2i", "lora"),
            f"--sample-prompts: for the t2i and lora stages (the {self.stage} stage's grids show its own "
            "layouts or pictures); drop it",
        )
        if self.sample_prompts is not None:
            try:  # a missing, empty or malformed file is an error now, not at the first grid
                read_sample_prompts(self.sample_prompts)
            except SamplePromptError as exc:
                raise ConfigError(str(exc)) from None
        need(self.sample_steps >= 1, f"sample_steps (--sample-steps) must be >= 1, got {self.sample_steps}")
        need(self.keep_tokens >= 0, f"keep_tokens (--keep-tokens) must be >= 0, got {self.keep_tokens}")
        need(
            0.0 <= self.caption_tag_dropout < 1.0,
            f"caption_tag_dropout (--caption-tag-dropout) must lie in [0, 1), got {self.caption_tag_dropout}",
        )
        need(
            self.caption_ext.startswith(".")
            and len(self.caption_ext) > 1
            and not any(c in self.caption_ext for c in "/\\")
            and self.caption_ext.count(".") == 1,
            f"caption_ext (--caption-ext) must be a file extension such as '.txt', got {self.caption_ext!r}",
        )
        need(
            self.caption_ext.lower() not in IMAGE_EXTENSIONS,
            f"--caption-ext {self.caption_ext}: that is an image extension, so each picture would be read as "
            "its own caption; give the captions' extension (.txt, .caption)",
        )
        need(
            not (self.stage == "t2i" and self.init is None and guidance_distilled(self.model)),
            "a guidance-distilled architecture (guidance_embed, as FLUX.1-dev) is made by distilling a model "
            "trained with classifier-free guidance, which pictor does not do: train from scratch on a "
            "preset without guidance_embed, or fine-tune a distilled bundle with --init",
        )
        need(self.keep >= 1, f"keep must be >= 1, got {self.keep}")
        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        for name in ("save_every", "sample_every", "eval_every"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0 (0 disables), got {getattr(self, name)}")
        need(self.latent_stats_images >= 1, "latent_stats_images must be >= 1")
        need(
            self.eval_prompts >= 1,
            f"eval_prompts must be >= 1 (--eval-every 0 turns evals off), got {self.eval_prompts}",
        )
        need(
            self.eval_images_per_prompt >= 1,
            f"eval_images_per_prompt must be >= 1, got {self.eval_images_per_prompt}",
        )
        need(self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank}")
        need(
            self.control in CONTROL_KINDS,
            f"control (--control) must be one of {', '.join(CONTROL_KINDS)}, got {self.control!r}",
        )
        need(
            self.controlnet_blocks is None
            or (
                isinstance(self.controlnet_blocks, list)
                and len(self.controlnet_blocks) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) for n in self.controlnet_blocks)
                and min(self.controlnet_blocks) >= 0
                and sum(self.controlnet_blocks) >= 1
            ),
            "controlnet_blocks (--controlnet-blocks D,S) must be two whole numbers >= 0, not both 0 (the "
            f"ControlNet's double and single blocks), got {self.controlnet_blocks!r}",
        )
        need(
            self.controlnet_blocks is None or self.stage == "controlnet",
            "--controlnet-blocks is for controlnet training; drop it",
        )
        need(
            self.control_dir is None or (self.stage == "controlnet" and self.data != "shapes"),
            "--control-dir is for controlnet training on an image folder (its control pictures, paired with "
            "--data's images by relative path); drop it",
        )
        need(
            (self.control == "folder") == (self.control_dir is not None),
            "--control folder reads its pictures from --control-dir DIR, and --control-dir needs --control "
            "folder (the default with it); give both or neither",
        )
        need(
            self.control != "metadata" or (self.stage == "controlnet" and self.data != "shapes"),
            "--control metadata is for controlnet training on an image folder whose metadata.jsonl names "
            "each image's control picture (conditioning_image_file_name or conditioning_image); drop it",
        )
        need(
            not self.cache_latents or self.stage != "controlnet",
            "--cache-latents: controlnet training crops each control picture with its training image (or "
            "draws it from the image), so it needs the images, not their latents; drop --cache-latents",
        )
        need(self.lora_alpha is None or self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        need(
            self.lora_algo in LORA_ALGOS,
            f"lora_algo (--lora-algo) must be one of {', '.join(LORA_ALGOS)}, got {self.lora_algo!r}",
        )
        need(
            self.lokr_factor == -1 or self.lokr_factor >= 1,
            "lokr_factor (--lokr-factor) must be -1 (as balanced as possible) or >= 1, "
            f"got {self.lokr_factor}",
        )
        need(
            self.lokr_factor == -1 or self.lora_algo == "lokr",
            f"--lokr-factor applies to --lora-algo lokr, not {self.lora_algo}; drop it or choose lokr",
        )
        need(
            self.lora_init is None
            or (self.stage == "lora" and self.lora_algo == "lora" and not self.lora_dora),
            "--lora-init starts a plain LoRA run (stage lora, --lora-algo lora, no --dora) from a LoRA file; "
            f"drop it for this {self.stage} run"
            + ("" if self.stage != "lora" else f" ({self.lora_algo}{' + DoRA' if self.lora_dora else ''})"),
        )
        need(
            self.loraplus_lr_ratio is None or (self.stage == "lora" and self.lora_algo == "lora"),
            "--loraplus-lr-ratio: LoRA+ speeds up a LoRA's B matrices, for --lora-algo lora runs (with or "
            f"without --dora); drop it for this {self.stage} run"
            + (f" ({self.lora_algo})" if self.stage == "lora" else ""),
        )
        need(
            self.loraplus_lr_ratio is None or self.optimizer != "prodigy",
            "--loraplus-lr-ratio with --optimizer prodigy: Prodigy estimates one step size for all its "
            "parameter groups and refuses groups with their own learning rates; use adamw or adafactor, or "
            "drop the ratio",
        )
        need(
            self.loraplus_lr_ratio is None or self.loraplus_lr_ratio > 0,
            f"--loraplus-lr-ratio must be above 0 (16 is LoRA+'s suggestion), got {self.loraplus_lr_ratio}",
        )
        need(
            self.lora_dropout == 0 or (self.lora_algo == "lora" and not self.lora_dora),
            "--lora-dropout applies to a plain LoRA (LyCORIS' LoKr and LoHa have no input dropout, and DoRA "
            "here has none either); drop --lora-dropout or train --lora-algo lora without --dora",
        )
        if self.autoencoder is not None and self.image_size is not None:
            factor = 2 ** (len(self.autoencoder["ch_mult"]) - 1)
            # t2i and lora pack 2x2 latent patches; the AE stage only needs the AE's own factor.
            packed = self.stage != "autoencoder"
            multiple = factor * (2 if packed else 1)
            need(
                self.image_size % multiple == 0,
                f"image_size {self.image_size} must be a multiple of {multiple} "
                f"(autoencoder factor {factor}{' x 2x2 latent patches' if packed else ''})",
            )


def _default_guidance(defaults: dict[str, Any]) -> float:
    """The guidance a model generates with by default: what sample grids and evals use."""
    if defaults.get("guidance_mode") == "none":
        return 1.0
    return float(defaults.get("guidance", 4.0))


def guidance_distilled(model: dict[str, Any] | None) -> bool:
    """Whether a transformer config has a guidance embedding (guidance-distilled, as FLUX.1-dev)."""
    return bool((model or {}).get("guidance_embed", False))


def _bundle_preset(name: str, flag: str, why: str) -> dict[str, Any]:
    """A trained bundle's configs (by folder or local name), in the shape of a preset."""
    from pictor.checkpoint import CheckpointError, read_bundle_config  # torch-importing: only here
    from pictor.locate import resolve

    try:
        ref = resolve(name)
        if ref.path is None:
            raise ConfigError(f"{flag} {name}: '{ref.name}' is a preset (an untrained architecture); {why}")
        config = read_bundle_config(ref.path)
    except CheckpointError as exc:
        raise ConfigError(f"{flag} {name}: {exc}") from exc
    return {
        "model": config.model,
        "autoencoder": config.autoencoder,
        "text_encoder": config.text_encoder,
        "defaults": config.defaults,
    }


# Settings that change the loss curve; changing them on --resume is allowed but warned about.
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
