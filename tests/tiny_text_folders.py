"""Tiny random CLIP and T5 text encoders saved as local folders (save_pretrained), and the parts of a
diffusers FLUX.1 pipeline that hold a pictor Pipeline's weights: for the tests that run whole diffusers
pipelines beside pictor's (FLUX.1 Kontext, FLUX.1 Fill)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
import transformers

_LETTERS = list(string.ascii_lowercase)
CLIP_LEN, T5_LEN = 16, 20


def clip_folder(folder: Path) -> None:
    # BPE vocab with no merges: every word spelled letter by letter (as tests/models/test_text.py)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(_LETTERS)})
    vocab.update({c + "</w>": i + 2 + len(_LETTERS) for i, c in enumerate(_LETTERS)})
    # model_max_length: diffusers pads CLIP prompts to it (77 for the real tokenizer)
    transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_LEN).save_pretrained(folder)
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=24,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(folder)


def t5_folder(folder: Path) -> None:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in _LETTERS] + [("▁" + c, -2.5) for c in _LETTERS]
    transformers.T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(folder)
    config = transformers.T5Config(
        vocab_size=len(pieces),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(1)
    transformers.T5EncoderModel(config).save_pretrained(folder)


def flux_text_encoders(root: Path) -> dict[str, Any]:
    """Tiny CLIP and T5 folders under ``root`` and the FLUX.1 text-encoder config that reads them."""
    clip_folder(root / "clip")
    t5_folder(root / "t5")
    return {
        "kind": "flux",
        "t5": {"kind": "t5", "path": str(root / "t5"), "max_length": T5_LEN},
        "clip": {"kind": "clip", "path": str(root / "clip"), "max_length": CLIP_LEN},
    }


def diffusers_components(root: Path, pipe: Any) -> dict[str, Any]:
    """What a diffusers FLUX.1 pipeline (FluxKontextPipeline, FluxFillPipeline) takes, holding a pictor
    Pipeline's weights: its autoencoder and transformer mapped by diffusers' own converter and ours, the
    text encoders from the folders under ``root`` (clip_folder, t5_folder), FLUX.1's scheduler settings."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from tiny_flux import load_benchmark_module, load_reference

    vae_config = load_benchmark_module("_ae_reference").diffusers_config(pipe.autoencoder.params)
    vae = diffusers.AutoencoderKL(**vae_config).eval()
    vae.load_state_dict(
        convert_ldm_vae_checkpoint(dict(pipe.autoencoder.state_dict()), vae_config), strict=True
    )
    params = pipe.transformer.params
    transformer = load_reference().build_reference(
        params, {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    )
    return {
        "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        "vae": vae,
        "text_encoder": transformers.CLIPTextModel.from_pretrained(root / "clip"),
        "tokenizer": transformers.CLIPTokenizer.from_pretrained(root / "clip"),
        "text_encoder_2": transformers.T5EncoderModel.from_pretrained(root / "t5"),
        "tokenizer_2": transformers.T5Tokenizer.from_pretrained(root / "t5"),
        "transformer": transformer,
    }
