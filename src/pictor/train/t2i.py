"""The text-to-image stage: the Flux transformer on latents of the frozen autoencoder, conditioned on the
frozen text encoder, trained with the rectified-flow loss of `pictor.flow`. Its checkpoints are bundles.

Latent scale (FLUX.1 does the same with its fixed 0.3611 / 0.1159): a fresh t2i run encodes
`latent_stats_images` held-out images and sets the autoencoder's shift_factor = mean and
scale_factor = 1 / std of the raw latents (posterior means, over every element), so the transformer sees
roughly zero-mean, unit-variance latents whatever KL weight the AE was trained with. The two numbers are
stored in the bundle's autoencoder config, which `AutoEncoder.encode/decode` apply; a resumed run keeps
the numbers of its checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pictor.checkpoint import (
    TRANSFORMER_FILE,
    BundleConfig,
    CheckpointError,
    load_into,
    read_bundle_config,
    read_safetensors,
    save_bundle,
)
from pictor.flow import flow_loss, huber_threshold, interpolate, resolution_mu
from pictor.locate import resolve
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids, pack_latents
from pictor.t5_gguf_files import build_text_encoder
from pictor.train import previews
from pictor.train.config import (
    DEFAULT_TIMESTEP_SHIFT,
    DISTILLED_TRAIN_GUIDANCE,
    TrainConfig,
    guidance_distilled,
)
from pictor.train.data import Batch, ImageCaptionDataset, SampleDraws, to_float, validation_items
from pictor.train.distributed import DistInfo, broadcast
from pictor.train.sample_prompts import SamplePrompt, read_sample_prompts
from pictor.train.stages import Stage, holdout_batches, holdout_captions, load_autoencoder, seeded
from pictor.train.validation import validation_loss


def lineage_steps(training: dict[str, Any]) -> int:
    """A bundle's training steps with those of every bundle it was warm-started from (--init chains)."""
    init = training.get("init")
    before = lineage_steps(init.get("training") or {}) if init else 0
    return int(training.get("step") or 0) + before


def _weighted_flow_loss(
    pred: Tensor, x0: Tensor, eps: Tensor, weights: Tensor | None, kind: str, huber_c: Tensor | None
) -> Tensor:
    """The flow loss of error `kind` (`pictor.flow.flow_loss`), each value weighted by its loss mask where
    there are masks (kohya's masked loss: the weighted mean over all values, so a mask that leaves half an
    image out halves its loss)."""
    if weights is None:
        return flow_loss(pred, x0, eps, loss_type=kind, huber_c=huber_c)
    return (flow_loss(pred, x0, eps, reduction="none", loss_type=kind, huber_c=huber_c) * weights).mean()


