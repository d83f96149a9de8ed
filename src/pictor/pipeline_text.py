"""What a Pipeline reads of its prompts: their token states from the text encoder (placed on the device in
the pipeline's dtype), and the notices that name the end of a prompt the encoder does not read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pictor.models.text import TextEmbeddings
from pictor.prompt_weights import PromptWeightError, parse_weights, plain_text

if TYPE_CHECKING:
    from pictor.pipeline import Pipeline

__all__ = ["encode_text", "prompt_notices"]


def prompt_notices(
    pipe: Pipeline, prompt: str | None, negative_prompt: str | None = None, weighted: bool = False
) -> list[str]:
    """What `resolve_request` warns about these texts: for each that is longer than the text encoder
    reads, a sentence naming the end that is not read; empty when all of both is read. Public so that
    a caller that cannot catch warnings safely (the server's worker thread: `warnings.catch_warnings`
    is process-wide) can hand the same sentences to its user. `weighted`: the texts carry prompt
    weights, which the encoder does not read."""
    notices = []
    for what, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        try:
            read = plain_text(text or "", weighted)
        except PromptWeightError:  # resolution refuses it, naming the weight; nothing to say here
            continue
        dropped = pipe.text_encoder.cut_off(read) if read else ""
        if dropped:
            notices.append(
                f"the {what} is longer than the text encoder's {pipe.text_encoder.max_length} tokens; "
                f"this end of it is not read: '{dropped}'"
            )
    return notices


def encode_text(pipe: Pipeline, prompts: list[str], weighted: bool = False) -> TextEmbeddings:
    """The prompts' token states; `weighted`: read for prompt weights (`pictor.prompt_weights`)."""
    if weighted:
        emb = pipe.text_encoder.encode_weighted([parse_weights(p).pieces for p in prompts])
    else:
        emb = pipe.text_encoder.encode(prompts)
    return TextEmbeddings(
        tokens=emb.tokens.to(pipe.device, pipe.dtype),
        mask=emb.mask.to(pipe.device),
        pooled=emb.pooled.to(pipe.device, pipe.dtype),
    )
