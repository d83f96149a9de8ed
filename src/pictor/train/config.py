"""TrainConfig: every setting of a training run, JSON-able, stored in each checkpoint.

A run is fully described by its TrainConfig: the stage, the data, the model architecture (from a preset,
optionally overridden), the optimizer and schedule, and the cadence of logs, samples, evals and
checkpoints. `--resume` reads the config back from the checkpoint, so a resumed run needs no flags again.

Batch convention (as in diffusers' and kohya's scripts): ``batch_size`` is the micro-batch of ONE process;
one optimizer step sees ``batch_size * grad_accum * world_size`` images (`global_batch`).

The settings' choices and stage defaults live in `pictor.train.config_choices`, the checks of a config
in `pictor.train.config_checks`, and what `--resume` may change in `pictor.train.resume_rules`.
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
from pictor.train.config_checks import check_config, guidance_distilled
from pictor.train.config_choices import (
    ADAPTER_STAGES,
    CONTROL_KINDS,
    CONTROLS_FROM_DATA,
    DEFAULT_TIMESTEP_SHIFT,
    DISTILLED_TRAIN_GUIDANCE,
    HUBER_SCHEDULES,
    IMAGE_EXTENSIONS,
    LORA_ALGOS,
    LOSS_TYPES,
    LR_SCHEDULES,
    MIXED_PRECISION,
    OPTIMIZERS,
    RECON_LOSSES,
    STAGE_DEFAULTS,
    STAGES,
    TIMESTEP_SAMPLINGS,
    ConfigError,
    default_controlnet_blocks,
)
from pictor.train.resume_rules import LORA_SHAPE_KEYS, TRAJECTORY_KEYS, fixed_on_resume, resume_refusal

# The names of the modules split off this one stay importable from here, where callers import them.
__all__ = [
    "ADAPTER_STAGES",
    "CONTROLS_FROM_DATA",
    "CONTROL_KINDS",
    "DEFAULT_TIMESTEP_SHIFT",
    "DISTILLED_TRAIN_GUIDANCE",
    "HUBER_SCHEDULES",
    "IMAGE_EXTENSIONS",
    "LORA_ALGOS",
    "LORA_SHAPE_KEYS",
    "LOSS_TYPES",
    "LR_SCHEDULES",
    "MIXED_PRECISION",
    "OPTIMIZERS",
    "RECON_LOSSES",
    "STAGES",
    "STAGE_DEFAULTS",
    "TIMESTEP_SAMPLINGS",
    "TRAJECTORY_KEYS",
    "ConfigError",
    "TrainConfig",
    "data_path",
    "default_controlnet_blocks",
    "fixed_on_resume",
    "guidance_distilled",
    "resume_refusal",
]


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
    # kohya's network_args rank_dropout / module_dropout (plain LoRA, while training only): each sample's rank
    # channels of A x dropped with this probability (the rest scaled by 1 / (1 - p)), or a whole adapter
    # left out of a forward pass with this one (pictor.models.lora_layers.LoRAAdapter)
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    # kohya's --scale_weight_norms: after each optimizer step every adapter's update alpha / rank * B @ A is
    # scaled back to this Frobenius norm where it is larger (pictor.models.lora.max_norm_adapters)
    scale_weight_norms: float | None = None
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
        check_config(self)


def _default_guidance(defaults: dict[str, Any]) -> float:
    """The guidance a model generates with by default: what sample grids and evals use."""
    if defaults.get("guidance_mode") == "none":
        return 1.0
    return float(defaults.get("guidance", 4.0))


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