class T2IStage(Stage):
    name = "t2i"

    def __init__(
        self, cfg: TrainConfig, ds: ImageCaptionDataset, info: DistInfo, resume: Path | None = None
    ) -> None:
        super().__init__(cfg, ds, info)
        assert cfg.model is not None and cfg.text_encoder is not None
        self.init = self._init_bundle() if resume is None and cfg.init is not None else None
        # Where a warm-started run's weights began (the --init path and that bundle's training record),
        # read once: a resumed run repeats what its checkpoint recorded, as the bundle may be gone by then.
        self.lineage: dict[str, Any] | None = None
        if resume is not None:  # the checkpoint's own AE, with the latent stats of the original start
            ae_params, ae_sd, _ = load_autoencoder(resume)
            training = read_bundle_config(resume).training
            self.ae_source = Path(training.get("autoencoder_source", resume))
            self.lineage = training.get("init")
        elif self.init is not None:  # the bundle's AE and latent stats: the weights were trained on them
            ae_params, ae_sd, _ = load_autoencoder(self.init)
            training = read_bundle_config(self.init).training
            self.ae_source = Path(training.get("autoencoder_source", self.init))
            self.lineage = {"path": str(cfg.init), "training": training}
        elif cfg.autoencoder_path:
            ae_params, ae_sd, self.ae_source = load_autoencoder(cfg.autoencoder_path)
        else:
            raise CheckpointError(
                "t2i training needs a trained autoencoder: pass --autoencoder DIR (the --out of "
                "`pictor train autoencoder`, an AE checkpoint, or a bundle)"
            )
        with torch.device("meta"):
            ae = AutoEncoder(AutoEncoderParams.from_dict(dict(ae_params)))
        self.ae = (
            load_into(ae, ae_sd, f"{self.ae_source}: autoencoder", dtype=torch.float32)
            .to(self.device)
            .eval()
            .requires_grad_(False)
        )
        self.text = build_text_encoder(cfg.text_encoder).to(self.device)
        multiple = 2 * self.ae.params.downsample_factor
        if int(cfg.image_size or 0) % multiple:
            raise CheckpointError(
                f"image_size {cfg.image_size} must be a multiple of {multiple} for this autoencoder "
                f"(factor {multiple // 2} x 2x2 latent patches)"
            )
        params = FluxParams.from_dict(cfg.model)
        self._check_dims(params)
        whole_here = info.is_main or not cfg.fsdp
        if whole_here:
            self.module = seeded(cfg.seed, lambda: Flux(params).init_weights())
        else:
            # FSDP: rank 0 alone builds (or loads) the whole model; `distributed.shard` sends each rank its
            # shards, so the others need only the architecture, which the meta device holds for free.
            with torch.device("meta"):
                self.module = Flux(params)
        if self.init is not None and whole_here:  # before the move: assign=True puts weights where read
            init_sd = read_safetensors(self.init / TRANSFORMER_FILE)  # fp16 or bf16 in a cast bundle
            load_into(self.module, init_sd, f"--init {self.init}", dtype=torch.float32)
        if not cfg.fsdp:  # sharding puts each rank's shards on the device
            self.module.to(self.device)
        self.forward_module = self.module
        if self.init is None and resume is None:
            self._set_latent_stats()

    def _init_bundle(self) -> Path:
        """The --init bundle's folder, checked against this run's architecture and text encoder."""
        c = self.cfg
        assert c.init is not None
        ref = resolve(c.init)
        if ref.path is None:
            raise CheckpointError(f"--init {c.init}: '{ref.name}' is a preset, not a trained bundle")
        bundle = read_bundle_config(ref.path)
        for name, ours, theirs in (
            ("model", c.model, bundle.model),
            ("text_encoder", c.text_encoder, bundle.text_encoder),
        ):
            if ours != theirs:
                raise CheckpointError(
                    f"--init {c.init}: the run's {name} config differs from the bundle's; a warm start keeps "
                    f"the bundle's architecture (drop '{name}' from the training config)"
                )
        return ref.path

    def _check_dims(self, p: FluxParams) -> None:
        z, ctx, pooled = self.ae.params.z_channels, self.text.context_dim, self.text.pooled_dim
        problems = []
        if p.in_channels != 4 * z or p.out_channels != 4 * z:
            problems.append(
                f"in/out_channels {p.in_channels}/{p.out_channels} != 4 x AE z_channels ({4 * z})"
            )
        if p.context_in_dim != ctx:
            problems.append(f"context_in_dim {p.context_in_dim} != text encoder width {ctx}")
        if p.vec_in_dim != pooled:
            problems.append(f"vec_in_dim {p.vec_in_dim} != text encoder pooled width {pooled}")
        if problems:
            raise CheckpointError("transformer config does not fit its inputs: " + "; ".join(problems))

    @torch.no_grad()
    def _set_latent_stats(self) -> None:
        n = self.cfg.latent_stats_images
        total = torch.zeros(3, dtype=torch.float64)  # count, sum, sum of squares
        for images in holdout_batches(self.ds, n, 64):  # batches of one size (buckets differ)
            x = to_float(images, self.device)
            mean, _ = self.ae.encode_moments(x)  # fp32: statistics deserve full precision
            m = mean.double().cpu()
            total += torch.stack(
                [torch.tensor(float(m.numel()), dtype=torch.float64), m.sum(), m.square().sum()]
            )
        count, s, sq = total.tolist()
        mu = s / count
        std = math.sqrt(max(sq / count - mu * mu, 1e-12))
        stats = broadcast(torch.tensor([mu, 1.0 / std], dtype=torch.float64, device=self.device), self.info)
        self.ae.params.shift_factor, self.ae.params.scale_factor = (float(v) for v in stats.cpu().tolist())

    def shard_units(self) -> list[nn.Module]:
        """FSDP's units: each transformer block gathers its weights only while it runs (as FLUX.1 is
        sharded in practice); the root keeps the embedders and the final layer."""
        assert isinstance(self.module, Flux)
        return [*self.module.double_blocks, *self.module.single_blocks]

    def draws(self) -> SampleDraws:
        c = self.cfg
        return SampleDraws(
            c.seed,
            self._latent_shape(self.ae),
            timesteps=True,
            caption_dropout=c.caption_dropout,
            t_kind=c.timestep_sampling,
            t_mean=c.timestep_mean,
            t_std=c.timestep_std,
            t_shift=self._timestep_shift(),
            # buckets: each image's noise takes its own latent size
            latent_factor=self.ae.params.downsample_factor if c.buckets else 0,
        )

    def _timestep_shift(self) -> float:
        """The shift of "shift" / "flux_shift" training timesteps (1: none): the configured one, or FLUX.1's
        sampling shift at this run's token count (exp(mu), as `schedule_flux` shifts)."""
        c = self.cfg
        if c.timestep_sampling == "shift":
            return c.timestep_shift if c.timestep_shift is not None else DEFAULT_TIMESTEP_SHIFT
        if c.timestep_sampling == "flux_shift":
            _, h, w = self._latent_shape(self.ae)
            return math.exp(resolution_mu((h // 2) * (w // 2)))
        return 1.0

    def loss(self, fwd: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        drops = batch.draws["drop"].tolist()
        captions = ["" if drop else cap for drop, cap in zip(drops, batch.captions, strict=True)]
        if "latent" in batch.draws:  # --cache-latents: the stored posterior means, scaled and shifted here
            mean = batch.draws["latent"].to(self.device, non_blocking=True)
            z = self.ae.scale_latent(mean).float()
        else:
            assert batch.images is not None  # without cached latents the stream decodes every image
            x = to_float(batch.images, self.device)
            with torch.no_grad(), previews.autocast(self.device, self.amp):
                z = self.ae.encode(x).float()  # [B, C, h, w], scaled and shifted
        noise = batch.draws["noise"].to(self.device, non_blocking=True)
        t = batch.draws["t"].to(self.device, non_blocking=True)
        emb = self.text.encode(captions)
        x0, eps = pack_latents(z), pack_latents(noise)  # [B, N, 4C]
        x_t = interpolate(x0, eps, t)
        b, h, w = z.shape[0], z.shape[2], z.shape[3]
        img_ids = make_img_ids(b, h, w, device=self.device)
        txt_ids = make_txt_ids(b, emb.tokens.shape[1], device=self.device)
        extra = self.forward_extras(batch, (h // 2, w // 2))
        if guidance_distilled(c.model):
            # A guidance-distilled model (FLUX.1-dev) is trained at one guidance value, as kohya and
            # diffusers train FLUX.1-dev LoRAs; its forward refuses to run without one.
            scale = c.guidance_scale if c.guidance_scale is not None else DISTILLED_TRAIN_GUIDANCE
            extra["guidance"] = torch.full((b,), float(scale), device=self.device)
        with previews.autocast(self.device, self.amp):
            txt, vec = emb.tokens.to(self.device), emb.pooled.to(self.device)
            out = fwd(x_t, img_ids, txt, txt_ids, t, vec, **extra)
        weights = self._mask_weights(batch, z) if "mask" in batch.draws else None
        huber = None
        if c.loss_type in ("huber", "smooth_l1"):
            huber = huber_threshold(t, c.huber_c, c.huber_schedule, c.huber_scale)
        if isinstance(out, Tensor):
            return _weighted_flow_loss(out, x0, eps, weights, c.loss_type, huber), {}
        # (velocity, auxiliary loss): a forward module that trains an adapter with a loss of its own too
        pred, aux = out
        flow = _weighted_flow_loss(pred, x0, eps, weights, c.loss_type, huber)
        return flow + aux, {"flow_loss": flow.detach(), "aux_loss": aux.detach()}

    def _mask_weights(self, batch: Batch, z: Tensor) -> Tensor:
        """The loss masks (`pictor.data.loss_masks`, uint8 [B, 1, H, W]) as weights of each packed latent
        value [B, N, 4C]: each mask averaged over the pixels of a latent pixel (kohya's area interpolation),
        the same for every channel."""
        mask = batch.draws["mask"].to(self.device, non_blocking=True).float().div_(255.0)
        mask = F.interpolate(mask, size=z.shape[2:], mode="area")  # [B, 1, h, w]
        return pack_latents(mask.expand(-1, z.shape[1], -1, -1))

    def forward_extras(self, batch: Batch, grid: tuple[int, int]) -> dict[str, Any]:
        """More keyword inputs of the forward module for this batch (the layout stage's boxes); none here."""
        return {}

    def bundle_config(self, step: int) -> BundleConfig:
        c = self.cfg
        defaults = {**(c.defaults or {}), "width": c.image_size, "height": c.image_size}
        description = f"trained by pictor train t2i on {c.data}, {step} steps"
        if self.lineage:
            before = lineage_steps(self.lineage.get("training", {}))
            description += f" from {self.lineage['path']}"
            description += f" (after its {before} steps)" if before else ""
        return BundleConfig(
            name=Path(c.out).resolve().name,
            preset=c.preset,
            model=self.module.params.to_dict(),
            autoencoder=self.ae.params.to_dict(),
            text_encoder=self.text.config(),
            defaults=defaults,
            trained=True,
            description=description,
            training={
                **self.training_info(step),
                "autoencoder_source": str(self.ae_source),
                **({"init": self.lineage} if self.lineage else {}),
            },
        )

    def write_weights(self, folder: Path, ema: nn.Module, step: int) -> None:
        save_bundle(folder, self.bundle_config(step), ema.state_dict(), self.ae.state_dict())

    def ema_weights(self, checkpoint: Path) -> dict[str, Tensor]:
        return read_safetensors(checkpoint / TRANSFORMER_FILE)

    def _prompts(self, n: int) -> list[str]:
        if self.cfg.data == "shapes":
            return [s["prompt"] for s in previews.eval_specs(n)]
        return holdout_captions(self.ds, n)

    def sample_grid(self, ema: nn.Module) -> Any:
        c = self.cfg
        if c.sample_prompts:
            return previews.grid(self._file_samples(ema, read_sample_prompts(c.sample_prompts)), columns=8)
        prompts = self._prompts(c.num_samples)
        images = previews.generate(
            ema,
            self.ae,
            self.text,
            prompts,
            list(range(len(prompts))),
            int(c.image_size or 64),
            c.sample_steps,
            c.sample_guidance,
            self.device,
            self.amp,
        )
        return previews.grid(images, columns=min(8, len(images)))

    def _file_samples(self, ema: nn.Module, lines: list[SamplePrompt]) -> list[np.ndarray]:
        """The --sample-prompts file's images, line i with its own settings (seed i unless it gives one),
        generated in groups of one size, steps and guidance."""
        c = self.cfg
        side = int(c.image_size or 64)
        groups: dict[tuple[int, int, int, float], list[int]] = {}
        for i, line in enumerate(lines):
            steps = line.steps or c.sample_steps
            guidance = line.guidance if line.guidance is not None else c.sample_guidance
            groups.setdefault((line.width or side, line.height or side, steps, guidance), []).append(i)
        images: list[np.ndarray] = [np.zeros(0)] * len(lines)
        for (width, height, steps, guidance), members in groups.items():
            drawn = previews.generate(
                ema,
                self.ae,
                self.text,
                [lines[i].prompt for i in members],
                [i if lines[i].seed is None else lines[i].seed for i in members],
                (width, height),
                steps,
                guidance,
                self.device,
                self.amp,
                negatives=[lines[i].negative for i in members],
            )
            for i, image in zip(members, drawn, strict=True):
                images[i] = image
        return images

    def evaluate(self, ema: nn.Module) -> dict[str, Any] | None:
        c = self.cfg
        if c.data != "shapes":
            held_out = validation_items(self.ds)
            return validation_loss(self, ema, self.ds, held_out) if held_out is not None else None
        specs = previews.eval_specs(c.eval_prompts)
        k = c.eval_images_per_prompt
        prompts = [s["prompt"] for s in specs for _ in range(k)]
        seeds = [1000 + i for i in range(len(prompts))]
        return previews.score(specs, self.eval_images(ema, specs, k, prompts, seeds), k)

    def eval_images(
        self, ema: nn.Module, specs: list[dict], k: int, prompts: list[str], seeds: list[int]
    ) -> Any:
        """The images an eval scores: k per spec, prompt i with seed i (the layout stage adds layouts)."""
        c = self.cfg
        return previews.generate(
            ema,
            self.ae,
            self.text,
            prompts,
            seeds,
            int(c.image_size or 64),
            c.sample_steps,
            c.sample_guidance,
            self.device,
            self.amp,
            batch_size=64,
        )

    def state(self) -> dict[str, Any]:
        return {
            "scale_factor": self.ae.params.scale_factor,
            "shift_factor": self.ae.params.shift_factor,
            "autoencoder_source": str(self.ae_source),
        }
