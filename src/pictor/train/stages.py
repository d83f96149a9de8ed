"""Training stages: what is trained, how a batch becomes a loss, what a checkpoint's weights are.

- AutoencoderStage (here): the KL autoencoder, L1 (or L2) reconstruction + a small KL term. Its
  checkpoints are AE checkpoints (autoencoder.json + autoencoder.safetensors), which the t2i stage reads.
- T2IStage (`pictor.train.t2i`): the Flux transformer on the frozen autoencoder's latents. Its checkpoints
  are full bundles.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pictor.checkpoint import (
    AUTOENCODER_FILE,
    CheckpointError,
    is_bundle,
    read_bundle_config,
    read_safetensors,
    write_json,
    write_safetensors,
)
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams, kl_loss
from pictor.train import previews
from pictor.train.config import TrainConfig
from pictor.train.data import (
    Batch,
    ImageCaptionDataset,
    SampleDraws,
    dataset_length,
    holdout_index,
    to_float,
    to_tensor,
)
from pictor.train.distributed import DistInfo
from pictor.train.sample_prompts import read_sample_prompts, report_ignored_options

AE_CONFIG = "autoencoder.json"
AE_FORMAT = "pictor-autoencoder"


def seeded(seed: int, build):  # type: ignore[no-untyped-def]
    """Build a module under a fixed seed without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def holdout_images(ds: ImageCaptionDataset, n: int) -> tuple[torch.Tensor, list[str]]:
    length = dataset_length(ds)
    items = [ds[holdout_index(length, i)] for i in range(n)]
    return to_tensor([it[0] for it in items]), [it[1] for it in items]


def holdout_captions(ds: ImageCaptionDataset, n: int) -> list[str]:
    length = dataset_length(ds)
    return [ds[holdout_index(length, i)][1] for i in range(n)]


def holdout_batches(ds: ImageCaptionDataset, n: int, batch: int) -> Iterator[torch.Tensor]:
    """The first n held-out images as uint8 [B, 3, H, W] batches of at most `batch`, each of one size
    (aspect-ratio buckets give images of several), in order of first appearance."""
    length = dataset_length(ds)
    by_size: dict[tuple[int, ...], list[Any]] = {}
    for i in range(n):
        image = ds[holdout_index(length, i)][0]
        by_size.setdefault(tuple(image.shape), []).append(image)
    for images in by_size.values():
        for start in range(0, len(images), batch):
            yield to_tensor(images[start : start + batch])


