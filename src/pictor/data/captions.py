"""Caption augmentation for tag-style captions ("1girl, red hair, smiling"), as kohya's scripts do it.

A caption is split on "," into tags, each stripped; the first `keep_tokens` tags stay in front as they
are (kohya's --keep_tokens: usually a trigger word or the subject), the rest are shuffled
(--shuffle_caption) and then each dropped with probability `tag_dropout` (--caption_tag_dropout_rate);
the tags are joined again with ", ". Shuffling before dropping, in that order, is kohya's too.

Pure: every random number comes from the generator passed in, so a caller that seeds it from the sample's
position in the stream gets the same caption on every rank, worker and resume.
"""

from __future__ import annotations

import numpy as np


def split_tags(caption: str) -> list[str]:
    """The caption's comma-separated tags, stripped; empty ones (from "a, , b" or a trailing comma) are
    left out, so they cannot be shuffled into the middle as a stray ", ,"."""
    return [tag for tag in (t.strip() for t in caption.split(",")) if tag]


def augment_tags(
    caption: str,
    rng: np.random.Generator,
    *,
    shuffle: bool = False,
    keep_tokens: int = 0,
    tag_dropout: float = 0.0,
) -> str:
    """The caption with its tags past the first `keep_tokens` shuffled and/or dropped (see the module
    docstring). The generator is drawn from in a fixed order (permutation, then one number per tag past
    `keep_tokens`) only for the options that are on."""
    if not shuffle and tag_dropout <= 0.0:
        return caption  # nothing asked: the caption as written, not even re-spaced
    tags = split_tags(caption)
    fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle and len(flex) > 1:
        flex = [flex[i] for i in rng.permutation(len(flex))]
    if tag_dropout > 0.0 and flex:
        keep = rng.random(len(flex)) >= tag_dropout
        flex = [tag for tag, kept in zip(flex, keep, strict=True) if kept]
    return ", ".join(fixed + flex)
