"""Models from local Hugging Face folders (SigLIP for FLUX.1 Redux, Depth Anything for depth maps), loaded
the way every pictor load is: offline, safetensors only, and strict, where transformers would fill missing
weights with random ones and only log it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load_pretrained_strict"]


def load_pretrained_strict(cls: Any, folder: Path, what: str, error: type[Exception]) -> nn.Module:
    """``cls.from_pretrained(folder)`` in float32 from local files only, in eval mode without gradients.
    `what` names the model in messages ("SigLIP's vision tower"); failures raise `error`. Unexpected weights
    are allowed (google/siglip-so400m-patch14-384 is saved whole, text tower too); missing or mismatched
    ones are refused."""
    from transformers.utils import logging as hf_logging

    # transformers lists every unexpected tensor on every load; what matters is checked below.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(
            str(folder),
            local_files_only=True,
            use_safetensors=True,
            dtype=torch.float32,
            output_loading_info=True,
        )
    except Exception as exc:  # transformers raises many kinds; name the folder in every case
        raise error(f"could not load {what} from {folder}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    bad = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if bad:
        raise error(
            f"{folder}: {what} is missing or mismatches {len(bad)} weights ({', '.join(bad[:4])}"
            + (", ..." if len(bad) > 4 else "")
            + "); the folder is damaged or holds another model"
        )
    return model.eval().requires_grad_(False)
