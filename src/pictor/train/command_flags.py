"""`pictor train`'s flags: the argparse subparser of `pictor train autoencoder|t2i|lora|layout|reference|
controlnet ...`, with every option's help. :mod:`pictor.train.command` turns what it parses into a
TrainConfig and runs it.
"""

from __future__ import annotations

import argparse
from typing import Any

from pictor.train.config import STAGES


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    t = subparsers.add_parser(
        "train",
        help="train an autoencoder or a text-to-image model from scratch, or a LoRA, a layout or a "
        "reference adapter, or a ControlNet",
        description="Train in two stages: first `autoencoder`, then `t2i --autoencoder AE_RUN`; or adapt a "
        "trained model with `lora --base BUNDLE --data FOLDER`, or teach it layouts (boxes with phrases) "
        "with `layout --base BUNDLE --data shapes`, or image prompts with `reference --base BUNDLE --data "
        "shapes`, or a ControlNet that follows edge maps with `controlnet --base BUNDLE --data shapes`. "
        "Runs under torchrun for several processes "
        "(DDP; or, for t2i, --fsdp to shard the model). Outputs: OUT/log.jsonl, OUT/tb, OUT/samples, "
        "OUT/eval.jsonl, OUT/checkpoints/step-N "
        "(+ OUT/latest), OUT/final (the bundle; for lora, layout and reference the adapter, also copied "
        "to OUT/lora.safetensors, OUT/layout.safetensors or OUT/reference.safetensors; for controlnet a "
        "diffusers ControlNet folder, also copied to OUT/controlnet).",
    )
    t.add_argument("stage", choices=STAGES)
    t.add_argument("--out", required=True, help="run folder (logs, samples, checkpoints, final/)")
    t.add_argument("--data", default=None, help="'shapes' (default) or an image folder with captions")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="architecture preset (default: shapes-small)")
    src.add_argument("--config", default=None, help="JSON file of TrainConfig settings")
    t.add_argument("--autoencoder", default=None, help="t2i: AE run folder, AE checkpoint or bundle")
    t.add_argument(
        "--init",
        default=None,
        help="t2i: start from a trained bundle's weights (its architecture, autoencoder and text encoder) "
        "with a fresh optimizer and schedule, instead of at random",
    )
    t.add_argument("--base", default=None, help="lora, layout, reference: the model bundle to adapt (frozen)")
    t.add_argument("--rank", type=int, default=None, help="lora: adapter rank (16)")
    t.add_argument("--alpha", type=float, default=None, help="lora: alpha; scale = alpha / rank (= rank)")
    t.add_argument(
        "--targets",
        default=None,
        help="lora: layers to adapt, comma-separated groups (attn, mlp, mod, blocks, all), globs over "
        "FLUX module names (*.img_attn.qkv) or re:REGEX (default: blocks)",
    )
    t.add_argument(
        "--lora-dropout",
        type=float,
        default=None,
        help="lora: dropout on the adapter input (0; PEFT's lora_dropout: kohya's network_dropout drops the "
        "down projection's output instead)",
    )
    t.add_argument(
        "--rank-dropout",
        type=float,
        default=None,
        metavar="P",
        help="lora: while training, drop each sample's rank channels of the down projection with "
        "probability P, scaling the rest by 1/(1-P) (kohya's network_args rank_dropout; plain LoRA) (0)",
    )
    t.add_argument(
        "--module-dropout",
        type=float,
        default=None,
        metavar="P",
        help="lora: while training, leave each adapter out of a forward pass with probability P (kohya's "
        "network_args module_dropout; plain LoRA) (0)",
    )
    t.add_argument(
        "--scale-weight-norms",
        type=float,
        default=None,
        metavar="MAX",
        help="lora: max-norm regularisation, after each step scale every adapter whose update "
        "alpha/rank * up @ down has a norm above MAX back to MAX (kohya's --scale_weight_norms; 1 is a "
        "good start; plain LoRA); logs max_norm/keys_scaled, max_norm/max_key_norm, norm/avg_key_norm",
    )
    t.add_argument(
        "--loraplus-lr-ratio",
        type=float,
        default=None,
        metavar="R",
        help="lora: LoRA+, the B matrices learn R times faster than the A ones (kohya's loraplus_lr_ratio; "
        "16 is the paper's suggestion)",
    )
    t.add_argument(
        "--lora-init",
        default=None,
        metavar="FILE",
        help="lora: start the adapters from this LoRA file (pictor's, kohya's or diffusers' layout; kohya's "
        "--network_weights) instead of from zero; --rank at least the file's",
    )
    t.add_argument(
        "--lora-algo",
        default=None,
        help="lora: lora (default), lokr or loha (LyCORIS' LoKr / LoHa, saved in LyCORIS' kohya layout)",
    )
    t.add_argument(
        "--dora",
        action="store_true",
        help="lora: weight-decomposed (DoRA, LyCORIS' dora_wd) adapters, with any --lora-algo",
    )
    t.add_argument(
        "--lokr-factor",
        type=int,
        default=None,
        help="lora --lora-algo lokr: LyCORIS' factor, the size of the small Kronecker factor (-1: balanced)",
    )
    t.add_argument(
        "--controlnet-blocks",
        type=_block_counts,
        default=None,
        metavar="D,S",
        help="controlnet: its double and single blocks, copied from the base's first ones (default 2,0)",
    )
    t.add_argument(
        "--control",
        default=None,
        help="controlnet: what its control pictures are: canny (default; drawn from each training image, "
        "OpenCV-exact edges, thresholds 100 and 200, as `pictor preprocess canny` draws them), folder "
        "(read from --control-dir) or metadata (the picture each image's metadata.jsonl line names with "
        "conditioning_image_file_name, as Hugging Face's imagefolder names a second image, or "
        "conditioning_image, as diffusers' train_controlnet datasets do)",
    )
    t.add_argument(
        "--control-dir",
        default=None,
        metavar="DIR",
        help="controlnet on an image folder: its control pictures (depth maps, poses, edges, ...), one per "
        "image at the same relative path and stem (kohya's conditioning_data_dir); cropped and mirrored with "
        "their images; images without one are skipped",
    )
    t.add_argument("--resume", action="store_true", help="continue from OUT's newest checkpoint")
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help="image folders: train this many epochs instead (kohya's --max_train_epochs); the steps are "
        "worked out from the folder (with its repeats and buckets) at the start",
    )
    t.add_argument("--batch-size", type=int, default=None, help="per process; x grad-accum x ranks per step")
    t.add_argument("--grad-accum", type=int, default=None)
    t.add_argument(
        "--optimizer",
        choices=("adamw", "adafactor", "prodigy"),
        default=None,
        help="adamw (default), adafactor (factored: little state, for full fine-tunes) or prodigy (estimates "
        "its own step size; --lr scales it, 1.0 by default; needs prodigyopt)",
    )
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (stage default)")
    t.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None)
    t.add_argument("--warmup-steps", type=int, default=None)
    t.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (0: off)")
    t.add_argument("--ema-decay", type=float, default=None)
    t.add_argument("--caption-dropout", type=float, default=None, help="t2i: P(caption -> '') (0.1)")
    t.add_argument(
        "--loss-type",
        choices=("l2", "l1", "huber", "smooth_l1"),
        default=None,
        help="t2i, lora, layout, reference, controlnet: the flow loss's error: l2 (default), l1, or kohya's "
        "pseudo-Huber huber / smooth_l1 (quadratic under --huber-c, linear past it; kohya's --loss_type)",
    )
    t.add_argument("--huber-c", type=float, default=None, help="huber, smooth_l1: the threshold (0.1)")
    t.add_argument(
        "--huber-schedule",
        choices=("constant", "exponential"),
        default=None,
        help="huber, smooth_l1: the threshold constant (default) or --huber-scale x c**t, wide at t = 0 "
        "and c at pure noise (kohya's exponential)",
    )
    t.add_argument(
        "--huber-scale", type=float, default=None, help="huber, smooth_l1: scales the threshold (1)"
    )
    t.add_argument(
        "--timestep-sampling",
        choices=("logit_normal", "uniform", "shift", "flux_shift"),
        default=None,
        help="t2i, lora, layout, reference: training timesteps: logit_normal (default, SD3/FLUX), uniform, "
        "shift (logit-normal pushed toward noise by --timestep-shift; kohya's --timestep_sampling shift) or "
        "flux_shift (shifted by the image's token count, as FLUX.1 samples)",
    )
    t.add_argument(
        "--timestep-shift",
        type=float,
        default=None,
        help="with --timestep-sampling shift: the shift (3.0; kohya's --discrete_flow_shift, e.g. 3.1582)",
    )
    t.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="a guidance-distilled model (FLUX.1-dev): the value its guidance embedding gets while training "
        "(1.0, as kohya's FLUX.1 recipe; diffusers' scripts use 3.5)",
    )
    t.add_argument(
        "--flip-aug", action="store_true", help="image folders: mirror about half of the images left to right"
    )
    t.add_argument(
        "--shuffle-caption",
        action="store_true",
        help="image folders: shuffle a caption's comma-separated tags per sample (kohya's --shuffle_caption)",
    )
    t.add_argument(
        "--keep-tokens",
        type=int,
        default=None,
        help="with --shuffle-caption or --caption-tag-dropout: the first N tags stay as they are (0)",
    )
    t.add_argument(
        "--caption-tag-dropout",
        type=float,
        default=None,
        help="image folders: drop each comma-separated tag (past --keep-tokens) with this probability (0)",
    )
    t.add_argument(
        "--validation-split",
        type=float,
        default=None,
        help="image folders (t2i, lora, layout, reference): hold this fraction of the images out of training "
        "and log the flow loss on them at fixed timesteps and noise every --eval-every steps (eval.jsonl: "
        "val_loss)",
    )
    t.add_argument(
        "--cache-latents",
        action="store_true",
        help="image folders: encode every image once before training and train from the stored latents "
        "(kohya's --cache_latents_to_disk); kept in OUT/latent-cache or --latent-cache DIR",
    )
    t.add_argument(
        "--latent-cache",
        default=None,
        metavar="DIR",
        help="with --cache-latents: where the latents are kept (shared by runs on the same images and "
        "autoencoder)",
    )
    t.add_argument(
        "--buckets",
        action="store_true",
        help="image folders: aspect-ratio buckets of about --image-size squared pixels instead of square "
        "crops (kohya's --enable_bucket); each step's batch holds one bucket",
    )
    t.add_argument(
        "--folder-repeats",
        action="store_true",
        help="image folders: subfolders named <repeats>_<class tokens> (kohya's '10_sks dog') come that many "
        "times an epoch, and their images without a caption are captioned with the class tokens",
    )
    t.add_argument(
        "--alpha-mask",
        action="store_true",
        help="t2i, lora on image folders: weight the loss by each picture's alpha channel (kohya's "
        "--alpha_mask)",
    )
    t.add_argument(
        "--mask-dir",
        default=None,
        metavar="DIR",
        help="t2i, lora on image folders: weight the loss by a grey mask per picture (white counts), at the "
        "picture's relative folder and stem in DIR (kohya's --masked_loss)",
    )
    t.add_argument("--caption-ext", default=None, help="image folders: the caption file's extension (.txt)")
    t.add_argument("--kl-weight", type=float, default=None, help="autoencoder: KL weight (1e-6)")
    t.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="training size: the side of the square, or with --buckets of the buckets' area (preset's)",
    )
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--save-every", type=int, default=None, help="checkpoint cadence in steps (0: end only)")
    t.add_argument(
        "--save-every-epochs",
        type=int,
        default=None,
        help="image folders: a checkpoint every this many epochs instead (kohya's --save_every_n_epochs)",
    )
    t.add_argument("--keep", type=int, default=None, help="checkpoints kept (3)")
    t.add_argument("--sample-every", type=int, default=None, help="sample-grid cadence (0: off)")
    t.add_argument(
        "--sample-prompts",
        default=None,
        metavar="FILE",
        help="t2i, lora: the sample grids' prompts, one per line (kohya's --sample_prompts; # comments), "
        "image i with seed i; default: the data's own captions",
    )
    t.add_argument("--sample-steps", type=int, default=None, help="sampler steps of the sample grids (20)")
    t.add_argument(
        "--sample-guidance", type=float, default=None, help="guidance of the sample grids (the model's)"
    )
    t.add_argument("--eval-every", type=int, default=None, help="shapes-score cadence (0: off)")
    t.add_argument(
        "--eval-prompts", type=int, default=None, help="dev prompts per eval, spread over tags (24)"
    )
    t.add_argument("--eval-images", type=int, default=None, help="images per prompt in each eval (2)")
    t.add_argument("--device", default=None, help="cpu, cuda (default: cuda if present)")
    t.add_argument("--num-workers", type=int, default=None, help="data loader processes")
    t.add_argument(
        "--mixed-precision",
        choices=("auto", "bf16", "no"),
        default=None,
        help="auto (default): bf16 autocast on CUDA, float32 on the CPU; bf16: autocast on any device (on "
        "the CPU faster with AMX or AVX-512 BF16, and norms and softmax run in bf16 there too); no: float32",
    )
    t.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (CUDA)")
    t.add_argument(
        "--fp8-base",
        action="store_true",
        help="lora: hold the base's block weights in FP8 (half of bf16's memory; each layer widened as it "
        "runs); an FP8 bundle as --base is kept FP8 anyway",
    )
    t.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each transformer block in the backward pass: the same gradients with less memory, "
        "for about a third more time per step",
    )
    t.add_argument(
        "--fsdp",
        action="store_true",
        help="t2i under torchrun: shard weights, gradients and optimizer state over the ranks (FSDP2), "
        "for a transformer that does not fit one device; checkpoints stay whole",
    )
    t.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after this many minutes of this run (checkpoint + final/, as at --max-steps); "
        "--resume continues. The LR schedule still spans --max-steps",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    return t


def _block_counts(text: str) -> list[int]:
    """--controlnet-blocks D,S -> [D, S] (checked further by TrainConfig.validate)."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two whole numbers D,S (double and single blocks), got {text!r}"
        ) from None
