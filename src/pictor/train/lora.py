"""The LoRA stage: the t2i flow loss on a frozen base bundle, training only low-rank adapters.

The trained module is the adapter tree (`pictor.models.lora.adapter_tree`): its state dict is the native
LoRA file layout, so optimizer state, EMA, checkpoints and resume work on the adapters alone and the
base weights are never written. Sample grids and evals run the base model with the EMA adapters swapped
in. Outputs: OUT/checkpoints/step-N/lora.safetensors (+ optimizer, RNG and raw adapter weights for
resume), OUT/final/lora.safetensors and a copy at OUT/lora.safetensors.

A resumed run checks that the base is the same model (SHA-256 of its transformer weights).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pictor import __version__
from pictor.checkpoint import (
    CheckpointError,
    load_bundle,
    load_into,
    model_hash,
    read_safetensors,
    staged_file,
    state_dict_hash,
)
from pictor.locate import resolve
from pictor.lora_files import save_adapters, save_lycoris
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import Flux, FluxParams
from pictor.models.lora import add_lora, max_norm_adapters
from pictor.models.lycoris_train import add_lycoris
from pictor.models.text import TextEmbeddings, TextEncoder
from pictor.models.weight_storage import FP8_STORAGE, is_fp8, place, quantized_formats, store_fp8
from pictor.t5_gguf_files import build_text_encoder
from pictor.train.config import TrainConfig, resume_refusal
from pictor.train.data import ImageCaptionDataset
from pictor.train.distributed import DistInfo
from pictor.train.lora_init import init_adapters
from pictor.train.stages import Stage, seeded
from pictor.train.state import STATE_FILE
from pictor.train.t2i import T2IStage

LORA_FILE = "lora.safetensors"
ADAPTER = "default"
TEXT_CACHE_BYTES = 1 << 30


class CachedText:
    """The frozen text encoder with a per-caption cache (kohya's --cache_text_encoder_outputs): a LoRA
    set repeats a few captions every epoch, and encoding them again is most of a small model's step.

    Each caption is encoded on its own, so an entry never depends on which batch first needed it and a
    resumed run sees the same numbers. Past ``max_bytes`` new captions are encoded without caching.
    """

    def __init__(self, encoder: TextEncoder, max_bytes: int = TEXT_CACHE_BYTES) -> None:
        self.encoder = encoder
        self.max_bytes = max_bytes
        self.bytes = 0
        self.cache: dict[str, TextEmbeddings] = {}

    def __getattr__(self, name: str) -> Any:  # context_dim, pooled_dim, config(), ... of the encoder
        if name == "encoder":  # not set yet (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.encoder, name)

    def _one(self, prompt: str) -> TextEmbeddings:
        if prompt in self.cache:
            return self.cache[prompt]
        emb = self.encoder.encode([prompt])
        size = sum(t.numel() * t.element_size() for t in (emb.tokens, emb.mask, emb.pooled))
        if self.bytes + size <= self.max_bytes:
            self.cache[prompt] = emb
            self.bytes += size
        return emb

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        if not prompts:
            return self.encoder.encode([])
        rows = [self._one(p) for p in prompts]
        return TextEmbeddings(
            tokens=torch.cat([r.tokens for r in rows]),
            mask=torch.cat([r.mask for r in rows]),
            pooled=torch.cat([r.pooled for r in rows]),
        )


class LoRAStage(T2IStage):
    """T2IStage's loss, draws, previews and evals; its own model setup and outputs."""

    name = "lora"

    def __init__(
        self, cfg: TrainConfig, ds: ImageCaptionDataset, info: DistInfo, resume: Path | None = None
    ) -> None:
        Stage.__init__(self, cfg, ds, info)  # not T2IStage's: nothing is built from scratch here
        if not cfg.base:
            raise CheckpointError(f"{self.name} training needs --base BUNDLE (the trained model to adapt)")
        ref = resolve(cfg.base)
        if ref.path is None:
            raise CheckpointError(f"--base {cfg.base}: a preset is untrained; give a trained model bundle")
        bundle = load_bundle(ref.path)
        self.base_path = ref.path.resolve()
        self.base_name = bundle.config.name
        self.base_hash = model_hash(bundle.config) or state_dict_hash(bundle.transformer)
        if resume is not None:
            self._check_same_base(resume)

        with torch.device("meta"):
            ae = AutoEncoder(AutoEncoderParams.from_dict(dict(bundle.config.autoencoder)))
            flux = Flux(FluxParams.from_dict(dict(bundle.config.model)))
        # Without autocast (--mixed-precision no, or auto on the CPU) the model computes in float32 whatever
        # the bundle stores: fp16 weights would meet float32 adapters and inputs. Under bf16 autocast on
        # CUDA the transformer keeps its stored dtype (half the memory of a FLUX.1-size base); on the CPU it
        # stays float32 even then, as before CPU autocast was offered: a half-precision base under CPU
        # autocast has not been measured against it. The autoencoder, small and fed float32 pixels, is
        # float32 everywhere.
        base_dtype = None if self.amp and self.device.type == "cuda" else torch.float32
        self.ae = load_into(ae, bundle.autoencoder, f"{ref.path}: autoencoder", torch.float32)
        self.ae.to(self.device)
        self.ae.eval().requires_grad_(False)
        stored = any(is_fp8(t) for t in bundle.transformer.values()) or quantized_formats(bundle.transformer)
        if cfg.fp8_base or stored:
            # The blocks' weights stay (or become) FP8 and are widened one layer at a time, also for the
            # backward pass (kohya's --fp8_base): half of a bf16 base's memory; the rest computes wide.
            # A GGUF base's quantized layers likewise stay in their GGML blocks (a QLoRA-style run).
            self.flux = load_into(flux, bundle.transformer, f"{ref.path}: transformer")
            try:
                store_fp8(self.flux, FP8_STORAGE if cfg.fp8_base else None)
            except ValueError as exc:
                raise CheckpointError(f"--fp8-base: {exc}") from None
            place(self.flux, self.device, base_dtype or torch.bfloat16)
        else:
            self.flux = load_into(flux, bundle.transformer, f"{ref.path}: transformer", base_dtype)
            self.flux.to(self.device)
        self.flux.requires_grad_(False)
        text = build_text_encoder(bundle.config.text_encoder).to(self.device)
        # Shuffled or thinned tags make nearly every caption new: a cache would only fill up (kohya refuses
        # --cache_text_encoder_outputs with --shuffle_caption for the same reason).
        varied = cfg.caption_shuffle or cfg.caption_tag_dropout > 0
        self.text = text if varied else CachedText(text)  # type: ignore[assignment]
        self.ae_source = self.base_path
        multiple = 2 * self.ae.params.downsample_factor
        if int(cfg.image_size or 0) % multiple:
            raise CheckpointError(
                f"image_size {cfg.image_size} must be a multiple of {multiple} for this autoencoder "
                f"(factor {multiple // 2} x 2x2 latent patches)"
            )
        self._check_dims(self.flux.params)

        self.module = self.build_trainable()
        if cfg.lora_init is not None and resume is None:  # a resumed run's adapters are its checkpoint's
            note = init_adapters(self.flux, ADAPTER, cfg.lora_init)
            if info.is_main:
                print(f"pictor train: {note}", file=sys.stderr, flush=True)
        self.forward_module = self.flux
        if cfg.compile and self.device.type == "cuda":
            self.flux.compile()

    def build_trainable(self) -> nn.Module:
        """The trained module beside the frozen base: here the LoRA adapter tree."""
        cfg = self.cfg
        if self.lycoris:
            # LoKr, LoHa, DoRA: LyCORIS' shapes and init (one factor at zero), drawn under the run's seed;
            # their tree's state dict is the LyCORIS file (kohya names), float32 as LoRA's.
            return seeded(
                cfg.seed,
                lambda: add_lycoris(
                    self.flux,
                    ADAPTER,
                    cfg.lora_targets,
                    cfg.lora_algo,
                    cfg.lora_rank,
                    cfg.lora_alpha,
                    cfg.lora_dora,
                    cfg.lokr_factor,
                    dtype=torch.float32,
                ),
            )
        # A is drawn under the run's seed; B starts at zero, so step 0 is exactly the base model. The
        # adapters are float32 whatever the base's dtype (AdamW on bf16 weights loses small updates).
        return seeded(
            cfg.seed,
            lambda: add_lora(
                self.flux,
                ADAPTER,
                cfg.lora_targets,
                cfg.lora_rank,
                cfg.lora_alpha,
                cfg.lora_dropout,
                dtype=torch.float32,
                rank_dropout=cfg.rank_dropout,
                module_dropout=cfg.module_dropout,
            ),
        )

    @property
    def lycoris(self) -> bool:
        """Whether the run trains a LyCORIS adapter (LoKr, LoHa or any DoRA), saved in LyCORIS' layout."""
        return self.cfg.lora_algo != "lora" or self.cfg.lora_dora

    def _check_same_base(self, checkpoint: Path) -> None:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        # The adapter's kind and shape (and a LyCORIS adapter's alpha, a buffer in its weights, which loading
        # the checkpoint would put back) are fixed (older runs stored the LyCORIS keys not: plain LoRA, the
        # defaults); another value would only surface as a state-dict mismatch or be silently undone.
        # (Layout and reference runs fix only their optimizer: see `fixed_on_resume`.)
        before = TrainConfig.from_dict(state["config"], str(checkpoint))
        refusal = resume_refusal(before, dataclasses.asdict(self.cfg), str(checkpoint))
        if refusal:
            raise CheckpointError(refusal)
        saved = state.get("stage", {})
        if saved.get("base_hash") not in (None, self.base_hash):
            raise CheckpointError(
                f"{checkpoint}: this {self.name} run was trained on base {saved.get('base')} "
                f"(transformer {saved['base_hash'][:12]}), but --base {self.cfg.base} has transformer "
                f"{self.base_hash[:12]}; resume with the same base"
            )

    def after_step(self) -> dict[str, float]:
        """kohya's --scale_weight_norms after the optimizer step, logged under kohya's names."""
        if self.cfg.scale_weight_norms is None:
            return {}
        scaled, mean, largest = max_norm_adapters(self.module, self.cfg.scale_weight_norms)
        return {"max_norm/keys_scaled": scaled, "max_norm/max_key_norm": largest, "norm/avg_key_norm": mean}

    # -- outputs ---------------------------------------------------------------------------------------

    def metadata(self, step: int) -> dict[str, str]:
        c = self.cfg
        training = {
            **self.training_info(step),
            "base": str(self.base_path),
            "lora_dropout": c.lora_dropout,
            "rank_dropout": c.rank_dropout,
            "module_dropout": c.module_dropout,
            "scale_weight_norms": c.scale_weight_norms,
        }
        meta = {
            "lora_targets": c.lora_targets,
            "lora_algo": c.lora_algo + ("+dora" if c.lora_dora else ""),
            "base_model": self.base_name,
            "base_model_hash": self.base_hash,
            "pictor_version": __version__,
            "pictor_training": json.dumps(training),
        }
        # kohya's header keys for its regularisers, as sd-scripts writes them (network_args as strings)
        if c.scale_weight_norms is not None:
            meta["ss_scale_weight_norms"] = str(c.scale_weight_norms)
        args = {
            k: str(v)
            for k, v in (("rank_dropout", c.rank_dropout), ("module_dropout", c.module_dropout))
            if v
        }
        if args and not self.lycoris:  # a LyCORIS file has its own ss_network_args (these are refused there)
            meta["ss_network_args"] = json.dumps(args)
        return meta

    def write_weights(self, folder: Path, ema: nn.Module, step: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save = save_lycoris if self.lycoris else save_adapters
        save(ema, folder / LORA_FILE, self.metadata(step))

    def ema_weights(self, checkpoint: Path) -> dict[str, Tensor]:
        return read_safetensors(checkpoint / LORA_FILE)

    def publish(self, final: Path) -> Path:
        """Copy final/lora.safetensors to OUT/lora.safetensors (atomically) and return that path."""
        out = Path(self.cfg.out) / LORA_FILE
        with staged_file(out) as tmp:
            shutil.copyfile(final / LORA_FILE, tmp)
        return out

    def state(self) -> dict[str, Any]:
        return {"base": str(self.base_path), "base_hash": self.base_hash}

    def training_info(self, step: int) -> dict[str, Any]:
        c = self.cfg
        return {
            **super().training_info(step),
            "rank": c.lora_rank,
            "alpha": c.lora_alpha or c.lora_rank,
            "targets": c.lora_targets,
            "algo": c.lora_algo,
            "dora": c.lora_dora,
            **({"lokr_factor": c.lokr_factor} if c.lora_algo == "lokr" else {}),
        }

    # -- previews with the EMA adapters ------------------------------------------------------------------

    @contextmanager
    def _with(self, ema: nn.Module) -> Iterator[Flux]:
        """The base model carrying the EMA adapters for the duration (the live weights are put back)."""
        live = [p.detach().clone() for p in self.module.parameters()]
        with torch.no_grad():
            for p, e in zip(self.module.parameters(), ema.parameters(), strict=True):
                p.copy_(e)
        try:
            yield self.flux
        finally:
            with torch.no_grad():
                for p, saved in zip(self.module.parameters(), live, strict=True):
                    p.copy_(saved)

    def sample_grid(self, ema: nn.Module) -> Any:
        with self._with(ema) as flux:
            return super().sample_grid(flux)

    def evaluate(self, ema: nn.Module) -> dict[str, Any] | None:
        with self._with(ema) as flux:
            return super().evaluate(flux)
