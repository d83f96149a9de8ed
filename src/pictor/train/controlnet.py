"""The controlnet stage: a FLUX.1 ControlNet trained beside a frozen base bundle, as kohya's
flux_train_control_net.py and diffusers' train_controlnet_flux.py train one.

The ControlNet is grown from the base (`controlnet_from_transformer`: its embedders and first blocks copied,
its control embedder and residual projections zero, so it starts by changing nothing); the base's flow loss
with the ControlNet's residuals added after its blocks is the loss, and only the ControlNet learns. Each
training image's control picture is drawn from the image itself as it was cropped (``--control canny``:
OpenCV's Canny edges with thresholds 100 and 200, as diffusers' ControlNet examples and `pictor preprocess
canny` draw them), or read from ``--control-dir`` beside it (``--control folder``: a depth map, pose or mask
of the user's, cropped and mirrored with the image by the data, `pictor.data.folder`) or from where its
metadata.jsonl line names it (``--control metadata``, Hugging Face's ControlNet dataset layout); either is
encoded by the base's autoencoder as the pipeline encodes a control picture. The caption is dropped with
--caption-dropout as usual; the control picture stays. Outputs: OUT/checkpoints/step-N/controlnet/ (+
optimizer, RNG state for resume), OUT/final/controlnet/ and a copy at OUT/controlnet/, each a diffusers
ControlNet folder (config.json + diffusion_pytorch_model.safetensors, whose header names the base it was
trained on) that `pictor generate --controlnet OUT/controlnet --controlnet-image EDGES` and diffusers'
`FluxControlNetModel.from_pretrained` load.

Periodic evals on the shapes world generate each dev prompt from the edges of a ground-truth scene of its spec
and score the images against the spec: how far the edges carry counts and positions the base alone misses.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pictor.checkpoint import CheckpointError, staged_dir
from pictor.controlnet_files import load_controlnet
from pictor.controlnet_writing import save_controlnet_folder, unrepresentable
from pictor.edge_maps import CONTROLNET_CANNY, canny_control_picture
from pictor.models.controlnet import FluxControlNet, controlnet_from_transformer
from pictor.models.flux import pack_latents
from pictor.train import previews
from pictor.train.adapter_stage import FileAdapterStage
from pictor.train.config import CONTROLS_FROM_DATA, default_controlnet_blocks
from pictor.train.data import Batch, to_float, to_tensor
from pictor.train.stages import seeded

CONTROLNET_DIR = "controlnet"
EVAL_CONTROL_SEED = 13  # ground-truth scenes of the eval specs, whose edges the evals draw from


class ControlNetForward(nn.Module):
    """The frozen transformer and the trained ControlNet in one forward: DDP wraps this module, so the
    ControlNet's gradients are averaged over the ranks like any model's."""

    def __init__(self, flux: nn.Module, controlnet: nn.Module) -> None:
        super().__init__()
        self.flux, self.controlnet = flux, controlnet

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        t: Tensor,
        y: Tensor,
        *,
        control: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        residuals = self.controlnet(img, img_ids, control, txt, txt_ids, t, y, guidance)
        return self.flux(img, img_ids, txt, txt_ids, t, y, guidance, controlnet=residuals)


def control_pictures(images: np.ndarray, kind: str) -> np.ndarray:
    """uint8 [B, H, W, 3] training images -> their control pictures, uint8 [B, H, W, 3], where they are
    drawn from the images (kind "canny"; "folder" and "metadata" runs read their own, which come with the
    batch)."""
    if kind != "canny":  # TrainConfig.validate admits CONTROL_KINDS only
        raise CheckpointError(f"controlnet training: control {kind!r} pictures are not drawn from images")
    low, high = CONTROLNET_CANNY
    return np.stack([canny_control_picture(np.ascontiguousarray(im), low, high) for im in images])


class ControlNetStage(FileAdapterStage):
    """A FileAdapterStage whose adapter is a ControlNet, kept as a diffusers folder."""

    name = "controlnet"
    adapter_file = CONTROLNET_DIR

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.forward_module = ControlNetForward(self.flux, self.module)

    def build_trainable(self) -> nn.Module:
        p = self.flux.params
        odd = unrepresentable(p)  # checked now, not when the first checkpoint is written
        if odd:
            raise CheckpointError(
                f"controlnet training: the base's blocks are not FLUX.1's ({', '.join(odd)}), which the "
                "diffusers ControlNet folder this stage writes requires; train on a FLUX.1-type base (as "
                "pictor's default model)"
            )
        double, single = self.cfg.controlnet_blocks or default_controlnet_blocks(p.depth)
        if double > p.depth or single > p.depth_single_blocks:
            raise CheckpointError(
                f"--controlnet-blocks {double},{single}: the ControlNet's blocks are copies of the base's "
                f"first ones, but it has only {p.depth} double and {p.depth_single_blocks} single blocks"
            )
        try:
            net = seeded(self.cfg.seed, lambda: controlnet_from_transformer(self.flux, double, single))
        except ValueError as exc:  # a base stored quantized or in FP8
            raise CheckpointError(
                f"controlnet training: {exc}. Widen the base first: pictor convert dtype BASE --dtype bf16 "
                "--out WIDE, and train with --base WIDE"
            ) from None
        if single == 0 and double > 0:
            # Without single blocks the last double block's text-stream output is never read: its text
            # projection and MLP get no gradient, which DDP (torchrun) refuses; they stay as copied.
            last = net.double_blocks[-1]
            last.txt_attn.proj.requires_grad_(False)
            last.txt_mlp.requires_grad_(False)
        return net.to(self.device)

    @torch.no_grad()
    def _control_tokens(self, images: np.ndarray) -> Tensor:
        """uint8 [B, H, W, 3] images -> their control pictures' packed latents [B, N, 4C]."""
        return self._encode_controls(to_tensor(list(control_pictures(images, self.cfg.control))))

    @torch.no_grad()
    def _encode_controls(self, pictures: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] control pictures -> packed latents [B, N, 4C], encoded by the frozen autoencoder
        (its scaled mean, as the pipeline encodes a control picture)."""
        with previews.autocast(self.device, self.amp):
            z = self.ae.encode(to_float(pictures, self.device)).float()
        return pack_latents(z)

    def forward_extras(self, batch: Batch, grid: tuple[int, int]) -> dict[str, Any]:
        """The batch's control pictures, drawn from its images as cropped, for the forward module."""
        if batch.controls is not None:  # the data's own, cropped and mirrored with the images
            return {"control": self._encode_controls(batch.controls)}
        if batch.images is None:  # TrainConfig refuses --cache-latents for this stage
            raise CheckpointError("controlnet training: a batch without its images reached the loss")
        images = batch.images.permute(0, 2, 3, 1).numpy()
        return {"control": self._control_tokens(images)}

    # -- outputs: a diffusers ControlNet folder ---------------------------------------------------------

    def save_adapter(self, ema: nn.Module, path: Path, metadata: dict[str, str]) -> None:
        assert isinstance(ema, FluxControlNet)
        save_controlnet_folder(ema, path, metadata)

    def ema_weights(self, checkpoint: Path) -> dict[str, Tensor]:
        net = load_controlnet(checkpoint / CONTROLNET_DIR)
        return {k: v.float() for k, v in net.state_dict().items()}

    def publish(self, final: Path) -> Path:
        """Copy final/controlnet to OUT/controlnet (atomically) and return that folder."""
        out = Path(self.cfg.out) / CONTROLNET_DIR
        with staged_dir(out) as tmp:
            for f in (final / CONTROLNET_DIR).iterdir():
                shutil.copyfile(f, tmp / f.name)
        return out

    def training_info(self, step: int) -> dict[str, Any]:
        assert isinstance(self.module, FluxControlNet)
        p = self.module.params
        return {
            **super().training_info(step),
            "controlnet_blocks": [p.depth, p.depth_single_blocks],
            "control": self.cfg.control,
        }

    # -- previews and evals with the EMA ControlNet ------------------------------------------------------

    def _generate_with_controls(
        self, ema: nn.Module, prompts: list[str], images: np.ndarray, seeds: list[int]
    ) -> np.ndarray:
        """Prompt i from the control picture of `images[i]` (a scene whose edges it follows), seed i. The EMA
        ControlNet as it is (float32): under autocast its outputs take the base's precision, as in
        training."""

        def control_fn(part: slice) -> tuple[nn.Module, Tensor]:
            if self.cfg.control in CONTROLS_FROM_DATA:  # `images` are the control pictures themselves
                return ema, self._encode_controls(to_tensor(list(images[part])))
            return ema, self._control_tokens(images[part])

        return self.preview_images(prompts, seeds, control_fn=control_fn)

    @torch.no_grad()
    def sample_grid(self, ema: nn.Module) -> Any:
        """Top row: the control pictures; below: the images drawn from them and the prompts."""
        n = self.cfg.num_samples
        if self.cfg.data == "shapes":
            specs = previews.eval_specs(n)
            prompts, scenes = [s["prompt"] for s in specs], self.eval_scenes(specs, 1, EVAL_CONTROL_SEED)
        else:  # the first images of the folder (or their control pictures) and their captions
            from_data = self.cfg.control in CONTROLS_FROM_DATA
            prompts, scenes = self.folder_previews(n, "control" if from_data else None)
        images = self._generate_with_controls(ema, prompts, scenes, list(range(len(prompts))))
        from_data = self.cfg.control in CONTROLS_FROM_DATA
        controls = scenes if from_data else control_pictures(scenes, self.cfg.control)
        return previews.grid(np.concatenate([controls, images]), columns=len(prompts))

    @torch.no_grad()
    def eval_images(
        self, ema: nn.Module, specs: list[dict], k: int, prompts: list[str], seeds: list[int]
    ) -> Any:
        """The dev prompts, each from the edges of a ground-truth scene of its spec."""
        return self._generate_with_controls(
            ema, prompts, self.eval_scenes(specs, k, EVAL_CONTROL_SEED), seeds
        )