class Stage:
    """Base: the trained module, the module DDP wraps, and the stage's parts of the run's outputs."""

    name = ""
    module: nn.Module  # trained weights (optimizer, EMA and checkpoints see these names)
    forward_module: nn.Module  # what the loss calls; DDP wraps this one

    def __init__(self, cfg: TrainConfig, ds: ImageCaptionDataset, info: DistInfo) -> None:
        self.cfg, self.ds, self.info, self.device = cfg, ds, info, info.device
        self.amp = cfg.mixed_precision == "bf16" or (
            cfg.mixed_precision == "auto" and self.device.type == "cuda"
        )
        if cfg.sample_prompts and info.is_main:
            report_ignored_options(read_sample_prompts(cfg.sample_prompts), cfg.sample_prompts)

    @property
    def precision(self) -> str:
        """What the steps run in, which `--mixed-precision auto` leaves to the device: "bf16" (autocast)
        or "fp32". Recorded with the weights and in every checkpoint."""
        return "bf16" if self.amp else "fp32"

    def loss(self, fwd: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def draws(self) -> SampleDraws:
        """Per-sample random numbers the loss needs, drawn by the data loader's workers."""
        raise NotImplementedError

    def _latent_shape(self, ae: AutoEncoder) -> tuple[int, int, int]:
        side = int(self.cfg.image_size or 64) // ae.params.downsample_factor
        return (ae.params.z_channels, side, side)

    def after_step(self) -> dict[str, float]:
        """After each optimizer step, before the EMA update: a change to the trained weights (the LoRA
        stage's max-norm regularisation) and the numbers it logs."""
        return {}

    def write_weights(self, folder: Path, ema: nn.Module, step: int) -> None:
        raise NotImplementedError

    def ema_weights(self, checkpoint: Path) -> dict[str, Tensor]:
        raise NotImplementedError

    def sample_grid(self, ema: nn.Module) -> Any:
        raise NotImplementedError

    def evaluate(self, ema: nn.Module) -> dict[str, Any] | None:
        return None

    def state(self) -> dict[str, Any]:
        return {}

    def training_info(self, step: int) -> dict[str, Any]:
        c = self.cfg
        return {
            "stage": self.name,
            "step": step,
            "data": c.data,
            "image_size": c.image_size,
            "global_batch": c.global_batch(self.info.world_size),
            "lr": c.lr,
            "seed": c.seed,
            "precision": self.precision,
        }


# -- autoencoder ------------------------------------------------------------------------------------------


class _AEForward(nn.Module):
    """The AE's training pass with caller-given posterior noise (per-sample seeded), for DDP to wrap."""

    def __init__(self, ae: AutoEncoder) -> None:
        super().__init__()
        self.ae = ae

    def forward(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean, logvar = self.ae.encode_moments(x)
        z = mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
        if self.ae.post_quant_conv is not None:
            z = self.ae.post_quant_conv(z)
        return self.ae.decoder(z), mean, logvar


class AutoencoderStage(Stage):
    name = "autoencoder"

    def __init__(self, cfg: TrainConfig, ds: ImageCaptionDataset, info: DistInfo) -> None:
        super().__init__(cfg, ds, info)
        assert cfg.autoencoder is not None
        params = AutoEncoderParams.from_dict(cfg.autoencoder)
        self.module = seeded(cfg.seed, lambda: AutoEncoder(params)).to(self.device)
        self.forward_module = _AEForward(self.module)
        self._reference: float | None = None

    def draws(self) -> SampleDraws:
        return SampleDraws(self.cfg.seed, self._latent_shape(self.module))

    def loss(self, fwd: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        assert batch.images is not None  # the autoencoder stage never takes cached latents
        x = to_float(batch.images, self.device)
        noise = batch.draws["noise"].to(self.device, non_blocking=True)
        with previews.autocast(self.device, self.amp):
            recon, mean, logvar = fwd(x, noise)
        recon = recon.float()
        l1 = (recon - x).abs().mean()
        l2 = (recon - x).square().mean()
        rec = {"l1": l1, "l2": l2, "l1+l2": l1 + l2}[self.cfg.recon_loss]
        # LDM scales: recon summed over pixels, KL summed over the latent; divide both by the pixel count.
        kl = kl_loss(mean.float(), logvar.float()) / x[0].numel()
        return rec + self.cfg.kl_weight * kl, {"l1": l1.detach(), "kl": kl.detach()}

    def write_weights(self, folder: Path, ema: nn.Module, step: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(ema.state_dict(), folder / AUTOENCODER_FILE, {"format": "pt"})
        record = {
            "format": AE_FORMAT,
            "preset": self.cfg.preset,
            "autoencoder": self.module.params.to_dict(),
            "training": self.training_info(step),
        }
        write_json(record, folder / AE_CONFIG)

    def ema_weights(self, checkpoint: Path) -> dict[str, Tensor]:
        return read_safetensors(checkpoint / AUTOENCODER_FILE)

    def sample_grid(self, ema: nn.Module) -> Any:
        images, _ = holdout_images(self.ds, self.cfg.num_samples)
        recon = previews.reconstruct(ema, images, self.device, self.amp)
        originals = images.permute(0, 2, 3, 1).numpy()
        return previews.grid([*originals, *recon], columns=len(originals))

    def evaluate(self, ema: nn.Module) -> dict[str, Any] | None:
        """Do shapes survive the round trip? Scores of reconstructed ground-truth renders of dev prompts,
        next to the scores of the renders themselves (`reference`), and the PSNR on held-out images."""
        images, _ = holdout_images(self.ds, max(self.cfg.num_samples, 16))
        recon = previews.reconstruct(ema, images, self.device, self.amp)
        mse = np.mean((recon.astype(np.float64) - images.permute(0, 2, 3, 1).numpy()) ** 2)
        result: dict[str, Any] = {"psnr": float(10 * math.log10(255.0**2 / max(mse, 1e-12)))}
        if self.cfg.data == "shapes":
            from pictor.eval.shapes import ground_truth_images

            specs = previews.eval_specs(self.cfg.eval_prompts)
            k = self.cfg.eval_images_per_prompt
            truth = ground_truth_images(specs, k, seed=self.cfg.seed, size=int(self.cfg.image_size or 64))
            flat = [img for imgs in truth for img in imgs]
            recon = previews.reconstruct(ema, to_tensor(flat), self.device, self.amp)
            result.update(previews.score(specs, recon, k))
            if self._reference is None:
                self._reference = previews.score(specs, np.stack(flat), k)["overall"]
            result["reference"] = self._reference
        return result


def find_autoencoder(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The AE params and the folder holding its weights: a bundle, an AE checkpoint, or an AE training
    run's output folder (its final/ or newest checkpoint). Reads no weights."""
    p = Path(path)
    if p.is_file():
        raise CheckpointError(
            f"--autoencoder {p}: give a folder (a bundle, an AE checkpoint, or the --out of an "
            "autoencoder run), not a single file"
        )
    if (p / AE_CONFIG).is_file():
        return json.loads((p / AE_CONFIG).read_text())["autoencoder"], p
    if is_bundle(p):
        return read_bundle_config(p).autoencoder, p
    from pictor.train.state import find_latest

    for candidate in (p / "final", find_latest(p)):
        if candidate is not None and candidate.is_dir() and (candidate / AUTOENCODER_FILE).is_file():
            return find_autoencoder(candidate)
    raise CheckpointError(
        f"--autoencoder {p}: no autoencoder found (expected {AE_CONFIG} or config.json with "
        f"{AUTOENCODER_FILE}, or an autoencoder run's final/ or checkpoints/)"
    )


def load_autoencoder(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], Path]:
    """AE params and weights from a bundle, an AE checkpoint, or an AE training run's output folder."""
    params, folder = find_autoencoder(path)
    return params, read_safetensors(folder / AUTOENCODER_FILE), folder
