"""The reference stage: a ReferenceAdapter (image prompts) trained on a frozen base bundle.

The base model's flow loss with the adapter's residuals added to the prompt's token states and pooled
vector, plus a direct loss on both (see ReferenceForward); only the adapter learns (as
IP-Adapter and FLUX.1 Redux freeze their base). Each training image comes with a reference picture
(`pictor.data.reference_pairs`: in the shapes world another scene of the same spec, in a folder the
image itself). The caption is dropped with --caption-dropout as usual; a high rate (0.5 in the README's
recipe) makes the reference carry the content on its own. Outputs:
OUT/checkpoints/step-N/reference.safetensors (+ optimizer, RNG state for resume),
OUT/final/reference.safetensors and a copy at OUT/reference.safetensors. Copied into the base bundle's
folder, it is loaded with the model and `pictor generate --reference IMAGE` works.

Periodic evals generate from an empty prompt and a reference (a ground-truth render of each dev spec),
and score the image against the spec: how much of the reference's content the model carries over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pictor.checkpoint import CheckpointError
from pictor.data.reference_pairs import ReferencePairs
from pictor.models.flux import pack_latents
from pictor.models.reference import ReferenceAdapter, ReferenceConditioning, apply_reference
from pictor.reference_files import REFERENCE_FILE, reference_params_for, save_reference_adapter
from pictor.train import previews
from pictor.train.adapter_stage import FileAdapterStage
from pictor.train.config import TrainConfig
from pictor.train.data import Batch, ImageCaptionDataset, to_float, to_tensor
from pictor.train.distributed import DistInfo
from pictor.train.stages import seeded

EVAL_REFERENCE_SEED = 11  # ground-truth scenes of the eval specs, rendered as the evals' references


# Weight of the direct loss (see ReferenceForward) beside the flow loss. At 0.1 the pooled part fell only
# from 0.49 to 0.42 in 200 steps of 16 images at lr 1e-3: the flow loss's noisy gradients set the step
# size of the same weights, so the direct loss needs the larger share.
DIRECT_LOSS_WEIGHT = 1.0


class ReferenceForward(nn.Module):
    """The frozen transformer and the trained adapter in one forward: DDP wraps this module, so the
    adapter's gradients are averaged over the ranks like any model's.

    Besides the velocity it returns an auxiliary loss. Through the frozen model the flow loss says only
    faintly, sample by sample, what the picture should add (measured: 200 steps of 16 images moved a new
    adapter's outputs by about 1e-3), so the adapter is also taught directly what the picture's caption
    would give the model: an empty prompt's token states plus the adapter's residuals should be the
    caption's token states (squared error relative to theirs), and likewise its pooled vector (squared
    distance; unit vectors). Both matter: in the shipped model an empty prompt's tokens with a caption's
    pooled vector scored 0.075 on 25 dev prompts x 2, the caption's tokens with an empty pooled vector
    0.258, the whole caption 0.408, nothing 0.021."""

    def __init__(self, flux: nn.Module, adapter: nn.Module, empty: tuple[Tensor, Tensor]) -> None:
        super().__init__()
        self.flux, self.adapter = flux, adapter
        # the prompt "": token states [1, L, D] and pooled vector [1, P]
        self.register_buffer("empty_tokens", empty[0], persistent=False)
        self.register_buffer("empty_pooled", empty[1], persistent=False)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        t: Tensor,
        y: Tensor,
        *,
        reference: tuple[Tensor, tuple[int, int], Tensor, Tensor],
        guidance: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        latents, (grid_h, grid_w), target_tokens, target_pooled = reference
        out = self.adapter(latents, grid_h, grid_w)
        # per sample, so that the mean over ranks is the mean over the global batch (DDP)
        tokens_error = (self.empty_tokens + out.tokens.float() - target_tokens).square().sum((1, 2))
        tokens_error = (tokens_error / target_tokens.square().sum((1, 2))).mean()
        pooled_error = (self.empty_pooled + out.pooled.float() - target_pooled).square().sum(-1).mean()
        txt, y = apply_reference(txt, y, out)
        return self.flux(img, img_ids, txt, txt_ids, t, y, guidance), DIRECT_LOSS_WEIGHT * (
            tokens_error + pooled_error
        )


def _tokens(z: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Scaled latents [B, C, h, w] -> packed tokens [B, N, 4C] and their token grid."""
    return pack_latents(z), (z.shape[2] // 2, z.shape[3] // 2)


class ReferenceStage(FileAdapterStage):
    """A FileAdapterStage whose adapter is a reference adapter."""

    name = "reference"

    def __init__(
        self, cfg: TrainConfig, ds: ImageCaptionDataset, info: DistInfo, resume: Path | None = None
    ) -> None:
        super().__init__(cfg, ReferencePairs(ds), info, resume)
        empty = self.text.encode([""])
        self.forward_module = ReferenceForward(
            self.flux,
            self.module,
            (empty.tokens.float().to(self.device), empty.pooled.float().to(self.device)),
        )

    def build_trainable(self) -> nn.Module:
        params = reference_params_for(self.flux.params, self.text.max_length)
        return seeded(self.cfg.seed, lambda: ReferenceAdapter(params).init_weights()).to(self.device)

    @torch.no_grad()
    def _reference_tokens(self, pictures: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """uint8 [B, 3, H, W] -> packed latents of the frozen autoencoder [B, N, 4C] and their token grid."""
        with previews.autocast(self.device, self.amp):
            z = self.ae.encode(to_float(pictures, self.device)).float()
        return _tokens(z)

    def forward_extras(self, batch: Batch, grid: tuple[int, int]) -> dict[str, Any]:
        """The batch's reference pictures as latent tokens for the forward module, which runs the adapter.
        The reference stays when the caption is dropped: then it is all the model has to go on."""
        if batch.reference_captions is None:
            raise CheckpointError("reference training: a batch without reference pictures reached the loss")
        if "reference_latent" in batch.draws:  # --cache-latents: the stored means, scaled and shifted here
            mean = batch.draws["reference_latent"].to(self.device, non_blocking=True)
            latents, grid = _tokens(self.ae.scale_latent(mean).float())
        elif batch.references is not None:
            latents, grid = self._reference_tokens(batch.references)
        else:
            raise CheckpointError("reference training: a batch without reference pictures reached the loss")
        target = self.text.encode(batch.reference_captions)
        tokens, pooled = target.tokens.float().to(self.device), target.pooled.float().to(self.device)
        return {"reference": (latents, grid, tokens, pooled)}

    # -- outputs ---------------------------------------------------------------------------------------

    adapter_file = REFERENCE_FILE

    def save_adapter(self, ema: nn.Module, path: Path, metadata: dict[str, str]) -> None:
        assert isinstance(self.module, ReferenceAdapter)
        save_reference_adapter(ema, self.module.params, path, metadata)

    # -- previews and evals with the EMA adapter ---------------------------------------------------------

    def _generate_with_references(
        self, ema: nn.Module, prompts: list[str], pictures: np.ndarray, seeds: list[int]
    ) -> np.ndarray:
        def context_fn(part: slice) -> ReferenceConditioning:
            tokens, (gh, gw) = self._reference_tokens(to_tensor(list(pictures[part])))
            return ema(tokens, gh, gw)

        return self.preview_images(prompts, seeds, context_fn=context_fn)

    def _eval_references(self, specs: list[dict], per_spec: int) -> np.ndarray:
        """Reference j of spec i: the ground-truth scene drawn from (EVAL_REFERENCE_SEED, i, j)."""
        return self.eval_scenes(specs, per_spec, EVAL_REFERENCE_SEED)

    @torch.no_grad()
    def sample_grid(self, ema: nn.Module) -> Any:
        """Top row: the references; below: images from them with an empty prompt."""
        n = self.cfg.num_samples
        if self.cfg.data == "shapes":
            refs = self._eval_references(previews.eval_specs(n), 1)
        else:  # the first images of the folder
            refs = self.folder_previews(n)[1]
        images = self._generate_with_references(ema, [""] * len(refs), refs, list(range(len(refs))))
        return previews.grid(np.concatenate([refs, images]), columns=len(refs))

    @torch.no_grad()
    def eval_images(
        self, ema: nn.Module, specs: list[dict], k: int, prompts: list[str], seeds: list[int]
    ) -> Any:
        """An empty prompt and a reference render of the spec: the score says what the reference carried."""
        refs = self._eval_references(specs, k)
        return self._generate_with_references(ema, [""] * len(prompts), refs, seeds)
